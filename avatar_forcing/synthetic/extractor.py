"""Face-parameter extractor: a small CNN that reads `CHANNELS` back from a rendered frame.

It plays the part a 3DMM fitter plays for real video: the metrics' `expression` and `pose`
families run on what it recovers from generated frames, not on the renderer's inputs.

Input. A frame of any square size, cropped to the fixed central box `CROP` (fractions of the
side; the renderer keeps the head centred, so the whole face, brows to chin, lies inside at
any pose in `RANGES`), resized with area averaging to `INPUT` x `INPUT` RGB, scaled to [0, 1].

Network (`ExtractorNet`, ~160 k parameters). Five 3x3 stride-2 convolutions with batch norm
and ReLU (3 -> 24 -> 32 -> 64 -> 96 -> 96 channels, 64 -> 2 pixels), flattened, a 128-unit
hidden layer, and a linear head of `len(CHANNELS)` outputs in normalised units: each channel
mapped from its range in `RANGES` to [-1, 1]. Trained with an L1 loss on frames of random
identities and parameters (`train`); weights ship as `assets/extractor.safetensors` with a
JSON record (`assets/extractor.json`) of the training run and held-out accuracy.

Splits for the metrics: `POSE` = yaw, pitch, roll (degrees); `EXPRESSION` = mouth_open,
smile, blink. Gaze would belong with expression (feature movement over a fixed head), but the
shipped network does not recover it: at 64 px the iris is ~3 px and its held-out gaze MAE
equals the mean predictor's (see docs/synthetic-world.md), so gaze stays out of the metric
arrays until an extractor reads it; `extract` still returns all `CHANNELS`.

CLI:
    python -m avatar_forcing.synthetic.extractor train --out PATH --steps N --seed 0
    python -m avatar_forcing.synthetic.extractor evaluate [--weights PATH] [--frames N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from avatar_forcing.synthetic.identity import random_identity
from avatar_forcing.synthetic.params import CHANNELS, INDEX, RANGES, FaceParams
from avatar_forcing.synthetic.render import FaceRenderer
from avatar_forcing.synthetic.world import generate_conversation

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "extractor.safetensors"
RECORD = ASSETS / "extractor.json"
INPUT = 64
CROP = (0.12, 0.88, 0.12, 0.88)  # top, bottom, left, right as fractions of the frame side
# Training inputs: this share are face crops, cut around the face the way `FaceCropper` cuts a
# model's inputs, at a framing (crop side / detected face side) drawn from CROP_SCALES; the rest
# are whole frames. The metrics read a model's generated face crops, whose framing is the
# model's (`crop_scale`: 1.8 for the release's, 1.3 for the demo model's), and a face-tracked
# crop keeps the face centred whatever its pose, so the network must read pose from the face.
FACE_CROP_SHARE = 2 / 3
CROP_SCALES = (1.2, 1.9)
REPORTED_CROP_SCALES = (1.8, 1.3)  # held-out error reported for face crops at these framings
POSE = ("yaw", "pitch", "roll")
EXPRESSION = ("mouth_open", "smile", "blink")
UNRECOVERED = ("gaze_x", "gaze_y")  # returned by `extract`, not usable: no better than the mean
EVAL_SEED = 1_000_003  # held-out frames: identities and parameters from a stream training never uses

_LOW = np.array([RANGES[c][0] for c in CHANNELS], np.float32)
_HIGH = np.array([RANGES[c][1] for c in CHANNELS], np.float32)


def normalise(values: np.ndarray) -> np.ndarray:
    return (2.0 * (values - _LOW) / (_HIGH - _LOW) - 1.0).astype(np.float32)


def denormalise(values: np.ndarray) -> np.ndarray:
    return np.clip(_LOW + (np.asarray(values, np.float32) + 1.0) * 0.5 * (_HIGH - _LOW), _LOW, _HIGH)


def preprocess(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) RGB -> float (T, 3, INPUT, INPUT) in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    top, bottom, left, right = (round(f * s) for f, s in zip(CROP, (h, h, w, w), strict=True))
    out = np.empty((len(frames), INPUT, INPUT, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame[top:bottom, left:right], (INPUT, INPUT), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def face_crops(frames: np.ndarray, scales: np.ndarray, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's face cut as `FaceCropper(size, scale)` cuts it, at that frame's scale: (T, size,
    size, 3), and whether a face was found (where not, the whole frame, resized, stands in)."""
    from avatar_forcing.media.face_crop import FaceBox, FaceCropper

    cropper = FaceCropper(size, scale=1.0)  # boxes of the detected face's side, widened per frame below
    out = np.empty((len(frames), size, size, 3), np.uint8)
    found = np.zeros(len(frames), bool)
    for i, (frame, scale) in enumerate(zip(frames, scales, strict=True)):
        boxes = cropper.detect(frame)
        found[i] = bool(boxes)
        if boxes:
            out[i] = cropper.crop(frame, FaceBox(boxes[0].cx, boxes[0].cy, boxes[0].side * float(scale)))
        else:
            out[i] = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return out, found


class ExtractorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = (3, 24, 32, 64, 96, 96)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        side = INPUT // 2 ** (len(widths) - 1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(widths[-1] * side * side, 128), nn.ReLU(), nn.Linear(128, len(CHANNELS))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))


# --- weights file ----------------------------------------------------------------------------


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- data ------------------------------------------------------------------------------------


def sample_frames(
    rng: np.random.Generator, count: int, conversation_share: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """`count` rendered 256^2 frames and their (count, C) parameters.

    Most rows are uniform within `RANGES`, 4 frames per random identity; `conversation_share`
    of them are frames of `generate_conversation` tracks (the combinations the rules produce).
    """
    frames = np.empty((count, 256, 256, 3), np.uint8)
    values = np.empty((count, len(CHANNELS)), np.float32)
    n_conv = round(count * conversation_share)
    i = 0
    while i < n_conv:
        conv = generate_conversation(int(rng.integers(2**31)), 4.0)
        for side in (0, 1):
            renderer = FaceRenderer(conv.identities[side])
            picks = rng.choice(conv.num_frames, size=min(8, n_conv - i), replace=False)
            for t in picks:
                values[i] = conv.params[side].values[t]
                frames[i] = renderer.frame(values[i])
                i += 1
            if i >= n_conv:
                break
    while i < count:
        renderer = FaceRenderer(random_identity(rng))
        for _ in range(min(4, count - i)):
            values[i] = rng.uniform(_LOW, _HIGH).astype(np.float32)
            frames[i] = renderer.frame(values[i])
            i += 1
    return frames, values


# --- inference -------------------------------------------------------------------------------

_CACHE: dict[str, ExtractorNet] = {}


def load(weights: str | Path = WEIGHTS) -> ExtractorNet:
    key = str(Path(weights).resolve())
    if key not in _CACHE:
        net = ExtractorNet()
        net.load_state_dict(load_safetensors(weights))
        _CACHE[key] = net.eval()
    return _CACHE[key]


@torch.no_grad()
def extract(frames: np.ndarray, weights: str | Path = WEIGHTS, batch: int = 128) -> FaceParams:
    """uint8 (T, H, W, 3) RGB frames -> FaceParams recovered by the extractor (T rows)."""
    net = load(weights)
    out = [net(preprocess(frames[s : s + batch])).numpy() for s in range(0, len(frames), batch)]
    return FaceParams(denormalise(np.concatenate(out)))


def pose(params: FaceParams) -> np.ndarray:
    """(T, 3) yaw, pitch, roll in degrees: the metrics' `pose` array."""
    return params.values[:, [INDEX[c] for c in POSE]].copy()


def expression(params: FaceParams) -> np.ndarray:
    """(T, 3) mouth_open, smile, blink: the metrics' `expression` array."""
    return params.values[:, [INDEX[c] for c in EXPRESSION]].copy()


def per_channel_mae(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = np.abs(np.asarray(predicted) - np.asarray(target)).mean(axis=0)
    return {c: float(err[i]) for i, c in enumerate(CHANNELS)}


def held_out(count: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    return sample_frames(np.random.default_rng(seed), count)


# --- training --------------------------------------------------------------------------------


def train(out: Path, steps: int, seed: int, frames: int, batch: int, eval_frames: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])  # training stream; never EVAL_SEED's
    start = time.time()
    parts, rows = [], []
    for s in range(0, frames, 500):  # render in chunks: 256^2 frames are kept only as inputs
        images, values = sample_frames(rng, min(500, frames - s))
        cropped = rng.random(len(images)) < FACE_CROP_SHARE
        crops, _ = face_crops(images[cropped], rng.uniform(*CROP_SCALES, int(cropped.sum())))
        parts += [preprocess(images[~cropped]), preprocess(crops)]
        values = np.concatenate([values[~cropped], values[cropped]])
        rows.append(values)
    inputs, targets = torch.cat(parts), torch.from_numpy(normalise(np.concatenate(rows)))
    render_s = time.time() - start
    print(f"rendered {frames} training frames in {render_s:.0f} s")
    net = ExtractorNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(inputs), (batch,), generator=gen)
        x = inputs[idx]
        # brightness/contrast jitter so colour shifts of identities are not memorised
        x = (
            x * (1 + 0.1 * torch.randn(batch, 1, 1, 1, generator=gen))
            + 0.05 * torch.randn(batch, 3, 1, 1, generator=gen)
        ).clamp(0, 1)
        loss = (net(x) - targets[idx]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    train_s = time.time() - start
    net.eval()
    save_safetensors(net.state_dict(), out, {"format": "pt", "steps": str(steps), "seed": str(seed)})
    _CACHE.pop(str(Path(out).resolve()), None)
    mae = evaluate(out, eval_frames)
    on_crops = {str(scale): evaluate(out, eval_frames, crop_scale=scale) for scale in REPORTED_CROP_SCALES}
    record = {
        "steps": steps,
        "seed": seed,
        "batch": batch,
        "training_frames": frames,
        "train_seconds": round(train_s, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
        "input": INPUT,
        "eval_seed": EVAL_SEED,
        "eval_frames": eval_frames,
        "face_crop_share": round(FACE_CROP_SHARE, 4),
        "crop_scales": list(CROP_SCALES),
        "mae": {c: round(v, 4) for c, v in mae.items()},
        "mae_face_crops": {scale: {c: round(v, 4) for c, v in m.items()} for scale, m in on_crops.items()},
        "mean_predictor_mae": {c: round(v, 4) for c, v in mean_baseline(eval_frames).items()},
    }
    Path(out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def mean_baseline(count: int) -> dict[str, float]:
    """MAE of predicting each channel's held-out mean on every frame (the trivial predictor)."""
    _, values = held_out(count)
    return per_channel_mae(np.broadcast_to(values.mean(0), values.shape), values)


def evaluate(weights: str | Path, count: int, crop_scale: float | None = None) -> dict[str, float]:
    """Per-channel MAE on held-out frames: whole frames, or with `crop_scale` their face crops at
    that framing (frames without a detected face are left out, as a model gets no crop of them)."""
    images, values = held_out(count)
    if crop_scale is not None:
        images, found = face_crops(images, np.full(len(images), crop_scale))
        images, values = images[found], values[found]
    mae = per_channel_mae(extract(images, weights).values, values)
    framing = "whole frames" if crop_scale is None else f"face crops at {crop_scale:g}, {len(values)} found"
    for c, v in mae.items():
        print(f"{c:>10}: MAE {v:.4f} (range {RANGES[c][0]:g}..{RANGES[c][1]:g}; {framing})")
    return mae


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avatar_forcing.synthetic.extractor")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="render frames, train the CNN, save weights + JSON record")
    t.add_argument("--out", type=Path, default=WEIGHTS)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--frames", type=int, default=8000, help="training frames rendered once")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--eval-frames", type=int, default=400)
    e = sub.add_parser("evaluate", help="per-channel MAE on held-out frames")
    e.add_argument("--weights", type=Path, default=WEIGHTS)
    e.add_argument("--frames", type=int, default=400)
    e.add_argument("--crop-scale", type=float, help="read face crops at this framing (default: whole frames)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "train":
        print(json.dumps(train(args.out, args.steps, args.seed, args.frames, args.batch, args.eval_frames), indent=2))
    else:
        evaluate(args.weights, args.frames, args.crop_scale)


if __name__ == "__main__":
    main()
