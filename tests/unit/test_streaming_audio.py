"""Streaming audio features: chunking invariance, exact windows, state round-trip, bad input."""

from __future__ import annotations

import io
import wave as wav_io

import numpy as np
import pytest
import torch

from avatar_forcing.config import SAMPLES_PER_FRAME, tiny
from avatar_forcing.diagnostics import audio_drift
from avatar_forcing.engine.streaming_audio import StreamingAudioFeatures
from avatar_forcing.nn.audio_encoder import AudioEncoder, normalize_waveform, num_frames_for

NUM_SAMPLES = 12 * SAMPLES_PER_FRAME + 250  # 12.4 frames: the last one is partial


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(tiny().audio).eval()


@pytest.fixture(scope="module")
def wave() -> np.ndarray:
    g = np.random.default_rng(0)
    t = np.arange(NUM_SAMPLES) / 16000
    envelope = 0.2 + 0.8 * (np.sin(2 * np.pi * 1.5 * t) > 0)  # louder and quieter stretches
    return ((np.sin(2 * np.pi * 220 * t) * 0.3 + 0.05 * g.standard_normal(NUM_SAMPLES)) * envelope).astype(np.float32)


def stream_all(stream: StreamingAudioFeatures, wave: np.ndarray, chunk: int) -> torch.Tensor:
    outputs = [stream.push(wave[i : i + chunk]) for i in range(0, len(wave), chunk)]
    outputs.append(stream.flush())
    return torch.cat(outputs)


@torch.no_grad()
def whole_clip(encoder: AudioEncoder, wave: np.ndarray) -> torch.Tensor:
    return encoder(torch.from_numpy(wave)[None], num_frames_for(len(wave)))[0]


@pytest.mark.parametrize(
    "settings",
    [
        {"left_context_s": 0.2, "lookahead_frames": 2, "hop_frames": 1},
        {"left_context_s": 0.16, "lookahead_frames": 0, "hop_frames": 4},
    ],
)
def test_chunk_size_does_not_change_features(encoder, wave, settings):
    results = {
        chunk: stream_all(StreamingAudioFeatures(encoder, **settings), wave, chunk) for chunk in (1, 333, 640, 4000)
    }
    expected_frames = num_frames_for(NUM_SAMPLES)
    for chunk, features in results.items():
        assert features.shape == (expected_frames, 512), chunk
        torch.testing.assert_close(features, results[640], atol=0, rtol=0, msg=f"chunk {chunk}")


def test_window_covering_the_clip_equals_whole_clip(encoder, wave):
    """Only when left context AND lookahead cover the clip does every frame see the same audio."""
    clip_frames = num_frames_for(NUM_SAMPLES)
    stream = StreamingAudioFeatures(encoder, left_context_s=clip_frames / 25, lookahead_frames=clip_frames)
    assert stream.push(wave).shape[0] == 0  # everything waits for the end of the stream
    streamed = stream.flush()
    torch.testing.assert_close(streamed, whole_clip(encoder, wave), atol=0, rtol=0)


def test_bounded_window_is_the_documented_window(encoder, wave):
    """Honest statement of what a bounded stream computes: frame t comes from the window
    [t - left, t + 1 + lookahead) normalised on its own, not from the whole clip."""
    left, lookahead = 3, 2
    streamed = stream_all(
        StreamingAudioFeatures(encoder, left_context_s=left / 25, lookahead_frames=lookahead, hop_frames=1),
        wave,
        640,
    )
    total = num_frames_for(NUM_SAMPLES)
    x = torch.from_numpy(wave)
    with torch.no_grad():
        for t in (0, 1, 5, total - 3, total - 1):
            start, end = max(0, t - left), min(t + 1 + lookahead, total)
            window = x[start * 640 : min(end * 640, NUM_SAMPLES)][None]
            expected = encoder(normalize_waveform(window), end - start, normalize=False)[0, t - start]
            torch.testing.assert_close(streamed[t], expected, atol=0, rtol=0, msg=f"frame {t}")
    # and it is not the whole-clip feature: the drift is real (measured in docs/audio-streaming.md)
    assert (streamed - whole_clip(encoder, wave)).abs().max() > 1e-3


def test_emission_schedule_and_bounded_buffer(encoder, wave):
    stream = StreamingAudioFeatures(encoder, left_context_s=0.12, lookahead_frames=2, hop_frames=1)
    emitted = 0
    for k in range(1, 12):
        emitted += stream.push(wave[(k - 1) * 640 : k * 640]).shape[0]
        assert emitted == max(0, k - 2)  # frame t is out once frame t + lookahead is complete
        assert stream.frames_emitted == emitted
        assert stream.buffer.shape[0] <= (stream.window_frames + 1) * 640
    assert stream.latency_frames == 2
    assert stream.window_frames == 3 + 1 + 2


def test_state_round_trip(encoder, wave):
    settings = {"left_context_s": 0.2, "lookahead_frames": 1, "hop_frames": 2}
    reference = stream_all(StreamingAudioFeatures(encoder, **settings), wave, 500)

    first = StreamingAudioFeatures(encoder, **settings)
    head = [first.push(wave[i : i + 500]) for i in range(0, 4000, 500)]
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)  # plain tensors and ints
    blob.seek(0)
    state = torch.load(blob, weights_only=True)

    second = StreamingAudioFeatures(encoder, **settings)
    second.load_state_dict(state)
    tail = [second.push(wave[i : i + 500]) for i in range(4000, len(wave), 500)] + [second.flush()]
    torch.testing.assert_close(torch.cat(head + tail), reference, atol=0, rtol=0)

    other = StreamingAudioFeatures(encoder, left_context_s=0.2, lookahead_frames=3, hop_frames=2)
    with pytest.raises(ValueError, match="lookahead_frames"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="buffer"):
        second.load_state_dict({**state, "buffer": torch.zeros(3)})


def test_empty_stream_and_empty_chunks(encoder):
    stream = StreamingAudioFeatures(encoder)
    assert stream.push(np.zeros(0, np.float32)).shape == (0, 512)
    assert stream.flush().shape == (0, 512)
    with pytest.raises(RuntimeError, match="reset"):
        stream.push(np.zeros(10, np.float32))
    stream.reset()
    assert stream.push(np.zeros(640 * 4, np.float32)).shape == (0, 512)  # the first 10-frame hop is not done
    assert stream.push(np.zeros(640 * 6, np.float32)).shape == (10, 512)


@pytest.mark.parametrize(
    ("samples", "kwargs", "match"),
    [
        (np.array([0.0, np.nan], np.float32), {}, "NaN"),
        (np.zeros((2, 10), np.float32), {}, "shape"),
        (np.zeros(10, np.int16), {}, "dtype"),
        (np.zeros(10, np.float32), {"sample_rate": 48000}, "sample rate"),
    ],
)
def test_bad_chunks_raise_naming_the_field(encoder, samples, kwargs, match):
    stream = StreamingAudioFeatures(encoder)
    with pytest.raises(ValueError, match=match) as info:
        stream.push(samples, **kwargs)
    assert str(info.value).startswith("samples:")
    assert stream.samples_received == 0  # a rejected chunk leaves the state alone


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"left_context_s": -1.0}, "left_context_s"),
        ({"lookahead_frames": -1}, "lookahead_frames"),
        ({"hop_frames": 0}, "hop_frames"),
    ],
)
def test_bad_settings_raise_naming_the_field(encoder, kwargs, field):
    with pytest.raises(ValueError, match=field):
        StreamingAudioFeatures(encoder, **kwargs)


def test_audio_drift_tool_smoke(tmp_path, wave, capsys):
    """The measurement behind docs/audio-streaming.md runs and says loudly that weights are random."""
    path = tmp_path / "speech.wav"
    with wav_io.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes())
    argv = ["--wav", str(path), "--config", "tiny", "--windows", "0.2", "--lookaheads", "0", "--hops", "4"]
    assert audio_drift.main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    row = [line for line in out.splitlines() if line.startswith("| 0.2 | 0 | 4 |")]
    assert len(row) == 1
