"""Ray Serve deployment of the public streaming session (`AvatarSession.Stream`).

Authenticates the caller, then runs a `SessionPipeline` whose stages are handles to
the four model deployments; generator calls carry the session id, so Serve's
session-affinity router sends them to the replica that holds the session's cache.
A session token (claim `sid`) may stream only its session; another tenant's session or
avatar answers NOT_FOUND exactly as an unknown id (`access`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from services.common.auth import claims_from_grpc_metadata
from services.common.config import Settings
from services.common.servicer_call import call_servicer
from services.ingress.access import authorize_call
from services.ingress.config import IngressSettings, Stages
from services.ingress.pipeline import SessionPipeline
from services.store import SessionStore
from services.wire.errors import ServiceError, UnavailableError, set_status
from services.wire.protos import audio_features_pb2, decoder_pb2, generator_pb2, motion_encoder_pb2, pb

REPLICA_DEATH_RETRIES = 8  # ~7 s of backoff in all


def handle_stages(
    audio_features: DeploymentHandle,
    motion_encoder: DeploymentHandle,
    generator: DeploymentHandle,
    decoder: DeploymentHandle,
) -> Stages:
    def method(handle: DeploymentHandle, name: str, routed: bool = False):
        async def call(request):
            try:
                return await attempt(request)
            except RayTaskError as exc:
                # A deployment's own error arrives wrapped, its text a Ray traceback; callers
                # (and gRPC clients) get the original error with its message.
                raise (exc.cause if isinstance(exc.cause, ServiceError) else exc) from None

        async def attempt(request):
            target = handle.options(method_name=name)
            if not routed:
                return await target.remote(request)
            # Pinned to the replica holding the session's cache. If that replica just died, Serve
            # needs a moment to drop it from the replica set; the next replica resumes the session.
            target = target.options(session_id=request.session_id)
            for attempt in range(REPLICA_DEATH_RETRIES):
                try:
                    return await target.remote(request)
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    if attempt == REPLICA_DEATH_RETRIES - 1:
                        raise UnavailableError(
                            f"session_id: the generator replica of {request.session_id!r} "
                            "died and no other replica answered; retry"
                        ) from None
                    await asyncio.sleep(0.2 * (attempt + 1))

        return call

    return Stages(
        extract=method(audio_features, "Extract"),
        encode_user_motion=method(motion_encoder, "EncodeUserMotion"),
        encode_portrait=method(motion_encoder, "EncodePortrait"),
        open_session=method(generator, "OpenSession", routed=True),
        generate_block=method(generator, "GenerateBlock", routed=True),
        close_session=method(generator, "CloseSession", routed=True),
        decode=method(decoder, "Decode"),
    )


@serve.deployment(name="session_ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
class SessionIngress:
    def __init__(
        self,
        audio_features: DeploymentHandle,
        motion_encoder: DeploymentHandle,
        generator: DeploymentHandle,
        decoder: DeploymentHandle,
        overrides: dict | None = None,
        image_size: int = 512,
        ingress: dict | None = None,
    ) -> None:
        self.settings = Settings.from_env(overrides=overrides)
        self.store = SessionStore.from_settings(self.settings)
        self.stages = handle_stages(audio_features, motion_encoder, generator, decoder)
        self.ingress_settings = IngressSettings(image_size=image_size, **(ingress or {}))

    async def Stream(self, request_stream, grpc_context=None) -> AsyncIterator[pb.ServerMessage]:
        try:
            first = await anext(request_stream)
            token = first.start.auth_token if first.WhichOneof("message") == "start" else ""
            metadata = grpc_context.invocation_metadata() if grpc_context is not None else []
            claims = claims_from_grpc_metadata(metadata, token)
            pipeline = SessionPipeline(
                self.stages, self.store, self.ingress_settings, claims.tenant_id, token_session_id=claims.session_id
            )
            async for message in pipeline.run(_prepend(first, request_stream)):
                yield message
        except Exception as exc:
            if grpc_context is not None:
                set_status(grpc_context, exc)
            raise

    # The model services' RPCs, reachable through Serve's gRPC proxy (which dispatches every
    # method of this application to its ingress): authenticated, scoped to the token's tenant,
    # then forwarded to the deployment (generator calls pinned to the session's replica).
    # Another tenant's session (or, for a session token, any other session) is NOT_FOUND.

    async def Extract(self, request, grpc_context=None):
        return await self._forward(
            "Extract", self.stages.extract, request, grpc_context, audio_features_pb2.ExtractFeaturesResponse
        )

    async def EncodeUserMotion(self, request, grpc_context=None):
        return await self._forward(
            "EncodeUserMotion",
            self.stages.encode_user_motion,
            request,
            grpc_context,
            motion_encoder_pb2.EncodeUserMotionResponse,
        )

    async def EncodePortrait(self, request, grpc_context=None):
        return await self._forward(
            "EncodePortrait",
            self.stages.encode_portrait,
            request,
            grpc_context,
            motion_encoder_pb2.EncodePortraitResponse,
        )

    async def OpenSession(self, request, grpc_context=None):
        return await self._forward(
            "OpenSession", self.stages.open_session, request, grpc_context, generator_pb2.OpenSessionResponse
        )

    async def GenerateBlock(self, request, grpc_context=None):
        return await self._forward(
            "GenerateBlock", self.stages.generate_block, request, grpc_context, generator_pb2.GenerateBlockResponse
        )

    async def CloseSession(self, request, grpc_context=None):
        return await self._forward(
            "CloseSession", self.stages.close_session, request, grpc_context, generator_pb2.CloseSessionResponse
        )

    async def Decode(self, request, grpc_context=None):
        return await self._forward("Decode", self.stages.decode, request, grpc_context, decoder_pb2.DecodeResponse)

    async def _forward(self, method: str, stage, request, grpc_context, empty: type):
        async def authorized(message):
            if grpc_context is not None:
                claims = claims_from_grpc_metadata(grpc_context.invocation_metadata())
                await authorize_call(self.store, claims, method, message)
            return await stage(message)

        return await call_servicer(authorized, request, grpc_context, empty)


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item
