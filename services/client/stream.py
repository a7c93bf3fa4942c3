"""One `AvatarSession.Stream` call as the client drives it (`AvatarStream`, made by
`AvatarClient.session` in `services.client.session`).

Receiving: a background task reads the call, decodes frames in order into a queue (`frames()`),
records Interrupted and non-fatal `Error` messages, and keeps why the call ended. Sending: audio
in chunks, camera frames encoded, every message through the rate limiter, and media held back
while it would be more than `max_ahead_ms` ahead of the frames received.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np

from services.client.audio import audio_chunks, samples_to_us, to_pcm16
from services.client.frames import FRAME_US, Frame, frame_from_message
from services.client.rate_limit import RateLimiter
from services.wire.errors import (
    AnswerTimeoutError,
    ProtocolError,
    ServerError,
    ServerMessageError,
    ServiceError,
    SessionClosedError,
    ValidationError,
    from_rpc_error,
)
from services.wire.images import DEFAULT_JPEG_QUALITY, encode_image, encoded_image
from services.wire.protos import Limit, pb, pb_grpc

if TYPE_CHECKING:
    from services.client.session import AvatarClient

__all__ = ["AvatarStream", "OnError", "ServerWarning"]

OnError = Literal["warn", "raise", "ignore"] | Callable[[ServerError], None]
_END = object()  # the end of the frame queue


class ServerWarning(UserWarning):
    """The server dropped a client message (an `Error` on the stream); the session goes on."""


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
        # After Interrupted the server drops the frames it had in flight (they carried the dropped
        # speech): the next frame is Interrupted.frame_index, a jump forward that is expected.
        resumed = frame.frame_index == self.interrupted_frame_index and frame.frame_index > self.frames_received
        if frame.frame_index != self.frames_received and not resumed:
            warnings.warn(
                f"frame_index: got {frame.frame_index}, expected {self.frames_received} (frames missing)",
                ServerWarning,
                stacklevel=3,
            )
        return frame_from_message(frame, self.started)

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
                base_us = samples_to_us(cursor)
            else:
                base_us = int(timestamp_us)
                first_sample = round(base_us * Limit.SAMPLE_RATE / 1_000_000)
                if base_us < 0 or first_sample < cursor:
                    raise ValidationError(
                        f"{name}.timestamp_us",
                        f"got {base_us}; expected >= {samples_to_us(cursor)} (chunks of a source "
                        "must not overlap and must be in timestamp order)",
                    )
                cursor = first_sample
            for chunk, end_us, sent in audio_chunks(source, pcm, base_us, self._chunk):
                await self._send(pb.ClientMessage(audio=chunk), end_us)
                self._audio_cursor[source] = cursor + sent
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
                self._audio_cursor[pb.AVATAR] = min(self._audio_cursor[pb.AVATAR], index * Limit.SAMPLES_PER_FRAME)
        return index

    async def end_input(self) -> None:
        """No more input: the server flushes the remaining frames and ends the stream."""
        if self._input_ended:
            return
        await self._send(pb.ClientMessage(end_of_input=pb.EndOfInput()))
        self._input_ended = True
        async with self._write_lock:
            await self._call.done_writing()
