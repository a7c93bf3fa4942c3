"""Encoding an uploaded portrait, and asking whether the Serve application answers.

`PortraitEncoder.encode` runs the MotionEncoder's EncodePortrait once per upload: it decodes the
image, crops the largest face, encodes it (a portrait without a face is INVALID_ARGUMENT) and
stores the portrait and its metadata in Redis, which is what decoders and generators rebuild the
encoding from.

- `ServeEncoder` (the deployment): EncodePortrait through Serve's gRPC proxy with a short-lived
  tenant token minted here; `ready()` asks the proxy (RayServeAPIService.ListApplications) that
  the application is deployed.
- `InProcessEncoder`: the same servicer (`MotionEncoderServicer`) in this process, for tests,
  benchmarks and a one-process setup without Ray.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from services.common.auth import grpc_metadata, mint_token
from services.wire.errors import UnavailableError, ValidationError, from_rpc_error

_LIST_APPLICATIONS = "/ray.serve.RayServeAPIService/ListApplications"
ENCODE_TOKEN_TTL_S = 120.0


class PortraitEncoder(Protocol):
    async def encode(self, tenant_id: str, avatar_id: str, portrait: bytes) -> str:
        """Encode and store the portrait; returns the avatar id. ValidationError for a bad portrait."""
        ...

    async def ready(self) -> None:
        """UnavailableError unless the encoder can serve now."""
        ...

    async def aclose(self) -> None: ...


def _as_portrait_field(exc: ValidationError) -> ValidationError:
    # The RPC names the image `image`; the gateway's form field is `portrait`.
    field = exc.field.replace("image", "portrait", 1) if exc.field.startswith("image") else exc.field
    message = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
    return ValidationError(field, message)


def _application_names(payload: bytes) -> list[str]:
    """ListApplicationsResponse { repeated string application_names = 1; } read from the wire format."""
    names, i = [], 0
    while i < len(payload):
        tag = payload[i]
        i += 1
        length = shift = 0
        while True:  # varint
            byte = payload[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if tag >> 3 == 1 and tag & 7 == 2:
            names.append(payload[i : i + length].decode("utf-8", "replace"))
        if tag & 7 != 2:  # only length-delimited fields occur in this message
            break
        i += length
    return names


class ServeEncoder:
    """EncodePortrait through Serve's gRPC proxy (which routes it to the application's ingress)."""

    def __init__(self, target: str, secret: str, app_name: str, timeout_s: float = 60.0) -> None:
        self.target = target
        self.secret = secret
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    def _get_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            from services.wire.protos import grpc_options

            self._channel = grpc.aio.insecure_channel(self.target, options=grpc_options())
        return self._channel

    async def encode(self, tenant_id: str, avatar_id: str, portrait: bytes) -> str:
        from services.wire.protos import pb, pb_grpc

        token = mint_token(tenant_id, self.secret, ENCODE_TOKEN_TTL_S, scope="avatar:write")
        metadata = (*grpc_metadata(token), ("application", self.app_name))
        stub = pb_grpc.MotionEncoderStub(self._get_channel())
        request = pb.EncodePortraitRequest(tenant_id=tenant_id, image=portrait, avatar_id=avatar_id)
        try:
            response = await stub.EncodePortrait(request, metadata=metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise UnavailableError(f"motion encoder at {self.target} did not answer ({exc.code().name})") from None
            error = from_rpc_error(exc)
            raise (_as_portrait_field(error) if isinstance(error, ValidationError) else error) from None
        return response.avatar_id

    async def ready(self) -> None:
        call = self._get_channel().unary_unary(
            _LIST_APPLICATIONS, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            payload = await call(b"", timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(
                f"serve: the gRPC proxy at {self.target} did not answer ({exc.code().name})"
            ) from None
        names = _application_names(payload)
        if self.app_name not in names:
            raise UnavailableError(f"serve: application {self.app_name!r} is not deployed (found {names})")

    async def aclose(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()


class InProcessEncoder:
    """MotionEncoderServicer.EncodePortrait in this process (the tiny preset's random weights unless
    a model is given): the real crop, encode and store, without Ray."""

    def __init__(self, store: Any, model: Any = None, preset: str = "tiny") -> None:
        from avatar_forcing.config import preset as model_preset
        from avatar_forcing.nn.model import random_model
        from services.motion_encoder.servicer import MotionEncoderServicer

        self.servicer = MotionEncoderServicer(model or random_model(model_preset(preset), seed=0), store)

    async def encode(self, tenant_id: str, avatar_id: str, portrait: bytes) -> str:
        from services.wire.protos import pb

        request = pb.EncodePortraitRequest(tenant_id=tenant_id, image=portrait, avatar_id=avatar_id)
        try:
            response = await self.servicer.EncodePortrait(request)
        except ValidationError as exc:
            raise _as_portrait_field(exc) from None
        except ValueError as exc:  # avatar_forcing validates with ValueError
            raise ValidationError("portrait", str(exc)) from None
        return response.avatar_id

    async def ready(self) -> None:
        pass

    async def aclose(self) -> None:
        self.servicer.close()
