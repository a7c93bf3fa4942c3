"""Measure how far streamed audio features drift from whole-clip features (`docs/audio-streaming.md`).

The release encodes each clip at once (bidirectional). `StreamingAudioFeatures` sees only
a bounded window; this tool streams one speech clip in real-time-sized chunks (one video
frame, 640 samples, per push) for every (left context, lookahead, hop) setting and prints
a markdown table of the differences to the whole-clip features, plus the encoder time per
emitted frame.

    avatar-forcing audio-drift --config paper --wav2vec2 /models/wav2vec2-base-960h

Without `--wav2vec2` the wav2vec2 weights are random (seeded): the table then only shows
how the *architecture* responds to a bounded window, not what the trained model does.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.config import FPS, PRESET_NAMES, SAMPLE_RATE, SAMPLES_PER_FRAME, preset
from avatar_forcing.engine.streaming_audio import StreamingAudioFeatures
from avatar_forcing.nn.audio_encoder import AudioEncoder, normalize_waveform, num_frames_for

SPEECH_TEXT = (
    "Hello, and thank you for joining the call today. I wanted to walk you through the results "
    "of last week's experiment. The new model listens while it talks, and it reacts to what you say. "
    "Does that sound reasonable to you? Great. Let's start with the numbers, and then look at the videos."
)


def read_wav(path: Path) -> np.ndarray:
    """16-bit PCM WAV -> mono float32 at 16 kHz (averaging channels, resampling if needed)."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"--wav {path}: {8 * f.getsampwidth()}-bit samples; expected 16-bit PCM")
        rate, channels = f.getframerate(), f.getnchannels()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    data = data.reshape(-1, channels).mean(axis=1)
    return resample(data, rate, SAMPLE_RATE)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x.astype(np.float32)
    try:
        from scipy.signal import resample_poly

        g = math.gcd(rate, target)
        return resample_poly(x, target // g, rate // g).astype(np.float32)
    except ImportError:  # linear interpolation: fine for a drift measurement
        n = round(len(x) * target / rate)
        return np.interp(np.arange(n) * rate / target, np.arange(len(x)), x).astype(np.float32)


def synthesize_speech(text: str = SPEECH_TEXT) -> np.ndarray:
    """Speech from espeak-ng (16 kHz mono float32); RuntimeError if espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng not found; pass --wav PATH (16-bit PCM speech) or apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(out), text], check=True, capture_output=True)
        return read_wav(out)


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure(
    encoder: AudioEncoder,
    audio: np.ndarray,
    reference: torch.Tensor,
    *,
    left_context_s: float,
    lookahead_frames: int,
    hop_frames: int,
) -> dict[str, float]:
    """Stream `audio` one frame (640 samples) per push; compare with `reference` (T, 512)."""
    stream = StreamingAudioFeatures(
        encoder,
        left_context_s=left_context_s,
        lookahead_frames=lookahead_frames,
        hop_frames=hop_frames,
    )
    outputs, busy = [], 0.0
    for i in range(0, len(audio), SAMPLES_PER_FRAME):
        t0 = time.perf_counter()
        outputs.append(stream.push(audio[i : i + SAMPLES_PER_FRAME]))
        busy += time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs.append(stream.flush())
    busy += time.perf_counter() - t0
    streamed = torch.cat(outputs)
    diff = (streamed - reference).abs()
    rel = (streamed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)  # per frame
    return {
        "mean_abs": diff.mean().item(),
        "max_abs": diff.max().item(),
        "mean_rel": rel.mean().item(),
        "max_rel": rel.max().item(),
        "ms_per_frame": 1000 * busy / reference.shape[0],
    }


@torch.no_grad()
def stage_drift(
    encoder: AudioEncoder, audio: np.ndarray, *, left_frames: int, lookahead_frames: int, every: int = 20
) -> dict[str, float]:
    """Mean relative drift of one frame per `every` at each stage of the encoder (hop 1).

    Frame t is encoded in the window [t - left, t + 1 + lookahead) and compared, stage by stage,
    with the same frame of the whole-clip pass: conv stack (GroupNorm over the window),
    feature projection, hidden_states[0] (adds the positional conv), the middle and last layer,
    and the 512-d output. It shows which part of wav2vec2 makes a bounded window drift.
    """
    x = torch.from_numpy(audio)
    total = num_frames_for(len(audio))
    full = encoder.trace(x[None], total)
    full_out = encoder.audio_projection(encoder.layer_features(x[None], total))[0]
    mid = len(full.hidden_states) // 2
    names = [
        "conv",
        "projection",
        "hidden_0",
        f"hidden_{mid}",
        f"hidden_{len(full.hidden_states) - 1}",
        "output",
    ]
    sums = dict.fromkeys(names, 0.0)
    frames = range(left_frames, total - lookahead_frames - 1, every)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    for t in frames:
        start, end = t - left_frames, t + 1 + lookahead_frames
        window = normalize_waveform(x[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME][None])
        trace = encoder.trace(window, end - start, normalize=False)
        out = encoder.audio_projection(torch.cat(trace.hidden_states[1:], dim=-1))[0]  # layer-major
        i = t - start
        pairs = [
            (trace.conv_features[0, :, 2 * i], full.conv_features[0, :, 2 * t]),  # frame t = conv frame 2t
            (trace.projected_features[0, i], full.projected_features[0, t]),
            (trace.hidden_states[0][0, i], full.hidden_states[0][0, t]),
            (trace.hidden_states[mid][0, i], full.hidden_states[mid][0, t]),
            (trace.hidden_states[-1][0, i], full.hidden_states[-1][0, t]),
            (out[i], full_out[t]),
        ]
        for name, (a, b) in zip(names, pairs, strict=True):
            sums[name] += rel(a, b) / len(frames)
    return sums


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avatar-forcing audio-drift",
        description="Drift of bounded-window streaming audio features vs whole-clip features.",
    )
    p.add_argument("--wav", type=Path, help="16-bit PCM speech (resampled to 16 kHz); default: espeak-ng speech")
    p.add_argument("--config", choices=PRESET_NAMES, default="paper")
    p.add_argument("--wav2vec2", type=Path, help="local transformers wav2vec2 folder; default: random weights")
    p.add_argument("--projection", type=Path, help="flow_transformer.pth holding audio_encoder.audio_projection.*")
    p.add_argument("--windows", default="0.5,1,2,4,8", help="left contexts in seconds, comma-separated")
    p.add_argument("--lookaheads", default="0,2,5", help="lookahead frames, comma-separated")
    p.add_argument("--hops", default="10", help="frames emitted per encoder pass, comma-separated")
    p.add_argument(
        "--stages",
        action="store_true",
        help="also break the drift down by encoder stage (hop 1, one frame in 20)",
    )
    p.add_argument("--max-seconds", type=float, default=20.0, help="cut the clip to this length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = preset(args.config).audio
    if args.wav2vec2 is not None:
        encoder = AudioEncoder.from_pretrained_dir(args.wav2vec2, config)
        weights = f"wav2vec2 weights from {args.wav2vec2}; audio_projection random (seed {args.seed})"
    else:
        encoder = AudioEncoder(config)
        weights = f"RANDOM wav2vec2 weights (transformers init, seed {args.seed}) and random projection"
    if args.projection is not None:
        prefix = "audio_encoder.audio_projection."
        state = torch.load(args.projection, map_location="cpu", weights_only=True)
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        encoder.audio_projection.load_state_dict(own)  # strict: names and shapes must match
        weights = weights.replace(f"audio_projection random (seed {args.seed})", f"projection from {args.projection}")
    encoder.eval()

    try:
        audio = read_wav(args.wav) if args.wav is not None else synthesize_speech()
    except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"audio-drift: {exc}", file=sys.stderr)
        return 2
    source = str(args.wav) if args.wav is not None else "espeak-ng en-us speech"
    audio = audio[: int(args.max_seconds * SAMPLE_RATE)]
    num_frames = num_frames_for(len(audio))
    with torch.no_grad():
        reference = encoder(torch.from_numpy(audio)[None], num_frames)[0]  # (T, 512) whole clip

    lines = []
    if args.wav2vec2 is None:
        banner = "WARNING: RANDOM WEIGHTS. These numbers describe an untrained wav2vec2, not the real model."
        lines += ["", "!" * len(banner), banner, "!" * len(banner), ""]
    lines += [
        f"config `{args.config}`, {weights}; clip: {source}, {len(audio) / SAMPLE_RATE:.2f} s, "
        f"{num_frames} frames; torch threads {args.threads}; mean |whole-clip feature| "
        f"{reference.abs().mean().item():.4f}",
        "",
        "| left context (s) | lookahead (frames) | hop (frames) | window (s) "
        "| mean abs drift | max abs drift | mean rel drift | max rel drift | encoder ms / frame |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for hop in parse_ints(args.hops):
        for lookahead in parse_ints(args.lookaheads):
            for left in parse_floats(args.windows):
                r = measure(encoder, audio, reference, left_context_s=left, lookahead_frames=lookahead, hop_frames=hop)
                window_s = (round(left * FPS) + hop + lookahead) / FPS
                print(
                    f"| {left:g} | {lookahead} | {hop} | {window_s:.2f} "
                    f"| {r['mean_abs']:.4f} | {r['max_abs']:.4f} | {r['mean_rel']:.4f} | {r['max_rel']:.4f} "
                    f"| {r['ms_per_frame']:.1f} |",
                    flush=True,
                )
    if args.stages:
        print(
            "\nDrift by stage (mean relative drift, hop 1, every 20th frame):\n\n"
            "| left context (s) | lookahead (frames) | conv stack | projection | hidden 0 (pos-conv) "
            "| middle layer | last layer | 512-d output |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for lookahead in parse_ints(args.lookaheads):
            for left in parse_floats(args.windows):
                r = stage_drift(encoder, audio, left_frames=round(left * FPS), lookahead_frames=lookahead)
                print(
                    f"| {left:g} | {lookahead} | " + " | ".join(f"{v:.4f}" for v in r.values()) + " |",
                    flush=True,
                )
    if args.wav2vec2 is None:
        print("\n(random weights: rerun with --wav2vec2 DIR for the real model's drift)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
