"""`avatar-forcing prepare`: a manifest of dyadic conversations -> training shards.

    avatar-forcing prepare --manifest data/conversations.jsonl --out data/prepared --weights weights/

Reads each conversation's two videos (25 fps) and two separated voices (16 kHz), splits it
where a face is lost, and writes motion latents, audio features and the identity latent of
every clip (docs/training-data.md). Run it again with the same arguments to resume: finished
conversations are skipped, failed ones retried. Exit status 0 when every conversation
succeeded, 1 when some failed (the others are written), 2 for bad arguments or a bad manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avatar_forcing.apps.cli import _add_model_args, load_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL, one conversation per line")
    parser.add_argument("--out", type=Path, required=True, help="output folder (shards, ledger, index.json)")
    parser.add_argument("--min-frames", type=int, default=50, help="shortest clip kept (default 50 = 2 s)")
    parser.add_argument("--max-gap", type=int, default=5, help="longest face gap bridged, frames (default 5)")
    parser.add_argument("--max-frames", type=int, default=750, help="longest clip, frames; 0 = no limit (default 750)")
    parser.add_argument("--detect-every", type=int, default=1, help="detect faces on every k-th frame")
    parser.add_argument("--batch-size", type=int, default=16, help="face crops per encoder call")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Prepare training shards from a manifest of dyadic conversations."""
    from avatar_forcing.training.data.prepare import Encoders, PrepareOptions, prepare

    args = build_parser().parse_args(argv)
    try:
        options = PrepareOptions(
            min_frames=args.min_frames,
            max_gap=args.max_gap,
            max_frames=args.max_frames,
            detect_every=args.detect_every,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        model = load_model(args)
        weights = str(args.weights.resolve()) if args.weights else f"random-init:{args.config}"
        index = prepare(args.manifest, args.out, Encoders.from_model(model, weights, args.detect_every), options)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    totals = index["totals"]
    print(
        f"wrote {args.out}: {totals['clips']} clips ({totals['clip_frames']} frames) from "
        f"{totals['done']} of {totals['conversations']} conversations; "
        f"dropped {totals['dropped_clips']} short clips ({totals['dropped_frames']} frames), "
        f"{totals['no_face_frames']} frames without both faces; {totals['failed']} failed"
    )
    for conv_id, error in index["failed"].items():
        print(f"  failed {conv_id}: {error}")
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
