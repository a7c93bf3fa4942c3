"""`avatar-forcing train`: clear errors for bad input; a run that resumes when rerun and exports weights."""

import pytest
import torch

from avatar_forcing.apps.cli import main as cli_main
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.training import checkpointing
from avatar_forcing.training.batch import SyntheticDataset, save_examples


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--random-init", "--out", "OUT"], "--data"),
        (["--data", "synthetic:4", "--random-init"], "--out"),
        (["--data", "synthetic:4", "--out", "OUT"], "--init-weights"),
        (["--data", "synthetic:x", "--random-init", "--out", "OUT"], "synthetic:N"),
        (["--data", "nowhere/", "--random-init", "--out", "OUT"], "--data 'nowhere/'"),
        (["--data", "synthetic:4", "--random-init", "--out", "OUT", "--precision", "bf16"], "precision"),
        (["--data", "synthetic:4", "--random-init", "--out", "OUT", "--batch-size", "8"], "dataset"),
        (["--data", "synthetic:4", "--random-init", "--out", "OUT", "--drop-user", "2"], "drop_user"),
        (["--data", "synthetic:4", "--random-init", "--out", "OUT", "--dpo", "--beta", "0"], "beta"),
    ],
)
def test_bad_input_names_the_field(tmp_path, capsys, argv, field):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli_main(["train", *argv, "--quiet"]) == 2
    assert field in capsys.readouterr().err


def test_examples_file_width_mismatch_names_the_track(tmp_path, capsys):
    path = save_examples(tmp_path / "ex.safetensors", [SyntheticDataset(1, 50, motion_dim=8, audio_dim=8)[0]])
    argv = ["train", "--data", str(path), "--random-init", "--out", str(tmp_path / "o"), "--quiet"]
    assert cli_main(argv) == 2
    assert "avatar_motion width 8; expected 512" in capsys.readouterr().err


def test_train_resumes_when_rerun_and_exports_serving_weights(tmp_path):
    examples = save_examples(tmp_path / "ex.safetensors", [SyntheticDataset(4, 50, seed=1)[i] for i in range(4)])
    run = str(tmp_path / "run")
    common = ["train", "--data", str(examples), "--random-init", "--config", "tiny", "--out", run, "--batch-size", "2",
              "--checkpoint-every", "1", "--log-every", "1", "--quiet", "--lr", "1e-3"]  # fmt: skip
    assert cli_main([*common, "--steps", "1"]) == 0
    assert cli_main([*common, "--steps", "2", "--export", str(tmp_path / "weights")]) == 0
    steps = [p.name for p in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == ["step_00000001", "step_00000002"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    exported = load_pretrained(tmp_path / "weights")
    last = load_pretrained(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in exported.state_dict().items())
