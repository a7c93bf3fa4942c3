"""The motion auto-encoder's two per-block stages, this checkout against a previous one, in one process.

    git worktree add --detach /tmp/prev <commit>          # or any copy of an older tree
    python -m avatar_forcing.diagnostics.mae_stages --previous /tmp/prev --previous-channels 64

`encode_user_motion` (10 face crops -> user motion latents) and `decode_frames` (10 latents ->
uint8 frames, one portrait), the previous checkout's `motion_autoencoder.py` loaded from its file
next to the current one, calls alternating (and which goes first), 1 torch thread as in a replica.
The previous side runs the previous code's loops: one `from_uint8` per crop, decoding in chunks of
8. Prints the median wall and CPU milliseconds per call and the median of the per-call ratios
current / previous; CPU times and ratios are what to read on a shared machine. Random weights;
with equal channel counts both sides get the same weights and the outputs are compared too.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.config import MotionAutoEncoderConfig
from avatar_forcing.engine import portrait
from avatar_forcing.media.io import from_uint8, to_uint8
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder


def _previous_module(checkout: Path):
    path = checkout / "avatar_forcing" / "nn" / "motion_autoencoder.py"
    spec = importlib.util.spec_from_file_location("previous_motion_autoencoder", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--previous: no {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatar_forcing.diagnostics.mae_stages", description=__doc__)
    parser.add_argument("--previous", type=Path, required=True, help="root of the previous checkout")
    parser.add_argument("--channels", type=int, default=32, help="max_channels of the current side")
    parser.add_argument("--previous-channels", type=int, help="max_channels of the previous side (default: same)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    previous_channels = args.previous_channels or args.channels
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    current = MotionAutoEncoder(MotionAutoEncoderConfig(image_size=64, max_channels=args.channels)).eval()
    module = _previous_module(args.previous)
    previous = module.MotionAutoEncoder(MotionAutoEncoderConfig(image_size=64, max_channels=previous_channels)).eval()
    same_weights = previous_channels == args.channels
    if same_weights:
        previous.load_state_dict(current.state_dict())
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    latents = torch.from_numpy(rng.standard_normal((10, 512)).astype(np.float32))

    with torch.no_grad():
        previous_portrait = previous.encode(from_uint8(crops[0])[None])

    @torch.no_grad()
    def previous_encode() -> torch.Tensor:
        return previous.encode_motion(torch.stack([from_uint8(c) for c in crops]))

    @torch.no_grad()
    def previous_decode() -> np.ndarray:
        p = previous_portrait
        chunks = [latents[i : i + 8] for i in range(0, len(latents), 8)]
        return np.concatenate([to_uint8(previous.decode(p.identity + c, p.feature_maps)) for c in chunks])

    current_portrait = portrait.encode_portrait(current, crops[0])
    calls = {
        "encode_user_motion, previous": previous_encode,
        "encode_user_motion, current": lambda: portrait.encode_user_motion(current, crops),
        "decode_frames, previous": previous_decode,
        "decode_frames, current": lambda: portrait.decode_frames(current, current_portrait, latents),
    }
    print(f"channels: previous {previous_channels}, current {args.channels}; {args.threads} thread(s)")
    if same_weights:
        motion = (previous_encode() - calls["encode_user_motion, current"]()).abs().max().item()
        pixels = np.abs(previous_decode().astype(int) - calls["decode_frames, current"]().astype(int)).max()
        print(f"max abs difference: user motion {motion:.3g}, frames {pixels} (uint8 levels)")
    for call in calls.values():
        call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(args.repeats):
        for name, call in list(calls.items())[:: 1 if repeat % 2 else -1]:
            c, w = time.process_time(), time.perf_counter()
            call()
            cpu[name].append((time.process_time() - c) * 1000.0)
            wall[name].append((time.perf_counter() - w) * 1000.0)
    for name in calls:
        print(f"{name:30s} wall median {np.median(wall[name]):7.1f} ms   cpu median {np.median(cpu[name]):7.1f} ms")
    for stage in ("encode_user_motion", "decode_frames"):
        ratios = np.array(wall[f"{stage}, current"]) / np.array(wall[f"{stage}, previous"])
        print(f"{stage}: current / previous, median of per-call ratios {np.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
