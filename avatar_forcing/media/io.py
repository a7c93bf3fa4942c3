"""Media I/O: audio, video and images in and out, with PyAV (no ffmpeg subprocess).

Conventions used everywhere in the library:
- audio: float32 mono in [-1, 1] at `SAMPLE_RATE` (16 kHz), shape (N,);
- frames and images: uint8 RGB, shape (H, W, 3); a clip is (T, H, W, 3) at `FPS` (25);
- model images: float tensors (3, H, W) or (B, 3, H, W) in [-1, 1] (`to_uint8` / `from_uint8`).
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import cv2
import numpy as np
import torch
from torch import Tensor

from avatar_forcing.config import FPS, SAMPLE_RATE


@dataclass(frozen=True)
class VideoClip:
    """Frames resampled to `fps`, and the audio track (if the file has one) at `sample_rate`."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: int
    audio: np.ndarray | None  # (N,) float32 mono in [-1, 1], or None without an audio track
    sample_rate: int = SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def duration(self) -> float:
        """Seconds covered by the frames."""
        return self.num_frames / self.fps


# --- validation ---------------------------------------------------------------------------------


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise ValueError(f"{path}: not a media file PyAV can read ({exc})") from exc


def _check_image(name: str, image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (H, W, 3), got {image.shape}")


def _check_audio(name: str, samples: np.ndarray) -> np.ndarray:
    """Any real 1-D array -> contiguous float32 (N,) clipped to [-1, 1]."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"{name}: expected mono samples of shape (N,), got {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name}: expected float samples in [-1, 1], got dtype {samples.dtype}")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{name}: samples contain NaN or infinity")
    return np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)


def _check_rate(name: str, rate: int) -> None:
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {rate!r}")


# --- audio --------------------------------------------------------------------------------------


def _decode_audio(container: av.container.InputContainer, sample_rate: int) -> np.ndarray:
    """First audio stream -> float32 mono (N,) at `sample_rate`.

    Channels are averaged after resampling (not ffmpeg's -3 dB downmix, which can push identical
    full-scale channels past 1).
    """
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # planar, source channel layout
    chunks = []
    for frame in container.decode(stream):
        chunks.extend(out.to_ndarray() for out in resampler.resample(frame))  # each (C, n)
    chunks.extend(out.to_ndarray() for out in resampler.resample(None))  # flush
    samples = np.concatenate(chunks, axis=1).mean(axis=0) if chunks else np.zeros(0, np.float32)
    # Encoders such as AAC pad the last packet; the stream's duration says where the signal ends.
    if stream.duration is not None and stream.time_base is not None:
        declared = round(float(stream.duration * stream.time_base) * sample_rate)
        if 0 < declared < samples.shape[0]:
            samples = samples[:declared]
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio or video file PyAV decodes -> float32 mono (N,) in [-1, 1] at `sample_rate`."""
    _check_rate("sample_rate", sample_rate)
    path = _check_path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream; expected a file with sound")
        return _decode_audio(container, sample_rate)


def save_audio(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """float mono (N,) in [-1, 1] -> 16-bit PCM mono WAV."""
    _check_rate("sample_rate", sample_rate)
    samples = _check_audio("samples", samples)
    pcm = np.round(samples * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


# --- video --------------------------------------------------------------------------------------


def read_video(path: str | Path, fps: int = FPS) -> VideoClip:
    """Video file -> frames at `fps` (nearest source frame in time) and its 16 kHz mono audio.

    The output has round(duration * fps) frames, where duration runs from the first frame's
    timestamp to the end of the last frame. Frames are selected while decoding, so only the
    kept frames are held in memory.
    """
    _check_rate("fps", fps)
    path = _check_path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream; expected a file with pictures")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(fps)
        source_frame_duration = 1.0 / float(rate)

        kept: list[np.ndarray] = []
        start = previous_time = previous_image = None
        for index, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else index * source_frame_duration
            start = time if start is None else start
            time -= start
            image = frame.to_ndarray(format="rgb24")
            if previous_image is not None:
                # Output frame k (at k / fps) takes the previous source frame while k / fps is
                # nearer to it than to this one.
                midpoint = (previous_time + time) / 2
                while len(kept) / fps <= midpoint:
                    kept.append(previous_image)
            previous_time, previous_image = time, image
        if previous_image is None:
            raise ValueError(f"{path}: the video stream has no decodable frames")

        num_frames = max(1, round((previous_time + source_frame_duration) * fps))
        while len(kept) < num_frames:
            kept.append(previous_image)
        frames = np.stack(kept[:num_frames])  # (T, H, W, 3)

    audio = None
    with _open(path) as container:
        if container.streams.audio:
            audio = _decode_audio(container, SAMPLE_RATE)
    return VideoClip(frames=frames, fps=fps, audio=audio)


def _video_codec() -> str:
    """H.264 through libx264 when PyAV's bundled ffmpeg has it, else MPEG-4 part 2."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):  # UnknownCodecError is a ValueError
            continue
    raise RuntimeError("PyAV has neither the libx264 nor the mpeg4 encoder; expected one of them")


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row / column where a side is odd."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame


class VideoWriter:
    """Streams RGB frames (and mono audio) into an H.264 / AAC MP4 (or any container by suffix).

        with VideoWriter("out.mp4", audio=avatar_audio) as writer:
            for frame in frames:
                writer.write(frame)

    Frames are encoded as they arrive, so generation can stream into the file. Audio is given
    up front (`audio=`) or appended with `write_audio`; in the latter case pass `has_audio=True`,
    because every stream must exist before the first packet is written. The frame size is taken
    from the first frame; odd sides are padded to even by repeating the last row / column.
    """

    def __init__(
        self,
        path: str | Path,
        fps: int = FPS,
        audio: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
        has_audio: bool = False,
        crf: int = 23,
        audio_bit_rate: int = 64000,
    ) -> None:
        _check_rate("fps", fps)
        _check_rate("sample_rate", sample_rate)
        if not 0 <= crf <= 51:
            raise ValueError(f"crf: expected 0 <= crf <= 51, got {crf}")
        self.path = Path(path)
        self.fps = fps
        self.sample_rate = sample_rate
        self.codec = _video_codec()
        self.has_audio = has_audio or audio is not None
        self.frames_written = 0
        self.samples_written = 0
        self._crf = crf
        self._audio_bit_rate = audio_bit_rate
        self._pending_audio: list[np.ndarray] = [] if audio is None else [_check_audio("audio", audio)]
        self._frame_shape: tuple[int, int, int] | None = None
        self._container: av.container.OutputContainer | None = None
        self._video: av.VideoStream | None = None
        self._audio: av.AudioStream | None = None
        self._closed = False

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self, height: int, width: int) -> None:
        self._container = av.open(str(self.path), mode="w")
        options = {"crf": str(self._crf)} if self.codec == "libx264" else {}
        self._video = self._container.add_stream(self.codec, rate=self.fps, options=options)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        if self.codec == "mpeg4":
            self._video.bit_rate = 2_000_000
        if self.has_audio:
            self._audio = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
            self._audio.bit_rate = self._audio_bit_rate

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB frame (H, W, 3); every frame must have the first frame's size."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        _check_image("frame", frame)
        if self._frame_shape is None:
            self._frame_shape = frame.shape
            padded = _pad_to_even(frame)
            self._open(padded.shape[0], padded.shape[1])
        elif frame.shape != self._frame_shape:
            raise ValueError(f"frame: expected shape {self._frame_shape} like the first frame, got {frame.shape}")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(_pad_to_even(frame)), format="rgb24")
        video_frame.pts = self.frames_written
        for packet in self._video.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1
        self._flush_audio()

    def write_audio(self, samples: np.ndarray) -> None:
        """Append float mono samples (N,) in [-1, 1] at the writer's sample rate."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if not self.has_audio:
            raise ValueError(f"{self.path}: the writer has no audio track; pass has_audio=True or audio=")
        self._pending_audio.append(_check_audio("samples", samples))
        if self._container is not None:
            self._flush_audio()

    def _flush_audio(self) -> None:
        if self._audio is None or not self._pending_audio:
            return
        samples = np.concatenate(self._pending_audio)
        self._pending_audio.clear()
        if samples.size == 0:
            return
        audio_frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")  # (1, N)
        audio_frame.sample_rate = self.sample_rate
        audio_frame.pts = self.samples_written
        for packet in self._audio.encode(audio_frame):
            self._container.mux(packet)
        self.samples_written += samples.shape[0]

    def close(self) -> None:
        """Flush the encoders and finish the file. A writer that never got a frame writes nothing."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            self._flush_audio()
            for packet in self._video.encode(None):
                self._container.mux(packet)
            if self._audio is not None:
                for packet in self._audio.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()


def write_video(path: str | Path, frames: np.ndarray, audio: np.ndarray | None = None, fps: int = FPS) -> None:
    """Whole clip (T, H, W, 3) uint8 (+ optional 16 kHz mono audio) -> video file."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4:
        raise ValueError(f"frames: expected a (T, H, W, 3) uint8 array, got {getattr(frames, 'shape', frames)}")
    with VideoWriter(path, fps=fps, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)


# --- images -------------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """Image file (PNG, JPEG, ...) -> uint8 RGB (H, W, 3); alpha is dropped, grey is expanded."""
    path = _check_path(path)
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def save_image(path: str | Path, image: np.ndarray) -> None:
    """uint8 RGB (H, W, 3) -> image file; the format follows the suffix (.png, .jpg, ...)."""
    _check_image("image", image)
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode images with suffix {path.suffix!r}")
    encoded.tofile(path)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(H, W, 3) and (h, w, 3) uint8 -> (H, W + w', 3), `right` resized to H high (aspect kept)."""
    _check_image("left", left)
    _check_image("right", right)
    height = left.shape[0]
    if right.shape[0] != height:
        width = max(1, round(right.shape[1] * height / right.shape[0]))
        interpolation = cv2.INTER_AREA if right.shape[0] > height else cv2.INTER_LINEAR
        right = cv2.resize(right, (width, height), interpolation=interpolation)
    return np.concatenate([left, right], axis=1)


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) float in [-1, 1] -> (H, W, 3) or (B, H, W, 3) uint8, clamped."""
    if not isinstance(image, Tensor):
        raise ValueError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image: expected shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    pixels = ((image.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


def from_uint8(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> float32 tensor (3, H, W) in [-1, 1]."""
    _check_image("image", image)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
