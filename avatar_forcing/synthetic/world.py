"""A synthetic dyadic conversation: two rendered faces, two voices, and their ground truth.

    conv = generate_conversation(seed=3, seconds=8.0)      # params + audio, no pixels yet
    frames = conv.frames(0)                                 # (T, 256, 256, 3) avatar side
    write_conversation(conv, "out/synth-3")                 # mp4s, wavs, params.npz

Side 0 is the avatar, side 1 the user (`SIDES`). Randomness comes from one
`numpy.random.SeedSequence(seed)` spawned into independent streams (identities, turns, each
side's voice and behaviour), so the same seed gives bit-identical params and audio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar_forcing.config import FPS, SAMPLE_RATE
from avatar_forcing.synthetic.behaviour import Events, Rules, face_tracks, plan_turns
from avatar_forcing.synthetic.identity import Identity, random_identity
from avatar_forcing.synthetic.params import CHANNELS, FaceParams
from avatar_forcing.synthetic.render import SIZE, FaceRenderer
from avatar_forcing.synthetic.speech import Voice, random_voice, synthesize

SIDES = ("avatar", "user")


@dataclass
class SyntheticConversation:
    seed: int
    seconds: float
    identities: tuple[Identity, Identity]
    voices: tuple[Voice, Voice]
    params: tuple[FaceParams, FaceParams]
    audio: tuple[np.ndarray, np.ndarray]  # (N,) float32 at 16 kHz, N = T * 640
    events: Events
    rules: Rules
    size: int = SIZE

    @property
    def num_frames(self) -> int:
        return len(self.params[0])

    def frames(self, side: int) -> np.ndarray:
        """Render one side: (T, size, size, 3) uint8 RGB at 25 fps."""
        return FaceRenderer(self.identities[side], self.size).render(self.params[side])


def generate_conversation(
    seed: int, seconds: float, rules: Rules | None = None, size: int = SIZE
) -> SyntheticConversation:
    """Params and audio of a conversation `seconds` long (rounded to whole 25 fps frames)."""
    if seconds < 1.0:
        raise ValueError(f"seconds: expected >= 1.0, got {seconds}")
    rules = rules or Rules()
    num_frames = round(seconds * FPS)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    identity_rng, turn_rng, voice_rngs, behaviour_rngs = streams[0], streams[1], streams[2:4], streams[4:6]
    identities = (random_identity(identity_rng), random_identity(identity_rng))
    voices = (random_voice(identity_rng), random_voice(identity_rng))
    ipus = plan_turns(turn_rng, num_frames / FPS, rules)
    speech = [synthesize(voice_rngs[s], ipus[s], num_frames, voices[s]) for s in (0, 1)]
    params, events = face_tracks(
        (behaviour_rngs[0], behaviour_rngs[1]),
        ipus,
        (speech[0].envelope, speech[1].envelope),
        (speech[0].f0, speech[1].f0),
        (speech[0].syllables, speech[1].syllables),
        num_frames,
        rules,
    )
    return SyntheticConversation(
        seed=seed,
        seconds=num_frames / FPS,
        identities=identities,
        voices=voices,
        params=params,
        audio=(speech[0].audio, speech[1].audio),
        events=events,
        rules=rules,
        size=size,
    )


def _pairs(items: list, width: int) -> np.ndarray:
    return np.array(items, np.float32).reshape(len(items), width)


def write_conversation(conv: SyntheticConversation, folder: str | Path) -> dict[str, str]:
    """Write `folder`/{avatar,user}.mp4 (no audio track), {avatar,user}.wav (16-bit 16 kHz) and
    params.npz; returns the media file names (relative to `folder`) keyed by manifest field."""
    from avatar_forcing.media.io import save_audio, write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for s, side in enumerate(SIDES):
        write_video(folder / f"{side}.mp4", conv.frames(s), fps=FPS)
        save_audio(folder / f"{side}.wav", conv.audio[s], SAMPLE_RATE)
        names[f"{side}_video"] = f"{side}.mp4"
        names[f"{side}_audio"] = f"{side}.wav"
    arrays: dict[str, np.ndarray] = {"channels": np.array(CHANNELS)}
    for s, side in enumerate(SIDES):
        ev = conv.events
        arrays[f"{side}_params"] = conv.params[s].values
        arrays[f"{side}_ipus"] = _pairs(ev.ipus[s], 2)
        arrays[f"{side}_nods"] = _pairs(ev.nods[s], 2)
        arrays[f"{side}_smiles"] = _pairs(ev.smiles[s], 3)
        arrays[f"{side}_blinks"] = np.array(ev.blinks[s], np.float32)
    meta = {
        "seed": conv.seed,
        "seconds": conv.seconds,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "sides": list(SIDES),
        "identities": [json.loads(i.to_json()) for i in conv.identities],
        "voices": [{"f0": v.f0, "formant_scale": v.formant_scale} for v in conv.voices],
        "rules": conv.rules.to_dict(),
    }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(folder / "params.npz", **arrays)
    return names


def load_params(path: str | Path) -> tuple[dict[str, FaceParams], dict]:
    """params.npz -> ({"avatar": FaceParams, "user": FaceParams}, meta dict)."""
    with np.load(path) as data:
        params = {side: FaceParams(data[f"{side}_params"]) for side in SIDES}
        meta = json.loads(str(data["meta"]))
    return params, meta
