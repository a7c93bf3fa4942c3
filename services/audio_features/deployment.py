"""Ray Serve deployment of AudioFeatures: a thin adapter over `AudioFeaturesServicer`.

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

from services.audio_features.servicer import AudioFeaturesServicer
from services.common.config import Settings
from services.common.model_loader import load_model
from services.common.servicer_call import call_servicer
from services.wire.protos import audio_features_pb2


@serve.deployment(name="audio_features", ray_actor_options={"num_cpus": 0.5})
class AudioFeatures:
    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.settings = Settings.from_env(overrides=overrides)
        self.servicer = AudioFeaturesServicer(load_model(self.settings), None, self.settings)

    async def Extract(self, request, grpc_context=None):
        return await call_servicer(
            self.servicer.Extract, request, grpc_context, audio_features_pb2.ExtractFeaturesResponse
        )

    async def check_health(self) -> None:
        pass  # stateless: a replica that answers is healthy
