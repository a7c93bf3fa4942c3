"""`avatar-forcing synth`: a synthetic world of dyadic conversations, as a `prepare` manifest.

    avatar-forcing synth --out data/synth --conversations 20 --seconds 30 --seed 0
    avatar-forcing prepare --manifest data/synth/manifest.jsonl --out data/synth-prepared ...

Conversation k gets the seed `seed + k` and the folder OUT/synth-<seed+k>/ holding avatar.mp4,
user.mp4, avatar.wav, user.wav and params.npz (the per-frame ground truth; docs/synthetic-world.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.jsonl + one folder each)")
    parser.add_argument("--conversations", type=int, default=1, help="how many conversations (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each, seconds (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first conversation (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-conversation lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write synthetic dyadic conversations and their manifest."""
    from avatar_forcing.synthetic.world import generate_conversation, write_conversation
    from avatar_forcing.training.data.manifest import write_manifest

    args = build_parser().parse_args(argv)
    if args.conversations < 1:
        raise SystemExit("error: --conversations: expected >= 1")
    if args.seconds < 1.0:
        raise SystemExit("error: --seconds: expected >= 1.0")
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(args.conversations):
        seed = args.seed + k
        conv_id = f"synth-{seed}"
        names = write_conversation(generate_conversation(seed, args.seconds), args.out / conv_id)
        entries.append({"id": conv_id, **{field: f"{conv_id}/{name}" for field, name in names.items()}})
        if not args.quiet:
            print(f"{conv_id}: {args.seconds:g} s")
    write_manifest(args.out / "manifest.jsonl", entries)
    if not args.quiet:
        print(f"wrote {args.out / 'manifest.jsonl'}: {len(entries)} conversations")
    return 0
