"""An async Python client of `AvatarSession.Stream` (protos/avatar_forcing/v1/session.proto).

    async with AvatarClient("127.0.0.1:9000", token) as client:
        async with client.session(portrait=png_bytes, options={"block": 10}) as s:
            print(s.started.session_id, s.started.width, s.started.height)

            async def feed():
                await s.send_avatar_audio(tts_float32)          # chunked, timestamped for you
                await s.send_user_frame(camera_rgb_uint8)       # JPEG-encoded for you
                await s.end_input()

            feeder = asyncio.create_task(feed())
            async for frame in s.frames():                      # decoded, in frame order
                show(frame.image, frame.audio)                  # (H, W, 3) uint8, (640,) int16
            await feeder

The client keeps to the contract's limits so that a well-behaved program is never throttled by
the server: audio goes out in chunks of at most MAX_AUDIO_CHUNK_SAMPLES, at most
`max_messages_per_second` messages leave per second (below MAX_CLIENT_MESSAGES_PER_SECOND),
and media is held back while it would be more than `max_ahead_ms` ahead of the frames received
(the server buffers at most MAX_BUFFERED_AUDIO_MS of avatar audio ahead of generation). Frames
are read in the background as they arrive, so consume `frames()` concurrently with sending.

Errors: a failed call raises the typed `services.wire.errors` exception of its status
(`UnauthenticatedError`, `ValidationError` for INVALID_ARGUMENT, `NotFoundError`,
`PermissionDeniedError`, `CapacityExceededError`, `UnavailableError`, ...) with the server's
message, from `frames()` and from the send methods. A non-fatal `Error` message (a dropped
media message) is a `ServerWarning` by default (`on_error="warn"`), is collected in
`session.errors`, and with `on_error="raise"` is raised from `frames()` as `ServerMessageError`.
Bad arguments are caught before sending and raise `ValidationError` (a ValueError).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import cv2
import grpc
import numpy as np

from services.wire.errors import FailedPreconditionError, ServiceError, ValidationError, from_rpc_error
from services.wire.protos import Limit, grpc_options, pb, pb_grpc

SAMPLE_RATE = Limit.SAMPLE_RATE  # 16000
FPS = Limit.FPS  # 25
SAMPLES_PER_FRAME = Limit.SAMPLES_PER_FRAME  # 640
FRAME_US = 1_000_000 // FPS  # 40000: media time of one frame
# Below the server's MAX_CLIENT_MESSAGES_PER_SECOND (400), for clock differences and retries.
DEFAULT_MESSAGES_PER_SECOND = int(Limit.MAX_CLIENT_MESSAGES_PER_SECOND * 0.9)
# Below MAX_BUFFERED_AUDIO_MS (30 s): frames received lag the server's generation cursor, so the
# client's estimate of what the server holds is already an upper bound; 1 s more of margin.
DEFAULT_MAX_AHEAD_MS = Limit.MAX_BUFFERED_AUDIO_MS - 1000
DEFAULT_JPEG_QUALITY = 90
_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_END = object()  # the end of the frame queue

OnError = Literal["warn", "raise", "ignore"] | Callable[["ServerError"], None]


# --- results and errors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameTiming:
    """session.proto FrameTiming, plus when the client received the frame."""

    block_latency_ms: float  # from the block's last input to its frames being ready (server)
    generated_unix_ms: int  # wall clock when the server had the frame ready
    nfe_used: int  # sampler steps of the frame's block
    degradation: str  # "DEGRADATION_NONE", "REDUCED_NFE" or "HELD_FRAME"
    received_unix_ms: float  # wall clock when this client had the frame decoded


@dataclass(frozen=True)
class Frame:
    """One avatar frame with its slice of the avatar audio."""

    index: int  # session frame index, from 0, no gaps
    timestamp_us: int  # index * 40000
    image: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray  # (640,) int16: the avatar audio of this frame (silence where there is none)
    timing: FrameTiming

    def audio_float32(self) -> np.ndarray:
        """The audio slice as float32 in [-1, 1)."""
        return self.audio.astype(np.float32) / 32768.0


@dataclass(frozen=True)
class ServerError:
    """A non-fatal `Error` message: the server dropped one client message; the session goes on."""

    code: int  # a gRPC status code number (3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, ...)
    message: str  # the server's text: the field, the value and what was expected

    @property
    def status(self) -> grpc.StatusCode | None:
        return next((c for c in grpc.StatusCode if c.value[0] == self.code), None)

    def __str__(self) -> str:
        name = self.status.name if self.status is not None else f"code {self.code}"
        return f"{name}: {self.message}"


class ServerWarning(UserWarning):
    """The server dropped a client message (an `Error` on the stream); the session goes on."""


class ServerMessageError(ServiceError):
    """An `Error` message raised from `frames()` with on_error="raise"."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error
        self.code = error.status or grpc.StatusCode.UNKNOWN


class ProtocolError(ServiceError):
    """The server broke the contract (no Started first, an undecodable frame, ...)."""

    code = grpc.StatusCode.INTERNAL


class AnswerTimeoutError(ServiceError):
    """The server did not answer Start (or Interrupt) in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class SessionClosedError(FailedPreconditionError):
    """A send after `end_input()`, or after the call ended."""


# --- conversions ----------------------------------------------------------------------------------


def to_pcm16(samples: Any, name: str = "samples") -> np.ndarray:
    """Mono samples -> int16 (N,): int16 as is, float in [-1, 1] scaled by 32767 (clipped)."""
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValidationError(name, f"expected mono samples of shape (N,), got shape {array.shape}")
    if array.dtype == np.int16:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValidationError(name, f"expected float samples in [-1, 1] or int16, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValidationError(name, "samples contain NaN or infinity")
    return np.round(np.clip(array, -1.0, 1.0) * 32767.0).astype(np.int16)


def _check_side(name: str, height: int, width: int) -> None:
    low, high = Limit.MIN_IMAGE_SIDE, Limit.MAX_IMAGE_SIDE
    if not (low <= height <= high and low <= width <= high):
        raise ValidationError(name, f"got {width}x{height} pixels; expected sides in [{low}, {high}]")


def _check_rgb(name: str, image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValidationError(name, f"expected a uint8 RGB array (H, W, 3), got {dtype} of shape {shape}")
    _check_side(name, image.shape[0], image.shape[1])
    return image


def encode_image(image: np.ndarray, image_format: int = pb.JPEG, quality: int = DEFAULT_JPEG_QUALITY) -> pb.Image:
    """uint8 RGB (H, W, 3) -> an `Image` message within the contract's limits."""
    image = _check_rgb("image", image)
    height, width = image.shape[:2]
    if image_format == pb.RAW_RGB:
        return pb.Image(format=pb.RAW_RGB, width=width, height=height, data=np.ascontiguousarray(image).tobytes())
    if image_format not in (pb.JPEG, pb.PNG):
        raise ValidationError("format", f"got {image_format!r}; expected JPEG, PNG or RAW_RGB")
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if image_format == pb.JPEG else []
    ok, encoded = cv2.imencode(".jpg" if image_format == pb.JPEG else ".png", bgr, params)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise ValidationError("image", "OpenCV could not encode the image")
    data = encoded.tobytes()
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(
            "image",
            f"encoded to {len(data)} bytes; expected at most {Limit.MAX_IMAGE_BYTES} (use JPEG or a lower quality)",
        )
    return pb.Image(format=image_format, width=width, height=height, data=data)


def encoded_image(data: bytes, name: str = "image") -> pb.Image:
    """JPEG or PNG file bytes -> an `Image` message (size checked; sides are the server's to check)."""
    data = bytes(data)
    if data.startswith(_JPEG_MAGIC):
        image_format = pb.JPEG
    elif data.startswith(_PNG_MAGIC):
        image_format = pb.PNG
    else:
        raise ValidationError(name, f"expected JPEG or PNG bytes, got {len(data)} bytes of something else")
    if len(data) > Limit.MAX_IMAGE_BYTES:
        raise ValidationError(name, f"got {len(data)} bytes; expected at most {Limit.MAX_IMAGE_BYTES}")
    return pb.Image(format=image_format, data=data)


def portrait_bytes(portrait: bytes | np.ndarray | str | os.PathLike[str]) -> bytes:
    """A portrait as JPEG/PNG bytes: bytes as is, a uint8 RGB array or an image file re-encoded when needed."""
    if isinstance(portrait, bytes | bytearray | memoryview):
        return encoded_image(bytes(portrait), "portrait").data
    if isinstance(portrait, str | os.PathLike):
        with open(portrait, "rb") as file:
            data = file.read()
        if data.startswith((_JPEG_MAGIC, _PNG_MAGIC)) and len(data) <= Limit.MAX_IMAGE_BYTES:
            return data
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValidationError("portrait", f"{os.fspath(portrait)}: not an image OpenCV can decode")
        portrait = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    image = _check_rgb("portrait", portrait)
    encoded = encode_image(image, pb.PNG) if image.size <= 512 * 512 * 3 else None
    if encoded is None or len(encoded.data) > Limit.MAX_IMAGE_BYTES:
        encoded = encode_image(image, pb.JPEG, quality=95)
    return encoded.data


def decode_image(image: pb.Image, started: pb.Started) -> np.ndarray:
    """An avatar frame's `Image` -> uint8 RGB (H, W, 3)."""
    if image.format == pb.RAW_RGB:
        height, width = image.height or started.height, image.width or started.width
        if len(image.data) != height * width * 3:
            raise ProtocolError(f"frame.image.data: got {len(image.data)} bytes; expected {width}x{height}x3")
        return np.frombuffer(image.data, np.uint8).reshape(height, width, 3).copy()
    if image.format in (pb.JPEG, pb.PNG):
        decoded = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ProtocolError(
                f"frame.image: {len(image.data)} bytes that do not decode as {pb.ImageFormat.Name(image.format)}"
            )
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    raise ProtocolError(f"frame.image.format: got {image.format}; expected RAW_RGB, JPEG or PNG")


def session_options(options: pb.SessionOptions | Mapping[str, Any] | None) -> pb.SessionOptions | None:
    """SessionOptions from a message or a dict such as {"block": 5, "nfe": 4, "warm_start": True}."""
    if options is None or isinstance(options, pb.SessionOptions):
        return options
    try:
        return pb.SessionOptions(**dict(options))
    except (ValueError, TypeError) as exc:
        raise ValidationError("options", f"{exc}; expected fields of SessionOptions (common.proto)") from None


# --- pacing ---------------------------------------------------------------------------------------


class RateLimiter:
    """At most `limit` acquisitions in any `period` seconds (a sliding window)."""

    def __init__(self, limit: int, period: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"limit: got {limit}; expected >= 1")
        self.limit, self.period = limit, period
        self._times: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            while self._times and now - self._times[0] >= self.period:
                self._times.popleft()
            if len(self._times) >= self.limit:
                await asyncio.sleep(self._times[0] + self.period - now)
                self._times.popleft()
            self._times.append(time.monotonic())


# --- the client -----------------------------------------------------------------------------------


class AvatarClient:
    """A channel to the service (Serve's gRPC proxy, or any AvatarSession server).

    `token`: a tenant token, sent as `authorization: Bearer <token>` call metadata (or in
    Start.auth_token with `token_in_start=True`). `credentials`: TLS channel credentials
    (`grpc.ssl_channel_credentials()`); without them the channel is plaintext. `metadata`:
    extra call metadata, e.g. (("application", "avatar-forcing"),) for Serve's routing.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token_in_start: bool = False,
        channel_options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        if token is not None and len(token.encode()) > Limit.MAX_AUTH_TOKEN_BYTES:
            raise ValidationError(
                "token", f"got {len(token.encode())} bytes; expected at most {Limit.MAX_AUTH_TOKEN_BYTES}"
            )
        self.target = target
        self._token = token
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._token_in_start = token_in_start
        self._channel_options = list(channel_options) if channel_options is not None else grpc_options()
        self._channel: grpc.aio.Channel | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"AvatarClient(target={self.target!r}, token={'<set>' if self._token else None})"

    def channel(self) -> grpc.aio.Channel:
        """The grpc.aio channel, created on first use (inside the running event loop)."""
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._channel_options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> AvatarClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        auth = () if self._token is None or self._token_in_start else (("authorization", f"Bearer {self._token}"),)
        return auth + self._metadata

    def session(
        self,
        portrait: bytes | np.ndarray | str | os.PathLike[str] | None = None,
        *,
        avatar_id: str | None = None,
        options: pb.SessionOptions | Mapping[str, Any] | None = None,
        session_id: str = "",
        output_format: int = pb.JPEG,
        jpeg_quality: int = 0,
        on_error: OnError = "warn",
        max_messages_per_second: int = DEFAULT_MESSAGES_PER_SECOND,
        max_ahead_ms: float = DEFAULT_MAX_AHEAD_MS,
        audio_chunk_samples: int = Limit.MAX_AUDIO_CHUNK_SAMPLES,
        user_fps: float = FPS,
        start_timeout_s: float = 60.0,
    ) -> AvatarStream:
        """A session (async context manager): `portrait` (JPEG/PNG bytes, uint8 RGB array or an image
        file) or `avatar_id` (registered with the gateway); `options` as SessionOptions or a dict."""
        if (portrait is None) == (avatar_id is None):
            raise ValidationError("portrait", "pass exactly one of portrait= or avatar_id=")
        start = pb.Start(
            options=session_options(options),
            session_id=session_id,
            output_format=output_format,
            jpeg_quality=jpeg_quality,
        )
        if avatar_id is not None:
            start.avatar_id = avatar_id
        else:
            start.portrait = portrait_bytes(portrait)
        if self._token is not None and self._token_in_start:
            start.auth_token = self._token
        return AvatarStream(
            self,
            start,
            on_error=on_error,
            max_messages_per_second=max_messages_per_second,
            max_ahead_ms=max_ahead_ms,
            audio_chunk_samples=audio_chunk_samples,
            user_fps=user_fps,
            start_timeout_s=start_timeout_s,
        )


class AvatarStream:
    """One `AvatarSession.Stream` call. Made by `AvatarClient.session`; use it with `async with`.

    Leaving the block cancels the call if it is still running; for a clean end call
    `end_input()` and read `frames()` to its end (the server flushes the remaining frames).
    """

    def __init__(
        self,
        client: AvatarClient,
        start: pb.Start,
        *,
        on_error: OnError,
        max_messages_per_second: int,
        max_ahead_ms: float,
        audio_chunk_samples: int,
        user_fps: float,
        start_timeout_s: float,
    ) -> None:
        if not 1 <= audio_chunk_samples <= Limit.MAX_AUDIO_CHUNK_SAMPLES:
            raise ValidationError(
                "audio_chunk_samples", f"got {audio_chunk_samples}; expected [1, {Limit.MAX_AUDIO_CHUNK_SAMPLES}]"
            )
        if not 0 < user_fps <= 30:
            raise ValidationError("user_fps", f"got {user_fps}; expected (0, 30] frames per second")
        if not 0 < max_messages_per_second <= Limit.MAX_CLIENT_MESSAGES_PER_SECOND:
            raise ValidationError(
                "max_messages_per_second",
                f"got {max_messages_per_second}; expected (0, {Limit.MAX_CLIENT_MESSAGES_PER_SECOND}]",
            )
        self._client = client
        self._start = start
        self._on_error = on_error
        self._max_ahead_ms = max_ahead_ms
        self._chunk = audio_chunk_samples
        self._user_frame_us = round(1_000_000 / user_fps)
        self._start_timeout_s = start_timeout_s
        self._limiter = RateLimiter(max_messages_per_second)

        self.started: pb.Started | None = None
        self.errors: list[ServerError] = []  # every non-fatal Error message, in order
        self.frames_received = 0  # frames read off the wire (index of the next expected frame)
        self.interrupted_frame_index: int | None = None  # from the last Interrupted
        self.messages_sent = 0

        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._progress = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        self._source_locks = {pb.AVATAR: asyncio.Lock(), pb.USER: asyncio.Lock(), "video": asyncio.Lock()}
        self._audio_cursor = {pb.AVATAR: 0, pb.USER: 0}  # next sample index per source
        self._video_cursor_us = 0  # timestamp of the next auto-timestamped user frame
        self._last_video_us: int | None = None
        self._interrupted = asyncio.Event()
        self._failure: BaseException | None = None  # why the call ended, if not cleanly
        self._input_ended = False
        self._finished = False
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.started.session_id if self.started is not None else ""

    async def __aenter__(self) -> AvatarStream:
        stub = pb_grpc.AvatarSessionStub(self._client.channel())
        self._call = stub.Stream(metadata=self._client.call_metadata())
        try:
            await self._limiter.acquire()
            await self._call.write(pb.ClientMessage(start=self._start))
            self.messages_sent += 1
            first = await asyncio.wait_for(self._call.read(), self._start_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._call.cancel()
            raise from_rpc_error(exc) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            raise from_rpc_error(await self._status_error()) from None
        except TimeoutError:
            self._call.cancel()
            raise AnswerTimeoutError(f"Started: no answer within {self._start_timeout_s:.0f} s") from None
        if first is grpc.aio.EOF:
            raise ProtocolError("Started: the server ended the stream before answering Start")
        if first.WhichOneof("message") != "started":
            self._call.cancel()
            raise ProtocolError(f"Started: expected Started first, got {first.WhichOneof('message')}")
        self.started = first.started
        self._reader = asyncio.create_task(self._read_loop(), name=f"avatar-stream-{self.session_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel the call if it still runs, and stop the reader."""
        self._closing = True
        if self._call is not None and not self._call.done():
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _status_error(self) -> grpc.aio.AioRpcError:
        code = await self._call.code()
        details = await self._call.details()
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    # --- receiving --------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                if self._handle(message):
                    async with self._progress:
                        self._progress.notify_all()
        except grpc.aio.AioRpcError as exc:
            if not (self._closing and exc.code() == grpc.StatusCode.CANCELLED):
                self._failure = from_rpc_error(exc)
        except asyncio.CancelledError:
            self._failure = self._failure or SessionClosedError("the session was closed")
            raise
        except ServiceError as exc:  # a contract violation found while decoding
            self._failure = exc
            self._call.cancel()
        finally:
            self._finished = True
            self._queue.put_nowait(_END)
            self._interrupted.set()
            async with self._progress:
                self._progress.notify_all()

    def _handle(self, message: pb.ServerMessage) -> bool:
        """Handle one message; True when it was a frame (progress for `_wait_ahead`)."""
        kind = message.WhichOneof("message")
        if kind == "frame":
            frame = self._decode_frame(message.frame)
            self.frames_received = frame.index + 1
            self._queue.put_nowait(frame)
            return True
        if kind == "error":
            self._server_error(ServerError(message.error.code, message.error.message))
        elif kind == "interrupted":
            self.interrupted_frame_index = message.interrupted.frame_index
            self._interrupted.set()
        else:
            warnings.warn(f"stream: unexpected {kind!r} message after Started; ignored", ServerWarning, stacklevel=2)
        return False

    def _decode_frame(self, frame: pb.AvatarFrame) -> Frame:
        if frame.frame_index != self.frames_received:
            warnings.warn(
                f"frame_index: got {frame.frame_index}, expected {self.frames_received} (frames missing)",
                ServerWarning,
                stacklevel=3,
            )
        if len(frame.audio_pcm_s16le) != SAMPLES_PER_FRAME * 2:
            raise ProtocolError(
                f"frame.audio_pcm_s16le: got {len(frame.audio_pcm_s16le)} bytes; expected {SAMPLES_PER_FRAME * 2}"
            )
        image = decode_image(frame.image, self.started)
        audio = np.frombuffer(frame.audio_pcm_s16le, "<i2").astype(np.int16)
        timing = FrameTiming(
            block_latency_ms=frame.timing.block_latency_ms,
            generated_unix_ms=frame.timing.generated_unix_ms,
            nfe_used=frame.timing.nfe_used,
            degradation=pb.DegradationLevel.Name(frame.timing.degradation),
            received_unix_ms=time.time() * 1000.0,
        )
        return Frame(frame.frame_index, frame.timestamp_us, image, audio, timing)

    def _server_error(self, error: ServerError) -> None:
        self.errors.append(error)
        if callable(self._on_error):
            self._on_error(error)
        elif self._on_error == "warn":
            warnings.warn(f"server dropped a message: {error}", ServerWarning, stacklevel=3)
        elif self._on_error == "raise":
            self._queue.put_nowait(ServerMessageError(error))

    async def frames(self) -> AsyncIterator[Frame]:
        """The avatar frames in order, until the server ends the stream.

        Raises the typed error of a failed call (after the frames that came before it), and
        `ServerMessageError` at the point of an `Error` message with on_error="raise" (iterate
        again to go on).
        """
        while True:
            item = await self._queue.get()
            if item is _END:
                self._queue.put_nowait(_END)  # later iterations end at once too
                if self._failure is not None and not isinstance(self._failure, SessionClosedError):
                    raise self._failure
                return
            if isinstance(item, ServerMessageError):
                raise item
            yield item

    @property
    def done(self) -> bool:
        """The call has ended (all frames were read off the wire, or it failed)."""
        return self._finished

    # --- sending ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.started is None:
            raise SessionClosedError("the session is not open; use `async with client.session(...) as s`")
        if self._failure is not None:
            raise self._failure
        if self._input_ended:
            raise SessionClosedError("the input has ended (end_input() was called)")
        if self._finished:
            raise SessionClosedError("the call has ended")

    async def _wait_ahead(self, media_end_us: int) -> None:
        """Hold media back while it would be more than `max_ahead_ms` ahead of the frames received."""
        limit_us = self._max_ahead_ms * 1000.0

        def may_send() -> bool:
            return self._finished or media_end_us - self.frames_received * FRAME_US <= limit_us

        if not may_send():
            async with self._progress:
                await self._progress.wait_for(may_send)

    async def _send(self, message: pb.ClientMessage, media_end_us: int | None = None) -> None:
        self._check_open()
        if media_end_us is not None:
            await self._wait_ahead(media_end_us)
        await self._limiter.acquire()
        async with self._write_lock:
            self._check_open()
            try:
                await self._call.write(message)
            except grpc.aio.AioRpcError as exc:
                raise self._failure or from_rpc_error(exc) from None
            except asyncio.InvalidStateError:
                if self._reader is not None:  # the reader records why the call ended
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(self._reader)
                if self._failure is not None:
                    raise self._failure from None
                raise SessionClosedError("the call has ended") from None
            self.messages_sent += 1

    async def _send_audio(self, source: int, samples: Any, timestamp_us: int | None, name: str) -> int:
        pcm = to_pcm16(samples, name)
        async with self._source_locks[source]:
            cursor = self._audio_cursor[source]
            if timestamp_us is None:
                base_us = cursor * 1_000_000 // SAMPLE_RATE
            else:
                base_us = int(timestamp_us)
                first_sample = round(base_us * SAMPLE_RATE / 1_000_000)
                if base_us < 0 or first_sample < cursor:
                    raise ValidationError(
                        f"{name}.timestamp_us",
                        f"got {base_us}; expected >= {cursor * 1_000_000 // SAMPLE_RATE} (chunks of a source "
                        "must not overlap and must be in timestamp order)",
                    )
                cursor = first_sample
            for offset in range(0, pcm.shape[0], self._chunk):
                piece = pcm[offset : offset + self._chunk]
                start_us = base_us + offset * 1_000_000 // SAMPLE_RATE
                chunk = pb.AudioChunk(
                    source=source,
                    timestamp_us=start_us,
                    pcm_s16le=piece.astype("<i2", copy=False).tobytes(),
                    sample_rate=SAMPLE_RATE,
                )
                await self._send(pb.ClientMessage(audio=chunk), start_us + piece.shape[0] * 1_000_000 // SAMPLE_RATE)
                self._audio_cursor[source] = cursor + offset + piece.shape[0]
            return base_us

    async def send_avatar_audio(self, samples: Any, timestamp_us: int | None = None) -> int:
        """What the avatar says (TTS): float in [-1, 1] or int16, mono 16 kHz. Without `timestamp_us`
        the audio follows the previous avatar audio. Returns the timestamp used (us)."""
        return await self._send_audio(pb.AVATAR, samples, timestamp_us, "avatar_audio")

    async def send_user_audio(self, samples: Any, timestamp_us: int | None = None) -> int:
        """The user's microphone, like `send_avatar_audio`; expected in real time."""
        return await self._send_audio(pb.USER, samples, timestamp_us, "user_audio")

    async def send_user_frame(
        self,
        image: np.ndarray | bytes,
        timestamp_us: int | None = None,
        format: int = pb.JPEG,
        quality: int = DEFAULT_JPEG_QUALITY,
    ) -> int:
        """One camera frame: uint8 RGB (H, W, 3), encoded as `format`, or JPEG/PNG bytes as they are.
        Without `timestamp_us` frames are 1 / user_fps apart from 0. Returns the timestamp used (us)."""
        if isinstance(image, bytes | bytearray | memoryview):
            message = encoded_image(bytes(image), "user_frame")
        else:
            message = await asyncio.to_thread(encode_image, image, format, quality)
        async with self._source_locks["video"]:
            stamp = self._video_cursor_us if timestamp_us is None else int(timestamp_us)
            if stamp < 0 or (self._last_video_us is not None and stamp <= self._last_video_us):
                raise ValidationError(
                    "user_frame.timestamp_us", f"got {stamp}; expected >= 0 and after the previous frame"
                )
            await self._send(pb.ClientMessage(video=pb.VideoFrame(timestamp_us=stamp, image=message)), stamp)
            self._last_video_us = stamp
            self._video_cursor_us = stamp + self._user_frame_us
            return stamp

    async def interrupt(self, wait: bool = True, timeout_s: float = 10.0) -> int | None:
        """Drop the avatar audio not yet used (LiveKit `lk.clear_buffer`).

        With `wait`, returns Interrupted.frame_index (the first frame without the dropped audio),
        and auto-timestamped avatar audio continues from that frame.
        """
        self._interrupted.clear()
        await self._send(pb.ClientMessage(interrupt=pb.Interrupt()))
        if not wait:
            return None
        try:
            await asyncio.wait_for(self._interrupted.wait(), timeout_s)
        except TimeoutError:
            raise AnswerTimeoutError(f"Interrupted: no answer within {timeout_s:.0f} s") from None
        if self._failure is not None:
            raise self._failure
        index = self.interrupted_frame_index
        if index is not None:
            async with self._source_locks[pb.AVATAR]:
                self._audio_cursor[pb.AVATAR] = min(self._audio_cursor[pb.AVATAR], index * SAMPLES_PER_FRAME)
        return index

    async def end_input(self) -> None:
        """No more input: the server flushes the remaining frames and ends the stream."""
        if self._input_ended:
            return
        await self._send(pb.ClientMessage(end_of_input=pb.EndOfInput()))
        self._input_ended = True
        async with self._write_lock:
            await self._call.done_writing()
