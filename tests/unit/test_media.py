"""Media I/O: PyAV round trips, resampling, image helpers and input validation."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avatar_forcing.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar_forcing.media.io import (
    VideoWriter,
    from_uint8,
    load_audio,
    load_image,
    read_video,
    save_audio,
    save_image,
    side_by_side,
    to_uint8,
    write_video,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def tone(frequency: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def gradient_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth moving gradients: content a lossy codec keeps close to the original."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(x * 255 // width + 3 * t) % 256, y * 255 // height, np.full_like(x, 128)], axis=-1)
        for t in range(num_frames)
    ]
    return np.stack(frames).astype(np.uint8)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.shape[0])))
    return float(np.fft.rfftfreq(samples.shape[0], 1 / rate)[spectrum.argmax()])


def test_writer_round_trip_keeps_frames_fps_and_audio(tmp_path: Path) -> None:
    frames = gradient_frames(50, 64, 96)
    audio = tone(440, 2.0, SAMPLE_RATE)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, audio)

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name in {"h264", "mpeg4"}
        assert video.average_rate == FPS
        assert video.codec_context.pix_fmt == "yuv420p"
        assert container.streams.audio[0].codec_context.sample_rate == SAMPLE_RATE

    clip = read_video(path)
    assert clip.fps == FPS
    assert clip.frames.shape == frames.shape
    assert clip.frames.dtype == np.uint8
    assert np.abs(clip.frames.astype(int) - frames).mean() < 6
    assert clip.audio is not None
    assert abs(clip.audio.shape[0] - audio.shape[0]) <= SAMPLES_PER_FRAME
    assert abs(peak_frequency(clip.audio, SAMPLE_RATE) - 440) < 2


def test_writer_uses_h264_when_libx264_is_available(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "clip.mp4") as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
    has_libx264 = "libx264" in av.codecs_available
    assert writer.codec == ("libx264" if has_libx264 else "mpeg4")


def test_writer_streams_audio_and_pads_odd_sizes(tmp_path: Path) -> None:
    frames = gradient_frames(30, 45, 61)
    audio = tone(1000, 30 / FPS, SAMPLE_RATE)
    path = tmp_path / "streamed.mp4"
    with VideoWriter(path, has_audio=True) as writer:
        for index, frame in enumerate(frames):
            writer.write(frame)
            writer.write_audio(audio[index * SAMPLES_PER_FRAME : (index + 1) * SAMPLES_PER_FRAME])
    assert writer.frames_written == 30 and writer.samples_written == audio.shape[0]

    clip = read_video(path)
    assert clip.frames.shape == (30, 46, 62, 3)  # padded to even sides
    assert np.abs(clip.frames[:, :45, :61].astype(int) - frames).mean() < 8
    assert abs(clip.audio.shape[0] - audio.shape[0]) <= SAMPLES_PER_FRAME


def test_writer_without_audio_and_load_audio_rejects_it(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    write_video(path, gradient_frames(5, 32, 32))
    assert read_video(path).audio is None
    with pytest.raises(ValueError, match=r"silent\.mp4.*no audio stream"):
        load_audio(path)


def test_writer_validates_frames_and_audio(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "a.mp4") as writer:
        with pytest.raises(ValueError, match="frame: expected dtype uint8"):
            writer.write(np.zeros((32, 32, 3), np.float32))
        with pytest.raises(ValueError, match=r"frame: expected shape \(H, W, 3\)"):
            writer.write(np.zeros((32, 32), np.uint8))
        writer.write(np.zeros((32, 32, 3), np.uint8))
        with pytest.raises(ValueError, match="like the first frame"):
            writer.write(np.zeros((32, 48, 3), np.uint8))
        with pytest.raises(ValueError, match="has_audio=True"):
            writer.write_audio(np.zeros(640, np.float32))
    with pytest.raises(ValueError, match="audio: expected mono"):
        VideoWriter(tmp_path / "b.mp4", audio=np.zeros((2, 640), np.float32))


def test_read_video_resamples_to_target_fps(tmp_path: Path) -> None:
    # Source at 50 fps where frame i is grey level 4 * i; at 25 fps frame k must be source 2k.
    frames = np.stack([np.full((32, 32, 3), 4 * i, np.uint8) for i in range(50)])
    path = tmp_path / "fast.mp4"
    write_video(path, frames, fps=50)
    clip = read_video(path, fps=25)
    assert clip.frames.shape == (25, 32, 32, 3)
    levels = clip.frames.reshape(25, -1).mean(axis=1)
    np.testing.assert_allclose(levels, 8 * np.arange(25), atol=3)

    upsampled = read_video(path, fps=100)
    assert upsampled.frames.shape[0] == 100


def test_load_audio_resamples_44k_to_16k(tmp_path: Path) -> None:
    path = tmp_path / "tone44k.wav"
    save_audio(path, tone(1000, 1.5, 44100), sample_rate=44100)
    samples = load_audio(path, SAMPLE_RATE)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.shape[0] - round(1.5 * SAMPLE_RATE)) <= 2
    assert abs(peak_frequency(samples, SAMPLE_RATE) - 1000) < 2
    assert 0.45 < np.abs(samples).max() <= 1.0


def test_load_audio_averages_stereo_channels(tmp_path: Path) -> None:
    left, right = tone(500, 1.0, 48000), -0.5 * tone(500, 1.0, 48000)  # peaks 0.5 and 0.25, opposite sign
    path = tmp_path / "stereo48k.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes((np.stack([left, right], axis=1) * 32767).astype("<i2").tobytes())  # interleaved
    samples = load_audio(path)
    assert abs(samples.shape[0] - SAMPLE_RATE) <= 2
    assert abs(np.abs(samples).max() - 0.125) < 0.01  # (0.5 - 0.25) / 2


def test_load_audio_reads_the_samples() -> None:
    speech = load_audio(SAMPLES / "avatar_speech.wav")
    assert 6 * SAMPLE_RATE <= speech.shape[0] <= 8 * SAMPLE_RATE
    user = load_audio(SAMPLES / "user.mp4")
    assert abs(user.shape[0] - 8 * SAMPLE_RATE) <= SAMPLES_PER_FRAME


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.wav"):
        load_audio(tmp_path / "nowhere.wav")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.mp4"):
        read_video(tmp_path / "nowhere.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.mp4"):
        read_video(garbage)
    wav = tmp_path / "speech.wav"
    save_audio(wav, tone(300, 0.2, SAMPLE_RATE))
    with pytest.raises(ValueError, match=r"speech\.wav.*no video stream"):
        read_video(wav)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(wav, sample_rate=0)


def test_side_by_side_resizes_right_to_left_height() -> None:
    left = np.zeros((64, 80, 3), np.uint8)
    right = np.full((32, 40, 3), 255, np.uint8)
    joined = side_by_side(left, right)
    assert joined.shape == (64, 160, 3) and joined.dtype == np.uint8
    assert joined[:, 80:].min() == 255
    assert side_by_side(left, np.zeros((128, 100, 3), np.uint8)).shape == (64, 130, 3)
    with pytest.raises(ValueError, match="right: expected dtype uint8"):
        side_by_side(left, right.astype(np.float32))


def test_tensor_conversions_round_trip_and_clamp() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tensor = from_uint8(image)
    assert tensor.shape == (3, 20, 30) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(to_uint8(tensor), image)

    batch = torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5).expand(2, 3, 4, 5)  # (B, 3, H, W)
    pixels = to_uint8(batch)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0, 0, :, 0], [0, 0, 128, 255, 255])  # clamped
    with pytest.raises(ValueError, match="image: expected shape"):
        to_uint8(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="image: expected dtype uint8"):
        from_uint8(image.astype(np.float32))


def test_images_round_trip_and_portrait_loads(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    save_image(tmp_path / "x.png", image)
    np.testing.assert_array_equal(load_image(tmp_path / "x.png"), image)
    portrait = load_image(SAMPLES / "portrait.png")
    assert portrait.dtype == np.uint8 and portrait.ndim == 3 and portrait.shape[2] == 3
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_image(tmp_path / "bad.png")
