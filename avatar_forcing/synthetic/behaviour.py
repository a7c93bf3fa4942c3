"""The two participants' behaviour: turn-taking, then each side's face track from stated rules.

Every rule draws its randomness from a seeded `numpy.random.Generator`, so one set of inputs
has many plausible outputs (one-to-many) and one seed exactly one. Times are seconds; the
face tracks are per video frame at 25 fps. All parameters are fields of `Rules`:

Turn-taking (`plan_turns`). The first speaker is a fair coin. A turn lasts U(`turn_seconds`)
and is split into inter-pausal units (IPUs) of U(`ipu_seconds`) separated by pauses of
U(`pause_seconds`). The next turn goes to the other side; with probability
`overlap_probability` it starts U(`overlap_seconds`) before the current turn ends
(overlapping speech), otherwise U(`gap_seconds`) after it (a silence).

Speaker rules (while a side's own voice sounds):
- mouth: `mouth_open` = clip(`mouth_gain` * (env / env95) ** 0.8), env the side's own audio
  RMS per frame and env95 its 95th percentile over speaking frames; a closed mouth otherwise;
- head with prosody: pitch += `prosody_pitch` degrees * accent envelope (a small dip-nod on
  each accented syllable) and yaw += `prosody_yaw` * (F0 / mean F0 - 1) * loudness, smoothed
  over 0.2 s; gaze looks away from the camera with probability `speaker_gaze_away`.

Listener rules (reacting to the other side):
- nods: after each of the other's IPU ends (a speech pause), with probability
  `nod_probability`, a nod (pitch pulse A sin^2, A ~ U(`nod_degrees`), length
  U(`nod_seconds`)) starts after a delay U(`nod_delay`) — unless the listener itself is
  speaking at that moment;
- smiles back: after each spontaneous smile of the other, with probability
  `smile_back_probability`, a smile starts U(`smile_back_delay`) later (smiles-back do not
  trigger further smiles-back);
- head tilt mirroring: roll += g * (the other's own roll, `mirror_delay` later), g ~
  U(`mirror_gain`) per conversation, weighted by how much the side is listening (0 while
  speaking, ramps over 0.5 s).

Both sides, always:
- spontaneous smiles: Poisson, `smile_rate` per second, each U(`smile_seconds`) long with
  peak U(`smile_amplitude`), a 0.25 s rise and a 0.4 s fall; baseline smile `smile_baseline`;
- blinks: intervals `blink_min` + Gamma(2, `blink_mean` / 2) seconds, each
  U(`blink_seconds`) long (sin shape, fully shut at the middle);
- gaze: fixations of U(`fixation_seconds`); a listener's fixation is N(0, 0.12) around the
  camera, a speaker's too unless it looks away (|x| ~ U(0.4, 0.8), y ~ U(-0.4, 0.2));
  moves between fixations take ~3 frames;
- idle drift: an Ornstein-Uhlenbeck process per head angle with stationary std
  `drift_degrees` (yaw, pitch, roll) and time constant `drift_tau` seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from avatar_forcing.config import FPS
from avatar_forcing.synthetic.params import FaceParams


@dataclass(frozen=True)
class Rules:
    turn_seconds: tuple[float, float] = (1.5, 4.0)
    ipu_seconds: tuple[float, float] = (0.6, 1.8)
    pause_seconds: tuple[float, float] = (0.25, 0.6)
    gap_seconds: tuple[float, float] = (0.2, 1.0)
    overlap_probability: float = 0.25
    overlap_seconds: tuple[float, float] = (0.2, 0.6)
    start_seconds: float = 0.3  # silence before the first turn
    mouth_gain: float = 0.9
    prosody_pitch: float = 3.0
    prosody_yaw: float = 25.0
    speaker_gaze_away: float = 0.5
    nod_probability: float = 0.8
    nod_delay: tuple[float, float] = (0.2, 0.6)
    nod_degrees: tuple[float, float] = (5.0, 10.0)
    nod_seconds: tuple[float, float] = (0.4, 0.6)
    smile_rate: float = 1 / 6
    smile_seconds: tuple[float, float] = (1.0, 2.5)
    smile_amplitude: tuple[float, float] = (0.5, 1.0)
    smile_baseline: float = 0.05
    smile_back_probability: float = 0.7
    smile_back_delay: tuple[float, float] = (0.3, 0.8)
    mirror_gain: tuple[float, float] = (0.3, 0.6)
    mirror_delay: float = 0.6
    blink_min: float = 0.8
    blink_mean: float = 2.8
    blink_seconds: tuple[float, float] = (0.15, 0.25)
    fixation_seconds: tuple[float, float] = (0.8, 2.5)
    drift_degrees: tuple[float, float, float] = (3.0, 1.5, 2.0)
    drift_tau: float = 2.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Events:
    """What happened, in seconds (ground truth for metrics): one list per side (0, 1)."""

    ipus: list[list[tuple[float, float]]] = field(default_factory=lambda: [[], []])
    nods: list[list[tuple[float, float]]] = field(default_factory=lambda: [[], []])  # (onset, trigger pause)
    smiles: list[list[tuple[float, float, bool]]] = field(default_factory=lambda: [[], []])  # (onset, end, is_back)
    blinks: list[list[float]] = field(default_factory=lambda: [[], []])


def plan_turns(rng: np.random.Generator, seconds: float, rules: Rules) -> list[list[tuple[float, float]]]:
    """Both sides' IPUs ((start, end) seconds) over a conversation of `seconds`."""
    ipus: list[list[tuple[float, float]]] = [[], []]
    side = int(rng.integers(2))
    t = rules.start_seconds
    end_limit = seconds - 0.2
    while t < end_limit - 0.3:
        turn_end = min(t + rng.uniform(*rules.turn_seconds), end_limit)
        start = t
        while start < turn_end - 0.3:
            stop = min(start + rng.uniform(*rules.ipu_seconds), turn_end)
            ipus[side].append((float(start), float(stop)))
            start = stop + rng.uniform(*rules.pause_seconds)
        last = ipus[side][-1][1] if ipus[side] else turn_end
        if rng.random() < rules.overlap_probability:
            t = last - rng.uniform(*rules.overlap_seconds)
        else:
            t = last + rng.uniform(*rules.gap_seconds)
        side = 1 - side
    return ipus


def _speaking(ipus: list[tuple[float, float]], num_frames: int) -> np.ndarray:
    times = np.arange(num_frames) / FPS
    out = np.zeros(num_frames, bool)
    for start, end in ipus:
        out |= (times >= start) & (times < end)
    return out


def _smooth(x: np.ndarray, seconds: float) -> np.ndarray:
    radius = max(1, round(seconds * FPS))
    kernel = np.hanning(2 * radius + 1)
    kernel /= kernel.sum()
    return np.convolve(np.pad(x, radius, mode="edge"), kernel, mode="valid")


def _ou(rng: np.random.Generator, num_frames: int, std: float, tau: float) -> np.ndarray:
    decay = np.exp(-1.0 / (FPS * tau))
    noise = rng.normal(0.0, std * np.sqrt(1 - decay**2), num_frames)
    out = np.empty(num_frames)
    value = rng.normal(0.0, std)
    for t in range(num_frames):
        value = decay * value + noise[t]
        out[t] = value
    return out


def _pulse(track: np.ndarray, onset: float, length: float, height: float) -> None:
    """Add height * sin^2 over [onset, onset + length) seconds."""
    times = np.arange(track.shape[0]) / FPS
    x = (times - onset) / length
    inside = (x >= 0) & (x < 1)
    track[inside] += height * np.sin(np.pi * x[inside]) ** 2


def _smile_shape(times: np.ndarray, onset: float, end: float, peak: float) -> np.ndarray:
    rise = np.clip((times - onset) / 0.25, 0, 1)
    fall = np.clip((end + 0.4 - times) / 0.4, 0, 1)
    return peak * (0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall)))


def face_tracks(
    rngs: tuple[np.random.Generator, np.random.Generator],
    ipus: list[list[tuple[float, float]]],
    envelopes: tuple[np.ndarray, np.ndarray],
    f0s: tuple[np.ndarray, np.ndarray],
    syllables: tuple[list, list],
    num_frames: int,
    rules: Rules,
) -> tuple[tuple[FaceParams, FaceParams], Events]:
    """Both sides' FaceParams from the turn plan, each side's own audio envelope and pitch."""
    times = np.arange(num_frames) / FPS
    events = Events(ipus=[list(ipus[0]), list(ipus[1])])
    speaking = [_speaking(ipus[s], num_frames) for s in (0, 1)]
    listening = [np.clip(_smooth((~speaking[s]).astype(float), 0.5), 0, 1) for s in (0, 1)]
    tracks = [
        {
            name: np.zeros(num_frames)
            for name in ("yaw", "pitch", "roll", "mouth_open", "smile", "blink", "gaze_x", "gaze_y")
        }
        for _ in (0, 1)
    ]

    # Spontaneous smiles first (both sides), then smiles back to them.
    spontaneous: list[list[tuple[float, float]]] = [[], []]
    for s in (0, 1):
        rng = rngs[s]
        t = rng.exponential(1 / rules.smile_rate)
        while t < times[-1]:
            length = rng.uniform(*rules.smile_seconds)
            spontaneous[s].append((float(t), float(t + length)))
            events.smiles[s].append((float(t), float(t + length), False))
            t += length + 0.4 + rng.exponential(1 / rules.smile_rate)
    for s in (0, 1):
        rng = rngs[s]
        for onset, _end in spontaneous[1 - s]:
            if rng.random() < rules.smile_back_probability:
                start = onset + rng.uniform(*rules.smile_back_delay)
                events.smiles[s].append((float(start), float(start + rng.uniform(*rules.smile_seconds)), True))
    for s in (0, 1):
        rng = rngs[s]
        smile = np.full(num_frames, rules.smile_baseline)
        for onset, end, _back in events.smiles[s]:
            smile = np.maximum(smile, _smile_shape(times, onset, end, rng.uniform(*rules.smile_amplitude)))
        tracks[s]["smile"] = smile

    # Head: idle drift, speaker prosody; nods to the other's pauses; mirrored roll.
    own_roll = []
    for s in (0, 1):
        rng, tr = rngs[s], tracks[s]
        for name, std in zip(("yaw", "pitch", "roll"), rules.drift_degrees, strict=True):
            tr[name] = _ou(rng, num_frames, std, rules.drift_tau)
        accents = np.zeros(num_frames)
        for start, end, accented in syllables[s]:
            if accented:
                _pulse(accents, start, max(end - start, 0.12), 1.0)
        tr["pitch"] += rules.prosody_pitch * accents
        mean_f0 = f0s[s][f0s[s] > 0].mean() if np.any(f0s[s] > 0) else 1.0
        loud = envelopes[s] / max(float(np.percentile(envelopes[s], 99)), 1e-6)
        intonation = np.where(f0s[s] > 0, f0s[s] / mean_f0 - 1.0, 0.0) * np.clip(loud, 0, 1)
        tr["yaw"] += rules.prosody_yaw * _smooth(intonation, 0.2)
        tr["roll"] += (
            1.5 * _smooth(speaking[s].astype(float), 0.4) * np.sin(2 * np.pi * 0.3 * times + rng.uniform(0, 6.3))
        )
        own_roll.append(tr["roll"].copy())
    for s in (0, 1):
        rng, tr = rngs[s], tracks[s]
        for _start, end in ipus[1 - s]:  # the other's speech pauses
            if rng.random() >= rules.nod_probability:
                continue
            onset = end + rng.uniform(*rules.nod_delay)
            length = rng.uniform(*rules.nod_seconds)
            frame = round(onset * FPS)
            if frame >= num_frames or speaking[s][min(frame, num_frames - 1)]:
                continue
            _pulse(tr["pitch"], onset, length, rng.uniform(*rules.nod_degrees))
            events.nods[s].append((float(onset), float(end)))
        gain = rng.uniform(*rules.mirror_gain)
        shift = round(rules.mirror_delay * FPS)
        other = np.concatenate([np.full(shift, own_roll[1 - s][0]), own_roll[1 - s][: num_frames - shift]])
        tr["roll"] += gain * listening[s] * other

    # Mouth from the side's own audio envelope.
    for s in (0, 1):
        env = envelopes[s].astype(float)
        voiced = env[speaking[s]]
        ref = float(np.percentile(voiced, 95)) if voiced.size else 1.0
        tracks[s]["mouth_open"] = np.clip(rules.mouth_gain * (env / max(ref, 1e-6)) ** 0.8, 0, 1)
        tracks[s]["mouth_open"][env < 4 * 5e-4] = 0.0

    # Blinks and gaze.
    for s in (0, 1):
        rng, tr = rngs[s], tracks[s]
        t = rng.uniform(0, rules.blink_min + rules.blink_mean)
        while t < times[-1]:
            length = rng.uniform(*rules.blink_seconds)
            _pulse(tr["blink"], t, length, 1.0)
            events.blinks[s].append(float(t))
            t += length + rules.blink_min + rng.gamma(2.0, rules.blink_mean / 2)
        tr["blink"] = np.clip(tr["blink"], 0, 1)
        gx, gy = np.zeros(num_frames), np.zeros(num_frames)
        t = 0.0
        while t < times[-1] + 1 / FPS:
            length = rng.uniform(*rules.fixation_seconds)
            frame = min(round(t * FPS), num_frames - 1)
            if speaking[s][frame] and rng.random() < rules.speaker_gaze_away:
                x, y = rng.choice([-1, 1]) * rng.uniform(0.4, 0.8), rng.uniform(-0.4, 0.2)
            else:
                x, y = rng.normal(0, 0.12), rng.normal(0, 0.12)
            sel = (times >= t) & (times < t + length)
            gx[sel], gy[sel] = x, y
            t += length
        decay = 0.35
        for arr in (gx, gy):
            for i in range(1, num_frames):
                arr[i] = decay * arr[i - 1] + (1 - decay) * arr[i]
        tr["gaze_x"], tr["gaze_y"] = gx, gy

    params = tuple(FaceParams.from_channels(tracks[s]) for s in (0, 1))
    return params, events  # type: ignore[return-value]
