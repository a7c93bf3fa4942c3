"""The synthetic world (avatar_forcing.synthetic): reproducibility, detectable faces, and the
stated behaviour rules, measured back from the generated params and audio (not from the
event lists the generator keeps), then the real `synth` -> `prepare` path on a tiny world."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avatar_forcing.apps.cli import main
from avatar_forcing.config import FPS
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import load_audio
from avatar_forcing.synthetic import CHANNELS, RANGES, Rules, generate_conversation
from avatar_forcing.synthetic.speech import frame_envelope
from avatar_forcing.synthetic.world import load_params
from avatar_forcing.training.data.manifest import read_manifest
from avatar_forcing.training.data.shards import read_ledger

RULES = Rules()
LONG = 120.0  # seconds of params-only conversation for the rule statistics (no pixels)
SPEECH_THRESHOLD = 0.01  # RMS per frame; the silence floor is 5e-4, speech peaks near 0.5


@pytest.fixture(scope="module")
def long_worlds():
    return [generate_conversation(seed, LONG) for seed in (11, 12, 13)]


def test_same_seed_same_world_different_seed_differs():
    a, b, c = generate_conversation(5, 4.0), generate_conversation(5, 4.0), generate_conversation(6, 4.0)
    for s in (0, 1):
        np.testing.assert_array_equal(a.params[s].values, b.params[s].values)
        np.testing.assert_array_equal(a.audio[s], b.audio[s])
        assert not np.array_equal(a.params[s].values, c.params[s].values)
    assert a.identities == b.identities and a.identities != c.identities
    frame = 40
    np.testing.assert_array_equal(a.frames(0)[frame], b.frames(0)[frame])
    assert np.abs(a.frames(0)[frame].astype(int) - c.frames(0)[frame]).mean() > 5


def test_params_are_in_range_and_aligned_with_audio():
    conv = generate_conversation(3, 4.0)
    assert conv.num_frames == 100
    for s in (0, 1):
        values = conv.params[s].values
        assert values.shape == (100, len(CHANNELS))
        for i, name in enumerate(CHANNELS):
            low, high = RANGES[name]
            assert low <= values[:, i].min() and values[:, i].max() <= high, name
        assert conv.audio[s].shape == (100 * 640,) and conv.audio[s].dtype == np.float32


def test_rendered_faces_are_found_by_the_project_detector():
    """Every 4th frame of both sides of 3 conversations (6 identities, 150 frames).

    Measured: 92 % (138 / 150) at the time of writing (misses are strongly turned or pitched
    heads; `prepare` bridges gaps up to 5 frames). The threshold 0.8 leaves room for a cascade
    version difference while still failing a renderer whose faces the Haar detector does not
    read (a blank face or a scrambled feature layout scores near 0)."""
    cropper = FaceCropper(64)
    found = total = 0
    for seed in (0, 1, 2):
        conv = generate_conversation(seed, 4.0)
        for s in (0, 1):
            frames = conv.frames(s)[::4]
            for frame in frames:
                boxes = cropper.detect(frame)
                total += 1
                if boxes:
                    box = boxes[0]  # near the rendered head, not on the backdrop
                    assert abs(box.cx - 128) < 50 and abs(box.cy - 133) < 60
                    found += 1
    rate = found / total
    print(f"face detection rate: {found}/{total} = {rate:.3f}")
    assert rate >= 0.8


def test_mouth_opening_follows_own_audio_envelope(tmp_path):
    """Correlation between `mouth_open` and the RMS envelope of the side's written WAV."""
    from avatar_forcing.media.io import save_audio

    conv = generate_conversation(21, 20.0)
    for s in (0, 1):
        save_audio(tmp_path / f"{s}.wav", conv.audio[s])
        env = frame_envelope(load_audio(tmp_path / f"{s}.wav"))[: conv.num_frames]
        mouth = conv.params[s]["mouth_open"]
        r = np.corrcoef(mouth, env)[0, 1]
        print(f"side {s}: corr(mouth_open, audio RMS) = {r:.3f}")
        assert r > 0.8
        # and the other side's voice does not open this mouth
        other = frame_envelope(conv.audio[1 - s])
        assert np.corrcoef(mouth, other)[0, 1] < 0.3


def _pause_onsets(env: np.ndarray, min_speech: int = 5, min_pause: int = 5) -> list[int]:
    """Frames where speech (>= min_speech frames loud) stops for >= min_pause frames."""
    loud = env > SPEECH_THRESHOLD
    onsets, run = [], 0
    for t in range(1, len(loud) - min_pause):
        run = run + 1 if loud[t - 1] else 0
        if loud[t - 1] and not loud[t] and run >= min_speech and not loud[t : t + min_pause].any():
            onsets.append(t)
    return onsets


def _nod_onsets(pitch: np.ndarray) -> list[int]:
    """Nods read from the pitch track: a local peak >= 3 degrees above the 2 s running median;
    the onset is the last frame before the peak under 20 % of the peak's height."""
    pad = FPS
    padded = np.pad(pitch, pad, mode="edge")
    base = np.array([np.median(padded[t : t + 2 * pad + 1]) for t in range(len(pitch))])
    d = pitch - base
    onsets = []
    for t in range(1, len(d) - 1):
        if d[t] >= 3.0 and d[t] >= d[t - 1] and d[t] > d[t + 1]:
            k = t
            while k > 0 and d[k] > 0.2 * d[t]:
                k -= 1
            onsets.append(k)
    return onsets


def test_listener_nods_follow_the_others_pauses_with_the_stated_delay(long_worlds):
    """Pauses are read from the speaker's audio, nods from the listener's pitch. Stated:
    a nod with probability 0.8, U(0.2, 0.6) s after the pause (when the listener is silent)."""
    delays, followed, pauses = [], 0, 0
    window = int(1.2 * FPS)
    for conv in long_worlds:
        for s in (0, 1):
            env_other = frame_envelope(conv.audio[1 - s])
            env_self = frame_envelope(conv.audio[s])
            nods = np.array(_nod_onsets(conv.params[s]["pitch"]))
            for p in _pause_onsets(env_other):
                if p + window >= conv.num_frames or (env_self[p - 2 : p + window] > SPEECH_THRESHOLD).any():
                    continue  # the listener speaks around then: the rule does not apply
                pauses += 1
                after = nods[(nods >= p - 2) & (nods < p + window)] if nods.size else nods
                if after.size:
                    followed += 1
                    delays.append((after.min() - p) / FPS)
    delays = np.array(delays)
    rate = followed / pauses
    low, high = RULES.nod_delay
    print(
        f"{pauses} pauses, nod rate {rate:.2f}, delay median {np.median(delays):.2f} s, "
        f"quartiles {np.percentile(delays, [25, 75]).round(2)}"
    )
    assert pauses >= 60
    assert 0.65 <= rate <= 0.95  # stated 0.8
    # Pause onsets are read a frame early (the last syllable fades), nod onsets at 20 % of the rise.
    assert low <= np.median(delays) <= high
    assert np.mean((delays >= low - 0.1) & (delays <= high + 0.15)) >= 0.85


def _smile_onsets(smile: np.ndarray, level: float = 0.3) -> list[int]:
    return [t for t in range(1, len(smile)) if smile[t - 1] < level <= smile[t]]


def test_listener_smiles_back_with_the_stated_delay_and_probability(long_worlds):
    """Smile onsets read from the smile tracks. Stated: a smile back with probability 0.7,
    U(0.3, 0.8) s after the other's smile starts; spontaneous smiles at 1/6 per second add
    a few chance followers (expected measured rate ~0.72-0.78)."""
    delays, followed, smiles = [], 0, 0
    window = int(1.2 * FPS)
    for conv in long_worlds:
        for s in (0, 1):
            mine = np.array(_smile_onsets(conv.params[s]["smile"]))
            for t in _smile_onsets(conv.params[1 - s]["smile"]):
                if t + window >= conv.num_frames or conv.params[s]["smile"][t] >= 0.3:
                    continue  # already smiling: the other's smile may be a smile back itself
                smiles += 1
                after = mine[(mine > t) & (mine <= t + window)] if mine.size else mine
                if after.size:
                    followed += 1
                    delays.append((after.min() - t) / FPS)
    delays = np.array(delays)
    rate = followed / smiles
    low, high = RULES.smile_back_delay
    print(f"{smiles} smiles, smile-back rate {rate:.2f}, delay median {np.median(delays):.2f} s")
    assert smiles >= 50
    assert 0.55 <= rate <= 0.92  # stated 0.7 (+ chance)
    assert low <= np.median(delays) <= high
    assert np.mean((delays >= low - 0.1) & (delays <= high + 0.1)) >= 0.8


def test_listener_partly_mirrors_head_tilt(long_worlds):
    """Roll of the listener correlates with the other's roll 0.6 s earlier (stated gain 0.3-0.6)."""
    shift = round(RULES.mirror_delay * FPS)
    rs = []
    for conv in long_worlds:
        for s in (0, 1):
            mine, other = conv.params[s]["roll"], conv.params[1 - s]["roll"]
            rs.append(np.corrcoef(mine[shift:], other[:-shift])[0, 1])
    print("mirror correlations", np.round(rs, 2))
    assert np.mean(rs) > 0.2


def test_turn_taking_has_overlaps_and_silences(long_worlds):
    both = silence = 0
    for conv in long_worlds:
        loud = [frame_envelope(a) > SPEECH_THRESHOLD for a in conv.audio]
        both += int((loud[0] & loud[1]).sum())
        silence += int((~loud[0] & ~loud[1]).sum())
        assert loud[0].mean() > 0.2 and loud[1].mean() > 0.2  # both take turns
    assert both > 0 and silence > 0


def test_synth_workers_write_the_same_world(tmp_path):
    args = ["--conversations", "3", "--seconds", "2", "--seed", "11", "--quiet"]
    assert main(["synth", "--out", str(tmp_path / "one"), *args]) == 0
    assert main(["synth", "--out", str(tmp_path / "two"), "--workers", "2", *args]) == 0
    manifest = (tmp_path / "one" / "manifest.jsonl").read_text()
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == manifest  # same entries, seed order
    for seed in (11, 12, 13):
        for name in ("params.npz", "avatar.wav", "user.wav"):
            one, two = (tmp_path / d / f"synth-{seed}" / name for d in ("one", "two"))
            assert one.read_bytes() == two.read_bytes(), (seed, name)
    with pytest.raises(SystemExit, match="--workers: expected >= 1"):
        main(["synth", "--out", str(tmp_path / "x"), "--workers", "0"])


def test_synth_writes_a_manifest_prepare_accepts(tmp_path):
    out = tmp_path / "world"
    assert main(["synth", "--out", str(out), "--conversations", "2", "--seconds", "4", "--seed", "7", "--quiet"]) == 0
    conversations = read_manifest(out / "manifest.jsonl")
    assert [c.id for c in conversations] == ["synth-7", "synth-8"]
    for conv in conversations:
        for path in conv.media().values():
            assert path.is_file()
    params, meta = load_params(out / "synth-7" / "params.npz")
    assert meta["seed"] == 7 and len(params["avatar"]) == 100
    np.testing.assert_allclose(params["avatar"].values, generate_conversation(7, 4.0).params[0].values)

    prepared = tmp_path / "prepared"
    code = main(["prepare", "--manifest", str(out / "manifest.jsonl"), "--out", str(prepared),
                 "--random-init", "--config", "tiny", "--min-frames", "25", "--quiet"])  # fmt: skip
    assert code == 0
    ledger = read_ledger(prepared)
    index = json.loads((prepared / "index.json").read_text())
    assert index["totals"]["done"] == 2 and index["totals"]["failed"] == 0
    assert index["totals"]["clips"] >= 2 and index["totals"]["clip_frames"] >= 150
    for conv_id in ("synth-7", "synth-8"):
        assert (prepared / "shards" / f"{conv_id}.safetensors").is_file()
    assert sorted(ledger) == ["synth-7", "synth-8"]
