"""When the ingress schedules a block, and the audio window it reads for it (services/ingress/schedule.py)."""

from __future__ import annotations

import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME
from services.ingress.media import MediaState
from services.ingress.schedule import next_block, read_window
from services.wire.protos import pb

BLOCK = 10


def speak(media: MediaState, source: int, first_frame: int, frames: int, value: int = 1000) -> None:
    """`frames` frames of constant audio from `first_frame` on, a frame per chunk."""
    pcm = np.full(SAMPLES_PER_FRAME, value, np.int16).tobytes()
    for index in range(first_frame, first_frame + frames):
        media.on_audio(pb.AudioChunk(source=source, timestamp_us=index * 40_000, sample_rate=16000, pcm_s16le=pcm))


def live(frames: int) -> MediaState:
    """A session whose user audio has arrived up to `frames` frames, every complete block scheduled."""
    media = MediaState()
    speak(media, pb.AVATAR, 0, frames)
    speak(media, pb.USER, 0, frames, value=500)
    while (span := next_block(media, BLOCK, 0)) is not None:
        media.next_block_frame = span.first + span.frames
    return media


def test_a_block_waits_for_its_last_frame_of_live_media() -> None:
    media = live(27)
    assert media.next_block_frame == 20
    assert next_block(media, BLOCK, 0) is None  # frames 27..29 have not arrived
    speak(media, pb.USER, 27, 3, value=500)
    span = next_block(media, BLOCK, 0)
    assert (span.first, span.frames, span.padded) == (20, BLOCK, False)


def test_after_an_interrupt_the_block_at_the_cursor_is_scheduled_at_once_with_silence_for_what_is_missing() -> None:
    media = live(27)
    interrupted = media.on_interrupt(prompt=True)
    assert interrupted.frame_index == 20
    span = next_block(media, BLOCK, 0)
    assert (span.first, span.frames, span.last, span.padded) == (20, BLOCK, False, True)
    window, left = read_window(span, media.user, media.horizon(), left_context_s=0.4, lookahead_frames=0)
    assert left == 10 * SAMPLES_PER_FRAME
    # the whole block is in the window, so the audio encoder can return its 10 frames
    assert window.shape[0] == (10 + BLOCK) * SAMPLES_PER_FRAME
    arrived = (27 - 10) * SAMPLES_PER_FRAME
    assert np.all(window[:arrived] > 0) and not np.any(window[arrived:])
    # the avatar's speech after the cursor was dropped: its window is silent from the block on
    avatar, _ = read_window(span, media.avatar, media.horizon(), left_context_s=0.4, lookahead_frames=0)
    assert np.all(avatar[:left] > 0) and not np.any(avatar[left:])


def test_only_the_first_block_after_an_interrupt_is_prompt() -> None:
    media = live(27)
    media.on_interrupt(prompt=True)
    media.on_interrupt(prompt=True)  # a second Interrupt before the block went: still one block
    span = next_block(media, BLOCK, 0)
    media.prompt = False  # what the pipeline does when it schedules the block
    media.next_block_frame = span.first + span.frames
    assert next_block(media, BLOCK, 0) is None
    speak(media, pb.USER, 27, 13, value=500)  # frames 27..39: the next block is complete
    assert next_block(media, BLOCK, 0).padded is False


def test_without_prompt_the_block_after_an_interrupt_waits_for_its_media() -> None:
    media = live(27)
    media.on_interrupt(prompt=False)
    assert next_block(media, BLOCK, 0) is None


def test_an_interrupt_after_the_input_ended_schedules_nothing_new() -> None:
    media = live(20)
    media.ended = True
    media.on_interrupt(prompt=True)
    assert media.prompt is False
    assert next_block(media, BLOCK, 0) is None  # nothing begun after the cursor
