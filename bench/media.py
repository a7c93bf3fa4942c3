"""The sample media as a live client sends it (640-sample audio chunks and JPEG camera frames at
25 fps, looped) and the media clock the benchmark paces sessions and counts blocks with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatar_forcing.config import FPS, SAMPLES_PER_FRAME, FlowConfig
from services.local.defaults import REPO_ROOT

SAMPLES_DIR = REPO_ROOT / "samples"
FRAME_S = 1.0 / FPS
FRAME_US = 1_000_000 // FPS  # media timestamps are in microseconds
BLOCK = FlowConfig().block  # frames per streamed block; both presets keep the default


@dataclass(frozen=True)
class Media:
    """The sample media as a client sends it: 640-sample chunks and JPEG camera frames, looped."""

    portrait: bytes  # PNG bytes
    speech: np.ndarray  # (N,) int16, the avatar's audio
    user_audio: np.ndarray  # (M,) int16, the user's microphone
    camera: list[bytes]  # JPEG bytes of each 25 fps camera frame
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB camera frames

    def avatar_chunk(self, index: int) -> np.ndarray:
        return _looped(self.speech, index)

    def user_chunk(self, index: int) -> np.ndarray:
        return _looped(self.user_audio, index)

    def camera_jpeg(self, index: int) -> bytes:
        return self.camera[index % len(self.camera)]


def _looped(samples: np.ndarray, frame: int) -> np.ndarray:
    """Samples [640 frame, 640 (frame + 1)) of `samples` repeated end to end."""
    positions = (np.arange(SAMPLES_PER_FRAME) + frame * SAMPLES_PER_FRAME) % samples.shape[0]
    return samples[positions]


def load_media(samples_dir: Path = SAMPLES_DIR) -> Media:
    """The portrait, the avatar's speech and the user's clip (its audio and JPEG-encoded frames)."""
    from avatar_forcing.media.io import load_audio, read_video

    clip = read_video(samples_dir / "user.mp4")
    speech = (np.clip(load_audio(samples_dir / "avatar_speech.wav"), -1, 1) * 32767).astype(np.int16)
    user = (np.clip(clip.audio, -1, 1) * 32767).astype(np.int16)
    camera = []
    for frame in clip.frames:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
            raise RuntimeError("OpenCV could not encode a camera frame")
        camera.append(data.tobytes())
    return Media((samples_dir / "portrait.png").read_bytes(), speech, user, camera, clip.frames)
