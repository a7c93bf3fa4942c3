"""The motion generator: session-pinned streaming generation over `avatar_forcing`.

Ray-free: the Serve deployment (`deployment.py`) builds one of these per replica and
passes a `run_blocks` coroutine that batches the same sampler step of several
sessions into one forward pass. Per replica:

- `SessionTable` (the cache manager) holds each live session's `MotionStream` (KV
  caches, context, RNG) within a session count and a memory budget; when full, new
  sessions are refused with RESOURCE_EXHAUSTED, never by evicting a live one.
- Every generated block is appended to the session's bounded history in Redis
  (`HistoryBlock`: clean tokens, conditions, RNG state), and the session's constant
  setup (reference motion, options, frame offset) is in its state slot. A replica
  that receives a session it does not hold claims it in Redis and rebuilds the
  stream from that history: same frame cursor, same noise, cache replayed.

Frame numbers in Redis (`frame_cursor`, history entries) are model frames; session
frame indices (what clients see) are model frames minus the warm-start offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from avatar_forcing.config import FlowConfig
from avatar_forcing.engine.history import HistoryBlock
from avatar_forcing.engine.motion_stream import STREAMS, MotionBlock, MotionStream, SessionSetup, StreamOptions
from avatar_forcing.sampling.block_sampler import BlockRequest, BlockResult, BlockSampler
from avatar_forcing.sampling.euler import GuidanceScales
from services.common.telemetry import metrics, rpc_span
from services.common.torch_tensors import decode_torch
from services.store import Claim, SessionStore
from services.wire.errors import (
    CapacityExceededError,
    FailedPreconditionError,
    FrameConflictError,
    OwnershipLostError,
    SessionNotFoundError,
    ValidationError,
)
from services.wire.ids import check_id
from services.wire.protos import Limit, pb
from services.wire.tensors import encode

log = logging.getLogger(__name__)
FLOAT_DTYPES = ("FLOAT32", "FLOAT16", "BFLOAT16")
RunBlocks = Callable[[list[BlockRequest]], Awaitable[list[BlockResult]]]


def session_bytes(config: FlowConfig, block: int, dtype_bytes: int = 4) -> int:
    """Memory one session's cache holds: 3 guidance rows x depth x (self + cross entries) x K and V."""
    entries = (config.window - block - config.lookahead) + config.cross_window
    return 3 * config.depth * entries * config.hidden_dim * 2 * dtype_bytes


def stream_options(options: pb.SessionOptions) -> tuple[StreamOptions, int]:
    """SessionOptions (absent fields: defaults) -> (StreamOptions, seed), validated."""

    def pick(name: str, default, low, high):
        if not options.HasField(name):
            return default
        value = getattr(options, name)
        if not low <= value <= high:
            raise ValidationError(f"options.{name}", f"got {value}; expected a value in [{low}, {high}]")
        return value

    block = pick("block", 10, Limit.MIN_BLOCK, Limit.MAX_BLOCK)
    nfe = pick("nfe", 10, Limit.MIN_NFE, Limit.MAX_NFE)
    audio = pick("audio_guidance", 2.0, 0.0, float(Limit.MAX_GUIDANCE))
    user = pick("user_guidance", 1.0, 0.0, float(Limit.MAX_GUIDANCE))
    warm = options.warm_start if options.HasField("warm_start") else False
    seed = options.seed if options.HasField("seed") else 0
    return StreamOptions(block=block, nfe=nfe, guidance=GuidanceScales(audio, user), warm_start=warm), seed


@dataclass
class Generation:
    """One session held by this replica."""

    tenant_id: str
    stream: MotionStream
    claim: Claim
    nbytes: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionTable:
    """Per-replica session caches within a count and a byte budget; never evicts a live session.

    `on_change(table)` is called after every add and drop (the replica's load gauges).
    """

    def __init__(
        self, max_sessions: int, budget_bytes: int, on_change: Callable[[SessionTable], None] | None = None
    ) -> None:
        self.max_sessions = max_sessions
        self.budget_bytes = budget_bytes
        self.sessions: dict[str, Generation] = {}
        self.on_change = on_change
        self._changed()

    @property
    def bytes_used(self) -> int:
        return sum(g.nbytes for g in self.sessions.values())

    def has_room(self, nbytes: int) -> bool:
        return len(self.sessions) < self.max_sessions and self.bytes_used + nbytes <= self.budget_bytes

    def check_room(self, nbytes: int) -> None:
        if not self.has_room(nbytes):
            raise CapacityExceededError(
                f"generator replica full: {len(self.sessions)}/{self.max_sessions} sessions, "
                f"{self.bytes_used + nbytes} of {self.budget_bytes} cache bytes needed; try another replica"
            )

    def get(self, session_id: str) -> Generation | None:
        return self.sessions.get(session_id)

    def add(self, session_id: str, generation: Generation) -> None:
        self.check_room(generation.nbytes)
        self.sessions[session_id] = generation
        self._changed()

    def drop(self, session_id: str) -> Generation | None:
        generation = self.sessions.pop(session_id, None)
        self._changed()
        return generation

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


class GeneratorServicer:
    def __init__(
        self,
        sampler: BlockSampler,
        store: SessionStore,
        replica_id: str,
        max_sessions: int = 8,
        budget_bytes: int = 8 << 30,
        run_blocks: RunBlocks | None = None,
    ) -> None:
        self.sampler = sampler
        self.config = sampler.model.config
        self.store = store
        self.replica_id = replica_id
        self.table = SessionTable(max_sessions, budget_bytes, on_change=self._report_load)
        self.run_blocks = run_blocks or (lambda requests: asyncio.to_thread(sampler.run, requests))

    # -- RPCs ----------------------------------------------------------------------------

    async def OpenSession(self, request: pb.OpenSessionRequest, context=None) -> pb.OpenSessionResponse:
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        options, seed = stream_options(request.options)
        reference = decode_torch(
            request.reference_motion, "reference_motion", shape=(self.config.motion_dim,), dtypes=("FLOAT32",)
        )
        existing = self.table.get(request.session_id)
        if existing is not None:
            self._check_tenant(existing, request.tenant_id, request.session_id)
        else:
            nbytes = session_bytes(self.config, options.block)
            self.table.check_room(nbytes)
            await self._ensure_record(request)
            await self.store.replica_heartbeat(self.replica_id)
            claim = await self.store.claim(
                request.session_id, request.tenant_id, self.replica_id, max_sessions=self.table.max_sessions
            )
            stream = await asyncio.to_thread(MotionStream, self.sampler, reference, options, seed)
            await self.store.put_state(
                request.session_id,
                request.tenant_id,
                claim,
                SessionSetup(reference, options, seed, stream.frame_offset).to_bytes(),
            )
            generation = Generation(request.tenant_id, stream, claim, nbytes)
            if stream.last_history is not None:  # warm start generated the first window already
                await self._record(request.session_id, generation, stream.last_history)
            self.table.add(request.session_id, generation)
        window = self.config.window
        return pb.OpenSessionResponse(
            replica_id=self.replica_id,
            block=options.block,
            window=window,
            first_output_after=options.block if options.warm_start else window,
        )

    @rpc_span("avatar_forcing.v1.MotionGenerator/GenerateBlock")
    async def GenerateBlock(self, request: pb.GenerateBlockRequest, context=None) -> pb.GenerateBlockResponse:
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        generation, resumed = await self._session(request.session_id, request.tenant_id)
        async with generation.lock:
            stream = generation.stream
            snapshot = stream.checkpoint()
            try:
                return await self._generate(request, generation, resumed)
            except BaseException:
                # Nothing of a failed call sticks (Redis down, ownership lost, bad input): the
                # caller may send the same block again.
                stream.restore(snapshot)
                raise

    async def _generate(
        self, request: pb.GenerateBlockRequest, generation: Generation, resumed: bool
    ) -> pb.GenerateBlockResponse:
        stream = generation.stream
        expected = stream.next_input_frame
        if request.first_frame != expected:
            raise FrameConflictError(f"first_frame: got {request.first_frame}; expected {expected}")
        inputs = self._inputs(request)
        if inputs:
            stream.push(**inputs)
        if request.end_of_input:
            stream.finish()
        nfe = self._nfe(request.max_nfe, stream.options.nfe)
        blocks: list[MotionBlock] = []
        held = False
        pending_hold = request.hold and stream.cache is not None  # the first window cannot be held
        while True:
            if pending_hold:
                pending_hold = False
                block = await asyncio.to_thread(stream.hold_block)
                if block is None and stream.last_history is None:
                    break  # no block due
                held = True
            else:
                block_request = stream.next_request(nfe)
                if block_request is None:
                    break
                block = stream.accept((await self.run_blocks([block_request]))[0])
            await self._record(request.session_id, generation, stream.last_history)
            stream.last_history = None
            if block is not None:
                blocks.append(block)
        latents = torch.cat([b.latents for b in blocks]) if blocks else torch.zeros(0, self.config.motion_dim)
        return pb.GenerateBlockResponse(
            latents=encode(latents, "latents"),
            first_frame=blocks[0].frame_index if blocks else stream.frames_emitted,
            replica_id=self.replica_id,
            resumed=resumed,
            nfe_used=nfe,
            next_input_frame=stream.next_input_frame,
            held=held,
        )

    async def CloseSession(self, request: pb.CloseSessionRequest, context=None) -> pb.CloseSessionResponse:
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        generation = self.table.get(request.session_id)
        if generation is None:
            record = await self.store.get(request.session_id, request.tenant_id)  # NOT_FOUND (also another tenant's)
            return pb.CloseSessionResponse(frames_generated=max(0, record.frame_cursor))
        self._check_tenant(generation, request.tenant_id, request.session_id)
        self.table.drop(request.session_id)
        # The session ends: every key of it goes (a later GenerateBlock gets NOT_FOUND).
        with contextlib.suppress(SessionNotFoundError):
            await self.store.close(request.session_id, request.tenant_id)
        return pb.CloseSessionResponse(frames_generated=generation.stream.frames_emitted)

    # -- replica upkeep ------------------------------------------------------------------

    def routing_stats(self) -> dict:
        """What the session-affinity router reads: whether new sessions fit here."""
        block = self.sampler.model.config.block
        return {
            "full": not self.table.has_room(session_bytes(self.config, block)),
            "sessions": len(self.table.sessions),
            "cache_bytes": self.table.bytes_used,
        }

    async def drop_missing(self) -> list[str]:
        """Free the caches of sessions that were reaped or closed elsewhere."""
        gone = await self.store.missing(list(self.table.sessions))
        for session_id in gone:
            self.table.drop(session_id)
        return sorted(gone)

    # -- internals -----------------------------------------------------------------------

    def _report_load(self, table: SessionTable) -> None:
        metrics().set_generator_load(self.replica_id, len(table.sessions), table.bytes_used)

    async def _ensure_record(self, request: pb.OpenSessionRequest) -> None:
        """Callers of the generator API alone (no gateway, no ingress) get a session record here."""
        try:
            await self.store.get(request.session_id, request.tenant_id)
        except SessionNotFoundError:
            avatar_id = request.avatar_id or "unnamed"
            with contextlib.suppress(FailedPreconditionError):  # created concurrently: fine
                await self.store.create(request.session_id, request.tenant_id, avatar_id, status="active")

    async def _session(self, session_id: str, tenant_id: str) -> tuple[Generation, bool]:
        generation = self.table.get(session_id)
        if generation is not None:
            self._check_tenant(generation, tenant_id, session_id)
            return generation, False
        return await self._resume(session_id, tenant_id), True

    async def _resume(self, session_id: str, tenant_id: str) -> Generation:
        """Take the session over from another replica: claim it, then rebuild from the history."""
        snapshot = await self.store.snapshot(session_id, tenant_id)  # NOT_FOUND: unknown, or another tenant's
        if snapshot.state is None or not snapshot.history:
            raise FrameConflictError(
                f"session_id: {session_id!r} has no generated block to resume from; open it again (OpenSession)"
            )
        setup = SessionSetup.from_bytes(snapshot.state.blob)
        reference, options, frame_offset = setup.reference_motion, setup.options, setup.frame_offset
        nbytes = session_bytes(self.config, options.block)
        self.table.check_room(nbytes)
        await self.store.replica_heartbeat(self.replica_id)
        previous = snapshot.record.owner
        steal = previous if previous and previous != self.replica_id else ""
        claim = await self.store.claim(
            session_id, tenant_id, self.replica_id, steal_from=steal, max_sessions=self.table.max_sessions
        )
        history = [HistoryBlock.from_bytes(entry.blob) for entry in snapshot.history]
        stream = await asyncio.to_thread(
            MotionStream.rebuild, self.sampler, reference, options, history, history[-1].rng_state, frame_offset
        )
        generation = Generation(tenant_id, stream, claim, nbytes)
        self.table.add(session_id, generation)
        log.info(
            "session %s resumed on %s from %d history blocks (previous owner %r)",
            session_id,
            self.replica_id,
            len(history),
            previous,
        )
        return generation

    async def _record(self, session_id: str, generation: Generation, history: HistoryBlock) -> None:
        new_frames = history.tokens.shape[0] - (0 if history.start_frame == 0 else self.config.lookahead)
        try:
            await self.store.append_block(
                session_id,
                generation.tenant_id,
                generation.claim,
                history.end_frame - new_frames,
                new_frames,
                history.to_bytes(),
            )
        except OwnershipLostError:
            self.table.drop(session_id)  # another replica owns it now; our cache is stale
            raise

    def _inputs(self, request: pb.GenerateBlockRequest) -> dict[str, torch.Tensor]:
        inputs, rows = {}, set()
        for name in STREAMS:
            message = getattr(request, name)
            if not request.HasField(name) or not message.shape:
                continue
            tensor = decode_torch(
                message, name, shape=(None, self.config.motion_dim), dtypes=FLOAT_DTYPES, dtype=torch.float32
            )
            if tensor.shape[0] > Limit.MAX_FRAMES_PER_REQUEST:
                raise ValidationError(name, f"{tensor.shape[0]} rows; expected at most {Limit.MAX_FRAMES_PER_REQUEST}")
            inputs[name] = tensor
            rows.add(tensor.shape[0])
        if len(inputs) not in (0, len(STREAMS)) or len(rows) > 1:
            got = {name: int(t.shape[0]) for name, t in inputs.items()}
            raise ValidationError(
                "avatar_audio/user_audio/user_motion", f"rows {got}; expected all three with the same number of frames"
            )
        return inputs

    @staticmethod
    def _nfe(max_nfe: int, session_nfe: int) -> int:
        if max_nfe == 0:
            return session_nfe
        if not Limit.MIN_NFE <= max_nfe <= Limit.MAX_NFE:
            expected = f"0 or a value in [{Limit.MIN_NFE}, {Limit.MAX_NFE}]"
            raise ValidationError("max_nfe", f"got {max_nfe}; expected {expected}")
        return min(max_nfe, session_nfe)

    @staticmethod
    def _check_tenant(generation: Generation, tenant_id: str, session_id: str) -> None:
        """Another tenant's session answers exactly as an unknown one (NOT_FOUND): ids do not leak."""
        if generation.tenant_id != tenant_id:
            raise SessionNotFoundError(session_id)
