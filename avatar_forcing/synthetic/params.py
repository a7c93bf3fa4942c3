"""Per-frame face parameters: the ground truth that drives the renderer (and later metrics).

A side's motion over T frames is one float32 array (T, C) whose columns are `CHANNELS`, in
this order, each clipped to its range in `RANGES`:

| channel | unit | range | meaning |
|---|---|---|---|
| `yaw` | degrees | [-30, 30] | head turn; + moves the face toward image right |
| `pitch` | degrees | [-25, 25] | head nod; + tips the face down (a nod is a + pulse) |
| `roll` | degrees | [-25, 25] | head tilt in the image plane; + is clockwise on screen |
| `mouth_open` | fraction | [0, 1] | jaw opening: 0 closed, 1 widest |
| `smile` | fraction | [0, 1] | lip-corner raise and mouth widening |
| `blink` | fraction | [0, 1] | eyelid closure: 0 open, 1 shut |
| `gaze_x` | fraction | [-1, 1] | iris offset, + toward image right, 1 = the eye's edge |
| `gaze_y` | fraction | [-1, 1] | iris offset, + down |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNELS = ("yaw", "pitch", "roll", "mouth_open", "smile", "blink", "gaze_x", "gaze_y")
RANGES: dict[str, tuple[float, float]] = {
    "yaw": (-30.0, 30.0),
    "pitch": (-25.0, 25.0),
    "roll": (-25.0, 25.0),
    "mouth_open": (0.0, 1.0),
    "smile": (0.0, 1.0),
    "blink": (0.0, 1.0),
    "gaze_x": (-1.0, 1.0),
    "gaze_y": (-1.0, 1.0),
}
INDEX = {name: i for i, name in enumerate(CHANNELS)}


@dataclass(frozen=True)
class FaceParams:
    """One side's per-frame parameters: `values` (T, len(CHANNELS)) float32, columns `CHANNELS`."""

    values: np.ndarray

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.ndim != 2 or values.shape[1] != len(CHANNELS):
            raise ValueError(f"values: expected shape (T, {len(CHANNELS)}), got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError("values: contain NaN or infinity")

    @classmethod
    def from_channels(cls, channels: dict[str, np.ndarray]) -> FaceParams:
        """Dict of (T,) arrays (missing channels are 0) -> FaceParams, clipped to `RANGES`."""
        unknown = sorted(set(channels) - set(CHANNELS))
        if unknown:
            raise ValueError(f"unknown channel(s) {unknown}; expected some of {list(CHANNELS)}")
        lengths = {np.asarray(v).shape for v in channels.values()}
        if len(lengths) != 1 or len(next(iter(lengths))) != 1:
            raise ValueError(f"channels: expected (T,) arrays of one length, got shapes {sorted(lengths)}")
        (length,) = next(iter(lengths))
        values = np.zeros((length, len(CHANNELS)), np.float32)
        for name, column in channels.items():
            low, high = RANGES[name]
            values[:, INDEX[name]] = np.clip(column, low, high)
        return cls(values)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, name: str) -> np.ndarray:
        """The (T,) column of one channel."""
        return self.values[:, INDEX[name]]

    def frame(self, t: int) -> dict[str, float]:
        return {name: float(self.values[t, i]) for i, name in enumerate(CHANNELS)}
