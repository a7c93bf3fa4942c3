"""`avatar-forcing prepare`: manifest checks, clip planning, shards, resume, errors, the dataset.

The media are generated here: the sample portrait moved smoothly over a grey canvas (the Haar
detector finds it on every frame), blanked for stretches to lose the face, a corrupt file,
and sine-wave voices. The model is the tiny preset with random weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from avatar_forcing.apps.cli import main
from avatar_forcing.engine.portrait import encode_user_motion
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import load_image, read_video, save_audio, write_video
from avatar_forcing.metrics.report import evaluate, load_sequences
from avatar_forcing.training.batch import TrainingExample, collate
from avatar_forcing.training.data import ShardDataset
from avatar_forcing.training.data.clips import bridge_gaps, plan_clips
from avatar_forcing.training.data.manifest import ManifestError, read_manifest, write_manifest
from avatar_forcing.training.data.prepare import Encoders, PrepareOptions, prepare
from avatar_forcing.training.data.shards import read_ledger

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
FRAMES = 48
# Both faces are visible on [0, 16), [24, 29) and [35, 48): the avatar's face is gone on
# [16, 24) and for the single frame 8 (a gap the cropper bridges), the user's on [29, 35).
AVATAR_BLANK = [(8, 9), (16, 24)]
USER_BLANK = [(29, 35)]
OPTIONS = PrepareOptions(min_frames=8, max_gap=3, max_frames=0, progress=False)


def face_video(blank: list[tuple[int, int]], phase: float) -> np.ndarray:
    face = cv2.resize(load_image(SAMPLES / "portrait.png"), (144, 144), interpolation=cv2.INTER_AREA)
    frames = np.full((FRAMES, 192, 192, 3), 96, np.uint8)
    for t in range(FRAMES):
        if any(start <= t < end for start, end in blank):
            continue
        x, y = int(24 + 22 * np.sin(t / 5 + phase)), int(24 + 22 * np.cos(t / 7 + phase))
        frames[t, y : y + 144, x : x + 144] = face
    return frames


def voice(frequency: float, frames: int = FRAMES) -> np.ndarray:
    t = np.arange(frames * 640) / 16000
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def entry(conv_id: str, avatar_video: str = "avatar.mp4", **fields: str) -> dict[str, str]:
    return {
        "id": conv_id,
        "avatar_video": avatar_video,
        "user_video": fields.get("user_video", "user.mp4"),
        "avatar_audio": fields.get("avatar_audio", "avatar.wav"),
        "user_audio": fields.get("user_audio", "user.wav"),
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversations")
    write_video(root / "avatar.mp4", face_video(AVATAR_BLANK, 0.0))
    write_video(root / "user.mp4", face_video(USER_BLANK, 1.0))
    write_video(root / "short.mp4", face_video([], 2.0)[:6])  # 6 frames < min_frames
    save_audio(root / "avatar.wav", voice(220.0))
    save_audio(root / "user.wav", voice(330.0))
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_manifest(
        root / "manifest.jsonl",
        [
            entry("talk"),
            entry("corrupt", avatar_video="corrupt.mp4"),
            entry("missing", user_audio="later.wav"),  # created by the resume test
            entry("short", avatar_video="short.mp4"),
        ],
    )
    return root


@pytest.fixture(scope="module")
def encoders() -> Encoders:
    from avatar_forcing.config import tiny
    from avatar_forcing.nn.model import random_model

    return Encoders.from_model(random_model(tiny()), "random-init:tiny")


@pytest.fixture(scope="module")
def prepared(media: Path, encoders: Encoders, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("prepared")
    reports: list[str] = []
    index = prepare(media / "manifest.jsonl", out, encoders, OPTIONS, report=reports.append)
    return out, index, reports


# --- clip planning ------------------------------------------------------------------------------


def mask(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text])


def test_gaps_up_to_max_gap_are_bridged_inside_but_not_at_the_ends() -> None:
    present = mask("0011011000111100")
    assert bridge_gaps(present, 1).tolist() == mask("0011111000111100").tolist()
    assert bridge_gaps(present, 3).tolist() == mask("0011111111111100").tolist()
    assert bridge_gaps(present, 0).tolist() == present.tolist()


def test_plan_splits_on_lost_faces_drops_short_stretches_and_cuts_long_ones() -> None:
    #                 0         1         2
    #                 0123456789012345678901234
    present = mask("1111101111000001100111111")
    plan = plan_clips(present, min_frames=4, max_gap=1)
    assert plan.kept == [(0, 10), (19, 25)]
    assert plan.dropped == [(15, 17)]
    assert plan.dropped_frames == 2
    cut = plan_clips(present, min_frames=4, max_gap=1, max_frames=4)
    assert cut.kept == [(0, 4), (4, 8), (19, 23)]
    assert cut.dropped == [(8, 10), (15, 17), (23, 25)]
    with pytest.raises(ValueError, match="max_frames"):
        plan_clips(present, min_frames=4, max_frames=3)
    with pytest.raises(ValueError, match="present"):
        plan_clips(np.ones(5), min_frames=1)


# --- manifest -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"m\.jsonl:2: not valid JSON"),
        ('["a list"]', r"m\.jsonl:2: expected a JSON object"),
        ('{"id": "", "avatar_video": "a"}', r"m\.jsonl:2: field 'id'"),
        ('{"id": "b", "avatar_video": "a", "user_video": "u", "avatar_audio": "x"}', r"m\.jsonl:2: field 'user_audio'"),
        ('{"id": "b", "avatar_video": "a", "user_video": "u", "avatar_audio": "x", "user_audio": 3}', "'user_audio'"),
        (json.dumps({**entry("b"), "mixed_audio": "m.wav"}), r"m\.jsonl:2: unknown field\(s\) \['mixed_audio'\]"),
        (json.dumps(entry("a")), r"m\.jsonl:2: field 'id': 'a' already used on line 1"),
    ],
)
def test_bad_manifest_lines_name_the_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(entry("a")) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_manifest_paths_resolve_against_its_folder_and_comments_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.jsonl"
    path.parent.mkdir()
    path.write_text("# dyadic conversations\n\n" + json.dumps(entry("a", avatar_video="/abs/a.mp4")) + "\n")
    (conv,) = read_manifest(path)
    assert conv.avatar_video == Path("/abs/a.mp4")
    assert conv.user_video == tmp_path / "sub" / "user.mp4"
    assert conv.line == 3
    with pytest.raises(ManifestError, match="no conversations"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_manifest(tmp_path / "empty.jsonl")


# --- prepare ------------------------------------------------------------------------------------


def test_lost_faces_split_the_conversation_and_short_clips_are_dropped_and_counted(prepared) -> None:
    out, index, _ = prepared
    talk = [c for c in index["clips"] if c["conversation"] == "talk"]
    assert [(c["start_frame"], c["num_frames"]) for c in talk] == [(0, 16), (35, 13)]
    ledger = read_ledger(out)
    assert ledger["talk"].status == "done"
    assert (ledger["talk"].frames, ledger["talk"].clips, ledger["talk"].clip_frames) == (48, 2, 29)
    assert (ledger["talk"].dropped_clips, ledger["talk"].dropped_frames) == (1, 5)  # [24, 29)
    assert ledger["talk"].no_face_frames == 8 + 6  # [16, 24) and [29, 35)
    assert ledger["short"].status == "done" and ledger["short"].clips == 0
    assert ledger["short"].dropped_clips == 1 and ledger["short"].dropped_frames == 6
    assert ledger["short"].shard is None
    totals = index["totals"]
    assert (totals["conversations"], totals["done"], totals["failed"]) == (4, 2, 2)
    assert (totals["clips"], totals["dropped_clips"], totals["dropped_frames"]) == (2, 2, 11)


def test_unreadable_and_missing_files_are_reported_and_the_rest_go_on(prepared, media: Path) -> None:
    out, index, reports = prepared
    ledger = read_ledger(out)
    assert ledger["corrupt"].status == "failed"
    assert "avatar_video" in ledger["corrupt"].error and "corrupt.mp4" in ledger["corrupt"].error
    assert ledger["missing"].status == "failed"
    assert "user_audio" in ledger["missing"].error and "later.wav" in ledger["missing"].error
    assert any("corrupt.mp4" in line for line in reports) and any("later.wav" in line for line in reports)
    assert set(index["failed"]) == {"corrupt", "missing"}
    assert (out / "shards" / "talk.safetensors").is_file()


def test_shard_holds_latents_audio_features_and_identity_of_each_clip(prepared, media: Path, encoders) -> None:
    out, _, _ = prepared
    with safe_open(str(out / "shards" / "talk.safetensors"), framework="numpy") as shard:
        arrays = {name: shard.get_tensor(name) for name in shard.keys()}  # noqa: SIM118 (safe_open is no dict)
        meta = shard.metadata()
    assert meta["conversation"] == "talk"
    for k, frames in (("0", 16), ("1", 13)):
        assert arrays[f"{k}/avatar_motion"].shape == (frames, 512)
        assert arrays[f"{k}/user_motion"].shape == (frames, 512)
        assert arrays[f"{k}/avatar_audio"].shape == (frames, 512)
        assert arrays[f"{k}/user_audio"].shape == (frames, 512)
        assert arrays[f"{k}/identity"].shape == (512,)
        assert all(np.isfinite(a).all() for a in arrays.values())
        # r_s is the motion latent of the clip's first avatar crop: the first row of avatar_motion.
        np.testing.assert_allclose(arrays[f"{k}/reference_motion"], arrays[f"{k}/avatar_motion"][0], atol=1e-5)
        # The two sides are encoded from their own crops and voices.
        assert not np.allclose(arrays[f"{k}/avatar_motion"], arrays[f"{k}/user_motion"])
        assert not np.allclose(arrays[f"{k}/avatar_audio"], arrays[f"{k}/user_audio"])
    # The second clip's user latents are the user's frames 35..47 cropped and encoded.
    user_frames = read_video(media / "user.mp4").frames[35:48]
    crops = FaceCropper(64).crop_video(user_frames, "user.mp4")
    expected = encode_user_motion(encoders.motion_autoencoder, crops).numpy()
    np.testing.assert_allclose(arrays["1/user_motion"], expected, atol=1e-5)
    # Sine voices are stationary, so a clip's audio features barely change along time except
    # where the clip ends (padding); the avatar's 220 Hz differs from the user's 330 Hz.
    assert (
        np.abs(arrays["0/avatar_audio"][4] - arrays["0/avatar_audio"][8]).max()
        < np.abs(arrays["0/avatar_audio"][4] - arrays["0/user_audio"][4]).max()
    )


def test_rerun_resumes_skips_finished_retries_failed_and_refuses_other_settings(
    prepared, media: Path, encoders: Encoders, tmp_path: Path
) -> None:
    out = tmp_path / "prepared"
    shutil.copytree(prepared[0], out)  # the first run's output, copied: the other tests keep theirs
    reports: list[str] = []
    shard = out / "shards" / "talk.safetensors"
    first_write = shard.stat().st_mtime_ns
    save_audio(media / "later.wav", voice(330.0))  # the missing file appears
    try:
        index = prepare(media / "manifest.jsonl", out, encoders, OPTIONS, report=reports.append)
    finally:
        (media / "later.wav").unlink()
    assert "resuming: 2 of 4 conversations already done" in reports
    assert shard.stat().st_mtime_ns == first_write  # not redone
    ledger = read_ledger(out)
    assert ledger["missing"].status == "done" and ledger["missing"].clips == 2
    assert ledger["corrupt"].status == "failed"
    assert index["totals"]["done"] == 3 and index["totals"]["clips"] == 4
    lines = (out / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["talk", "corrupt", "missing", "short", "corrupt", "missing"]
    with pytest.raises(ValueError, match=r"settings.*min_frames: 8 -> 10"):
        prepare(media / "manifest.jsonl", out, encoders, PrepareOptions(min_frames=10, max_gap=3, max_frames=0))


def test_resume_refuses_weights_changed_in_the_same_folder(prepared, media: Path, tmp_path: Path) -> None:
    from avatar_forcing.config import tiny
    from avatar_forcing.nn.model import random_model
    from avatar_forcing.training.latent_scale import scale_latents

    out = tmp_path / "prepared"
    shutil.copytree(prepared[0], out)
    model = random_model(tiny())  # the weights the first run used, under the same name
    scale_latents(model.motion_autoencoder, 2.0)  # ... then changed in place: other latents
    changed = Encoders.from_model(model, "random-init:tiny")
    with pytest.raises(ValueError, match=r"other settings \(encoders_sha256: "):
        prepare(media / "manifest.jsonl", out, changed, OPTIONS)


def test_cli_prepare_exits_1_when_some_conversations_failed(media: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["prepare", "--manifest", str(media / "manifest.jsonl"), "--out", str(out)]
    argv += ["--random-init", "--config", "tiny", "--min-frames", "8", "--max-gap", "3", "--max-frames", "0", "--quiet"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "2 clips (29 frames) from 2 of 4 conversations" in printed
    assert "dropped 2 short clips (11 frames)" in printed
    assert "failed corrupt:" in printed and "failed missing:" in printed
    assert json.loads((out / "index.json").read_text())["totals"]["clips"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    assert main(["prepare", "--manifest", str(bad), "--out", str(out), "--random-init"]) == 2
    assert "field 'avatar_video'" in capsys.readouterr().err


# --- dataset ------------------------------------------------------------------------------------


def test_dataset_yields_training_examples_of_clips_and_windows(prepared) -> None:
    out, _, _ = prepared
    clips = ShardDataset(out)
    assert len(clips) == 2
    first = clips[0]
    assert isinstance(first, TrainingExample)
    assert first.key == "talk#0" and first.length == 16
    assert first.avatar_motion.shape == (16, 512) and first.reference_motion.shape == (512,)
    assert clips.identity(0).shape == (512,)

    windows = ShardDataset(out, window=8, stride=4)
    # clip of 16 frames: starts 0, 4, 8; clip of 13: starts 0, 4
    assert [w.key for w in windows] == ["talk#0@0", "talk#0@4", "talk#0@8", "talk#1@0", "talk#1@4"]
    window = windows[1]
    assert window.avatar_motion.shape == (8, 512)
    torch.testing.assert_close(window.avatar_motion, first.avatar_motion[4:12])
    torch.testing.assert_close(window.user_audio, first.user_audio[4:12])
    batch = collate([windows[i] for i in range(len(windows))])
    assert batch.avatar_motion.shape == (5, 8, 512) and bool(batch.mask.all())
    with pytest.raises(IndexError):
        windows[5]
    with pytest.raises(ValueError, match="window"):
        ShardDataset(out, window=0)
    with pytest.raises(FileNotFoundError, match="avatar-forcing prepare"):
        ShardDataset(out / "shards")


def test_eval_reads_prepared_shards_as_ground_truth(prepared) -> None:
    out, _, _ = prepared
    truth = load_sequences(out)
    assert sorted(truth) == ["talk#0", "talk#1"]
    generated = {name: {"avatar_motion": arrays["user_motion"]} for name, arrays in truth.items()}
    report = evaluate(generated, truth)
    m = report["families"]["motion"]
    assert (m["sequences"], m["frames"]) == (2, 29)
    assert m["rpcc"] > 0 and m["fd"] > 0  # the user's motion is not the avatar's
    assert m["sid"] is None and "distinct frames; expected at least k = 40" in m["sid_skipped"]  # 29 frames
