"""One streaming session, end to end: client media in, avatar frames out, pipelined per block.

Ray-free: `Stages` are async callables (Serve deployment handles in production, the
servicers themselves in tests). The path of block k:

    input complete ─▶ prepare(k): audio features (avatar, user) + user face crops → motion
                   ─▶ generate(k) on the session's generator replica (in order)
                   ─▶ decode(k) (in order) ─▶ AvatarFrame messages with their audio slices

prepare(k+1) runs while k generates and k−1 decodes. Each block is one trace: a root span
`block` with a child span per stage call, whose traceparent the call carries to the
servicer, and its latency and real-time factor are metrics (`services.common.telemetry`).

Timeline: frame i covers the samples [640 i, 640 (i+1)) of every audio source and the
camera frame nearest i * 40 ms. The media horizon is how far the user's (real-time)
media has arrived — or the avatar audio's, when no user media comes at all; gaps are
silence, missing camera frames repeat the previous one. Block k is complete once the
horizon passes its last frame plus the audio encoder's look-ahead, or at EndOfInput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME
from avatar_forcing.engine.streaming_audio import DEFAULT_LEFT_CONTEXT_S, DEFAULT_LOOKAHEAD_FRAMES
from avatar_forcing.media.face_crop import FaceCropper, FaceTrack, NoFaceError
from services.common.telemetry import BlockTrace, metrics
from services.ingress.policy import HELD_FRAME, REDUCED_NFE, Decision, RealtimePolicy
from services.store import SessionStore
from services.wire.errors import ServiceError, ValidationError, error_fields
from services.wire.ids import check_id
from services.wire.protos import Limit, pb
from services.wire.tensors import decode as decode_tensor
from services.wire.tensors import encode

log = logging.getLogger(__name__)
FRAME_US = 1_000_000 // Limit.FPS
DECODE_CHUNK = 10  # frames per Decode call: 10 RAW_RGB 512x512 frames fit one 8 MiB message

Call = Callable[[object], Awaitable[object]]


@dataclass
class Stages:
    extract: Call  # AudioFeatures.Extract
    encode_user_motion: Call  # MotionEncoder.EncodeUserMotion
    encode_portrait: Call  # MotionEncoder.EncodePortrait
    open_session: Call  # MotionGenerator.OpenSession (routed to the session's replica)
    generate_block: Call  # MotionGenerator.GenerateBlock (routed to the session's replica)
    close_session: Call  # MotionGenerator.CloseSession
    decode: Call  # FrameDecoder.Decode


@dataclass(frozen=True)
class IngressSettings:
    image_size: int
    left_context_s: float = DEFAULT_LEFT_CONTEXT_S
    lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES
    latency_budget_s: float = 0.8  # a block later than this after its input counts as late
    degrade: bool = True  # the real-time policy; off: every block at full quality, however late
    face_detect_every: int = 5
    video_grace_frames: int = 5  # how far the camera may lag the microphone before its frames are held
    # Beyond this many complete blocks waiting, a block is held without computing its features
    # (absent conditions): under overload even the feature stages cannot make latency grow.
    max_backlog_with_features: int = 3
    prefetch_blocks: int = 3  # blocks with features computed or in flight: k (generating), k+1, k+2
    heartbeat_s: float = 5.0


class AudioTimeline:
    """int16 samples of one source on the session timeline; gaps are silence."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples = np.zeros(0, np.int16)

    @property
    def end(self) -> int:
        return self.samples.shape[0]

    def write(self, timestamp_us: int, pcm: np.ndarray) -> None:
        start = timestamp_us * Limit.SAMPLE_RATE // 1_000_000
        if start < self.end:
            raise ValidationError(
                f"audio({self.name}).timestamp_us",
                f"{timestamp_us} overlaps audio already received up to {self.end * 1_000_000 // Limit.SAMPLE_RATE} us",
            )
        gap = np.zeros(start - self.end, np.int16)
        self.samples = np.concatenate([self.samples, gap, pcm])

    def truncate(self, sample: int) -> None:
        self.samples = self.samples[: max(0, sample)]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as int16, silence past the end."""
        chunk = self.samples[start:stop]
        return np.pad(chunk, (0, max(0, (stop - start) - chunk.shape[0])))


@dataclass
class PendingBlock:
    first: int  # session frame index
    frames: int
    ready_at: float  # monotonic time its input was complete
    features: asyncio.Task | None = None  # -> (avatar_audio, user_audio, user_motion) tensors
    last: bool = False
    trace: BlockTrace | None = None  # its trace (root span `block`) and metrics
    has_slot: bool = False  # holds one of the pipeline's feature slots


@dataclass
class SessionContext:
    session_id: str
    tenant_id: str
    avatar_id: str
    block: int
    nfe: int
    output_format: int
    jpeg_quality: int
    width: int
    height: int
    created: bool  # we created the Redis record (so we delete it at the end)


@dataclass
class _State:
    avatar: AudioTimeline = field(default_factory=lambda: AudioTimeline("AVATAR"))
    user: AudioTimeline = field(default_factory=lambda: AudioTimeline("USER"))
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    last_frame: np.ndarray | None = None
    user_media_seen: bool = False
    ended: bool = False
    next_block_frame: int = 0  # first frame of the next block to prepare
    video_end: int = 0  # samples covered by camera frames received so far (kept after frames are used)


class SessionPipeline:
    def __init__(self, stages: Stages, store: SessionStore, settings: IngressSettings, tenant_id: str) -> None:
        self.stages = stages
        self.store = store
        self.settings = settings
        self.tenant_id = tenant_id
        self.state = _State()
        self.face = FaceTrack(FaceCropper(settings.image_size), settings.face_detect_every)
        self.out: asyncio.Queue[pb.ServerMessage | None] = asyncio.Queue()
        self.input_event = asyncio.Event()
        # Blocks whose input is complete, in order; None after the last. Filled as input arrives,
        # so each block's features start at once and its `ready_at` is when its input completed.
        self.ready: asyncio.Queue[PendingBlock | None] = asyncio.Queue()
        self.feature_slots = asyncio.Semaphore(settings.prefetch_blocks)

    # -- the stream ------------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[pb.ClientMessage]) -> AsyncIterator[pb.ServerMessage]:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("message") != "start":
            raise ValidationError("message", "the first client message must be Start")
        ctx = await self._start(first.start)
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
            asyncio.create_task(self._read(requests, ctx)),
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
            await self._close(ctx)

    async def _start(self, start: pb.Start) -> SessionContext:
        options = start.options
        block = options.block if options.HasField("block") else 10
        nfe = options.nfe if options.HasField("nfe") else 10
        output_format = start.output_format or pb.JPEG
        if output_format not in (pb.RAW_RGB, pb.JPEG):
            raise ValidationError("start.output_format", f"got {output_format}; expected RAW_RGB or JPEG")
        quality = start.jpeg_quality or 85
        if not 1 <= quality <= Limit.MAX_JPEG_QUALITY:
            raise ValidationError("start.jpeg_quality", f"got {quality}; expected [1, {Limit.MAX_JPEG_QUALITY}]")
        which = start.WhichOneof("avatar")
        if which == "portrait":
            portrait = start.portrait
            avatar_id = ""
        elif which == "avatar_id":
            avatar_id = check_id("start.avatar_id", start.avatar_id)
            portrait = await self.store.get_avatar(self.tenant_id, avatar_id)
        else:
            raise ValidationError("start.avatar", "expected avatar_id or portrait")
        encoded = await self.stages.encode_portrait(
            pb.EncodePortraitRequest(tenant_id=self.tenant_id, image=portrait, avatar_id=avatar_id)
        )
        if start.session_id:
            session_id = check_id("start.session_id", start.session_id)
            await self.store.get(session_id, self.tenant_id)  # NOT_FOUND / PERMISSION_DENIED
            created = False
        else:
            session_id = uuid.uuid4().hex
            await self.store.create(session_id, self.tenant_id, encoded.avatar_id, status="active")
            created = True
        ctx = SessionContext(
            session_id,
            self.tenant_id,
            encoded.avatar_id,
            block,
            nfe,
            output_format,
            quality,
            self.settings.image_size,
            self.settings.image_size,
            created,
        )
        try:
            await self.stages.open_session(
                pb.OpenSessionRequest(
                    session_id=session_id,
                    tenant_id=self.tenant_id,
                    options=options,
                    reference_motion=encoded.reference_motion,
                    avatar_id=encoded.avatar_id,
                )
            )
        except BaseException:
            await self._close(ctx)
            raise
        return ctx

    # -- input -----------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[pb.ClientMessage], ctx: SessionContext) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("message")
                try:
                    if kind == "audio":
                        self._on_audio(message.audio)
                    elif kind == "video":
                        self._on_video(message.video)
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

    def _on_audio(self, chunk: pb.AudioChunk) -> None:
        if chunk.sample_rate != Limit.SAMPLE_RATE:
            raise ValidationError("audio.sample_rate", f"got {chunk.sample_rate}; expected {Limit.SAMPLE_RATE}")
        if chunk.source not in (pb.AVATAR, pb.USER):
            raise ValidationError("audio.source", "expected AVATAR or USER")
        if chunk.timestamp_us < 0:
            raise ValidationError("audio.timestamp_us", f"got {chunk.timestamp_us}; expected >= 0")
        data = chunk.pcm_s16le
        if not data or len(data) % 2 or len(data) // 2 > Limit.MAX_AUDIO_CHUNK_SAMPLES:
            raise ValidationError(
                "audio.pcm_s16le", f"{len(data)} bytes; expected 2 to {2 * Limit.MAX_AUDIO_CHUNK_SAMPLES}, even"
            )
        timeline = self.state.avatar if chunk.source == pb.AVATAR else self.state.user
        if chunk.source == pb.AVATAR:
            ahead = chunk.timestamp_us // 1000 - self.state.next_block_frame * FRAME_US // 1000
            if ahead > Limit.MAX_BUFFERED_AUDIO_MS:
                raise ValidationError(
                    "audio.timestamp_us",
                    f"{ahead} ms ahead of generation; at most {Limit.MAX_BUFFERED_AUDIO_MS} ms may be buffered",
                )
        else:
            self.state.user_media_seen = True
        timeline.write(chunk.timestamp_us, np.frombuffer(data, "<i2").astype(np.int16))

    def _on_video(self, video: pb.VideoFrame) -> None:
        if video.timestamp_us < 0:
            raise ValidationError("video.timestamp_us", f"got {video.timestamp_us}; expected >= 0")
        index = (video.timestamp_us + FRAME_US // 2) // FRAME_US
        if index < self.state.next_block_frame:
            metrics().count_dropped("late_video")
            return  # older than the generation cursor: dropped, as the contract says
        self.state.frames[index] = decode_image(video.image, "video.image")
        self.state.video_end = max(self.state.video_end, (index + 1) * SAMPLES_PER_FRAME)
        self.state.user_media_seen = True

    def _on_interrupt(self) -> pb.Interrupted:
        frame = self.state.next_block_frame
        self.state.avatar.truncate(frame * SAMPLES_PER_FRAME)
        return pb.Interrupted(frame_index=frame)

    def _horizon(self) -> int:
        """Samples of the timeline that have arrived (the real-time media's, see the module doc).

        With both a microphone and a camera, a block waits for both, but never more than
        `video_grace_frames` for a lagging or stalled camera (its frames are then held).
        """
        s = self.state
        if not s.user_media_seen:
            return s.avatar.end
        video_end = (max(s.frames) + 1) * SAMPLES_PER_FRAME if s.frames else 0
        video_end = max(video_end, s.video_end)
        if s.user.end == 0:
            return video_end
        if video_end == 0:
            return s.user.end
        grace = self.settings.video_grace_frames * SAMPLES_PER_FRAME
        return min(s.user.end, max(video_end, s.user.end - grace))

    # -- blocks ----------------------------------------------------------------------------

    def _next_ready_block(self, ctx: SessionContext) -> PendingBlock | None:
        s = self.state
        first = s.next_block_frame
        total = -(-self._horizon() // SAMPLES_PER_FRAME)  # frames begun
        if s.ended:
            if first >= total:
                return None
            frames = min(ctx.block, total - first)
            last = first + frames >= total
        else:
            needed = (first + ctx.block + self.settings.lookahead_frames) * SAMPLES_PER_FRAME
            if self._horizon() < needed:
                return None
            frames, last = ctx.block, False
        s.next_block_frame = first + frames
        trace = BlockTrace(ctx.session_id, ctx.tenant_id, first, frames, last)
        block = PendingBlock(first, frames, time.monotonic(), last=last, trace=trace)
        crops = self._user_crops(first, frames)
        block.features = asyncio.create_task(self._features(ctx, block, crops, total if s.ended else None))
        return block

    def _user_crops(self, first: int, frames: int) -> np.ndarray | None:
        """Face crops of the block's camera frames (held across gaps); None: no face seen yet."""
        images = []
        for index in range(first, first + frames):
            frame = self.state.frames.pop(index, None)
            if frame is not None:
                self.state.last_frame = frame
            if self.state.last_frame is None:
                return None
            images.append(self.state.last_frame)
        try:
            return self.face.crops(np.stack(images), "user camera")
        except NoFaceError:
            return None  # no face yet: the user's motion condition stays absent (zeros)

    async def _features(self, ctx: SessionContext, block: PendingBlock, crops: np.ndarray | None, total: int | None):
        avatar, user = (self._extract(ctx, block, timeline, total) for timeline in (self.state.avatar, self.state.user))
        if crops is None:
            motion = _zeros(block.frames)
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
        # The windows were read above. The calls wait for one of `prefetch_blocks` slots, held until
        # the generator is done with the block: features run at most that far ahead of generation,
        # and a block dropped from a deep backlog never computes them.
        await self.feature_slots.acquire()
        block.has_slot = True
        if self._too_far_behind(block):
            for call in (avatar, user, motion):
                call.close()  # never started
            return None  # the generator holds this block with absent conditions
        avatar_r, user_r, motion_r = await asyncio.gather(avatar, user, motion)
        return avatar_r.features, user_r.features, motion_r.latents

    def _extract(self, ctx: SessionContext, block: PendingBlock, timeline: AudioTimeline, total: int | None):
        """The bounded window the streaming audio encoder would use for the block's frames (read now)."""
        first, frames = block.first, block.frames
        left = round(self.settings.left_context_s * Limit.FPS)
        start = max(0, first - left)
        end = first + frames + self.settings.lookahead_frames
        received = max(self._horizon(), timeline.end)
        if total is not None:
            end = min(end, total)
        stop = min(end * SAMPLES_PER_FRAME, received)
        window = timeline.read(start * SAMPLES_PER_FRAME, stop).astype(np.float32) / 32768.0
        return self._call(
            block,
            "audio_features",
            self.stages.extract,
            pb.ExtractFeaturesRequest(
                session_id=ctx.session_id,
                tenant_id=ctx.tenant_id,
                source=pb.AVATAR if timeline is self.state.avatar else pb.USER,
                samples=encode(window, "samples"),
                sample_rate=Limit.SAMPLE_RATE,
                first_frame=first,
                num_frames=frames,
                left_context_samples=(first - start) * SAMPLES_PER_FRAME,
            ),
            source=timeline.name,
        )

    async def _call(self, block: PendingBlock, stage: str, call: Call, request, **attributes):
        """One stage call for a block: a child span of the block's, whose traceparent the request carries."""
        with block.trace.stage(stage, **attributes) as traceparent:
            request.traceparent = traceparent
            return await call(request)

    def _too_far_behind(self, block: PendingBlock) -> bool:
        """More than `max_backlog_with_features` complete blocks behind the live edge: hold, skip features."""
        if not self.settings.degrade:
            return False
        behind = (self.state.next_block_frame - block.first - block.frames) // max(1, block.frames)
        return behind > self.settings.max_backlog_with_features

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
                    features = None if self._too_far_behind(block) else await block.features
                    if features is None:
                        block.features.cancel()
                        avatar = user = motion = _zero_features(block.frames)
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
                    if output:
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
            latency_ms = (time.monotonic() - block.ready_at) * 1000
            items = decoded.frames
            if response.held:
                items = [
                    pb.DecodedFrame(frame_index=response.first_frame + i, image=items[0].image) for i in range(count)
                ]
            for item in items:
                index = item.frame_index
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
        latency = time.monotonic() - block.ready_at
        block.trace.frames_ready(len(frames), level, latency)
        if observe is not None:
            observe(latency)
        return frames

    async def _emit(self, ctx: SessionContext, decodes: asyncio.Queue) -> None:
        while (task := await decodes.get()) is not None:
            for message in await task:
                await self.out.put(message)
        await self.out.put(None)

    async def _heartbeat(self, ctx: SessionContext) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(ServiceError):
                await self.store.heartbeat(ctx.session_id, ctx.tenant_id)

    async def _close(self, ctx: SessionContext) -> None:
        """Free the generator's cache, then (for sessions we created) every Redis key."""
        with contextlib.suppress(Exception):
            await self.stages.close_session(pb.CloseSessionRequest(session_id=ctx.session_id, tenant_id=ctx.tenant_id))
        if ctx.created:
            with contextlib.suppress(Exception):
                await self.store.close(ctx.session_id, ctx.tenant_id)


def _zero_features(frames: int) -> pb.Tensor:
    """Absent conditions for `frames` frames (what classifier-free guidance uses as 'no input')."""
    return encode(np.zeros((frames, Limit.MOTION_DIM), np.float32), "features")


def _zeros(frames: int) -> Awaitable:
    async def zeros():
        return pb.EncodeUserMotionResponse(latents=_zero_features(frames))

    return zeros()


def decode_image(image: pb.Image, field: str) -> np.ndarray:
    """An Image message as uint8 RGB (H, W, 3), validated against the limits."""
    if image.format == pb.RAW_RGB:
        w, h = image.width, image.height
        if not (
            Limit.MIN_IMAGE_SIDE <= w <= Limit.MAX_IMAGE_SIDE and Limit.MIN_IMAGE_SIDE <= h <= Limit.MAX_IMAGE_SIDE
        ):
            raise ValidationError(
                f"{field}.width/height", f"{w}x{h}; expected sides in [{Limit.MIN_IMAGE_SIDE}, {Limit.MAX_IMAGE_SIDE}]"
            )
        if len(image.data) != w * h * 3:
            raise ValidationError(f"{field}.data", f"{len(image.data)} bytes; expected width*height*3 = {w * h * 3}")
        return np.frombuffer(image.data, np.uint8).reshape(h, w, 3).copy()
    if image.format in (pb.JPEG, pb.PNG):
        if not image.data or len(image.data) > Limit.MAX_IMAGE_BYTES:
            raise ValidationError(f"{field}.data", f"{len(image.data)} bytes; expected 1 to {Limit.MAX_IMAGE_BYTES}")
        bgr = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValidationError(f"{field}.data", "not a decodable JPEG/PNG image")
        h, w = bgr.shape[:2]
        if not (
            Limit.MIN_IMAGE_SIDE <= w <= Limit.MAX_IMAGE_SIDE and Limit.MIN_IMAGE_SIDE <= h <= Limit.MAX_IMAGE_SIDE
        ):
            raise ValidationError(
                f"{field}", f"{w}x{h}; expected sides in [{Limit.MIN_IMAGE_SIDE}, {Limit.MAX_IMAGE_SIDE}]"
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    raise ValidationError(f"{field}.format", "expected RAW_RGB, JPEG or PNG")
