"""Ray Serve deployment of MotionEncoder: a thin adapter over `MotionEncoderServicer`.

Two ways in, one servicer:
- Serve's gRPC proxy (the method name is the RPC name) passes `grpc_context`: a failure sets
  its status code and details and returns an empty response, so no exception has to cross
  processes (the proxy turns the status into the call's gRPC status).
- A deployment handle (the session ingress) passes no context: the typed exception reaches
  the caller.
Resources here are minimal defaults; deploy/serve/*.yaml set the real ones.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from services.common.config import Settings
from services.common.model_loader import load_model
from services.common.servicer_call import call_servicer
from services.motion_encoder.servicer import MotionEncoderServicer
from services.store import SessionStore
from services.wire.protos import motion_encoder_pb2


@serve.deployment(name="motion_encoder", ray_actor_options={"num_cpus": 0.5})
class MotionEncoder:
    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.settings = Settings.from_env(overrides=overrides)
        self.store = SessionStore.from_settings(self.settings)
        self.servicer = MotionEncoderServicer(load_model(self.settings), self.store, self.settings)

    async def EncodeUserMotion(self, request, grpc_context=None):
        return await call_servicer(
            self.servicer.EncodeUserMotion, request, grpc_context, motion_encoder_pb2.EncodeUserMotionResponse
        )

    async def EncodePortrait(self, request, grpc_context=None):
        return await call_servicer(
            self.servicer.EncodePortrait, request, grpc_context, motion_encoder_pb2.EncodePortraitResponse
        )

    async def check_health(self) -> None:
        pass  # Redis trouble is answered per request (UNAVAILABLE); restarting the replica would not help
