"""Regenerate the demo model's inputs in samples/synthetic/ from the synthetic world.

    python samples/synthetic/make_synthetic.py

One held-out conversation (`SEED`, in neither the demo model's training nor validation set):
the avatar's first frame with a detected face as its portrait, the avatar's own voice (it talks and falls silent
as the turns go), and the user's video with the user's voice as its sound track. Same seed,
same files (the mp4 container may differ between encoder builds; its frames do not).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run as a script from a checkout, installed or not

from avatar_forcing.config import FPS, SAMPLE_RATE  # noqa: E402
from avatar_forcing.media.face_crop import FaceCropper  # noqa: E402
from avatar_forcing.media.io import VideoWriter, save_audio, save_image  # noqa: E402
from avatar_forcing.synthetic.demo_model import HELD_OUT_SEED  # noqa: E402
from avatar_forcing.synthetic.world import generate_conversation  # noqa: E402

SEED = HELD_OUT_SEED + 100  # apart from the ablation's held-out seeds (HELD_OUT_SEED + 0 ...)
SECONDS = 10.0


def main() -> None:
    conv = generate_conversation(SEED, SECONDS)
    avatar, user = conv.frames(0), conv.frames(1)
    # the portrait: the avatar's first frame in which the project's face detector finds the face
    # (a turned or nodding head can be missed), as a user would pick a frontal photo
    cropper = FaceCropper(64)
    first = next(i for i, frame in enumerate(avatar) if cropper.detect(frame))
    save_image(HERE / "portrait.png", avatar[first])
    save_audio(HERE / "avatar_speech.wav", conv.audio[0], SAMPLE_RATE)
    with VideoWriter(HERE / "user.mp4", fps=FPS, audio=conv.audio[1], sample_rate=SAMPLE_RATE, crf=26) as writer:
        for frame in user:
            writer.write(frame)
    print(f"wrote {HERE}: seed {SEED}, {conv.num_frames} frames, portrait = frame {first}")


if __name__ == "__main__":
    main()
