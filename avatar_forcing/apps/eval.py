"""`avatar-forcing eval`: motion metrics of generated sequences against the ground truth.

    avatar-forcing eval --generated out/gen --ground-truth data/test --json out/report.json

Computes rPCC, SID, Var and FD (docs/metrics.md) for every family both sides supply (motion
latents; 3DMM expression and pose where given), measures the streaming engine's latency
(diagnostics/bench.py, random weights; --no-latency skips it), prints a summary and writes
the JSON report. Exit status 0, or 2 for unreadable or mismatched inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avatar_forcing.config import PRESET_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", type=Path, required=True, help="folder of .npz/.npy, one per sequence")
    parser.add_argument(
        "--ground-truth", type=Path, required=True, help="folder of .npz (same names), or a prepared folder"
    )
    parser.add_argument("--json", type=Path, help="write the report here (it is printed as well)")
    parser.add_argument("--trim", action="store_true", help="cut sequences of unequal length to the shortest")
    parser.add_argument("--pooled-rpcc", action="store_true", help="one PCC over all sequences (DIM's variant)")
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    parser.add_argument("--latency-config", default="paper", choices=PRESET_NAMES, help="model size timed")
    parser.add_argument("--latency-blocks", type=int, default=3, help="blocks timed (median reported)")
    parser.add_argument("--device", default=None, help="device for the latency (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Motion metrics (rPCC, SID, Var, FD) and engine latency -> a JSON report."""
    from avatar_forcing.metrics.report import evaluate, load_sequences, measure_latency, summary_lines

    args = build_parser().parse_args(argv)
    try:
        if args.latency_blocks < 1:
            raise ValueError(f"--latency-blocks: expected >= 1, got {args.latency_blocks}")
        report = evaluate(
            load_sequences(args.generated), load_sequences(args.ground_truth), args.trim, args.pooled_rpcc
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["generated"], report["ground_truth"] = str(args.generated), str(args.ground_truth)
    report["latency"] = measure_latency(args.latency_config, args.latency_blocks, args.device) if args.latency else None
    for line in summary_lines(report):
        print(line)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
