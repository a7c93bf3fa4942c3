"""The evaluation report: load generated and ground-truth sequences, compute every metric
family that both sides supply, add the engine's measured latency, return a JSON-able dict.

Sequences on disk (one per file, matched by file stem):
- ground truth: `.npz` with `avatar_motion` (T, D) and `user_motion` (T, D); optionally
  `expression` / `user_expression` (T, 50) and `pose` / `user_pose` (T, 6); or a folder made
  by `avatar-forcing prepare` (its clips, named `<conversation>#<clip>`);
- generated: `.npz` with `avatar_motion` (and optionally `expression`, `pose`), or `.npy`
  holding the avatar motion latents alone.

Metric families: `motion` (motion latents, k = 40), `expression` (k = 40), `pose` (k = 20).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatar_forcing.config import FPS
from avatar_forcing.metrics import motion

# family -> (generated/gt avatar key, user key, SID clusters)
FAMILIES = {
    "motion": ("avatar_motion", "user_motion", motion.MOTION_CLUSTERS),
    "expression": ("expression", "user_expression", motion.EXPRESSION_CLUSTERS),
    "pose": ("pose", "user_pose", motion.POSE_CLUSTERS),
}
KNOWN_KEYS = {key for avatar, user, _ in FAMILIES.values() for key in (avatar, user)}

Sequence = dict[str, np.ndarray]  # key -> (T, F)


def _load_file(path: Path) -> Sequence:
    try:
        if path.suffix == ".npy":
            return {"avatar_motion": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files if key in KNOWN_KEYS}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy/.npz file ({exc})") from exc
    if not arrays:
        raise ValueError(f"{path}: none of the arrays {sorted(KNOWN_KEYS)}; expected at least avatar_motion")
    return arrays


def load_sequences(path: str | Path) -> dict[str, Sequence]:
    """A folder of .npz/.npy files, one .npz/.npy file, or a prepared-shards folder -> name -> arrays."""
    path = Path(path)
    if path.is_dir() and (path / "index.json").is_file():
        from avatar_forcing.training.data.dataset import ShardDataset

        clips = ShardDataset(path)
        return {
            example.key: {"avatar_motion": example.avatar_motion.numpy(), "user_motion": example.user_motion.numpy()}
            for example in clips
        }
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise ValueError(f"{path}: no .npz or .npy files; expected one file per sequence")
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    stems = [f.stem for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"{path}: sequences {duplicates} exist as both .npz and .npy; keep one")
    return {f.stem: _load_file(f) for f in files}


@dataclass(frozen=True)
class Paired:
    """One family's arrays, aligned per sequence."""

    names: list[str]
    gt: list[np.ndarray]
    generated: list[np.ndarray]
    user: list[np.ndarray] | None  # None when the ground truth has no user track for the family


def pair(
    generated: dict[str, Sequence], ground_truth: dict[str, Sequence], family: str, trim: bool = False
) -> Paired | None:
    """The family's arrays for every generated sequence, or None when a side lacks them."""
    avatar_key, user_key, _ = FAMILIES[family]
    missing = sorted(set(generated) - set(ground_truth))
    if missing:
        raise ValueError(f"generated sequences {missing[:5]} have no ground truth of the same name")
    names = sorted(generated)
    if not all(avatar_key in generated[n] and avatar_key in ground_truth[n] for n in names):
        return None
    has_user = all(user_key in ground_truth[n] for n in names)
    out: dict[str, list[np.ndarray]] = {"gt": [], "generated": [], "user": []}
    for name in names:
        tracks = {"generated": generated[name][avatar_key], "gt": ground_truth[name][avatar_key]}
        if has_user:
            tracks["user"] = ground_truth[name][user_key]
        for side, track in tracks.items():
            if np.ndim(track) != 2:
                key = user_key if side == "user" else avatar_key
                raise ValueError(f"{name}: {side} {key}: shape {np.shape(track)}; expected (T, F) per-frame parameters")
        lengths = {side: np.shape(track)[0] for side, track in tracks.items()}
        shortest = min(lengths.values())
        if len(set(lengths.values())) > 1 and not trim:
            raise ValueError(f"{name}: {family} frame counts differ {lengths}; pass trim to cut to the shortest")
        for k, v in tracks.items():
            out[k].append(np.asarray(v)[:shortest])
    return Paired(names, out["gt"], out["generated"], out["user"] if has_user else None)


def family_metrics(paired: Paired, clusters: int, pooled_rpcc: bool = False) -> dict[str, float | int | None]:
    result: dict[str, float | int | None] = {"sequences": len(paired.names), "frames": sum(len(g) for g in paired.gt)}
    result["rpcc"] = None if paired.user is None else motion.rpcc(paired.gt, paired.generated, paired.user, pooled_rpcc)
    try:
        result["sid"] = motion.sid(paired.gt, paired.generated, clusters)
        result["sid_gt"] = motion.sid(paired.gt, paired.gt, clusters)  # the ground truth's own diversity
    except motion.TooFewFramesError as exc:  # a small test set: report the rest
        result["sid"] = result["sid_gt"] = None
        result["sid_skipped"] = str(exc)
    result["var"] = motion.variance(paired.generated)
    result["var_gt"] = motion.variance(paired.gt, "gt")
    result["fd"] = motion.fd(paired.gt, paired.generated)
    result["sid_clusters"] = clusters
    return result


def measure_latency(
    config: str = "paper", blocks: int = 3, device: str | None = None, nfe: int = 10, block: int = 10
) -> dict:
    """Per-block generation time of the streaming engine (diagnostics/bench.py), random weights.

    latency_s = block / fps (the block of input the engine waits for) + the median block time:
    the delay from a user's cue to the first generated frame that can react to it.
    """
    import torch

    from avatar_forcing.diagnostics.bench import bench_config, matmul_rate

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = argparse.Namespace(block=block, nfe=nfe, blocks=blocks, dtype="fp32", decode=False)
    dev = torch.device(device)
    with torch.inference_mode() if dev.type == "cuda" else nullcontext():  # as `avatar-forcing bench` runs
        rate = matmul_rate(dev, torch.float32, n=1024, repeats=3)
        figures = bench_config(config, args, dev, rate)
    return {
        "config": config,
        "device": device,
        "threads": torch.get_num_threads(),
        "nfe": nfe,
        "block": block,
        "blocks_timed": blocks,
        "block_ms": figures["block_ms"],
        "block_ms_p95": figures["block_ms_p95"],
        "latency_s": block / FPS + figures["block_ms"] / 1e3,
        "realtime_factor": figures["realtime_factor_generation"],
    }


def evaluate(
    generated: dict[str, Sequence],
    ground_truth: dict[str, Sequence],
    trim: bool = False,
    pooled_rpcc: bool = False,
) -> dict:
    """Every family both sides supply -> its metrics. ValueError when none can be computed."""
    if not generated:
        raise ValueError("generated: no sequences")
    report: dict = {"sequences": len(generated), "families": {}}
    for family, (_, _, clusters) in FAMILIES.items():
        paired = pair(generated, ground_truth, family, trim)
        if paired is not None:
            report["families"][family] = family_metrics(paired, clusters, pooled_rpcc)
    if not report["families"]:
        raise ValueError(
            f"no metric family in common: generated and ground truth must both have one of "
            f"{[avatar for avatar, _, _ in FAMILIES.values()]} for every sequence"
        )
    report["constants"] = {
        "pcc": "flattened over frames x features, per sequence" + (" (pooled over sequences)" if pooled_rpcc else ""),
        "kmeans_seed": motion.KMEANS_SEED,
        "kmeans_iterations": motion.KMEANS_ITERATIONS,
        "fd_eps": motion.FD_EPS,
        "variance_ddof": 0,
        "covariance_ddof": 1,
    }
    return report


def summary_lines(report: dict) -> list[str]:
    lines = []
    for family, m in report["families"].items():
        rpcc = "n/a" if m["rpcc"] is None else f"{m['rpcc']:.4f}"
        sid = "n/a" if m["sid"] is None else f"{m['sid']:.3f} (gt {m['sid_gt']:.3f}, k={m['sid_clusters']})"
        lines.append(
            f"{family:10s} rPCC {rpcc}  SID {sid}  "
            f"Var {m['var']:.4g} (gt {m['var_gt']:.4g})  FD {m['fd']:.4g}  [{m['sequences']} seq, {m['frames']} frames]"
        )
    latency = report.get("latency")
    if latency:
        lines.append(
            f"latency    {latency['latency_s']:.3f} s = {latency['block']} frames / {FPS} fps + "
            f"{latency['block_ms']:.1f} ms per block ({latency['config']}, {latency['device']}, NFE {latency['nfe']})"
        )
    return lines
