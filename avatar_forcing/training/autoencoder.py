"""Motion auto-encoder training: self-reconstruction of face crops (LIA's objective, reduced).

Every step draws B pairs of crops of one face (same clip, so the same identity): `source`
gives the identity and the warp sources, `driving` the motion, and the network must render the
source's face with the driving crop's motion: `mae(source, driving) ≈ driving`. The latent
it learns is the motion latent the flow transformer later predicts.

Loss: L1 on the image plus L1 on its 2x and 4x average-pooled versions (coarse structure
weighs more than pixel noise at 64²), each pixel weighted by how much the driving crop differs
there from the source (`motion_weight`): what the motion latent must explain. Uniform L1 is
dominated by the head's outline and the backdrop; a mouth that opens changes ~1 % of a 64²
crop, too little of the loss for the motion coefficients to learn it. Even motion-weighted,
head motion moves far more pixels than the lips do, so the mouth region
(`FaceCropper.mouth_region`) can weigh more again (`mouth_weight`), and pairs can be picked for
how much their mouths differ (`pairs_by="mouth"`). LIA adds a VGG perceptual term and a GAN;
neither has weights here.

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

from avatar_forcing.config import MotionAutoEncoderConfig
from avatar_forcing.engine.portrait import images_to_tensor
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from avatar_forcing.training.latent_scale import standardise_latents

PAIRS_BY = ("frame", "mouth")
Region = tuple[float, float, float, float]  # (top, bottom, left, right) as fractions of the crop side


@dataclass(frozen=True)
class AutoEncoderOptions:
    """steps, batch_size, lr, betas: Adam on every auto-encoder parameter. LIA uses lr 2e-3 and betas
    (0, 0.99), a GAN setting; without a GAN, momentum (0.9) reached a lower loss in the same steps.
    grad_clip: max gradient norm (0 = off). seed: pair draws and initial weights.
    motion_weight: extra weight of pixels where driving and source differ (0 = uniform L1).
    pair_candidates: drivings drawn per source, the most different kept (`PairSampler`).
    mouth_weight: extra weight of the mouth region (`FaceCropper.mouth_region`) in the loss.
    pairs_by: where a candidate's difference is measured: "frame" (the whole crop) or "mouth".
    colour_jitter: per pair, the same random colour change of source and driving: per-channel gain
    1 ± j and offset ± j/2 (0 = none). More skin, lip and hair colours than the world's identities
    hold, so the motion code is learnt from shapes rather than one palette.
    latent_std: after training, rescale the latents so the training crops' motion coefficients
    spread by this much (`training/latent_scale.py`; 0 = keep the scale training left).
    """

    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    motion_weight: float = 0.0
    pair_candidates: int = 1
    mouth_weight: float = 0.0
    pairs_by: str = "frame"
    colour_jitter: float = 0.0
    latent_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")
        if not self.motion_weight >= 0:
            raise ValueError(f"motion_weight: expected >= 0, got {self.motion_weight!r}")
        if not isinstance(self.pair_candidates, int) or self.pair_candidates < 1:
            raise ValueError(f"pair_candidates: expected an integer >= 1, got {self.pair_candidates!r}")
        if not self.mouth_weight >= 0:
            raise ValueError(f"mouth_weight: expected >= 0, got {self.mouth_weight!r}")
        if self.pairs_by not in PAIRS_BY:
            raise ValueError(f"pairs_by: expected one of {PAIRS_BY}, got {self.pairs_by!r}")
        if not 0 <= self.colour_jitter < 1:
            raise ValueError(f"colour_jitter: expected a number in [0, 1), got {self.colour_jitter!r}")
        if not (self.latent_std >= 0 and np.isfinite(self.latent_std)):
            raise ValueError(f"latent_std: expected a finite number >= 0, got {self.latent_std!r}")


@torch.no_grad()
def start_with_identity_warp(mae: MotionAutoEncoder) -> MotionAutoEncoder:
    """Zero every warp head's weights (their biases start at zero): each level's flow is then the
    identity and its mask 1/2, so an untrained decoder already passes the portrait's features
    through in place and training starts from the source crop, not from a random warp's
    scramble. For training from random weights only: it erases a trained model's warps."""
    for head in mae.dec.to_flows:
        head.conv.weight.zero_()
        head.bias.zero_()
    return mae


def load_face_crops(
    videos: Sequence[str | Path],
    mae: MotionAutoEncoderConfig,
    detect_every: int = 1,
    progress: bool = False,
    skipped: list[str] | None = None,
) -> list[np.ndarray]:
    """Each video -> its face crops (T, S, S, 3) uint8 at the auto-encoder's size and framing, cut as
    `prepare` cuts them. With a `skipped` list, a video whose face track cannot be cut (no face
    early enough, unreadable) is left out and its error appended there, as `prepare` leaves out
    such a conversation; without one the first such error is raised."""
    from avatar_forcing.media.io import read_video

    cropper = FaceCropper.for_model(mae, detect_every=detect_every)
    clips = []
    for path in videos:
        try:
            clips.append(cropper.crop_video(read_video(path).frames, str(path)))
        except (ValueError, FileNotFoundError) as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            continue
        if progress:
            print(f"  {path}: {len(clips[-1])} crops", flush=True)
    return clips


def motion_weights(source: Tensor, driving: Tensor, strength: float) -> Tensor:
    """(B, 1, S, S) per-pixel weights, mean 1 per image: 1 + strength x |driving - source|
    (channel mean, widened by a 5x5 max so that a moved edge weighs on both of its sides)."""
    change = (driving - source).abs().mean(1, keepdim=True)
    change = F.max_pool2d(change, 5, stride=1, padding=2)
    weights = 1.0 + strength * change / change.mean((2, 3), keepdim=True).clamp_min(1e-3)
    return weights / weights.mean((2, 3), keepdim=True)


def region_slices(region: Region, size: int) -> tuple[slice, slice]:
    """(rows, columns) of a `size` x `size` crop that `region` covers (at least one pixel each)."""
    top, bottom, left, right = (round(f * size) for f in region)
    return slice(top, max(bottom, top + 1)), slice(left, max(right, left + 1))


def region_weights(region: Region, size: int, strength: float) -> Tensor:
    """(1, 1, S, S) weights, mean 1: 1 + strength inside `region`, 1 elsewhere."""
    weights = torch.ones(1, 1, size, size)
    rows, cols = region_slices(region, size)
    weights[..., rows, cols] += strength
    return weights / weights.mean()


def reconstruction_loss(output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """L1 at full, 1/2 and 1/4 resolution, summed; `weights` (B, 1, S, S) per pixel, or uniform."""

    def at(x: Tensor, factor: int) -> Tensor:
        return F.avg_pool2d(x, factor) if factor > 1 else x

    loss = output.new_zeros(())
    for factor in (1, 2, 4):
        error = (at(output, factor) - at(target, factor)).abs()
        if weights is not None:
            error = error * at(weights, factor)
        loss = loss + error.mean()
    return loss


def jitter_colours(
    source: Tensor, driving: Tensor, strength: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(B, 3, S, S) pairs in [-1, 1] -> the same per-pair colour change applied to both: per
    channel x * (1 ± strength) ± strength / 2, clamped to [-1, 1]."""
    shape = (source.shape[0], source.shape[1], 1, 1)
    draw = lambda: (2 * torch.rand(shape, generator=generator) - 1).to(source.device, source.dtype)
    gain, offset = 1 + strength * draw(), 0.5 * strength * draw()
    return (source * gain + offset).clamp(-1, 1), (driving * gain + offset).clamp(-1, 1)


class PairSampler:
    """Draws (source, driving) crop pairs of one clip each, from a seeded generator.

    candidates: drivings drawn per source, of which the one that differs most from it is kept
    (1 = uniform pairs). In a conversation most pairs of frames differ by little more than the
    idle drift; the pairs where the mouth or head moved are the ones that teach the motion code.
    region: where the difference is measured (None: the whole crop). Over the whole crop the
    head's motion outweighs the mouth's; over the mouth region an opening mouth counts.
    """

    def __init__(
        self, clips: Sequence[np.ndarray], seed: int, candidates: int = 1, region: Region | None = None
    ) -> None:
        clips = [c for c in clips if len(c) >= 2]
        if not clips:
            raise ValueError("clips: expected at least one clip of >= 2 face crops")
        if candidates < 1:
            raise ValueError(f"candidates: expected >= 1, got {candidates!r}")
        self.clips = clips
        self.candidates = candidates
        self.rng = np.random.default_rng(seed)
        size = clips[0].shape[1]
        self.window = region_slices(region, size) if region is not None else (slice(None), slice(None))

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        picks = self.rng.integers(0, len(self.clips), batch)
        sources, drivings = [], []
        for k in picks:
            clip = self.clips[k]
            i = self.rng.integers(0, len(clip))
            js = self.rng.integers(0, len(clip), self.candidates)
            rows, cols = self.window
            drivings_there = clip[js][:, rows, cols].astype(np.int16)
            change = np.abs(drivings_there - clip[i][rows, cols].astype(np.int16)).mean(axis=(1, 2, 3))
            sources.append(clip[i])
            drivings.append(clip[js[np.argmax(change)]])
        return np.stack(sources), np.stack(drivings)


def train_autoencoder(
    mae: MotionAutoEncoder,
    train_clips: Sequence[np.ndarray],
    options: AutoEncoderOptions,
    out: Path,
    val_clips: Sequence[np.ndarray] = (),
    progress: bool = True,
    left_out: Sequence[str] = (),
) -> dict:
    """Train `mae` in place; write OUT/metrics.csv (step, loss, val_loss, seconds) and return a
    record of the run (options, final losses, time; `left_out`: the videos the caller could not
    crop, why each)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    mae.train().requires_grad_(True)
    optimiser = torch.optim.Adam(mae.parameters(), lr=options.lr, betas=options.betas)
    mouth = FaceCropper.for_model(mae.config).mouth_region()
    sampler = PairSampler(
        train_clips, options.seed, options.pair_candidates, mouth if options.pairs_by == "mouth" else None
    )
    size = mae.config.image_size
    mouth_weights = region_weights(mouth, size, options.mouth_weight) if options.mouth_weight else None
    # a fixed validation set of pairs (held-out identities): the same pairs at every evaluation
    val_pairs = PairSampler(val_clips, options.seed + 1).sample(64) if val_clips else None
    jitter_rng = torch.Generator().manual_seed(options.seed)
    start = time.perf_counter()
    rows: list[dict] = []
    running = 0.0
    # rows are written as they are logged, so a long run can be followed (tail OUT/metrics.csv)
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        for step in range(1, options.steps + 1):
            source, driving = (images_to_tensor(mae, x, "face crops") for x in sampler.sample(options.batch_size))
            if options.colour_jitter:
                source, driving = jitter_colours(source, driving, options.colour_jitter, jitter_rng)
            # cosine decay to 10 %: big steps while the warp is found, small ones to sharpen
            lr = options.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step - 1) / options.steps)))
            for group in optimiser.param_groups:
                group["lr"] = lr
            weights = motion_weights(source, driving, options.motion_weight) if options.motion_weight else None
            if mouth_weights is not None:  # the mouth's pixels weigh more, whatever else moved
                weights = mouth_weights if weights is None else weights * mouth_weights
                weights = weights / weights.mean((2, 3), keepdim=True)
            loss = reconstruction_loss(mae(source, driving), driving, weights)
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
    if left_out:
        record["left_out"] = list(left_out)
    if options.latent_std > 0:
        record["latent_scale"] = standardise_latents(mae, train_clips, options.latent_std, seed=options.seed)
    (out / "autoencoder_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@torch.no_grad()
def validation_loss(mae: MotionAutoEncoder, pairs: tuple[np.ndarray, np.ndarray]) -> float:
    was_training = mae.training
    mae.eval()
    source, driving = (images_to_tensor(mae, x, "validation crops") for x in pairs)
    loss = float(reconstruction_loss(mae(source, driving), driving))
    mae.train(was_training)
    return loss
