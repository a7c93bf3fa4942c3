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
                show(frame.image, frame.audio)                  # (H, W, 3) uint8, (SAMPLES_PER_FRAME,) int16
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

This module is the channel and the session's Start (`AvatarClient`); the call itself is
`services.client.stream.AvatarStream`, frames `services.client.frames`, images
`services.wire.images`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from services.client.stream import AvatarStream, OnError
from services.wire.errors import ValidationError
from services.wire.images import portrait_bytes
from services.wire.protos import Limit, grpc_options, pb

__all__ = ["DEFAULT_MAX_AHEAD_MS", "DEFAULT_MESSAGES_PER_SECOND", "AvatarClient", "session_options"]

# Below the server's MAX_CLIENT_MESSAGES_PER_SECOND, for clock differences and retries.
DEFAULT_MESSAGES_PER_SECOND = int(Limit.MAX_CLIENT_MESSAGES_PER_SECOND * 0.9)
# Below MAX_BUFFERED_AUDIO_MS: frames received lag the server's generation cursor, so the
# client's estimate of what the server holds is already an upper bound; 1 s more of margin.
DEFAULT_MAX_AHEAD_MS = Limit.MAX_BUFFERED_AUDIO_MS - 1000


def session_options(options: pb.SessionOptions | Mapping[str, Any] | None) -> pb.SessionOptions | None:
    """SessionOptions from a message or a dict such as {"block": 5, "nfe": 4, "warm_start": True}."""
    if options is None or isinstance(options, pb.SessionOptions):
        return options
    try:
        return pb.SessionOptions(**dict(options))
    except (ValueError, TypeError) as exc:
        raise ValidationError("options", f"{exc}; expected fields of SessionOptions (common.proto)") from None


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
        user_fps: float = Limit.FPS,
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
