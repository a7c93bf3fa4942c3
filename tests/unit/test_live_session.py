"""The in-process live session: raw media in any chunk sizes -> decoded avatar frames, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.config import tiny
from avatar_forcing.engine.live_session import LiveSession
from avatar_forcing.engine.motion_stream import StreamOptions
from avatar_forcing.media.face_crop import FaceCropper, NoFaceError
from avatar_forcing.media.io import load_audio, load_image, read_video
from avatar_forcing.nn.model import random_model

SAMPLES = Path(__file__).parents[2] / "samples"
FRAMES = 30  # 1.2 s: warm start, then three blocks


@pytest.fixture(scope="module")
def media():
    model = random_model(tiny(), seed=0)
    portrait = FaceCropper(64).crop_portrait(load_image(SAMPLES / "portrait.png"), "portrait.png")
    speech = load_audio(SAMPLES / "avatar_speech.wav")[: FRAMES * 640]
    clip = read_video(SAMPLES / "user.mp4")
    return model, portrait, speech, clip.audio[: FRAMES * 640], clip.frames[:FRAMES]


def run(session: LiveSession, speech, user_audio, frames, chunk: int, stop_at: int | None = None):
    """Feed all three streams in `chunk`-sample pieces (frames at the matching pace)."""
    out = []
    for start in range(0, speech.shape[0], chunk):
        if stop_at is not None and start >= stop_at:
            return out
        session.push_avatar_audio(speech[start : start + chunk])
        session.push_user_audio(user_audio[start : start + chunk])
        session.push_user_frames(frames[start // 640 : (start + chunk) // 640])
        out += session.pull()
    session.finish()
    return out + session.pull()


def test_live_session_emits_every_frame_in_order_for_any_chunking(media):
    model, portrait, speech, user_audio, frames = media
    results = {}
    for chunk in (640, 1000):
        session = LiveSession(model, portrait, StreamOptions(warm_start=True), seed=1)
        blocks = run(session, speech, user_audio, frames, chunk)
        assert [b.frame_index for b in blocks] == list(range(0, FRAMES, 10))
        video = np.concatenate([b.frames for b in blocks])
        assert video.shape == (FRAMES, 64, 64, 3) and video.dtype == np.uint8
        results[chunk] = np.concatenate([b.latents.numpy() for b in blocks])
    # Streaming audio features are computed on the same bounded windows whatever the chunking.
    np.testing.assert_allclose(results[640], results[1000], atol=1e-4)


def test_live_session_resumes_from_bytes(media):
    model, portrait, speech, user_audio, frames = media
    whole = run(LiveSession(model, portrait, StreamOptions(warm_start=True), seed=1), speech, user_audio, frames, 640)
    first = LiveSession(model, portrait, StreamOptions(warm_start=True), seed=1)
    head = run(first, speech, user_audio, frames, 640, stop_at=15 * 640)
    resumed = LiveSession(model, portrait, StreamOptions(warm_start=True), seed=99)
    resumed.load_bytes(first.to_bytes())
    tail = []
    for start in range(15 * 640, speech.shape[0], 640):
        resumed.push_avatar_audio(speech[start : start + 640])
        resumed.push_user_audio(user_audio[start : start + 640])
        resumed.push_user_frames(frames[start // 640 : start // 640 + 1])
        tail += resumed.pull()
    resumed.finish()
    tail += resumed.pull()
    got = np.concatenate([b.latents.numpy() for b in head + tail])
    np.testing.assert_array_equal(got, np.concatenate([b.latents.numpy() for b in whole]))


def test_live_session_bad_input_is_a_clear_error(media):
    model, portrait, *_ = media
    session = LiveSession(model, portrait)
    with pytest.raises(ValueError, match="sample"):
        session.push_avatar_audio(np.zeros(640, np.float32), sample_rate=44100)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        session.push_user_audio(np.full(640, np.nan, np.float32))
    with pytest.raises(NoFaceError, match="user camera frame 0"):
        session.push_user_frames(np.zeros((1, 120, 160, 3), np.uint8))
    with pytest.raises(ValueError, match="live session state"):
        session.load_bytes(b"garbage")
