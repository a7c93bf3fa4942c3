"""`avatar-forcing synth-ablation`: the paper's Table 4, reproduced in the synthetic world.

    avatar-forcing build-demo --work runs/demo
    avatar-forcing synth-ablation --work runs/demo --out docs/synthetic-ablation.md

From a `build-demo` work folder (its prepared data, `df-final`, `dpo-final`):

1. variant (a), *w/o user motion*: `train` with the diffusion-forcing recipe of the build and
   `--drop-user-motion 1`, so the network never sees the user's face (it still hears the
   user); at generation its user motion is zero;
2. held-out conversations (seeds from `HELD_OUT_SEED`, in neither training nor validation);
3. per variant, conversation and sample seed: the avatar's frames from the streaming engine
   (`generate_blocks`), given the avatar's first ground-truth frame as its portrait, its own
   voice, and the user's video and voice;
4. the extractor (`synthetic/extractor.py`) reads expression (mouth_open, smile, blink) and
   pose (yaw, pitch, roll) from the generated avatar crops, from the ground-truth avatar crops
   and from the user's crops: every row, ground truth included, is measured the same way;
5. rPCC, SID, Var and FD (`avatar_forcing.metrics`) per family, with 95 % bootstrap intervals
   over conversations; the markdown table is written to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.config import MotionAutoEncoderConfig
from avatar_forcing.synthetic.demo_model import HELD_OUT_SEED, Recipe, df_arguments, run_command

VARIANTS = (
    ("a", "w/o user motion", "df-no-user-motion-final", False),
    ("b", "w/o DPO", "df-final", True),
    ("c", "full (DPO)", "dpo-final", True),
)
FAMILIES = ("expression", "pose")
METRICS = ("rpcc", "sid", "var", "fd")


@dataclass(frozen=True)
class AblationOptions:
    conversations: int = 8
    seconds: float = 20.0
    samples: int = 2  # generation seeds per conversation (the task is one-to-many)
    nfe: int = 10
    seed: int = 0
    bootstrap: int = 500  # resampling rounds of the intervals


def train_no_user_motion(work: Path, recipe: Recipe) -> Path:
    """Variant (a): the build's DF step with the user's motion always dropped."""
    out = work / "df-no-user-motion-final"
    if (out / "model.safetensors").exists():
        return out
    argv = [*df_arguments(work, recipe, "df-no-user-motion"), "--drop-user-motion", "1"]
    if run_command("train", argv) != 0:
        raise RuntimeError("training variant (a) failed")
    return out


def held_out_conversations(options: AblationOptions, mae: MotionAutoEncoderConfig) -> list[dict]:
    """Held-out conversations as the engine sees them: face crops, voices, and their seed."""
    from avatar_forcing.media.face_crop import FaceCropper
    from avatar_forcing.synthetic.world import generate_conversation

    cropper = FaceCropper.for_model(mae, detect_every=5)
    out = []
    for k in range(options.conversations):
        seed = HELD_OUT_SEED + k
        conv = generate_conversation(seed, options.seconds)
        out.append(
            {
                "seed": seed,
                "avatar_crops": cropper.crop_video(conv.frames(0), f"synth-{seed} avatar"),
                "user_crops": cropper.crop_video(conv.frames(1), f"synth-{seed} user"),
                "avatar_audio": conv.audio[0],
                "user_audio": conv.audio[1],
            }
        )
    return out


def generate(model, conv: dict, use_user_motion: bool, nfe: int, seed: int) -> np.ndarray:
    """The avatar's crops (T, S, S, 3) for one conversation, by the streaming engine."""
    from avatar_forcing.apps.generate import generate_blocks
    from avatar_forcing.engine.motion_stream import StreamOptions
    from avatar_forcing.engine.portrait import encode_portrait

    portrait = encode_portrait(model.motion_autoencoder, conv["avatar_crops"][0])
    blocks = generate_blocks(
        model,
        portrait,
        conv["avatar_audio"],
        conv["user_audio"],
        conv["user_crops"],
        StreamOptions(nfe=nfe),
        seed,
        use_user_motion=use_user_motion,
    )
    return np.concatenate([frames for _, frames in blocks])


def families(crops: np.ndarray) -> dict[str, np.ndarray]:
    from avatar_forcing.synthetic import extractor

    params = extractor.extract(crops)
    return {"expression": extractor.expression(params), "pose": extractor.pose(params)}


def metric_table(gt: list[dict], generated: list[dict], user: list[dict]) -> dict[str, dict[str, float]]:
    """family -> metric -> value, over the given sequences."""
    from avatar_forcing.metrics.report import FAMILIES as CLUSTERS
    from avatar_forcing.metrics.report import Paired, family_metrics

    table = {}
    for family in FAMILIES:
        paired = Paired(
            [str(i) for i in range(len(gt))],
            [g[family] for g in gt],
            [g[family] for g in generated],
            [u[family] for u in user],
        )
        table[family] = family_metrics(paired, CLUSTERS[family][2])
    return table


def bootstrap(
    gt: list[dict], generated: list[dict], user: list[dict], groups: list[int], rounds: int, seed: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """95 % percentile intervals, resampling whole conversations (`groups`: each sequence's)."""
    rng = np.random.default_rng(seed)
    ids = sorted(set(groups))
    draws: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        chosen = rng.choice(ids, size=len(ids), replace=True)
        index = [i for c in chosen for i, g in enumerate(groups) if g == c]
        table = metric_table([gt[i] for i in index], [generated[i] for i in index], [user[i] for i in index])
        for family in FAMILIES:
            for metric in METRICS:
                value = table[family][metric]
                if value is not None:
                    draws.setdefault((family, metric), []).append(float(value))
    return {
        family: {m: tuple(np.percentile(draws[(family, m)], [2.5, 97.5])) for m in METRICS if (family, m) in draws}
        for family in FAMILIES
    }


def run(work: Path, options: AblationOptions, recipe: Recipe, log=print) -> dict:
    """Every row of the table with its intervals, as a JSON-able dict."""
    from avatar_forcing.config import ModelConfig
    from avatar_forcing.nn.checkpoints import CONFIG_FILE, load_pretrained

    torch.manual_seed(options.seed)
    start = time.perf_counter()
    train_no_user_motion(work, recipe)
    log(f"variant (a) trained ({time.perf_counter() - start:.0f} s)")
    # crops as the variants' auto-encoder takes them (they share it: one `prepare`)
    mae = ModelConfig.load(work / VARIANTS[0][2] / CONFIG_FILE).motion_autoencoder
    image_size = mae.image_size
    convs = held_out_conversations(options, mae)
    gt = [families(c["avatar_crops"]) for c in convs]
    user = [families(c["user_crops"]) for c in convs]
    rows = {}
    for key, label, folder, use_user in VARIANTS:
        model = load_pretrained(work / folder)
        generated, gts, users, groups = [], [], [], []
        for i, conv in enumerate(convs):
            for s in range(options.samples):
                generated.append(families(generate(model, conv, use_user, options.nfe, options.seed + s)))
                gts.append(gt[i])
                users.append(user[i])
                groups.append(i)
        rows[key] = {
            "label": label,
            "weights": folder,
            "values": metric_table(gts, generated, users),
            "ci95": bootstrap(gts, generated, users, groups, options.bootstrap, options.seed),
        }
        log(f"({key}) {label}: done ({time.perf_counter() - start:.0f} s)")
    # the ground truth against itself: rPCC 0 and FD 0 by definition; SID and Var are its own
    groups = list(range(len(convs)))
    rows["gt"] = {
        "label": "ground truth",
        "weights": None,
        "values": metric_table(gt, gt, user),
        "ci95": bootstrap(gt, gt, user, groups, options.bootstrap, options.seed),
    }
    return {
        "options": options.__dict__,
        "held_out_seeds": [HELD_OUT_SEED, HELD_OUT_SEED + options.conversations - 1],
        "image_size": image_size,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _cell(row: dict, family: str, metric: str) -> str:
    value = row["values"][family][metric]
    if value is None:
        return "n/a"
    if row["weights"] is None and metric in ("rpcc", "fd"):
        return "0 (by definition)"  # the ground truth against itself
    low, high = row["ci95"][family].get(metric, (value, value))
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def markdown(result: dict, command: str) -> str:
    """The report: the table in the paper's layout, then the comparison with the paper."""
    rows = result["rows"]
    lines = [
        "# Synthetic ablation: the paper's Table 4 in the synthetic world",
        "",
        f"Regenerated by `{command}` (from a `build-demo` work folder; {result['seconds']:.0f} s here).",
        f"Held-out conversations: seeds {result['held_out_seeds'][0]}-{result['held_out_seeds'][1]}, "
        f"{result['options']['seconds']:g} s each, generation seeds per conversation: {result['options']['samples']}, "
        f"NFE {result['options']['nfe']}. Values: the metric over all sequences, with a 95 % bootstrap "
        f"interval over conversations ({result['options']['bootstrap']} rounds) in brackets.",
        "",
        "Expression = (mouth_open, smile, blink), pose = (yaw, pitch, roll), read by the extractor from",
        f"{result['image_size']} x {result['image_size']} face crops for every row, the ground truth included. "
        "rPCC: lower is better (the",
        "avatar-user correlation is closer to the ground truth's). SID, Var: higher is richer motion",
        "(the ground truth's own values are the reference). FD: lower is closer to the ground truth.",
        "",
        "| | w/ user motion | DPO | rPCC-exp ↓ | rPCC-pose ↓ | SID-exp ↑ | SID-pose ↑ "
        "| Var-exp ↑ | Var-pose ↑ | FD-exp ↓ | FD-pose ↓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    marks = {"a": ("✗", "✗"), "b": ("✓", "✗"), "c": ("✓", "✓"), "gt": ("", "")}
    for key in ("a", "b", "c", "gt"):
        row = rows[key]
        cells = [_cell(row, f, m) for m in ("rpcc",) for f in FAMILIES]
        cells += [_cell(row, f, m) for m in ("sid", "var", "fd") for f in FAMILIES]
        name = f"({key}) {row['label']}" if key != "gt" else "ground truth"
        lines.append(f"| {name} | {marks[key][0]} | {marks[key][1]} | " + " | ".join(cells) + " |")
    lines += ["", "Paper, Table 4 (real data): (a) 0.052 / 0.175 / 2.165 / 1.586 (rPCC-exp, rPCC-pose, SID, Var);",
              "(b) 0.042 / 0.146 / 2.236 / 1.408; (c) 0.003 / 0.036 / 2.442 / 1.734.", "",
              "## Direction, compared with the paper", ""]  # fmt: skip
    lines += direction_lines(rows)
    lines += ["", "The JSON beside this file (`synthetic-ablation.json`) holds every value and interval.", ""]
    return "\n".join(lines)


def direction_lines(rows: dict) -> list[str]:
    """One line per claim of the paper: holds here, or not, and whether the intervals separate."""
    out = []
    claims = [
        ("user motion makes the avatar more reactive (rPCC lower)", "b", "a", "rpcc", "lower"),
        ("user motion makes the motion richer (SID higher)", "b", "a", "sid", "higher"),
        ("user motion makes the motion richer (Var higher)", "b", "a", "var", "higher"),
        ("DPO makes the avatar more reactive (rPCC lower)", "c", "b", "rpcc", "lower"),
        ("DPO makes the motion richer (SID higher)", "c", "b", "sid", "higher"),
        ("DPO makes the motion richer (Var higher)", "c", "b", "var", "higher"),
    ]
    for text, better, worse, metric, sense in claims:
        for family in FAMILIES:
            x = rows[better]["values"][family][metric]
            y = rows[worse]["values"][family][metric]
            if x is None or y is None:
                out.append(f"- {text}, {family}: not measured")
                continue
            holds = x < y if sense == "lower" else x > y
            lx, hx = rows[better]["ci95"][family][metric]
            ly, hy = rows[worse]["ci95"][family][metric]
            separate = hx < ly or hy < lx
            verdict = "agrees" if holds else "disagrees"
            strength = "intervals apart" if separate else "intervals overlap: not resolved at this size"
            out.append(f"- {text}, {family}: ({better}) {x:.4g} vs ({worse}) {y:.4g}: **{verdict}** ({strength})")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing synth-ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a build-demo work folder")
    parser.add_argument("--out", type=Path, required=True, help="markdown report (a .json is written beside it)")
    parser.add_argument("--conversations", type=int, default=AblationOptions.conversations)
    parser.add_argument("--seconds", type=float, default=AblationOptions.seconds)
    parser.add_argument("--samples", type=int, default=AblationOptions.samples)
    parser.add_argument("--bootstrap", type=int, default=AblationOptions.bootstrap, help="resampling rounds")
    parser.add_argument("--quick", action="store_true", help="the build's --quick recipe for variant (a)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Reproduce Table 4 (user motion, DPO) on held-out synthetic conversations."""
    args = build_parser().parse_args(argv)
    for name in ("conversations", "samples", "bootstrap"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name}: expected >= 1")
    options = AblationOptions(args.conversations, args.seconds, args.samples, bootstrap=args.bootstrap)
    recipe = Recipe.quick() if args.quick else Recipe()
    for folder in ("prepared-train", "df-final", "dpo-final"):
        if not (args.work / folder).exists():
            raise SystemExit(f"error: --work {args.work}: no {folder}/; run `avatar-forcing build-demo --work` first")
    result = run(args.work, options, recipe)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["avatar-forcing synth-ablation", *(argv if argv is not None else sys.argv[2:])])
    args.out.write_text(markdown(result, command))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=list) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
