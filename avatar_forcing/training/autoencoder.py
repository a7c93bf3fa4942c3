"""Motion auto-encoder training: self-reconstruction of face crops (LIA's objective, reduced).

Every step draws B pairs of crops of one face (same clip, so the same identity): `source`
gives the identity and the warp sources, `driving` the motion, and the network must render the
source's face with the driving crop's motion: `mae(source, driving) ≈ driving`. The latent
it learns is the motion latent the flow transformer later predicts.

Loss: L1 on the image plus L1 on its 2x and 4x average-pooled versions (coarse structure
weighs more than pixel noise at 64²). LIA adds a VGG perceptual term and a GAN; neither has
weights here, and on flat-shaded synthetic faces L1 alone converges to sharp crops.

Crops come from the videos of a `prepare` manifest, cut by the same `FaceCropper` (the model's
image size, the smoothed face track) that `prepare` and the engine use, so the auto-encoder
sees the crops it will be given.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder


@dataclass(frozen=True)
class AutoEncoderOptions:
    """steps, batch_size, lr, betas: Adam on every auto-encoder parameter. LIA uses lr 2e-3 and betas
    (0, 0.99), a GAN setting; without a GAN, momentum (0.9) reached a lower loss in the same steps.
    grad_clip: max gradient norm (0 = off). seed: pair draws and initial weights.
    """

    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")


def load_face_crops(
    videos: Sequence[str | Path], size: int, detect_every: int = 1, progress: bool = False
) -> list[np.ndarray]:
    """Each video -> its face crops (T, size, size, 3) uint8, cut as `prepare` cuts them."""
    from avatar_forcing.media.io import read_video

    cropper = FaceCropper(size, detect_every=detect_every)
    clips = []
    for path in videos:
        clips.append(cropper.crop_video(read_video(path).frames, str(path)))
        if progress:
            print(f"  {path}: {len(clips[-1])} crops", flush=True)
    return clips


def to_images(crops: np.ndarray) -> Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float in [-1, 1] (the engine's conversion)."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def reconstruction_loss(output: Tensor, target: Tensor) -> Tensor:
    """L1 at full, 1/2 and 1/4 resolution, summed."""
    loss = (output - target).abs().mean()
    for factor in (2, 4):
        loss = loss + (F.avg_pool2d(output, factor) - F.avg_pool2d(target, factor)).abs().mean()
    return loss


class PairSampler:
    """Draws (source, driving) crop pairs of one clip each, from a seeded generator."""

    def __init__(self, clips: Sequence[np.ndarray], seed: int) -> None:
        clips = [c for c in clips if len(c) >= 2]
        if not clips:
            raise ValueError("clips: expected at least one clip of >= 2 face crops")
        self.clips = clips
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        picks = self.rng.integers(0, len(self.clips), batch)
        sources, drivings = [], []
        for k in picks:
            clip = self.clips[k]
            i, j = self.rng.integers(0, len(clip), 2)
            sources.append(clip[i])
            drivings.append(clip[j])
        return np.stack(sources), np.stack(drivings)


def train_autoencoder(
    mae: MotionAutoEncoder,
    train_clips: Sequence[np.ndarray],
    options: AutoEncoderOptions,
    out: Path,
    val_clips: Sequence[np.ndarray] = (),
    progress: bool = True,
) -> dict:
    """Train `mae` in place; write OUT/metrics.csv (step, loss, val_loss, seconds) and return a
    record of the run (options, final losses, time)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    mae.train().requires_grad_(True)
    optimiser = torch.optim.Adam(mae.parameters(), lr=options.lr, betas=options.betas)
    sampler = PairSampler(train_clips, options.seed)
    # a fixed validation set of pairs (held-out identities): the same pairs at every evaluation
    val_pairs = PairSampler(val_clips, options.seed + 1).sample(64) if val_clips else None
    start = time.perf_counter()
    rows: list[dict] = []
    running = 0.0
    # rows are written as they are logged, so a long run can be followed (tail OUT/metrics.csv)
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        for step in range(1, options.steps + 1):
            source, driving = (to_images(x) for x in sampler.sample(options.batch_size))
            # cosine decay to 10 %: big steps while the warp is found, small ones to sharpen
            lr = options.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - 1) / options.steps)))
            for group in optimiser.param_groups:
                group["lr"] = lr
            loss = reconstruction_loss(mae(source, driving), driving)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(mae.parameters(), options.grad_clip)
            optimiser.step()
            running += loss.item()
            if step % options.log_every == 0 or step == options.steps:
                count = options.log_every if step % options.log_every == 0 else step % options.log_every
                row = {"step": step, "loss": running / count, "lr": lr, "seconds": time.perf_counter() - start}
                row["val_loss"] = validation_loss(mae, val_pairs) if val_pairs is not None else ""
                rows.append(row)
                writer.writerow(row)
                handle.flush()
                running = 0.0
                if progress:
                    val = f" val {row['val_loss']:.4f}" if val_pairs is not None else ""
                    line = f"  step {step}/{options.steps} loss {row['loss']:.4f}{val} ({row['seconds']:.0f} s)"
                    print(line, flush=True)
    mae.eval().requires_grad_(False)
    record = {
        "options": asdict(options),
        "train_clips": len(train_clips),
        "train_crops": int(sum(len(c) for c in train_clips)),
        "final_loss": rows[-1]["loss"],
        "final_val_loss": rows[-1]["val_loss"],
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in mae.parameters()),
    }
    (out / "autoencoder_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def validation_loss(mae: MotionAutoEncoder, pairs: tuple[np.ndarray, np.ndarray]) -> float:
    was_training = mae.training
    mae.eval()
    source, driving = (to_images(x) for x in pairs)
    loss = float(reconstruction_loss(mae(source, driving), driving))
    mae.train(was_training)
    return loss
