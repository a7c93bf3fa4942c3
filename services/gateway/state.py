"""What the routes share: settings, the store, the portrait encoder and the bridge dispatcher."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.encoder import PortraitEncoder
from services.gateway.livekit import BridgeDispatcher
from services.gateway.settings import GatewaySettings
from services.store import SessionStore


@dataclass
class Gateway:
    settings: GatewaySettings
    store: SessionStore
    encoder: PortraitEncoder
    dispatcher: BridgeDispatcher

    async def aclose(self) -> None:
        await self.dispatcher.aclose()
        await self.encoder.aclose()
        await self.store.aclose()
