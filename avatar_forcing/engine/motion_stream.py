"""Streaming motion generation for one session.

`MotionStream` takes per-frame condition features (avatar audio, user audio, user
motion), each stream in any chunk sizes and at its own pace, and emits motion
latents block by block as soon as the inputs of a block are complete. Its state
is explicit and serialisable: frame cursor, buffered inputs, clean context
latents, KV caches (self and condition), and the noise RNG. Fed the same inputs
and noise it equals `offline.sample_motion`.

Frame numbers: inputs and outputs use *session* frame indices (0 = first frame
the caller pushed). Internally positions are absolute model frames; with warm
start the first window is generated from idle input at absolute frames
[0, window) and session frame 0 is absolute frame `window`, so the first live
block needs `block` frames of input instead of `window`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from avatar_forcing.engine import session_state
from avatar_forcing.engine.chunks import condition_span
from avatar_forcing.engine.history import HistoryBlock, replay_history
from avatar_forcing.nn.kv_cache import FlowCache
from avatar_forcing.sampling.block_sampler import BlockRequest, BlockResult, BlockSampler, Conditions, pad_frames
from avatar_forcing.sampling.euler import GuidanceScales

STREAMS = ("avatar_audio", "user_audio", "user_motion")


@dataclass(frozen=True)
class StreamOptions:
    """Per-session generation options.

    block: frames per block after the first window (latency vs. cost: a 5-frame block
        answers in 200 ms of input but costs about twice the compute per second).
    nfe: sampler steps per block (the release: 10; fewer is faster and blurrier).
    guidance: classifier-free guidance scales for avatar audio and user signals.
    warm_start: generate the first window at once from idle input (silence, no user)
        so that the first live block waits for `block` frames, not `window`.
    """

    block: int = 10
    nfe: int = 10
    guidance: GuidanceScales = field(default_factory=GuidanceScales)
    warm_start: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StreamOptions:
        data = json.loads(text)
        data["guidance"] = GuidanceScales(**data["guidance"])
        return cls(**data)


@dataclass
class SessionSetup:
    """What never changes in a session: enough, with its history, to rebuild the stream elsewhere."""

    reference_motion: Tensor  # (512,) r_s of the portrait
    options: StreamOptions
    seed: int
    frame_offset: int  # model frames before session frame 0 (the warm-start window)

    def to_bytes(self) -> bytes:
        meta = {"options": self.options.to_json(), "seed": self.seed, "frame_offset": self.frame_offset}
        return session_state.pack("setup", {"reference_motion": self.reference_motion}, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionSetup:
        tensors, meta = session_state.unpack(data, "setup")
        try:
            options = StreamOptions.from_json(meta["options"])
            return cls(tensors["reference_motion"], options, int(meta["seed"]), int(meta["frame_offset"]))
        except KeyError as exc:
            raise ValueError(f"session state: the setup blob lacks {exc}") from None


@dataclass
class MotionBlock:
    frame_index: int  # session frame index of latents[0]
    latents: Tensor  # (n, 512)


def _as_frames(name: str, value: Tensor, dim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (n, {dim}), got {type(value).__name__}")
    if value.ndim != 2 or value.shape[1] != dim:
        raise ValueError(f"{name}: expected shape (n, {dim}), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return value.detach().float().cpu()


class MotionStream:
    def __init__(
        self,
        block_sampler: BlockSampler,
        reference_motion: Tensor,
        options: StreamOptions | None = None,
        seed: int = 0,
        idle_features: Conditions | None = None,
    ) -> None:
        self.sampler = block_sampler
        self.config = block_sampler.model.config
        self.options = options or StreamOptions()
        self.config.with_block(self.options.block)  # validates the block size
        dim = self.config.motion_dim
        self.reference_motion = _as_frames("reference_motion", reference_motion.reshape(1, -1), dim)[0]
        self.generator = torch.Generator().manual_seed(seed)
        self.frame_offset = 0
        self.next_frame = 0  # absolute frame index of the next frame to generate
        self.input_start = 0  # absolute frame index of inputs[*][0]
        self.inputs = {name: torch.zeros(0, dim) for name in STREAMS}
        self.context: Tensor | None = None
        self.cache: FlowCache | None = None
        self.total_frames: int | None = None  # set by finish(): session frames of input
        self._in_flight: BlockRequest | None = None
        self.last_history: HistoryBlock | None = None  # the latest block, for the session history
        if self.options.warm_start:
            self._warm_start(idle_features)

    # -- input ---------------------------------------------------------------------------

    def push(
        self,
        avatar_audio: Tensor | None = None,
        user_audio: Tensor | None = None,
        user_motion: Tensor | None = None,
    ) -> None:
        """Append per-frame features (n, 512) to any of the three streams."""
        if self.total_frames is not None:
            raise ValueError("push: the stream was finished; no more input is accepted")
        for name, value in zip(STREAMS, (avatar_audio, user_audio, user_motion), strict=True):
            if value is not None:
                self.inputs[name] = torch.cat([self.inputs[name], _as_frames(name, value, self.config.motion_dim)])

    def finish(self) -> None:
        """No more input: the remaining frames are generated with the last frame repeated."""
        lengths = {name: self._available(name) - self.frame_offset for name in STREAMS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"finish: streams have different lengths {lengths}; expected equal frame counts")
        self.total_frames = lengths["avatar_audio"]
        if self.total_frames <= 0 and self.next_frame <= self.frame_offset:
            raise ValueError("finish: no input frames were pushed")

    # -- generation ------------------------------------------------------------------------

    def next_request(self, nfe: int | None = None) -> BlockRequest | None:
        """The next block's request if its inputs are complete, else None."""
        cfg, opts = self.config, self.options
        first = self.cache is None
        start, stop = condition_span(self.next_frame, first, cfg.window, opts.block, cfg.lookahead)
        if self.total_frames is not None:
            if self.next_frame >= self.frame_offset + self.total_frames:
                return None
        elif min(self._available(name) for name in STREAMS) < stop:
            return None
        conditions = Conditions(*(self._frames(name, start, stop) for name in STREAMS))
        new = cfg.window if first else opts.block
        self._in_flight = BlockRequest(
            conditions,
            self.reference_motion,
            torch.randn((new, cfg.motion_dim), generator=self.generator),
            start,
            context=self.context,
            cache=self.cache,
            guidance=opts.guidance,
            nfe=nfe or opts.nfe,
            block=opts.block,
        )
        return self._in_flight

    def accept(self, result: BlockResult) -> MotionBlock | None:
        """Advance the state with a finished request; returns the frames due for output."""
        request = self._in_flight
        if request is None:
            raise ValueError("accept: no request in flight; call next_request() first")
        self._in_flight = None
        c = request.conditions
        self.last_history = HistoryBlock(
            request.start_frame,
            result.tokens.detach().float().cpu().clone(),
            torch.stack([c.avatar_audio, c.user_audio, c.user_motion], dim=1).float().cpu(),
            self.generator.get_state(),  # noise for this block was drawn in next_request
        )
        first_frame = self.next_frame
        self.context = result.tokens[-self.config.lookahead :].detach().float().cpu().clone()
        self.cache = result.cache
        self.next_frame += result.latents.shape[0]
        self._drop_consumed_inputs()
        latents = result.latents.detach().float().cpu()
        keep_from = max(0, self.frame_offset - first_frame)  # warm-start frames are not output
        keep_to = latents.shape[0]
        if self.total_frames is not None:
            keep_to = min(keep_to, self.frame_offset + self.total_frames - first_frame)
        if keep_from >= keep_to:
            return None
        return MotionBlock(first_frame + keep_from - self.frame_offset, latents[keep_from:keep_to])

    def hold_block(self) -> MotionBlock | None:
        """Drop the next block (compute fell behind): its frames repeat the last frame.

        The state stays consistent at a fraction of the cost: the held latents become the
        block's tokens and only the cache-writing call runs (1 forward pass instead of NFE).
        The noise of the dropped block is still drawn, so later blocks keep their noise.
        """
        request = self.next_request()
        if request is None or request.context is None:
            return None  # nothing due, or the first window (which cannot be held: no last frame)
        held = request.context[-1:].expand(request.noise.shape[0], -1)
        tokens = torch.cat([request.context, held])
        cache = self.sampler.replay(
            request.conditions, tokens, request.start_frame, self.reference_motion, self.cache, self.options.block
        )
        return self.accept(BlockResult(latents=held, tokens=tokens, cache=cache))

    def pull(self, nfe: int | None = None) -> list[MotionBlock]:
        """Generate every block whose inputs are complete."""
        blocks = []
        while (request := self.next_request(nfe)) is not None:
            block = self.accept(self.sampler.run([request], self.options.block)[0])
            if block is not None:
                blocks.append(block)
        return blocks

    @property
    def next_input_frame(self) -> int:
        """Session frame index of the next input frame that every stream still lacks."""
        return min(self._available(name) for name in STREAMS) - self.frame_offset

    @property
    def frames_emitted(self) -> int:
        return max(0, self.next_frame - self.frame_offset)

    # -- state -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole session state as one safetensors blob (tensors + JSON metadata)."""
        tensors = {f"input.{name}": self.inputs[name] for name in STREAMS}
        tensors["reference_motion"] = self.reference_motion
        tensors["rng_state"] = self.generator.get_state()
        if self.context is not None:
            tensors["context"] = self.context
        if self.cache is not None:
            tensors.update(self.cache.to(torch.device("cpu")).to_tensors("cache."))
        meta = {
            "options": self.options.to_json(),
            "frame_offset": self.frame_offset,
            "next_frame": self.next_frame,
            "input_start": self.input_start,
            "total_frames": self.total_frames,
            "depth": self.config.depth,
        }
        return session_state.pack("stream", tensors, meta)

    @classmethod
    def from_bytes(cls, block_sampler: BlockSampler, data: bytes) -> MotionStream:
        tensors, meta = session_state.unpack(data, "stream")
        if meta["depth"] != block_sampler.model.config.depth:
            raise ValueError(
                f"session state: made by a model of depth {meta['depth']}, this model has "
                f"{block_sampler.model.config.depth}"
            )
        stream = cls.__new__(cls)
        stream.sampler = block_sampler
        stream.config = block_sampler.model.config
        stream.options = StreamOptions.from_json(meta["options"])
        stream.reference_motion = tensors["reference_motion"]
        stream.generator = torch.Generator()
        stream.generator.set_state(tensors["rng_state"])
        stream.frame_offset = meta["frame_offset"]
        stream.next_frame = meta["next_frame"]
        stream.input_start = meta["input_start"]
        stream.total_frames = meta["total_frames"]
        stream.inputs = {name: tensors[f"input.{name}"] for name in STREAMS}
        stream._in_flight = None
        stream.last_history = None
        stream.context = tensors.get("context")
        has_cache = "cache.self_positions" in tensors
        stream.cache = FlowCache.from_tensors(tensors, stream.config.depth, "cache.") if has_cache else None
        return stream

    def checkpoint(self) -> dict:
        """A cheap snapshot to `restore` if what follows fails (e.g. a call whose result is lost).

        Every update rebinds tensors instead of writing into them, so references are enough.
        """
        names = ("input_start", "next_frame", "context", "cache", "total_frames", "_in_flight", "last_history")
        snapshot = {name: getattr(self, name) for name in names}
        snapshot["inputs"] = dict(self.inputs)
        snapshot["rng_state"] = self.generator.get_state()
        return snapshot

    def restore(self, snapshot: dict) -> None:
        for name, value in snapshot.items():
            if name == "rng_state":
                self.generator.set_state(value)
            else:
                setattr(self, name, dict(value) if name == "inputs" else value)

    @classmethod
    def rebuild(
        cls,
        block_sampler: BlockSampler,
        reference_motion: Tensor,
        options: StreamOptions,
        history: list[HistoryBlock],
        rng_state: Tensor,
        frame_offset: int = 0,
    ) -> MotionStream:
        """A stream continuing after the last history block, built on another replica.

        The KV cache is replayed from `history` (see `avatar_forcing.engine.history`); the noise RNG
        continues from `rng_state` (saved after that block); the frame cursor follows the last
        block. Inputs for frames from the cursor on must be pushed again by the caller.
        """
        cache, context, context_conditions = replay_history(block_sampler, reference_motion, history, options.block)
        stream = cls(block_sampler, reference_motion, options)
        stream.generator.set_state(rng_state)
        stream.frame_offset = frame_offset
        stream.next_frame = history[-1].end_frame
        stream.cache = cache
        stream.context = context.float().cpu().clone()
        stream.input_start = stream.next_frame - context.shape[0]
        stream.inputs = {name: context_conditions[:, i].float().cpu().clone() for i, name in enumerate(STREAMS)}
        return stream

    # -- internals -------------------------------------------------------------------------

    def _available(self, name: str) -> int:
        """Absolute frame index one past the last pushed frame of a stream."""
        return self.input_start + self.inputs[name].shape[0]

    def _frames(self, name: str, start: int, stop: int) -> Tensor:
        """Absolute frames [start, stop) of a stream; past the end of a finished stream, padded."""
        track = self.inputs[name][start - self.input_start : stop - self.input_start]
        return pad_frames(track, stop - start)

    def _drop_consumed_inputs(self) -> None:
        # The next request reads from next_frame - lookahead onwards; older frames are done.
        keep_from = self.next_frame - self.config.lookahead
        drop = keep_from - self.input_start
        if drop > 0:
            for name in STREAMS:
                self.inputs[name] = self.inputs[name][drop:]
            self.input_start = keep_from

    def _warm_start(self, idle: Conditions | None) -> None:
        cfg = self.config
        zeros = torch.zeros(1, cfg.motion_dim)
        idle = idle or Conditions(zeros, zeros, zeros)
        for name, track in zip(STREAMS, (idle.avatar_audio, idle.user_audio, idle.user_motion), strict=True):
            frame = _as_frames(f"idle_features.{name}", track[-1:], cfg.motion_dim)
            self.inputs[name] = frame.expand(cfg.window, -1).clone()
        self.frame_offset = cfg.window
        request = self.next_request()
        assert request is not None
        self.accept(self.sampler.run([request], self.options.block)[0])
