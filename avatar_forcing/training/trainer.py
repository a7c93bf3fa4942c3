"""The training loop: diffusion forcing (and DPO) over the flow transformer, one code path for
one process and for every Ray Train worker.

Only the flow transformer trains; the motion auto-encoder and the audio encoder ride along
frozen so that each checkpoint is a complete model directory (`checkpointing.py`).

Determinism, so that a resumed run continues bit for bit: every random draw of step s on
rank r (window offsets, timesteps, noise, dropout) comes from a generator seeded by
(seed, s, r), and the data order of epoch e from one seeded by (seed, e). The data position is
therefore the step itself; the checkpoint stores it with the weights, the optimiser, the LR
schedule, the grad scaler, the EMA and the process RNG states.

Validation reports the loss of the raw weights (`val_loss`) and of the EMA weights
(`val_loss_ema`), which are the ones that checkpoints and `export` write.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from avatar_forcing.engine.chunks import ChunkSchedule
from avatar_forcing.nn.model import AvatarForcing
from avatar_forcing.sampling.euler import FlowMatchEuler
from avatar_forcing.training import checkpointing
from avatar_forcing.training.batch import TrainingBatch, TrainingExample, collate
from avatar_forcing.training.conditioning import clip_context
from avatar_forcing.training.diffusion_forcing import DiffusionForcingConfig, VelocityModel, diffusion_forcing_loss
from avatar_forcing.training.dpo import DPOConfig, dpo_loss
from avatar_forcing.training.ema import EMA

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 8  # per worker (the paper: 8 on one GPU)
    lr: float = 1e-4
    optimizer: str = "adam"  # the paper's; "adamw" for decoupled weight decay
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500  # linear LR warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    precision: str = "fp32"  # bf16 / fp16 autocast on CUDA only
    ema_decay: float = 0.9999  # 0 = no EMA
    window: int = 0  # frames per training window; 0 = the model's attention window (50)
    seed: int = 0
    log_every: int = 10
    val_every: int = 500  # 0 = no validation
    val_batches: int = 4
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    deterministic: bool = True  # deterministic kernels (multi-threaded CPU attention backward is not otherwise)
    df: DiffusionForcingConfig = field(default_factory=DiffusionForcingConfig)
    dpo: DPOConfig | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"train config: {name} = {getattr(self, name)!r}; expected {expected}")

        need(self.steps >= 1, "steps", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.ema_decay == 0 or 0 < self.ema_decay < 1, "ema_decay", "0 (off) or in (0, 1)")
        need(self.window >= 0, "window", ">= 0 (0: the model's window)")
        for name in ("log_every", "checkpoint_every"):
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.val_every >= 0, "val_every", ">= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["df"] = DiffusionForcingConfig(**data.get("df", {}))
        data["dpo"] = None if data.get("dpo") is None else DPOConfig(**data["dpo"])
        data["betas"] = tuple(data.get("betas", (0.9, 0.999)))
        return cls(**data)


def step_generator(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]))


class CheckpointSink(Protocol):
    """Where a run's checkpoints go and come back from (a local folder, or Ray Train)."""

    def latest(self) -> Path | None: ...

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None: ...

    def report(self, metrics: dict[str, float]) -> None: ...


class LocalSink:
    """Checkpoints under `root/step_XXXXXXXX`, the newest `keep` kept; the latest is resumed."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root, self.keep = Path(root), keep

    def latest(self) -> Path | None:
        return checkpointing.latest_checkpoint(self.root)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write(checkpointing.step_dir(self.root, step))
        checkpointing.prune_checkpoints(self.root, self.keep)

    def report(self, metrics: dict[str, float]) -> None:
        pass


class CsvLog:
    """metrics.csv, one row per logged step, appended across resumes.

    A file written with other columns (an older version) keeps its header: rows are written in
    its columns, so that the file stays one consistent table.
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = None
        if self.path.is_file():
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), None)
        if not header:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        elif header != self.columns:
            log.warning("%s: columns %s, not %s; rows are written in the file's columns", self.path, header, columns)
            self.columns = header

    def write(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else row[c] for c in self.columns])

    def truncate(self, step: int) -> None:
        """Drop the rows after `step`: a run resumed from the checkpoint of `step` logs them again."""
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))
        index = self.columns.index("step")
        kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[index])) <= step]
        if len(kept) == len(rows):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        tmp.replace(self.path)


DF_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "steps_per_s", "val_loss", "val_loss_ema")
DPO_COLUMNS = ("loss_dpo", "loss_df", "implicit_acc", "reward_margin", "reward_win", "reward_lose")


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model: AvatarForcing,
        train_data: Sequence[TrainingExample],
        val_data: Sequence[TrainingExample] | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        losers: dict[str, Tensor] | None = None,
        log_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.config, self.model = config, model
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.train_data, self.val_data = train_data, val_data
        self.progress = progress and rank == 0
        flow_cfg = model.config.flow
        self.block = flow_cfg.block
        self.chunks = ChunkSchedule.of(flow_cfg)
        self.window = config.window or flow_cfg.window
        self.scheduler = FlowMatchEuler(flow_cfg.num_train_timesteps)
        if config.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision: {config.precision!r} needs a CUDA device (got {self.device}); use fp32")
        self.steps_per_epoch = len(train_data) // (config.batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"dataset: {len(train_data)} examples; expected at least batch_size x workers = "
                f"{config.batch_size} x {world_size}"
            )
        if config.dpo is not None:
            if losers is None:
                raise ValueError("dpo: no losers given; expected key -> motion from losers.ensure_losers")
            absent = [e.key for e in (train_data[i] for i in range(len(train_data))) if e.key not in losers]
            if absent:
                raise ValueError(f"dpo: no loser for examples {absent[:5]}; expected one per training example")
        self.losers = losers

        for part in (model.motion_autoencoder, model.audio_encoder):
            part.requires_grad_(False)
        self.flow = model.flow_transformer.to(self.device).train()
        self.flow.requires_grad_(True)
        self.velocity = VelocityModel(self.flow)
        self.module: nn.Module = self.velocity
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.velocity, device_ids=ids)
        params = [p for p in self.flow.parameters() if p.requires_grad]
        opt = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel over all parameters (7x faster than the foreach path on CPU here).
        self.optimizer = opt(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, fused=True)
        warmup = config.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 1.0 if warmup == 0 else min(1.0, (s + 1) / warmup)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.ema = EMA(self.flow, config.ema_decay) if config.ema_decay > 0 else None
        self.reference: VelocityModel | None = None
        if config.dpo is not None:
            reference = copy.deepcopy(self.flow).eval().requires_grad_(False)
            self.reference = VelocityModel(reference)
        self.step = 0
        self.csv = None
        if log_dir is not None and rank == 0:
            columns = DF_COLUMNS + (DPO_COLUMNS if config.dpo is not None else ())
            self.csv = CsvLog(Path(log_dir) / "metrics.csv", columns)

    # ---- data -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def batch_for(self, step: int, generator: torch.Generator) -> TrainingBatch:
        """This rank's batch of `step`: epoch order from (seed, epoch), windows from `generator`."""
        cfg = self.config
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_data), generator=step_generator(cfg.seed, epoch, 0x0DA7A))
        per_step = cfg.batch_size * self.world_size
        mine = order[position * per_step : (position + 1) * per_step][self.rank * cfg.batch_size :][: cfg.batch_size]
        return self._windows([self.train_data[int(i)] for i in mine], generator)

    def _windows(self, examples: list[TrainingExample], generator: torch.Generator) -> TrainingBatch:
        """Windows at random block-aligned offsets (the engine's blocks start on that grid), with the
        condition frames around them that the engine's chunks read (`training/conditioning.py`)."""
        windows, losers, starts = [], [], []
        for e in examples:
            spare = (e.length - self.window) // self.block
            start = self.block * int(torch.randint(0, spare + 1, (1,), generator=generator)) if spare > 0 else 0
            starts.append(start)
            windows.append(e.window(start, self.window))
            if self.losers is not None:
                loser = self.losers[e.key][start : start + self.window].float()
                missing = self.window - loser.shape[0]
                losers.append(torch.cat([loser, loser.new_zeros(missing, loser.shape[1])]) if missing > 0 else loser)
        batch = collate(windows, losers if self.losers is not None else None)
        tracks = [(e.avatar_audio, e.user_audio, e.user_motion) for e in examples]
        batch.context = clip_context(tracks, [e.length for e in examples], starts, self.window, self.chunks)
        return batch.to(self.device)

    # ---- steps ------------------------------------------------------------------------------

    def _autocast(self):
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextmanager
    def _determinism(self):
        """Deterministic kernels inside the block (warn-only on CUDA, where some ops have none)."""
        if not self.config.deterministic:
            yield
            return
        previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])

    def train_step(self) -> dict[str, float]:
        with self._determinism():
            return self._train_step()

    def _train_step(self) -> dict[str, float]:
        cfg = self.config
        generator = step_generator(cfg.seed, self.step, self.rank)
        batch = self.batch_for(self.step, generator)
        self.optimizer.zero_grad(set_to_none=True)
        extra: dict[str, float] = {}
        with self._autocast():
            if cfg.dpo is None:
                loss, _ = diffusion_forcing_loss(self.module, batch, self.scheduler, cfg.df, self.block, generator)
            else:
                assert self.reference is not None
                out = dpo_loss(
                    self.module, self.reference, batch, self.scheduler, cfg.df, cfg.dpo, self.block, generator
                )
                loss, extra = out.loss, out.stats
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(self.flow)
        self.step += 1
        loss_value = self._mean_over_workers(loss.detach().float())
        return {"step": self.step, "epoch": self.epoch, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                **extra}  # fmt: skip

    def _mean_over_workers(self, value: Tensor) -> float:
        if self.world_size > 1 and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return float(value)

    def validate(self, ema: bool = False) -> float | None:
        """The validation loss of the raw weights, or with `ema` of the EMA weights (the ones that
        checkpoints and `export` write). None without validation data, or for `ema` without EMA."""
        if ema and self.ema is None:
            return None
        with self._determinism(), self.inference_weights() if ema else nullcontext():
            return self._validate()

    def validation(self) -> dict[str, float | None]:
        """`val_loss` (raw weights) and `val_loss_ema` (EMA weights; None when EMA is off)."""
        return {"val_loss": self.validate(), "val_loss_ema": self.validate(ema=True)}

    @torch.no_grad()
    def _validate(self) -> float | None:
        """Mean diffusion-forcing loss on the validation set, with fixed draws (comparable across steps)."""
        if not self.val_data:
            return None
        cfg = self.config
        generator = step_generator(cfg.seed, 0x7A1)
        size = min(cfg.batch_size, len(self.val_data))
        batches = min(cfg.val_batches, math.ceil(len(self.val_data) / size))
        was_losers, self.losers = self.losers, None
        total = 0.0
        try:
            for b in range(batches):
                examples = [self.val_data[(b * size + i) % len(self.val_data)] for i in range(size)]
                batch = self._windows(examples, generator)
                with self._autocast():
                    loss, _ = diffusion_forcing_loss(
                        self.velocity, batch, self.scheduler, cfg.df, self.block, generator
                    )
                total += float(loss)
        finally:
            self.losers = was_losers
        return total / batches

    # ---- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "flow": {k: v.detach().to("cpu", copy=True) for k, v in self.flow.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "reference": None if self.reference is None else self.reference.flow.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": self.config.to_dict(),
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {})
        for name in ("seed", "batch_size", "window"):
            if name in saved and saved[name] != getattr(self.config, name):
                raise ValueError(
                    f"resume: {name} = {getattr(self.config, name)!r} but the checkpoint was trained with "
                    f"{saved[name]!r}; expected the same value (or a fresh output directory)"
                )
        # The data position is the step only for the same global batch (batch_size x workers).
        if "world_size" in state and int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"resume: world_size (workers) = {self.world_size} but the checkpoint was trained with "
                f"{state['world_size']}; expected the same number of workers (or a fresh output directory)"
            )
        if (state.get("reference") is None) != (self.reference is None):
            raise ValueError("resume: the checkpoint and this run disagree on --dpo; expected the same mode")
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("resume: the checkpoint has no EMA but ema_decay > 0; expected the same setting")
            self.ema.load_state_dict(state["ema"])
        if self.reference is not None:
            self.reference.flow.load_state_dict(state["reference"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])

    def resume(self, directory: Path) -> None:
        self.load_state_dict(checkpointing.read_state(directory))
        log.info("resumed from %s at step %d", directory, self.step)

    @contextmanager
    def inference_weights(self):
        """The flow transformer holds the EMA weights inside the block (the raw ones after, exactly)."""
        if self.ema is None:
            yield self.model
            return
        raw = {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
        self.flow.load_state_dict(self.ema.weights(self.flow))
        try:
            yield self.model
        finally:
            self.flow.load_state_dict(raw)

    def write_checkpoint(self, directory: Path) -> Path:
        state = self.state_dict()  # copies the raw weights before the EMA ones are swapped in
        with self.inference_weights() as model:
            return checkpointing.write_checkpoint(directory, model, state)

    def export(self, directory: str | Path) -> Path:
        """A weights directory for the engine and the services (EMA weights when enabled)."""
        from avatar_forcing.nn.checkpoints import save_pretrained

        with self.inference_weights() as model:
            return save_pretrained(model, directory)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, sink: CheckpointSink, until: int | None = None) -> list[dict[str, float]]:
        """Train to `until` (default: config.steps) steps, resuming from the sink's latest checkpoint.

        Every rank calls the sink at the same steps (Ray Train's report is collective); only
        rank 0 writes checkpoints and the CSV log. Returns the logged rows of this call.
        """
        from tqdm import tqdm

        cfg = self.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        latest = sink.latest()
        if latest is not None:
            self.resume(latest)
        if self.csv is not None:
            self.csv.truncate(self.step)  # rows past the checkpoint (an interrupted run's) come again
        rows: list[dict[str, float]] = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        last_time, last_step = time.perf_counter(), self.step
        try:
            while self.step < until:
                metrics = self.train_step()
                bar.update(1)
                step = self.step
                done = step == until
                logged = step % cfg.log_every == 0 or done
                if cfg.val_every and (step % cfg.val_every == 0 or done):
                    metrics.update(self.validation())
                    logged = True
                if not logged and step % cfg.checkpoint_every:
                    continue
                now = time.perf_counter()
                metrics["steps_per_s"] = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                rows.append(metrics)
                if self.csv is not None:
                    self.csv.write(metrics)
                report = {k: v for k, v in metrics.items() if v is not None}
                if step % cfg.checkpoint_every == 0 or done:
                    sink.save(step, self.write_checkpoint, report)
                else:
                    sink.report(report)
        finally:
            bar.close()
        return rows
