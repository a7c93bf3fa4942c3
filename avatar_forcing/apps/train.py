"""`avatar-forcing train`: diffusion forcing (default) or DPO (`--dpo`) on the flow transformer.

    avatar-forcing train --data data/prepared --init-weights weights/ --out runs/df
    avatar-forcing train --data data/prepared --init-weights runs/df/final --dpo --out runs/dpo
    avatar-forcing train --data synthetic:64 --random-init --config tiny --ray-workers 2 --out runs/ray
    avatar-forcing train --bench                      # tiny steps/s: one process and 2 Ray workers

Rerun the same command to resume (the latest checkpoint under OUT/checkpoints, or the Ray
run named by --ray-name under --ray-storage). Every checkpoint folder is also a weights
directory for `--weights` / AF_WEIGHTS_DIR; `--export DIR` writes the final one there.
See docs/training.md. Exit status 0 on success, 2 for bad arguments or data.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from avatar_forcing.config import PRESET_NAMES

DPO_DEFAULTS = {"steps": 5000, "lr": 1e-5, "ema_decay": 0.999, "warmup_steps": 100}
DF_DEFAULTS = {"steps": 100_000, "lr": 1e-4, "ema_decay": 0.9999, "warmup_steps": 500}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar-forcing train", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="measure tiny steps/s (one process, 2 Ray workers) and exit")
    p.add_argument("--data", help="prepared data folder, examples .safetensors, or synthetic:N[:frames[:seed]]")
    p.add_argument("--val-data", help="validation data (same forms as --data)")
    p.add_argument("--out", type=Path, help="run folder: metrics.csv, checkpoints/, losers cache")
    p.add_argument("--export", type=Path, help="write the final weights (EMA) here, for --weights / AF_WEIGHTS_DIR")
    src = p.add_argument_group("start weights")
    src.add_argument("--init-weights", type=Path, help="a converted weights folder (`avatar-forcing convert`)")
    src.add_argument("--random-init", action="store_true", help="random weights of --config")
    src.add_argument("--config", default="tiny", choices=PRESET_NAMES, help="preset for --random-init")
    src.add_argument("--init-seed", type=int, default=0)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, help="total steps (default 100000; --dpo: 5000, the paper's)")
    opt.add_argument("--batch-size", type=int, default=8, help="per worker (default 8, the paper's)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 1e-4; --dpo: 1e-5)")
    opt.add_argument("--optimizer", default="adam", choices=("adam", "adamw"))
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up (default 500; --dpo: 100)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 = off")
    opt.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast (CUDA only)")
    opt.add_argument("--ema-decay", type=float, help="0 = off (default 0.9999; --dpo: 0.999)")
    opt.add_argument("--seed", type=int, default=0)
    obj = p.add_argument_group("diffusion forcing")
    obj.add_argument("--loss", default="l1", choices=("l1", "l2"), help="l1: the paper's")
    obj.add_argument("--window", type=int, default=0, help="frames per window; 0 = the model's (50)")
    obj.add_argument("--drop-avatar-audio", type=float, default=0.1)
    obj.add_argument("--drop-user", type=float, default=0.1, help="user audio and motion together")
    obj.add_argument("--drop-reference", type=float, default=0.1)
    obj.add_argument(
        "--drop-user-motion", type=float, default=0.0, help="user motion alone; 1 = the w/o-user-motion ablation"
    )
    obj.add_argument("--clean-context-prob", type=float, default=0.5, help="windows with clean leading blocks")
    dpo = p.add_argument_group("DPO (--dpo)")
    dpo.add_argument("--dpo", action="store_true", help="preference fine-tuning against a frozen reference")
    dpo.add_argument("--beta", type=float, default=5000.0, help="β (mean-reduced losses; see docs/training.md)")
    dpo.add_argument("--dpo-lambda", type=float, default=1.0, help="λ, the weight of the diffusion-forcing loss")
    dpo.add_argument("--loser-weights", type=Path, help="talking-only model for the losers (default: the start)")
    dpo.add_argument("--loser-nfe", type=int, default=10)
    dpo.add_argument("--loser-audio-guidance", type=float, default=2.0)
    dpo.add_argument("--loser-batch", type=int, default=16, help="clips per batched loser rollout")
    dpo.add_argument("--loser-device", help="device for loser sampling (default: --device)")
    dpo.add_argument("--loser-seed", type=int, default=0)
    run = p.add_argument_group("running")
    run.add_argument("--device", default="cpu", help="one-process device, e.g. cpu or cuda")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: default)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--val-every", type=int, default=500, help="0 = no validation")
    run.add_argument("--val-batches", type=int, default=4)
    run.add_argument("--checkpoint-every", type=int, default=1000)
    run.add_argument("--keep-checkpoints", type=int, default=3)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray Train")
    ray.add_argument("--ray-workers", type=int, default=0, help="0: one process without Ray")
    ray.add_argument("--ray-gpu", action="store_true", help="one GPU per worker")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1)
    ray.add_argument("--ray-storage", type=Path, help="Ray Train storage_path (default OUT/ray)")
    ray.add_argument("--ray-name", default="train", help="Ray Train run name (rerun with it to resume)")
    return p


def spec_from_args(args: argparse.Namespace):
    from avatar_forcing.training.diffusion_forcing import DiffusionForcingConfig
    from avatar_forcing.training.dpo import DPOConfig
    from avatar_forcing.training.run import RunSpec
    from avatar_forcing.training.trainer import TrainConfig

    if args.data is None:
        raise ValueError("--data: required (a prepared data folder, an examples file or synthetic:N)")
    if args.out is None:
        raise ValueError("--out: required (the run folder)")
    if args.init_weights and args.random_init:
        raise ValueError("--init-weights / --random-init: pass one, not both")
    if not args.init_weights and not args.random_init:
        raise ValueError("--init-weights: required (a converted weights folder), or --random-init for smoke runs")
    if args.init_weights and not args.init_weights.is_dir():
        raise ValueError(f"--init-weights {args.init_weights}: not a folder")
    defaults = DPO_DEFAULTS if args.dpo else DF_DEFAULTS
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)
    dpo = None
    if args.dpo:
        if args.loser_weights and not args.loser_weights.is_dir():
            raise ValueError(f"--loser-weights {args.loser_weights}: not a folder")
        dpo = DPOConfig(
            beta=args.beta,
            df_weight=args.dpo_lambda,
            loser_weights=str(args.loser_weights) if args.loser_weights else None,
            loser_nfe=args.loser_nfe,
            loser_audio_guidance=args.loser_audio_guidance,
            loser_batch=args.loser_batch,
            loser_device=args.loser_device,
            loser_seed=args.loser_seed,
        )
    train = TrainConfig(
        steps=pick("steps"),
        batch_size=args.batch_size,
        lr=pick("lr"),
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_steps=pick("warmup_steps"),
        grad_clip=args.grad_clip,
        precision=args.precision,
        ema_decay=pick("ema_decay"),
        window=args.window,
        seed=args.seed,
        log_every=args.log_every,
        val_every=args.val_every if args.val_data else 0,
        val_batches=args.val_batches,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        df=DiffusionForcingConfig(
            loss_power=1 if args.loss == "l1" else 2,
            drop_avatar_audio=args.drop_avatar_audio,
            drop_user=args.drop_user,
            drop_reference=args.drop_reference,
            clean_context_prob=args.clean_context_prob,
            drop_user_motion=args.drop_user_motion,
        ),
        dpo=dpo,
    )
    return RunSpec(
        train=train,
        out_dir=str(args.out),
        data=args.data,
        val_data=args.val_data,
        init_weights=str(args.init_weights) if args.init_weights else None,
        preset=args.config,
        init_seed=args.init_seed,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
    )


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Copy a checkpoint's weights directory (config.json, model.safetensors) to `out`."""
    from avatar_forcing.nn.checkpoints import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(checkpoint / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    """Train the flow transformer: diffusion forcing, or DPO with --dpo (one process or Ray Train)."""
    args = build_parser().parse_args(argv)
    if args.bench:
        from avatar_forcing.diagnostics.train_bench import main as bench_main

        return bench_main([])
    try:
        spec = spec_from_args(args)
        if args.ray_workers > 0:
            from avatar_forcing.training.ray_train import train_ray

            result = train_ray(
                spec,
                args.ray_workers,
                args.ray_storage or args.out / "ray",
                args.ray_name,
                use_gpu=args.ray_gpu,
                cpus_per_worker=args.ray_cpus_per_worker,
            )
            final = Path(result.checkpoint.path)
            print(f"final checkpoint: {final}")
            if args.export:
                print(f"exported {export_checkpoint(final, args.export)}")
        else:
            from avatar_forcing.training.run import train_local

            trainer = train_local(spec)
            print(f"trained to step {trainer.step}; checkpoints in {args.out / 'checkpoints'}")
            if args.export:
                print(f"exported {trainer.export(args.export)}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
