"""`avatar-forcing train-autoencoder`: train the motion auto-encoder on a manifest's face videos.

    avatar-forcing train-autoencoder --manifest data/synth/manifest.jsonl --random-init --config tiny \
        --out runs/mae --steps 3000
    avatar-forcing prepare --manifest data/synth/manifest.jsonl --weights runs/mae --out data/prepared

Both sides' videos of every conversation are cropped as `prepare` crops them and the
auto-encoder learns to reconstruct one crop's motion on another crop's face
(training/autoencoder.py). OUT is a whole weights folder (`config.json`, `model.safetensors`):
the trained auto-encoder with the other parts of the start model unchanged, ready for
`prepare --weights` and `train --init-weights`. It also holds metrics.csv and
autoencoder_record.json. Exit status 0, or 2 for bad arguments or unreadable media.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avatar_forcing.config import PRESET_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar-forcing train-autoencoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="JSONL of conversations (both videos are used)")
    p.add_argument("--val-manifest", type=Path, help="held-out conversations for the validation loss")
    p.add_argument("--out", type=Path, required=True, help="weights folder to write")
    p.add_argument("--init-weights", type=Path, help="start from this weights folder")
    p.add_argument("--random-init", action="store_true", help="random weights of --config")
    p.add_argument("--config", default="tiny", choices=PRESET_NAMES, help="preset for --random-init")
    p.add_argument("--init-seed", type=int, default=0, help="seed of --random-init")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--motion-weight", type=float, default=0.0,
        help="extra loss weight where driving and source crops differ (0: uniform L1; the demo uses 4)",
    )  # fmt: skip
    p.add_argument(
        "--pair-candidates", type=int, default=1,
        help="drivings drawn per source crop, the most different one kept (1: uniform pairs; the demo uses 4)",
    )  # fmt: skip
    p.add_argument(
        "--mouth-weight", type=float, default=0.0,
        help="extra loss weight of the crop's mouth region (0: none; the demo uses 8)",
    )  # fmt: skip
    p.add_argument(
        "--pairs-by", default="frame", choices=("frame", "mouth"),
        help="rank a source's candidate drivings by their change over the whole crop or the mouth region",
    )  # fmt: skip
    p.add_argument(
        "--colour-jitter", type=float, default=0.0,
        help="the same random colour change of each pair's two crops, per-channel gain 1 ± J (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--latent-std", type=float, default=0.0,
        help="rescale the trained latents so the motion coefficients spread by this much (0: as trained)",
    )  # fmt: skip
    p.add_argument("--detect-every", type=int, default=5, help="face detection on every k-th frame (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train the motion auto-encoder on face crops; write a weights folder."""
    import torch

    from avatar_forcing.config import preset
    from avatar_forcing.nn.checkpoints import load_pretrained, save_pretrained
    from avatar_forcing.nn.model import random_model
    from avatar_forcing.training.autoencoder import (
        AutoEncoderOptions,
        load_face_crops,
        start_with_identity_warp,
        train_autoencoder,
    )
    from avatar_forcing.training.data.manifest import read_manifest

    args = build_parser().parse_args(argv)
    if bool(args.init_weights) == bool(args.random_init):
        print("error: pass exactly one of --init-weights DIR or --random-init", file=sys.stderr)
        return 2
    try:
        options = AutoEncoderOptions(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            motion_weight=args.motion_weight,
            pair_candidates=args.pair_candidates,
            mouth_weight=args.mouth_weight,
            pairs_by=args.pairs_by,
            colour_jitter=args.colour_jitter,
            latent_std=args.latent_std,
        )
        if args.detect_every < 1:
            raise ValueError(f"--detect-every: expected >= 1, got {args.detect_every}")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.init_weights:
            model = load_pretrained(args.init_weights)
        else:
            model = random_model(preset(args.config), args.init_seed)
            start_with_identity_warp(model.motion_autoencoder)

        skipped: list[str] = []

        def crops(manifest: Path) -> list:
            videos = [v for conv in read_manifest(manifest) for v in (conv.avatar_video, conv.user_video)]
            clips = load_face_crops(videos, model.config.motion_autoencoder, args.detect_every, skipped=skipped)
            if not clips:
                raise ValueError(f"{manifest}: no video gave face crops ({len(skipped)} left out: {skipped[:3]})")
            return clips

        train_clips = crops(args.manifest)
        val_clips = crops(args.val_manifest) if args.val_manifest else []
        for reason in skipped:  # as prepare does: the rest of the data goes on
            print(f"left out: {reason}", file=sys.stderr)
        record = train_autoencoder(
            model.motion_autoencoder,
            train_clips,
            options,
            args.out,
            val_clips,
            progress=not args.quiet,
            left_out=skipped,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_pretrained(model, args.out)
    val = f", validation loss {record['final_val_loss']:.4f}" if val_clips else ""
    print(f"wrote {args.out}: loss {record['final_loss']:.4f}{val}, {record['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
