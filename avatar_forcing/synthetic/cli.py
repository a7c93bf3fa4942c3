"""`avatar-forcing synth`: a synthetic world of dyadic conversations, as a `prepare` manifest.

    avatar-forcing synth --out data/synth --conversations 20 --seconds 30 --seed 0
    avatar-forcing prepare --manifest data/synth/manifest.jsonl --out data/synth-prepared ...

Conversation k gets the seed `seed + k` and the folder OUT/synth-<seed+k>/ holding avatar.mp4,
user.mp4, avatar.wav, user.wav and params.npz (the per-frame ground truth; docs/synthetic-world.md).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl + one folder each)")
    parser.add_argument("--conversations", type=int, default=1, help="how many conversations (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each, seconds (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first conversation (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering at once (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no per-conversation lines")
    return parser


def write_one(out: Path, seed: int, seconds: float) -> dict[str, str]:
    """Conversation `seed` into OUT/synth-<seed>/; its manifest entry (paths relative to OUT)."""
    from avatar_forcing.synthetic.world import generate_conversation, write_conversation

    conv_id = f"synth-{seed}"
    names = write_conversation(generate_conversation(seed, seconds), out / conv_id)
    return {"id": conv_id, **{field: f"{conv_id}/{name}" for field, name in names.items()}}


def main(argv: list[str] | None = None) -> int:
    """Write synthetic dyadic conversations and their manifest."""
    from avatar_forcing.training.data.manifest import write_manifest

    args = build_parser().parse_args(argv)
    if args.conversations < 1:
        raise SystemExit("error: --conversations: expected >= 1")
    if args.seconds < 1.0:
        raise SystemExit("error: --seconds: expected >= 1.0")
    if args.workers < 1:
        raise SystemExit("error: --workers: expected >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + k for k in range(args.conversations)]
    workers = min(args.workers, len(seeds))
    # every conversation draws from its own seed, so the processes' order changes no byte;
    # spawned, not forked: the parent may hold torch's thread pools
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    if pool:
        jobs = pool.map(write_one, [args.out] * len(seeds), seeds, [args.seconds] * len(seeds))
    else:
        jobs = (write_one(args.out, s, args.seconds) for s in seeds)
    entries = []
    try:
        for entry in jobs:
            entries.append(entry)
            if not args.quiet:
                print(f"{entry['id']}: {args.seconds:g} s")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    write_manifest(args.out / "manifest.jsonl", entries)
    if not args.quiet:
        print(f"wrote {args.out / 'manifest.jsonl'}: {len(entries)} conversations")
    return 0
