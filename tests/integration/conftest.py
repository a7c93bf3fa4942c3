"""Fixtures of the integration tests: the tiny model and the sample media of one session."""

from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.config import tiny
from avatar_forcing.media.io import load_audio, read_video
from avatar_forcing.nn.model import random_model

SAMPLES = Path(__file__).parents[2] / "samples"
FRAMES = 40  # 4 blocks of 10


@pytest.fixture(scope="session")
def model():
    """The tiny model with the seeded random weights every service replica builds too."""
    return random_model(tiny(), seed=0)


@pytest.fixture(scope="session")
def media():
    """(portrait PNG bytes, avatar speech int16, user speech int16, user camera frames) of FRAMES frames."""
    portrait_png = (SAMPLES / "portrait.png").read_bytes()
    speech = (load_audio(SAMPLES / "avatar_speech.wav")[: FRAMES * 640] * 32767).astype(np.int16)
    clip = read_video(SAMPLES / "user.mp4")
    user = (clip.audio[: FRAMES * 640] * 32767).astype(np.int16)
    return portrait_png, speech, user, clip.frames[:FRAMES]


__all__ = ["FRAMES", "SAMPLES", "media", "model"]
