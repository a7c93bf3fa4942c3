"""Speech-like audio: a formant synthesiser that turns a side's speaking intervals into a voice.

Per inter-pausal unit (IPU, one stretch of speech between pauses):

- syllables follow back to back, each `SYLLABLE_SECONDS` long, each with one vowel (formant
  table `VOWELS`, scaled by the voice's `formant_scale`) and a raised-cosine loudness
  envelope (a short rise, a longer fall) of amplitude U(0.55, 1.0); an accented syllable
  (probability `ACCENT_PROBABILITY`) is loud (1.0) and has a pitch rise of +12 %;
- the pitch (F0) starts at the voice's `f0` * U(1.0, 1.1), falls 15 % over the IPU
  (declination), plus the accent bumps and a slow +-2 % wobble;
- the source is a glottal pulse train at that F0 (one pulse per period, smoothed by a
  one-pole low-pass: a -6 dB/octave tilt) plus a little aspiration noise; it passes through
  three parallel second-order resonators at the vowel's formants (bandwidths 80, 100, 140 Hz);
- a 20 ms noise burst (a consonant) opens each syllable.

Output: float32 mono in [-1, 1] at 16 kHz (written as 16-bit PCM WAV); speech peaks at about
0.5 and silence is a faint noise floor (-66 dBFS) so that no sample is exactly constant.
Besides the audio, `synthesize` returns the per-video-frame loudness envelope (RMS per 640
samples) and pitch (Hz, 0 when silent) that the behaviour rules drive the face with.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from avatar_forcing.config import SAMPLE_RATE, SAMPLES_PER_FRAME

# (F1, F2, F3) in Hz for a typical adult male voice: /a/ /e/ /i/ /o/ /u/ /ae/ /schwa/.
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240),
          (660, 1720, 2410), (500, 1500, 2500))  # fmt: skip
BANDWIDTHS = (80.0, 100.0, 140.0)
FORMANT_GAINS = (1.0, 0.6, 0.3)
SYLLABLE_SECONDS = (0.14, 0.28)
ACCENT_PROBABILITY = 0.25
NOISE_FLOOR = 5e-4


@dataclass(frozen=True)
class Voice:
    """A speaker's voice: mean pitch (Hz) and a formant scale (1.0 male-like, ~1.17 female-like)."""

    f0: float
    formant_scale: float


def random_voice(rng: np.random.Generator) -> Voice:
    if rng.random() < 0.5:
        return Voice(f0=float(rng.uniform(95, 140)), formant_scale=float(rng.uniform(0.97, 1.05)))
    return Voice(f0=float(rng.uniform(170, 240)), formant_scale=float(rng.uniform(1.12, 1.22)))


@dataclass(frozen=True)
class Speech:
    audio: np.ndarray  # (N,) float32 at SAMPLE_RATE
    envelope: np.ndarray  # (T,) RMS per video frame
    f0: np.ndarray  # (T,) Hz, 0 where silent
    syllables: list[tuple[float, float, bool]]  # (start s, end s, accented)


def _resonator(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * frequency / SAMPLE_RATE
    return lfilter([1.0 - r], [1.0, -2.0 * r * np.cos(theta), r * r], signal)


def synthesize(rng: np.random.Generator, ipus: list[tuple[float, float]], num_frames: int, voice: Voice) -> Speech:
    """Speech over `ipus` ((start, end) seconds) in a clip of `num_frames` video frames."""
    total = num_frames * SAMPLES_PER_FRAME
    audio = rng.normal(0.0, NOISE_FLOOR, total)
    f0_samples = np.zeros(total)
    syllables: list[tuple[float, float, bool]] = []
    for start, end in ipus:
        s0, s1 = round(start * SAMPLE_RATE), min(total, round(end * SAMPLE_RATE))
        if s1 - s0 < 0.1 * SAMPLE_RATE:
            continue
        n = s1 - s0
        # Syllable boundaries filling the IPU.
        bounds = [0]
        while bounds[-1] < n:
            bounds.append(bounds[-1] + int(rng.uniform(*SYLLABLE_SECONDS) * SAMPLE_RATE))
        bounds[-1] = n
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < 0.08 * SAMPLE_RATE:
            del bounds[-2]
        t = np.arange(n) / SAMPLE_RATE
        f0 = voice.f0 * rng.uniform(1.0, 1.1) * (1.0 - 0.15 * t / max(t[-1], 1e-3))
        f0 *= 1.0 + 0.02 * np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 2 * np.pi))
        envelope = np.zeros(n)
        vowel_of = np.zeros(n, int)
        for a, b in itertools.pairwise(bounds):
            accented = bool(rng.random() < ACCENT_PROBABILITY)
            length = b - a
            x = np.arange(length) / length
            rise = 0.3
            shape = np.where(
                x < rise, 0.5 - 0.5 * np.cos(np.pi * x / rise), 0.5 + 0.5 * np.cos(np.pi * (x - rise) / (1 - rise))
            )
            envelope[a:b] = shape * (1.0 if accented else rng.uniform(0.55, 1.0))
            if accented:
                f0[a:b] *= 1.0 + 0.12 * np.sin(np.pi * x)
            vowel_of[a:b] = rng.integers(len(VOWELS))
            syllables.append(((s0 + a) / SAMPLE_RATE, (s0 + b) / SAMPLE_RATE, accented))
        # Glottal pulses: one per period, tilted by a one-pole low-pass.
        phase = np.cumsum(f0 / SAMPLE_RATE)
        pulses = np.diff(np.floor(phase), prepend=0.0)
        source = lfilter([1.0], [1.0, -0.97], pulses) - lfilter([1.0], [1.0, -0.97], pulses).mean()
        source += rng.normal(0.0, 0.02, n)
        voiced = np.zeros(n)
        for a, b in itertools.pairwise(bounds):
            formants = np.array(VOWELS[vowel_of[a]]) * voice.formant_scale
            segment = source[a:b]
            voiced[a:b] = sum(
                gain * _resonator(segment, f, bw)
                for f, bw, gain in zip(formants, BANDWIDTHS, FORMANT_GAINS, strict=True)
            )
            burst = min(b - a, int(0.02 * SAMPLE_RATE))
            voiced[a : a + burst] += rng.normal(0.0, 0.15, burst) * np.hanning(burst)
        voiced *= envelope
        peak = np.max(np.abs(voiced))
        audio[s0:s1] += 0.5 * voiced / max(peak, 1e-9)
        f0_samples[s0:s1] = np.where(envelope > 0.05, f0, 0.0)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    frames = audio.reshape(num_frames, SAMPLES_PER_FRAME).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    f0_frames = f0_samples.reshape(num_frames, SAMPLES_PER_FRAME).max(axis=1)
    return Speech(audio=audio, envelope=rms.astype(np.float32), f0=f0_frames.astype(np.float32), syllables=syllables)


def frame_envelope(audio: np.ndarray) -> np.ndarray:
    """(N,) samples -> (ceil(N / 640),) RMS per 25 fps video frame (zero-padded at the end)."""
    frames = -(-audio.shape[0] // SAMPLES_PER_FRAME)
    padded = np.zeros(frames * SAMPLES_PER_FRAME)
    padded[: audio.shape[0]] = audio
    return np.sqrt(np.mean(padded.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))
