"""`avatar-forcing build-demo --quick` and `synth-ablation` end to end at toy sizes: every step is
the project's own command, the result is a loadable model with its record, and the ablation
report has the paper's table layout. (The shipped model's own behaviour: test_demo_model.py.)"""

from __future__ import annotations

import json

import pytest

from avatar_forcing.apps.cli import main
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.synthetic.demo_model import RECORD_FILE


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-build")
    assert main(["build-demo", "--work", str(work), "--quick"]) == 0
    return work


def test_quick_build_writes_a_half_precision_model_with_its_record(work):
    model_dir = work / "model"
    model = load_pretrained(model_dir)  # float16 on disk, float32 once loaded
    assert next(model.parameters()).dtype.is_floating_point
    record = json.loads((model_dir / RECORD_FILE).read_text())
    names = [step["step"] for step in record["steps"]]
    assert names == ["1. synth", "2. synth", "3. train-autoencoder", "4. prepare", "5. prepare", "6. train", "7. train"]
    assert set(record["seconds"]) == set(names)  # every step ran and was timed
    assert record["recipe"]["autoencoder_steps"] == 20 and record["dpo"]["step"] == "6"
    # the DPO run started from the DF result and the DF run from the trained auto-encoder
    assert "--init-weights " + str(work / "df-final") in record["steps"][-1]["command"]
    assert "--init-weights " + str(work / "autoencoder") in record["steps"][-2]["command"]


def test_rerun_resumes_without_redoing_steps(work, capsys):
    assert main(["build-demo", "--work", str(work), "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 7


def test_ablation_report_has_the_table_layout(work):
    out = work / "ablation.md"
    argv = ["synth-ablation", "--work", str(work), "--out", str(out), "--quick", "--conversations", "2",
            "--seconds", "4", "--samples", "1", "--bootstrap", "20"]  # fmt: skip
    assert main(argv) == 0
    text = out.read_text()
    for row in ("(a) w/o user motion", "(b) w/o DPO", "(c) full (DPO)", "ground truth"):
        assert f"| {row} |" in text
    assert "rPCC-exp" in text and "## Direction, compared with the paper" in text
    result = json.loads(out.with_suffix(".json").read_text())
    gt = result["rows"]["gt"]["values"]
    assert gt["expression"]["rpcc"] == 0.0 and gt["pose"]["fd"] == pytest.approx(0.0, abs=1e-6)
    assert (work / "df-no-user-motion-final" / "model.safetensors").is_file()
