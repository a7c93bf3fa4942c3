"""`avatar-forcing` command line.

The library's own commands (generate, convert, bench, audio-drift, resume-drift) live here.
Other installed packages add commands through the `avatar_forcing.commands` entry-point group
(the services register `serve`, `client` and `serve-bench`): each entry point names a
`main(argv: list[str]) -> int` whose docstring's first line is its help. The library never
imports them by name, so it stays usable without the services installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from avatar_forcing.config import PRESET_NAMES

COMMAND_GROUP = "avatar_forcing.commands"

RANDOM_INIT_BANNER = """\
================================================================================
 WARNING: --random-init: the model has RANDOM WEIGHTS.
 The video shows noise shaped by the pipeline, not a talking face. This mode
 exists for smoke runs of the pipeline only. For real output convert the
 released checkpoints once (`avatar-forcing convert ...`) and pass --weights DIR.
================================================================================"""


DEMO_MODEL_NOTE = (
    "note: no --weights: using the installed demo model ({path}), trained in the synthetic world "
    "(docs/synthetic-world.md). It animates the synthetic faces it was trained on; for photographs "
    "convert the released checkpoints and pass --weights DIR."
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        type=Path,
        help="weights folder (`avatar-forcing convert`, `train`); default: the demo model",
    )
    parser.add_argument("--random-init", action="store_true", help="random weights (smoke runs only)")
    parser.add_argument(
        "--config", default="tiny", choices=PRESET_NAMES, help="preset for --random-init (tiny: the demo model)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def load_model(args: argparse.Namespace):
    import torch

    from avatar_forcing.config import preset
    from avatar_forcing.nn.checkpoints import load_pretrained
    from avatar_forcing.nn.model import random_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights and args.random_init:
        raise SystemExit("error: pass either --weights DIR or --random-init, not both")
    if args.weights:
        return load_pretrained(args.weights, args.device)
    if args.random_init:
        print(RANDOM_INIT_BANNER, file=sys.stderr)
        return random_model(preset(args.config)).to(args.device)
    from avatar_forcing.synthetic.demo_model import weights_dir

    demo = weights_dir()
    if args.config == "tiny" and (demo / "model.safetensors").is_file():
        print(DEMO_MODEL_NOTE.format(path=demo), file=sys.stderr)
        return load_pretrained(demo, args.device)
    raise SystemExit(
        f"error: no weights for --config {args.config}. Pass --weights DIR (made by `avatar-forcing convert` "
        "from the released flow_transformer.pth, motion_autoencoder.pth and a local wav2vec2-base-960h "
        "folder), or --random-init for a smoke run with random weights."
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from avatar_forcing.apps.generate import GenerationRequest, generate_video
    from avatar_forcing.engine.motion_stream import StreamOptions
    from avatar_forcing.sampling.euler import GuidanceScales

    for name in ("portrait", "avatar_audio", "user_video", "user_audio"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise SystemExit(f"error: --{name.replace('_', '-')} {path}: file not found")
    model = load_model(args)
    options = StreamOptions(
        block=args.block, nfe=args.nfe, guidance=GuidanceScales(args.audio_guidance, args.user_guidance)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    request = GenerationRequest(
        args.portrait,
        args.avatar_audio,
        args.user_video,
        args.out,
        args.user_audio,
        options,
        args.seed,
        args.side_by_side,
        not args.quiet,
    )
    frames = generate_video(model, request)
    print(f"wrote {args.out} ({frames} frames, {frames / model.config.fps:.2f} s)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from avatar_forcing.config import preset
    from avatar_forcing.nn.checkpoints import convert_release

    def note(line: str) -> None:
        print(line, file=sys.stderr)

    out = convert_release(
        args.flow_transformer, args.motion_autoencoder, args.wav2vec2, args.out, preset(args.config), on_ignored=note
    )
    print(f"wrote {out}")
    return 0


def registered_commands() -> list[EntryPoint]:
    """Commands other installed packages register under `avatar_forcing.commands`, by name."""
    return sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name)


def _module_main(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return run


def _entry_help(entry: EntryPoint) -> str:
    try:
        doc = entry.load().__doc__ or ""
    except Exception as exc:  # a broken plugin must not break the library's own commands
        return f"(unavailable: {type(exc).__name__}: {exc})"
    return doc.strip().splitlines()[0] if doc.strip() else f"provided by {entry.value}"


def _entry_main(entry: EntryPoint) -> Callable[[list[str]], int]:
    return lambda argv: entry.load()(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing", description="Real-time interactive head avatars.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="offline: portrait + audio + user video -> mp4")
    gen.add_argument("--portrait", type=Path, required=True, help="image with the avatar's face")
    gen.add_argument("--avatar-audio", type=Path, required=True, help="what the avatar says (sets the length)")
    gen.add_argument("--user-video", type=Path, required=True, help="the user's face (and voice, if it has audio)")
    gen.add_argument("--user-audio", type=Path, help="the user's voice (default: the user video's audio)")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--side-by-side", action="store_true", help="put the user's video beside the avatar")
    gen.add_argument("--block", type=int, default=10, help="frames per block")
    gen.add_argument("--nfe", type=int, default=10, help="sampler steps per block")
    gen.add_argument("--audio-guidance", type=float, default=2.0)
    gen.add_argument("--user-guidance", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="released checkpoints -> the project's safetensors format")
    conv.add_argument("--flow-transformer", type=Path, required=True, help="flow_transformer.pth")
    conv.add_argument("--motion-autoencoder", type=Path, required=True, help="motion_autoencoder.pth")
    conv.add_argument("--wav2vec2", type=Path, required=True, help="local wav2vec2-base-960h folder")
    conv.add_argument("--config", default="paper", choices=PRESET_NAMES)
    conv.add_argument("--out", type=Path, required=True)
    conv.set_defaults(func=cmd_convert)

    for name, module, help_text in (
        ("bench", "avatar_forcing.diagnostics.bench", "per-block generation cost against the machine's matmul rate"),
        ("audio-drift", "avatar_forcing.diagnostics.audio_drift", "streaming audio features vs whole-clip features"),
        (
            "resume-drift",
            "avatar_forcing.diagnostics.resume_drift",
            "a session rebuilt from its history vs uninterrupted",
        ),
        ("prepare", "avatar_forcing.apps.prepare", "dyadic conversations (JSONL manifest) -> training shards"),
        ("eval", "avatar_forcing.apps.eval", "motion metrics (rPCC, SID, Var, FD) and engine latency -> JSON"),
        ("train", "avatar_forcing.apps.train", "diffusion-forcing training or DPO (--dpo), one process or Ray Train"),
        ("train-autoencoder", "avatar_forcing.apps.train_autoencoder", "motion auto-encoder on a manifest's faces"),
        ("build-demo", "avatar_forcing.synthetic.demo_model", "build the demo model on CPU (synthetic world)"),
        ("synth-ablation", "avatar_forcing.synthetic.ablation", "the paper's Table 4 on held-out synthetic talks"),
        ("synth", "avatar_forcing.synthetic.cli", "synthetic dyadic conversations (faces, voices) -> manifest"),
    ):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=None, run=_module_main(module))
    for entry in registered_commands():
        if entry.name in sub.choices:
            continue  # the library's own command wins over a plugin of the same name
        p = sub.add_parser(entry.name, help=_entry_help(entry), add_help=False)
        p.set_defaults(func=None, run=_entry_main(entry))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.func is None:  # delegated subcommands parse their own options
        return args.run(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
