"""`avatar-forcing bench`: per-block generation cost, cached and not, against the machine.

Figures for each config: ms per block (KV-cached streaming), FLOPs of one block
(counted by torch's FlopCounterMode on the real call), achieved GFLOP/s and its
fraction of the fp32 (or bf16) matmul rate measured in the same run (the linear backend is
printed: on CPU float32, prepacked weights; see `avatar_forcing.nn.prepacked`), the
non-cached path (recompute the whole window every step), and the decoder's cost
per frame with the real-time factor of generation + decoding. Random weights:
timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from avatar_forcing.config import preset
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.nn import prepacked
from avatar_forcing.nn.model import random_model
from avatar_forcing.sampling.block_sampler import BlockRequest, BlockSampler, Conditions
from avatar_forcing.sampling.euler import GUIDANCE_ROWS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N GFLOP/s of a square matmul: the machine's dense rate for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, device, repeats)) / 1e9


def uncached_block(sampler: BlockSampler, stream: MotionStream, history: torch.Tensor) -> torch.Tensor:
    """The no-cache alternative: every step attends over the whole window recomputed from scratch.

    Tokens are the window's clean history (t = 0) plus the block's noise; conditions are one
    window-long chunk. This is what a KV cache saves; it is not numerically the cached rollout.
    """
    model, cfg = sampler.model, sampler.model.config
    block = stream.options.block
    window = cfg.window
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    conds = Conditions(*(torch.randn(window, cfg.motion_dim) for _ in range(3)))
    avatar, user_audio, user_motion = (x.to(device, dtype) for x in conds.guidance_rows())
    cond_kv = model.condition_kv(model.embed_conditions(avatar, user_audio, user_motion))
    start = stream.next_frame - (window - block)
    positions = torch.arange(start, start + window, device=device).expand(GUIDANCE_ROWS, window)
    reference = stream.reference_motion.to(device, dtype).expand(GUIDANCE_ROWS, -1)
    x = torch.cat([history[-(window - block) :], torch.randn(block, cfg.motion_dim)]).to(device, dtype)[None]
    is_new = torch.arange(window, device=device) >= window - block
    steps = sampler.sampler.timestep_list(stream.options.nfe)
    for t_now, t_next in itertools.pairwise(steps):
        t = torch.where(is_new, t_now, 0.0).expand(GUIDANCE_ROWS, window)
        out = model(x.expand(GUIDANCE_ROWS, -1, -1), t, reference, positions, cond_kv, positions, None, block)
        guided = stream.options.guidance.combine(out.velocity)[None]
        s_now = torch.where(is_new, sampler.sampler.sigma(t_now), 0.0)[None, :, None].to(device)
        s_next = torch.where(is_new, sampler.sampler.sigma(t_next), 0.0)[None, :, None].to(device)
        x = sampler.sampler.step(x, guided, s_now, s_next)
    return x[0, -block:]


def bench_config(name: str, args: argparse.Namespace, device: torch.device, rate: float) -> dict[str, float]:
    config = preset(name)
    model = random_model(config).to(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(dtype)
    sampler = model.block_sampler()
    options = StreamOptions(block=args.block, nfe=args.nfe)
    stream = MotionStream(sampler, torch.randn(config.flow.motion_dim) * 0.3, options, seed=0)
    frames = lambda n: torch.randn(n, config.flow.motion_dim)
    stream.push(frames(config.flow.window), frames(config.flow.window), frames(config.flow.window))
    history = torch.cat([b.latents for b in stream.pull()])

    def one_block() -> None:
        stream.push(frames(args.block), frames(args.block), frames(args.block))
        stream.pull()

    one_block()  # warm-up: allocator, kernels
    request_probe = _probe_request(stream, args.block)
    # Counted on the plain linear path: FlopCounterMode does not see the prepacked kernels, and
    # the arithmetic is the same.
    with prepacked.disabled(), FlopCounterMode(display=False) as counter:
        sampler.run([request_probe], args.block)
    flops = counter.get_total_flops()
    cached = timed(one_block, device, args.blocks)
    uncached_block(sampler, stream, history)
    uncached = timed(lambda: uncached_block(sampler, stream, history), device, args.blocks)

    on_cpu_fp32 = device.type == "cpu" and dtype == torch.float32  # the portrait helpers' path
    # Callers with their own argument set (the eval report) get the generation figures only.
    stages = stage_times(model, config, args, device, dtype) if getattr(args, "stages", False) and on_cpu_fp32 else {}
    decode_s = float("nan")
    if args.decode:
        mae = model.motion_autoencoder
        size = config.motion_autoencoder.image_size
        with torch.no_grad():
            portrait = mae.encode(torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1)
            latents = portrait.identity + torch.randn(args.block, config.flow.motion_dim, device=device, dtype=dtype)
            feats = portrait.feature_maps  # batch 1: shared by every frame
            mae.decode(latents, feats)
            decode_s = statistics.median(timed(lambda: mae.decode(latents, feats), device, args.blocks)) / args.block

    block_s = statistics.median(cached)
    uncached_s = statistics.median(uncached)
    block_seconds_of_video = args.block / config.fps
    figures = {
        "block_ms": block_s * 1e3,
        "block_ms_p95": sorted(cached)[int(0.95 * (len(cached) - 1))] * 1e3,
        "gflop_per_block": flops / 1e9,
        "gflops": flops / block_s / 1e9,
        "fraction_of_matmul": flops / block_s / 1e9 / rate,
        "uncached_block_ms": uncached_s * 1e3,
        "cached_over_uncached": block_s / uncached_s,
        "decode_ms_per_frame": decode_s * 1e3,
        "realtime_factor_generation": block_seconds_of_video / block_s,
        "realtime_factor_generation_and_decoding": block_seconds_of_video / (block_s + decode_s * args.block)
        if args.decode
        else float("nan"),
    }
    if stages:
        figures |= {f"{stage}_ms_per_block": ms for stage, ms in stages.items()}
        figures["generate_ms_per_block"] = block_s * 1e3
        total_ms = sum(stages.values()) + block_s * 1e3
        figures["all_stages_ms_per_block"] = total_ms
        figures["realtime_factor_all_stages"] = block_seconds_of_video * 1e3 / total_ms
    return figures


def stage_times(model, config, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Median service time of one block (ms) in each model stage besides generation, as the
    services run them: streaming audio features of one block of 16 kHz audio (AudioFeatures),
    user motion from one block of face crops (MotionEncoder), frames from one block of latents
    (FrameDecoder). One process, so no RPC or queueing: what a replica's compute costs."""
    # Imported here: the portrait helpers pull in OpenCV, which the generation figures do not need.
    import numpy as np

    from avatar_forcing.config import SAMPLES_PER_FRAME
    from avatar_forcing.engine import portrait as portraits
    from avatar_forcing.engine.streaming_audio import StreamingAudioFeatures

    mae = model.motion_autoencoder
    size = config.motion_autoencoder.image_size
    rng = np.random.default_rng(0)
    audio = StreamingAudioFeatures(model.audio_encoder)
    audio.push(rng.standard_normal(2 * config.fps * SAMPLES_PER_FRAME).astype(np.float32) * 0.1)  # 2 s of context
    chunk = lambda: rng.standard_normal(args.block * SAMPLES_PER_FRAME).astype(np.float32) * 0.1
    crops = rng.integers(0, 256, (args.block, size, size, 3), dtype=np.uint8)
    portrait = portraits.encode_portrait(mae, crops[0])
    latents = portrait.identity.float().cpu() + torch.randn(args.block, config.flow.motion_dim)
    calls = {
        "audio_features": lambda: audio.push(chunk()),
        "encode_user_motion": lambda: portraits.encode_user_motion(mae, crops),
        "decode_frames": lambda: portraits.decode_frames(mae, portrait, latents),
    }
    times = {}
    with torch.no_grad():
        for stage, call in calls.items():
            call()  # warm-up
            times[stage] = statistics.median(timed(call, device, args.blocks)) * 1e3
    return times


def _probe_request(stream: MotionStream, block: int) -> BlockRequest:
    """A request equal in shape to the next block, without advancing the stream."""
    dim = stream.config.motion_dim
    snapshot = stream.checkpoint()
    stream.push(*(torch.randn(block, dim) for _ in range(3)))
    request = stream.next_request()
    stream.restore(snapshot)
    assert request is not None
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar-forcing bench", description=__doc__)
    parser.add_argument("--configs", default="tiny,paper", help="comma-separated presets (tiny, paper)")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per figure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decoder figures")
    parser.add_argument(
        "--no-stages", dest="stages", action="store_false", help="skip the per-stage service times (CPU fp32 only)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rate = matmul_rate(device, dtype)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"threads {torch.get_num_threads()}, dtype {args.dtype}, nfe {args.nfe}, block {args.block}, "
        f"guidance rows {GUIDANCE_ROWS}, CPU float32 linears: {prepacked.backend() or 'plain'}"
    )
    print(f"matmul rate ({args.dtype}, 2048^3): {rate:.1f} GFLOP/s")
    with torch.inference_mode() if device.type == "cuda" else nullcontext():
        for name in args.configs.split(","):
            figures = bench_config(name.strip(), args, device, rate)
            print(f"\n[{name}]")
            for key, value in figures.items():
                print(f"  {key:42s} {value:10.3f}")
    return 0
