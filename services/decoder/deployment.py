"""Ray Serve deployment of FrameDecoder: a thin adapter over `DecoderServicer`.

Two ways in, one servicer:
- Serve's gRPC proxy (the method name is the RPC name) passes `grpc_context`: a failure sets
  its status code and details and returns an empty response, so no exception has to cross
  processes (the proxy turns the status into the call's gRPC status).
- A deployment handle (the session ingress) passes no context: the typed exception reaches
  the caller.
Resources here are minimal defaults; deploy/serve/*.yaml set the real ones. The avatar cache
is bounded by AF_CACHE_BUDGET_BYTES (`Settings.cache_budget_bytes`) per replica.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from services.common.config import Settings
from services.common.model_loader import load_model
from services.common.servicer_call import call_servicer
from services.decoder.servicer import DecoderServicer
from services.store import SessionStore
from services.wire.protos import decoder_pb2


@serve.deployment(name="decoder", ray_actor_options={"num_cpus": 0.5})
class FrameDecoder:
    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.settings = Settings.from_env(overrides=overrides)
        self.store = SessionStore.from_settings(self.settings)
        self.servicer = DecoderServicer(load_model(self.settings), self.store, self.settings)

    async def Decode(self, request, grpc_context=None):
        return await call_servicer(self.servicer.Decode, request, grpc_context, decoder_pb2.DecodeResponse)

    async def check_health(self) -> None:
        pass  # Redis trouble is answered per request (UNAVAILABLE); restarting the replica would not help
