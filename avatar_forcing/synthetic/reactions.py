"""Does an avatar follow the world's rules? Statistics on per-frame parameters.

Used on the ground truth (where the rules hold by construction) and on what a model generates,
with parameters read back by the extractor:

- talking: `speech_envelope` of the avatar's own voice against its `mouth_open`;
- reacting: `reaction_test` — after each of the user's events (a smile onset, the end of an
  utterance) does the avatar's signal (smile, head pitch) rise within the rule's delay window
  more than after random moments of the same conversation?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avatar_forcing.config import FPS, SAMPLES_PER_FRAME


def speech_envelope(audio: np.ndarray, frames: int, smooth: int = 3) -> np.ndarray:
    """RMS of each 40 ms frame of a 16 kHz voice, moving-averaged over `smooth` frames: (frames,)."""
    audio = np.asarray(audio, np.float64)[: frames * SAMPLES_PER_FRAME]
    audio = np.pad(audio, (0, frames * SAMPLES_PER_FRAME - len(audio)))
    rms = np.sqrt((audio.reshape(frames, SAMPLES_PER_FRAME) ** 2).mean(axis=1))
    return np.convolve(rms, np.ones(smooth) / smooth, mode="same")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two (T,) series; 0 when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def rises(signal: np.ndarray, times_s: Sequence[float], window_s: tuple[float, float]) -> np.ndarray:
    """Per event: the signal's maximum within [t + a, t + b] minus its value at t (events whose
    window runs past the end are left out)."""
    signal = np.asarray(signal, np.float64)
    start, end = (round(w * FPS) for w in window_s)
    out = []
    for t in times_s:
        frame = round(t * FPS)
        if frame >= 0 and frame + end < len(signal):
            out.append(signal[frame + start : frame + end + 1].max() - signal[frame])
    return np.array(out)


@dataclass(frozen=True)
class ReactionResult:
    after_events: float  # mean rise after the user's events
    at_random: float  # mean rise after random moments (the chance level)
    events: int
    p_value: float  # share of random event sets whose mean rise reaches `after_events`


def reaction_test(
    signals: Sequence[np.ndarray],
    events: Sequence[Sequence[float]],
    window_s: tuple[float, float],
    draws: int = 2000,
    seed: int = 0,
) -> ReactionResult:
    """Rise after the events against the same number of random moments per conversation, `draws`
    times (a one-sided permutation test: p = (1 + #random means >= observed) / (1 + draws))."""
    rng = np.random.default_rng(seed)
    observed = np.concatenate([rises(s, e, window_s) for s, e in zip(signals, events, strict=True)])
    if observed.size == 0:
        raise ValueError("events: none whose window fits inside its conversation")
    margin = window_s[1] + 1.0 / FPS
    random_means = np.empty(draws)
    for d in range(draws):
        parts = []
        for signal, times in zip(signals, events, strict=True):
            count = len(rises(signal, times, window_s))
            if count:
                moments = rng.uniform(0.0, len(signal) / FPS - margin, count)
                parts.append(rises(signal, moments, window_s))
        random_means[d] = np.concatenate(parts).mean()
    mean = float(observed.mean())
    p_value = float((1 + (random_means >= mean).sum()) / (1 + draws))
    return ReactionResult(mean, float(random_means.mean()), int(observed.size), p_value)
