"""Who a rendered face is: shape, colours and feature styles, drawn from a seeded Generator.

Every field is fixed for a whole conversation side; motion lives in `params.FaceParams`.

| field | range | meaning |
|---|---|---|
| `face_width` | [0.22, 0.27] | head half-width, fraction of the image side |
| `face_aspect` | [1.22, 1.40] | head half-height / half-width |
| `jaw` | [0.0, 1.0] | 0 round chin, 1 narrow pointed chin |
| `skin` | 6 tones | RGB skin colour, from light to dark (`SKIN_TONES`), jittered by +-8 |
| `hair` | 6 colours | RGB hair colour (`HAIR_COLOURS`) |
| `hair_style` | 0-3 | 0 short cap, 1 fringe, 2 long (falls behind the shoulders), 3 side part |
| `eye_spacing` | [0.36, 0.44] | eye centre offset from the midline, in head half-widths |
| `eye_size` | [0.15, 0.19] | eye half-width, in head half-widths |
| `eye_round` | [0.45, 0.65] | eye half-height / half-width |
| `iris` | 4 colours | RGB iris colour |
| `brow` | [0.03, 0.06] | eyebrow thickness, in head half-widths |
| `mouth_width` | [0.30, 0.40] | mouth half-width, in head half-widths |
| `lips` | RGB | lip colour: the skin darkened and reddened |
| `shirt`, `background` | RGB | clothing and backdrop colours |
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

SKIN_TONES = ((241, 204, 178), (226, 184, 150), (203, 152, 112), (170, 118, 82), (128, 86, 58), (94, 62, 44))
HAIR_COLOURS = ((30, 22, 18), (70, 45, 28), (120, 80, 45), (180, 140, 80), (90, 90, 95), (150, 60, 30))
IRIS_COLOURS = ((60, 40, 25), (50, 90, 140), (70, 110, 60), (40, 30, 25))
HAIR_STYLES = ("short", "fringe", "long", "side-part")


@dataclass(frozen=True)
class Identity:
    face_width: float
    face_aspect: float
    jaw: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int
    eye_spacing: float
    eye_size: float
    eye_round: float
    iris: tuple[int, int, int]
    brow: float
    mouth_width: float
    lips: tuple[int, int, int]
    shirt: tuple[int, int, int]
    background: tuple[int, int, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _rgb(values) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in values)
    return r, g, b


def random_identity(rng: np.random.Generator) -> Identity:
    """One face drawn from the ranges in the module docstring."""
    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], float) + rng.uniform(-8, 8, 3)
    lips = skin * np.array([0.82, 0.55, 0.55]) + np.array([25, 0, 0])
    # A backdrop that stays clearly apart from the skin, so the head outline reads.
    background = rng.uniform(150, 235, 3) if skin.mean() < 150 else rng.uniform(50, 120, 3)
    return Identity(
        face_width=float(rng.uniform(0.22, 0.27)),
        face_aspect=float(rng.uniform(1.22, 1.40)),
        jaw=float(rng.uniform(0.0, 1.0)),
        skin=_rgb(skin),
        hair=_rgb(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]),
        hair_style=int(rng.integers(len(HAIR_STYLES))),
        eye_spacing=float(rng.uniform(0.36, 0.44)),
        eye_size=float(rng.uniform(0.15, 0.19)),
        eye_round=float(rng.uniform(0.45, 0.65)),
        iris=_rgb(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]),
        brow=float(rng.uniform(0.03, 0.06)),
        mouth_width=float(rng.uniform(0.30, 0.40)),
        lips=_rgb(lips),
        shirt=_rgb(rng.uniform(20, 230, 3)),
        background=_rgb(background),
    )
