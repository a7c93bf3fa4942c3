"""`avatar-forcing build-demo`: build the demo model from nothing, on CPU.

    avatar-forcing build-demo --work runs/demo             # every step's output under runs/demo
    avatar-forcing build-demo --work runs/demo --install   # ... then install it as the default model

Each step is one of the project's own commands, called with the arguments the model's
`training_record.json` lists:

1. `synth`: training conversations (seeds from 0) and validation ones (seeds from 50000);
2. `train-autoencoder`: the motion auto-encoder on both sides' faces of the training set;
3. `prepare`: training and validation shards, with that auto-encoder and the `tiny` audio
   encoder as initialised (random and frozen: its features still carry the voice's
   envelope and spectrum, which is what the avatar's mouth needs in this world);
4. `train`: diffusion forcing of the flow transformer from random weights;
5. `train --dpo`: preference fine-tuning of step 4's result (losers: its own rollouts with the
   user removed, as the paper builds them);
6. export: the weights in float16, with the config and the training record.

A step whose output is complete is skipped, so an interrupted build resumes by running the
same command again. Seeds from `HELD_OUT_SEED` on are in neither set: the tests, the sample
inputs and the ablation use them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"
RECORD_FILE = "training_record.json"
VAL_SEED = 50_000
HELD_OUT_SEED = 100_000


@dataclass(frozen=True)
class Recipe:
    """The sizes of one build (the defaults: the recipe measured in docs/synthetic-world.md)."""

    train_conversations: int = 64  # 128 identities: the auto-encoder must generalise to new faces
    val_conversations: int = 8
    seconds: float = 10.0
    autoencoder_steps: int = 4000
    autoencoder_motion_weight: float = 4.0
    autoencoder_pair_candidates: int = 4
    autoencoder_mouth_weight: float = 8.0
    autoencoder_pairs_by: str = "mouth"
    # 0: the latents keep the scale training gave them; rescaling them (training/latent_scale.py)
    # changed nothing the flow transformer learnt in 1200 steps (docs/synthetic-world.md)
    autoencoder_latent_std: float = 0.0
    df_steps: int = 1200
    dpo_steps: int = 100
    batch_size: int = 16
    df_lr: float = 5e-4
    dpo_lr: float = 2e-5
    detect_every: int = 5
    min_frames: int = 50  # prepare's shortest clip: one training window

    @classmethod
    def quick(cls) -> Recipe:
        """About a minute: the same path at toy sizes (the tests' build; not a model that talks)."""
        return cls(
            train_conversations=2, val_conversations=2, seconds=4.0, autoencoder_steps=20,
            df_steps=20, dpo_steps=6, batch_size=2, min_frames=20,
        )  # fmt: skip


def weights_dir() -> Path:
    """The installed demo model's folder (a weights folder for `--weights` / AF_WEIGHTS_DIR)."""
    return DEMO_MODEL_DIR


def df_arguments(work: Path, recipe: Recipe, name: str) -> list[str]:
    """`train` arguments of the diffusion-forcing step, writing WORK/NAME and WORK/NAME-final."""
    r = recipe
    return [
        "--data", str(work / "prepared-train"), "--val-data", str(work / "prepared-val"),
        "--init-weights", str(work / "autoencoder"), "--out", str(work / name), "--export", str(work / f"{name}-final"),
        "--steps", str(r.df_steps), "--lr", str(r.df_lr), "--warmup-steps", "100", "--ema-decay", "0.99",
        "--batch-size", str(r.batch_size), "--val-every", "400", "--checkpoint-every", "400", "--quiet",
    ]  # fmt: skip


def steps(work: Path, recipe: Recipe) -> list[tuple[str, list[str], Path]]:
    """(command, argv, the output that marks it done), in order."""
    r = recipe
    train_every = ["--batch-size", str(r.batch_size), "--val-every", "400", "--checkpoint-every", "400", "--quiet"]
    return [
        (
            "synth",
            ["--out", str(work / "synth-train"), "--conversations", str(r.train_conversations),
             "--seconds", str(r.seconds), "--seed", "0", "--workers", "2", "--quiet"],
            work / "synth-train" / "manifest.jsonl",
        ),
        (
            "synth",
            ["--out", str(work / "synth-val"), "--conversations", str(r.val_conversations),
             "--seconds", str(r.seconds), "--seed", str(VAL_SEED), "--workers", "2", "--quiet"],
            work / "synth-val" / "manifest.jsonl",
        ),
        (
            "train-autoencoder",
            ["--manifest", str(work / "synth-train" / "manifest.jsonl"),
             "--val-manifest", str(work / "synth-val" / "manifest.jsonl"),
             "--random-init", "--config", "demo", "--out", str(work / "autoencoder"),
             "--steps", str(r.autoencoder_steps), "--motion-weight", str(r.autoencoder_motion_weight),
             "--pair-candidates", str(r.autoencoder_pair_candidates), "--mouth-weight", str(r.autoencoder_mouth_weight),
             "--pairs-by", r.autoencoder_pairs_by, "--latent-std", str(r.autoencoder_latent_std),
             "--detect-every", str(r.detect_every), "--quiet"],
            work / "autoencoder" / "model.safetensors",
        ),
        *[
            (
                "prepare",
                ["--manifest", str(work / f"synth-{split}" / "manifest.jsonl"),
                 "--out", str(work / f"prepared-{split}"), "--weights", str(work / "autoencoder"),
                 "--detect-every", str(r.detect_every), "--min-frames", str(r.min_frames), "--quiet"],
                work / f"prepared-{split}" / "index.json",
            )
            for split in ("train", "val")
        ],
        (
            "train",
            df_arguments(work, r, "df"),
            work / "df-final" / "model.safetensors",
        ),
        (
            "train",
            ["--dpo", "--data", str(work / "prepared-train"), "--val-data", str(work / "prepared-val"),
             "--init-weights", str(work / "df-final"), "--out", str(work / "dpo"), "--export", str(work / "dpo-final"),
             "--steps", str(r.dpo_steps), "--lr", str(r.dpo_lr), "--warmup-steps", "50", *train_every],
            work / "dpo-final" / "model.safetensors",
        ),
    ]  # fmt: skip


def run_command(name: str, argv: list[str]) -> int:
    """One `avatar-forcing` command, in this process."""
    from avatar_forcing.apps.cli import main

    return main([name, *argv])


def export(source: Path, out: Path, record: dict) -> Path:
    """A weights folder -> `out` in at most ~20 MB: the flow transformer's matrices in int8 with a
    scale per row (`nn/quantized.py`), everything else in float16; loading restores float32.
    Also the config and the training record."""
    from safetensors.torch import load_file, save_file

    from avatar_forcing.nn.quantized import quantize_int8

    state = quantize_int8(load_file(source / "model.safetensors"), ("flow_transformer.",))
    small = {k: v.half() if v.is_floating_point() and v.dtype != torch.float16 else v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(small, out / "model.safetensors", metadata={"format": "avatar-forcing", "config": "demo"})
    shutil.copyfile(source / "config.json", out / "config.json")
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _final_metrics(run: Path) -> dict:
    """The last logged row of a training run's metrics.csv (loss, val_loss, ...)."""
    import csv

    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    last = rows[-1]
    val_rows = [row for row in rows if row.get("val_loss_ema") or row.get("val_loss")]
    if val_rows:
        last = {**last, "val_loss": val_rows[-1].get("val_loss"), "val_loss_ema": val_rows[-1].get("val_loss_ema")}
    return {k: v for k, v in last.items() if v not in (None, "")}


def build(work: Path, recipe: Recipe, log: Callable[[str], None] = print) -> Path:
    """Run every step not yet done; export the model to WORK/model; return that folder."""
    work.mkdir(parents=True, exist_ok=True)
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    commands = []
    for index, (name, argv, done) in enumerate(steps(work, recipe), start=1):
        label = f"{index}. {name}"
        commands.append({"step": label, "command": " ".join(["avatar-forcing", name, *argv])})
        if done.exists():
            log(f"{label}: done already ({done})")
            continue
        log(f"{label}: avatar-forcing {name} {' '.join(argv)}")
        start = time.perf_counter()
        code = run_command(name, argv)
        if code != 0:
            raise RuntimeError(f"step {label} failed with exit status {code}")
        timings[label] = round(time.perf_counter() - start, 1)
        (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        log(f"{label}: {timings[label]:.0f} s")
    record = {
        "recipe": asdict(recipe),
        "seeds": {
            "train": [0, recipe.train_conversations - 1],
            "val": [VAL_SEED, VAL_SEED + recipe.val_conversations - 1],
            "held_out_from": HELD_OUT_SEED,
        },
        "steps": commands,
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "autoencoder": json.loads((work / "autoencoder" / "autoencoder_record.json").read_text()),
        "diffusion_forcing": _final_metrics(work / "df"),
        "dpo": _final_metrics(work / "dpo"),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }  # fmt: skip
    return export(work / "dpo-final", work / "model", record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing build-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for every step's output (resumable)")
    parser.add_argument("--install", action="store_true", help="install the result as the default model")
    parser.add_argument("--quick", action="store_true", help="toy sizes: minutes, a smoke run of the path")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Rebuild the demo model (synth -> train-autoencoder -> prepare -> train -> train --dpo)."""
    args = build_parser().parse_args(argv)
    recipe = Recipe.quick() if args.quick else Recipe()
    try:
        model = build(args.work, recipe)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {model}")
    if args.install:
        DEMO_MODEL_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", RECORD_FILE):
            shutil.copyfile(model / name, DEMO_MODEL_DIR / name)
        print(f"installed into {DEMO_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
