"""One streaming session, end to end: client media in, avatar frames out, pipelined per block.

Ray-free: `Stages` are async callables (Serve deployment handles in production, the
servicers themselves in tests). The path of block k:

    input complete ─▶ prepare(k): audio features (avatar, user) + user face crops → motion
                   ─▶ generate(k) on the session's generator replica (in order)
                   ─▶ decode(k) (in order) ─▶ AvatarFrame messages with their audio slices

prepare(k+1) runs while k generates and k−1 decodes. Each block is one trace: a root span
`block` with a child span per stage call, whose traceparent the call carries to the
servicer, and its latency and real-time factor are metrics (`services.common.telemetry`).

The session timeline and the media horizon are `media.MediaState`'s, when a block is
complete and what its features read is `schedule`'s, and the real-time policy is `policy`'s.
Memory stays bounded however long the session: the audio timelines forget what no block's
window and no unsent frame needs (`timeline.AudioTimeline`).

After each block's frames are out, the session is accounted (`_account`): its generated seconds
are added to the tenant's usage (a session that reaches max_session_minutes ends with
RESOURCE_EXHAUSTED after that block), its figures are written to the record (`SessionFigures`,
`services.store.records.SESSION_FIGURES`), and a stop the gateway requested (status
"stopping", `SessionStore.request_stop`) ends the call with OK and closes the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME
from avatar_forcing.media.face_crop import FaceCropper, FaceTrack, NoFaceError
from services.common.telemetry import BlockTrace
from services.ingress.config import Call, IngressSettings, Stages
from services.ingress.media import FRAME_US, MediaState
from services.ingress.policy import HELD_FRAME, REDUCED_NFE, Decision, RealtimePolicy
from services.ingress.schedule import (
    PendingBlock,
    absent_motion,
    blocks_behind,
    extract_request,
    features_from,
    next_block,
    zero_features,
)
from services.ingress.session import SessionContext, check_minutes, close_session, open_session
from services.store import SessionStore
from services.wire.errors import ServiceError, StoreUnavailable, ValidationError, error_fields
from services.wire.protos import Limit, pb
from services.wire.tensors import decode as decode_tensor
from services.wire.tensors import encode

__all__ = ["DECODE_CHUNK", "SessionFigures", "SessionPipeline"]

log = logging.getLogger(__name__)
DECODE_CHUNK = 10  # frames per Decode call: 10 RAW_RGB 512x512 frames fit one 8 MiB message

Clock = Callable[[], float]
FIGURE_BLOCKS = 64  # recent blocks the latency figures are taken over


class SessionFigures:
    """The live figures of one session (records.SESSION_FIGURES), updated per block of frames."""

    def __init__(self) -> None:
        self.frames = 0
        self.degraded_frames = 0
        self.latencies_ms: deque[float] = deque(maxlen=FIGURE_BLOCKS)
        self.factors: deque[float] = deque(maxlen=FIGURE_BLOCKS)

    def add_block(self, frames: list[pb.AvatarFrame]) -> None:
        if not frames:
            return
        self.frames += len(frames)
        self.degraded_frames += sum(1 for f in frames if f.timing.degradation)
        latency_ms = max(f.timing.block_latency_ms for f in frames)
        self.latencies_ms.append(latency_ms)
        if latency_ms > 0:
            self.factors.append(len(frames) / Limit.FPS * 1000 / latency_ms)

    def values(self) -> dict[str, float]:
        figures = {"frames": self.frames, "degraded_frames": self.degraded_frames, "session_seconds": self.seconds}
        if self.latencies_ms:
            ordered = sorted(self.latencies_ms)
            figures["block_latency_p50_ms"] = statistics.median(ordered)
            figures["block_latency_p95_ms"] = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        if self.factors:
            figures["realtime_factor"] = statistics.median(self.factors)
        return figures

    @property
    def seconds(self) -> float:
        return self.frames / Limit.FPS


class SessionPipeline:
    def __init__(
        self,
        stages: Stages,
        store: SessionStore,
        settings: IngressSettings,
        tenant_id: str,
        clock: Clock = time.monotonic,
        token_session_id: str | None = None,
    ) -> None:
        self.stages = stages
        self.store = store
        self.settings = settings
        self.tenant_id = tenant_id
        self.token_session_id = token_session_id  # a session token's `sid`: the only session it may stream
        self.figures = SessionFigures()
        # Seconds for block latencies (what the real-time policy judges): injectable so that a
        # test can run a session on virtual time, whatever the speed of the machine.
        self.clock = clock
        self.state = MediaState(video_grace_frames=settings.video_grace_frames)
        self.face = FaceTrack(FaceCropper(settings.image_size, scale=settings.crop_scale), settings.face_detect_every)
        self.out: asyncio.Queue[pb.ServerMessage | None] = asyncio.Queue()
        self.input_event = asyncio.Event()
        # Blocks whose input is complete, in order; None after the last. Filled as input arrives,
        # so each block's features start at once and its `ready_at` is when its input completed.
        self.ready: asyncio.Queue[PendingBlock | None] = asyncio.Queue()
        self.feature_slots = asyncio.Semaphore(settings.prefetch_blocks)
        self.unsent_frame = 0  # the first frame not yet sent: its avatar audio is still to be read
        # Frames below this were computed from avatar speech an Interrupt dropped: blocks still in
        # flight there are held (not generated in full) and their frames never sent, so the first
        # frame out after an Interrupted is its frame_index (see `_on_interrupt`).
        self.discard_before = 0

    # -- the stream ------------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[pb.ClientMessage]) -> AsyncIterator[pb.ServerMessage]:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "start":
            raise ValidationError("message", "the first client message must be Start")
        ctx = await open_session(
            self.stages, self.store, self.settings, self.tenant_id, first.start, self.token_session_id
        )
        yield pb.ServerMessage(
            started=pb.Started(
                session_id=ctx.session_id,
                fps=Limit.FPS,
                block=ctx.block,
                sample_rate=Limit.SAMPLE_RATE,
                samples_per_frame=SAMPLES_PER_FRAME,
                width=ctx.width,
                height=ctx.height,
                output_format=ctx.output_format,
            )
        )
        tasks = [
            asyncio.create_task(self._read(requests)),
            asyncio.create_task(self._schedule(ctx)),
            asyncio.create_task(self._generate(ctx)),
            asyncio.create_task(self._heartbeat(ctx)),
        ]
        try:
            while (message := await self.out.get()) is not None:
                if isinstance(message, BaseException):
                    raise message
                yield message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_session(self.stages, self.store, ctx)

    # -- input -----------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[pb.ClientMessage]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("message")
                try:
                    if kind == "audio":
                        self.state.on_audio(message.audio)
                    elif kind == "video":
                        self.state.on_video(message.video)
                    elif kind == "interrupt":
                        await self.out.put(pb.ServerMessage(interrupted=self._on_interrupt()))
                    elif kind == "end_of_input":
                        break
                    else:
                        raise ValidationError("message", f"unexpected {kind or 'empty'} message after Start")
                except ValidationError as exc:  # a bad media message is dropped, the session goes on
                    code, text = error_fields(exc)
                    await self.out.put(pb.ServerMessage(error=pb.Error(code=code, message=text)))
                self.input_event.set()
        finally:
            self.state.ended = True
            self.input_event.set()

    def _on_interrupt(self) -> pb.Interrupted:
        """The avatar stops speaking: its audio after the generation cursor is dropped, and so are
        the frames of the blocks in flight before it (scheduled, generating or decoding, not sent).

        Those frames were computed from the dropped speech: sending them would keep the avatar
        talking for the depth of the pipeline (a block or more) after the interruption. The
        client's next frame is therefore `frame_index`, the first one generated without the speech
        (`services.client.AvatarStream` expects that jump; frame indices never go back). With
        `prompt_after_interrupt` its block is scheduled at once, not when its media is complete.
        """
        interrupted = self.state.on_interrupt(prompt=self.settings.prompt_after_interrupt)
        self.discard_before = max(self.discard_before, interrupted.frame_index)
        return interrupted

    def _stale(self, first: int, frames: int) -> bool:
        """Frames [first, first + frames) are all behind an interruption: they are never sent."""
        return frames > 0 and first + frames <= self.discard_before

    # -- blocks ----------------------------------------------------------------------------

    def _next_ready_block(self, ctx: SessionContext) -> PendingBlock | None:
        s, settings = self.state, self.settings
        span = next_block(s, ctx.block, settings.lookahead_frames)
        if span is None:
            return None
        # The windows are read now, before the cursor moves on and the timelines forget what
        # lies behind the next block's left context.
        horizon = s.horizon()
        s.prompt = False
        extracts = tuple(
            extract_request(span, source, timeline, horizon, settings, ctx)
            for source, timeline in ((pb.AVATAR, s.avatar), (pb.USER, s.user))
        )
        s.next_block_frame = span.first + span.frames
        trace = BlockTrace(ctx.session_id, ctx.tenant_id, span.first, span.frames, span.last)
        block = PendingBlock(span.first, span.frames, self.clock(), last=span.last, trace=trace)
        crops = self._user_crops(span.first, span.frames)
        block.features = asyncio.create_task(self._features(ctx, block, extracts, crops))
        self._release_audio()
        return block

    def _release_audio(self) -> None:
        """Let the timelines forget audio no block's window and no unsent frame will read."""
        needed = features_from(self.state.next_block_frame, self.settings.left_context_s)
        self.state.user.release(needed)
        self.state.avatar.release(min(needed, self.unsent_frame * SAMPLES_PER_FRAME))

    def _user_crops(self, first: int, frames: int) -> np.ndarray | None:
        """Face crops of the block's camera frames (held across gaps); None: no face seen yet."""
        images = self.state.take_frames(first, frames)
        if images is None:
            return None
        try:
            return self.face.crops(images, "user camera")
        except NoFaceError:
            return None  # no face yet: the user's motion condition stays absent (zeros)

    async def _features(
        self,
        ctx: SessionContext,
        block: PendingBlock,
        extracts: tuple[pb.ExtractFeaturesRequest, pb.ExtractFeaturesRequest],
        crops: np.ndarray | None,
    ):
        avatar, user = (
            self._call(
                block, "audio_features", self.stages.extract, request, source=pb.AudioSource.Name(request.source)
            )
            for request in extracts
        )
        if crops is None:
            motion = absent_motion(block.frames)
        else:
            motion = self._call(
                block,
                "motion_encoder",
                self.stages.encode_user_motion,
                pb.EncodeUserMotionRequest(
                    session_id=ctx.session_id,
                    tenant_id=ctx.tenant_id,
                    first_frame=block.first,
                    crops=encode(crops, "crops", max_bytes=Limit.MAX_CROPS_TENSOR_BYTES),
                ),
            )
        # The windows were read when the block was scheduled. The calls wait for one of
        # `prefetch_blocks` slots, held until the generator is done with the block: features run
        # at most that far ahead of generation, and a block dropped from a deep backlog never
        # computes them.
        try:
            await self.feature_slots.acquire()
        except asyncio.CancelledError:  # the generator held the block meanwhile (backlog, interruption)
            for call in (avatar, user, motion):
                call.close()  # never started
            raise
        block.has_slot = True
        if self._too_far_behind(block) or self._stale(block.first, block.frames):
            for call in (avatar, user, motion):
                call.close()  # never started
            return None  # the generator holds this block with absent conditions
        avatar_r, user_r, motion_r = await asyncio.gather(avatar, user, motion)
        return avatar_r.features, user_r.features, motion_r.latents

    async def _call(self, block: PendingBlock, stage: str, call: Call, request, **attributes):
        """One stage call for a block: a child span of the block's, whose traceparent the request carries."""
        with block.trace.stage(stage, **attributes) as traceparent:
            request.traceparent = traceparent
            return await call(request)

    def _too_far_behind(self, block: PendingBlock) -> bool:
        """More than `max_backlog_with_features` complete blocks behind the live edge: hold, skip features."""
        if not self.settings.degrade:
            return False
        return blocks_behind(self.state, block) > self.settings.max_backlog_with_features

    async def _schedule(self, ctx: SessionContext) -> None:
        """Queue each block as soon as its input is complete (its features start right away)."""
        while True:
            await self.input_event.wait()
            self.input_event.clear()  # input arriving from here on sets it again
            while (block := self._next_ready_block(ctx)) is not None:
                await self.ready.put(block)
            if self.state.ended:
                await self.ready.put(None)
                return

    # -- generation and output -------------------------------------------------------------

    async def _generate(self, ctx: SessionContext) -> None:
        """Blocks in order: generate, then hand the latents to the in-order decoder."""
        policy = RealtimePolicy(ctx.nfe, self.settings.latency_budget_s)
        decodes: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
        emitter = asyncio.create_task(self._emit(ctx, decodes))
        next_input = 0
        block: PendingBlock | None = None
        try:
            while (block := await self.ready.get()) is not None:
                try:
                    backlog = self.ready.qsize()  # complete blocks waiting behind this one
                    decision = policy.decide(backlog=backlog) if self.settings.degrade else policy.decide(0)
                    # A block behind an interruption is still generated (the generator's state
                    # goes on in order) but held: one cheap pass instead of NFE, no features
                    # waited for. Its frames are never sent.
                    stale = self._stale(block.first, block.frames)
                    features = None if stale or self._too_far_behind(block) else await block.features
                    if features is not None and self._stale(block.first, block.frames):
                        features = None  # an Interrupt came while they were computed: held too
                    if features is None:
                        block.features.cancel()
                        avatar = user = motion = zero_features(block.frames)
                        decision = Decision(HELD_FRAME, 0, True)
                    else:
                        avatar, user, motion = features
                    response = await self._call(
                        block,
                        "generate",
                        self.stages.generate_block,
                        pb.GenerateBlockRequest(
                            session_id=ctx.session_id,
                            tenant_id=ctx.tenant_id,
                            first_frame=next_input,
                            avatar_audio=avatar,
                            user_audio=user,
                            user_motion=motion,
                            max_nfe=decision.max_nfe,
                            end_of_input=block.last and self.state.ended,
                            hold=decision.hold,
                        ),
                    )
                    next_input = response.next_input_frame
                    level = HELD_FRAME if response.held else (REDUCED_NFE if response.nfe_used < ctx.nfe else 0)
                    output = response.latents.shape[0] if response.latents.shape else 0
                    block.trace.generated(
                        nfe_used=response.nfe_used,
                        level=level,
                        output_first_frame=response.first_frame,
                        output_frames=output,
                    )
                    if output and self._stale(response.first_frame, output):
                        block.trace.end()  # generated from the dropped speech: not decoded, not sent
                    elif output:
                        observe = policy.observe if self.settings.degrade else None
                        await decodes.put(asyncio.create_task(self._decode(ctx, response, block, level, observe)))
                    else:
                        block.trace.end()  # the first window still filling: no frames of its own
                finally:
                    if block.has_slot:
                        self.feature_slots.release()
                        block.has_slot = False

        except BaseException as exc:
            waiting = [self.ready.get_nowait() for _ in range(self.ready.qsize())]
            for pending in (block, *waiting):  # blocks not handed to a decode task end here
                if pending is not None:
                    pending.trace.end(exc)
            if not isinstance(exc, asyncio.CancelledError):
                await decodes.put(None)
                await self.out.put(exc)
            raise
        await decodes.put(None)
        await emitter

    async def _decode(
        self, ctx: SessionContext, response, block: PendingBlock, level: int, observe=None
    ) -> list[pb.ServerMessage]:
        latents = decode_tensor(response.latents, "latents")
        count = latents.shape[0]
        if response.held:  # every latent of a dropped block is the last frame: decode it once
            latents = latents[:1]
        frames: list[pb.ServerMessage] = []
        for offset in range(0, latents.shape[0], DECODE_CHUNK):
            chunk = latents[offset : offset + DECODE_CHUNK]
            if self._stale(response.first_frame + offset, count - offset if response.held else chunk.shape[0]):
                continue  # an Interrupt came meanwhile: these frames are never sent
            decoded = await self._call(
                block,
                "decode",
                self.stages.decode,
                pb.DecodeRequest(
                    session_id=ctx.session_id,
                    tenant_id=ctx.tenant_id,
                    avatar_id=ctx.avatar_id,
                    latents=encode(chunk, "latents"),
                    first_frame=response.first_frame + offset,
                    format=ctx.output_format,
                    quality=ctx.jpeg_quality,
                ),
                first_frame=response.first_frame + offset,
                frames=chunk.shape[0],
            )
            latency_ms = (self.clock() - block.ready_at) * 1000
            items = decoded.frames
            if response.held:
                items = [
                    pb.DecodedFrame(frame_index=response.first_frame + i, image=items[0].image) for i in range(count)
                ]
            for item in items:
                index = item.frame_index
                if index < self.discard_before:
                    continue  # decoded before an Interrupt came: its audio and face are the dropped speech
                audio = self.state.avatar.read(index * SAMPLES_PER_FRAME, (index + 1) * SAMPLES_PER_FRAME)
                frames.append(
                    pb.ServerMessage(
                        frame=pb.AvatarFrame(
                            frame_index=index,
                            timestamp_us=index * FRAME_US,
                            image=item.image,
                            audio_pcm_s16le=audio.astype("<i2").tobytes(),
                            timing=pb.FrameTiming(
                                block_latency_ms=latency_ms,
                                generated_unix_ms=int(time.time() * 1000),
                                nfe_used=response.nfe_used,
                                degradation=level,
                            ),
                        )
                    )
                )
        latency = self.clock() - block.ready_at
        block.trace.frames_ready(len(frames), level, latency)
        if observe is not None and frames:  # a block an Interrupt dropped says nothing of the latency
            observe(latency)
        return frames

    async def _emit(self, ctx: SessionContext, decodes: asyncio.Queue) -> None:
        while (task := await decodes.get()) is not None:
            # an Interrupt may have come while these waited: what it dropped is not sent
            messages = [m for m in await task if m.frame.frame_index >= self.discard_before]
            for message in messages:
                await self.out.put(message)
            if messages:  # their audio is in the messages now: the avatar timeline may forget it
                self.unsent_frame = max(self.unsent_frame, messages[-1].frame.frame_index + 1)
                self._release_audio()
                try:
                    stop = await self._account(ctx, [m.frame for m in messages])
                except ServiceError as exc:  # over the minutes quota, or the session was closed elsewhere
                    await self.out.put(exc)
                    return
                if stop:
                    log.info("session %s: stop requested; ending after frame %d", ctx.session_id, self.unsent_frame)
                    break
        await self.out.put(None)

    async def _account(self, ctx: SessionContext, frames: list[pb.AvatarFrame]) -> bool:
        """After a block's frames went out: usage, figures, and the session's status. True: stop
        requested. Raises QuotaExceededError once the tenant's session minutes are used up."""
        self.figures.add_block(frames)
        try:
            used_s, record, _ = await asyncio.gather(
                self.store.add_session_seconds(ctx.tenant_id, len(frames) / Limit.FPS),
                self.store.get(ctx.session_id, ctx.tenant_id),
                self.store.set_figures(ctx.session_id, ctx.tenant_id, self.figures.values()),
            )
        except StoreUnavailable as exc:  # the session goes on; this block's accounting is lost
            log.warning("session %s: accounting skipped: %s", ctx.session_id, exc)
            return False
        if record.status == "stopping":
            return True
        check_minutes(ctx.tenant_id, ctx.quotas, used_s)
        return False

    async def _heartbeat(self, ctx: SessionContext) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(ServiceError):
                await self.store.heartbeat(ctx.session_id, ctx.tenant_id)
