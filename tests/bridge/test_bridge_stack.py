"""The whole path on loopback: the gateway dispatches a bridge (Redis P:bridge:dispatch) -> the
bridge worker joins the (in-memory) room -> AvatarSession.Stream over gRPC to the real Serve
stack (tiny model, CPU) -> the avatar's frames back, published in the room; livekit-agents'
DataStreamAudioOutput on the agent side. One stack for the module (a minute or two on 2 cores).
No timing assertions: the machine's speed is not the subject here (bench.bridge measures)."""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid

import httpx
import numpy as np
import pytest
from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

from services.bridge.backend import GrpcBackend, JoinOrder
from services.bridge.memory_room import MemoryServer, wait_until
from services.bridge.protocol import PUBLISH_ON_BEHALF
from services.bridge.runner import BridgeSettings
from services.bridge.worker import BridgeWorker, WorkerSettings
from services.client.audio import to_pcm16

pytestmark = pytest.mark.integration
ADMIN_TOKEN = "bridge-admin-" + secrets.token_hex(24)
AGENT = "agent-1"
# The gateway dispatches bridges only with LiveKit configured; nothing connects to this URL here.
LIVEKIT_ENV = {
    "LIVEKIT_URL": "ws://127.0.0.1:9",
    "LIVEKIT_API_KEY": "devkey",
    "LIVEKIT_API_SECRET": secrets.token_hex(32),
    "AF_GATEWAY_LIVEKIT_KICK": "0",
}


@pytest.fixture(scope="module")
def stack():
    import ray

    from services.local.launcher import start_local
    from services.store.inspection import delete_namespace

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    prefix = f"br-{uuid.uuid4().hex[:8]}"
    saved = {k: os.environ.get(k) for k in LIVEKIT_ENV}
    os.environ.update(LIVEKIT_ENV)
    try:
        service = start_local(
            "tiny",
            grpc_port=0,
            http_port=0,
            auth_secret=secrets.token_hex(32),
            app_args={"redis_prefix": prefix, "degrade": True},
            start_redis_if_down=True,
            warm=False,
            gateway_port=0,
            gateway_admin_token=ADMIN_TOKEN,
            log=lambda message: None,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield {"gateway": service.gateway.url, "redis_url": service.redis_url, "prefix": prefix}
    finally:
        try:
            delete_namespace(service.redis_url, prefix)
        finally:
            service.stop()


def test_gateway_dispatch_bridge_grpc_serve_and_back(stack):
    from services.local.warmup import sample_inputs
    from services.store import SessionStore
    from services.wire.images import portrait_bytes

    inputs = sample_inputs(frames=100)
    assert inputs is not None, "the repository's samples/ are missing"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=stack["gateway"], timeout=120) as c:
        assert c.post("/v1/tenants", json={"tenant_id": "acme"}, headers=admin).status_code == 201
        key = c.post("/v1/tenants/acme/keys", json={"name": "bridge"}, headers=admin).json()["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        portrait = inputs.portrait if isinstance(inputs.portrait, bytes) else portrait_bytes(inputs.portrait)
        files = {"portrait": ("portrait.png", portrait, "image/png")}
        assert c.post("/v1/avatars", files=files, data={"avatar_id": "ava"}, headers=headers).status_code == 201

        server = MemoryServer("room1")
        rooms = {}

        def room_factory(order: JoinOrder):
            rooms[order.session_id] = server.room(
                order.avatar_identity,
                rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
                **{PUBLISH_ON_BEHALF: order.agent_identity},
            )
            return rooms[order.session_id]

        async def main():
            store = SessionStore(stack["redis_url"], stack["prefix"], timeout_s=6.0)
            worker = BridgeWorker(
                store,
                WorkerSettings(redis_url=stack["redis_url"], redis_prefix=stack["prefix"], bridge_id="b1"),
                room_factory=room_factory,
                backend=GrpcBackend(start_timeout_s=120.0),
                session_settings=BridgeSettings(),
            )
            worker_task = asyncio.create_task(worker.run())
            agent_room = server.room(AGENT, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
            await agent_room.connect()
            human = server.room("human-1")
            await human.connect()
            mic, camera = await human.publish_microphone(), await human.publish_camera()

            async def film_and_speak():  # the sample user clip, looped, in real time
                loop = asyncio.get_running_loop()
                t0, n = loop.time(), 0
                audio = to_pcm16(inputs.user_audio)
                while True:
                    await asyncio.sleep(max(0.0, t0 + n * 0.04 - loop.time()))
                    image = inputs.user_frames[n % len(inputs.user_frames)]
                    h, w = image.shape[:2]
                    rgba = np.concatenate([image, np.full((h, w, 1), 255, np.uint8)], axis=2)
                    await camera.capture_frame(rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes()))
                    piece = audio[(n % 100) * 640 : (n % 100 + 1) * 640]
                    await mic.capture_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, piece.shape[0]))
                    n += 1

            feeder = asyncio.create_task(film_and_speak())
            created = await asyncio.to_thread(
                c.post,
                "/v1/sessions",
                json={"avatar_id": "ava", "room": "room1", "agent_identity": AGENT, "options": {"warm_start": True}},
                headers=headers,
            )
            assert created.status_code == 201, created.text
            session = created.json()
            assert session["livekit"]["avatar_identity"].startswith("af-avatar-")
            output = DataStreamAudioOutput(
                agent_room,
                destination_identity=session["livekit"]["avatar_identity"],
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                sample_rate=16000,
                wait_playback_start=True,
            )
            finished = []
            output.on("playback_finished", finished.append)
            await wait_until(lambda: session["session_id"] in rooms and rooms[session["session_id"]].published, 180)
            bridge_room = rooms[session["session_id"]]

            speech = to_pcm16(inputs.avatar_audio)[: 40 * 640]  # 1.6 s
            for offset in range(0, speech.shape[0], 3200):
                piece = speech[offset : offset + 3200]
                await output.capture_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, piece.shape[0]))
            output.flush()
            first = await asyncio.wait_for(output.wait_for_playout(), 120)

            for offset in range(0, speech.shape[0], 3200):  # a second turn, interrupted
                piece = speech[offset : offset + 3200]
                await output.capture_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, piece.shape[0]))
            output.flush()
            await wait_until(lambda: bridge_room is not None and worker.sessions, 5)
            bridge = worker.sessions[session["session_id"]][0]
            await wait_until(lambda: bridge.stats.started_sent >= 2, 120)
            output.clear_buffer()
            second = await asyncio.wait_for(output.wait_for_playout(), 10)
            published = len(bridge_room.published)

            stopped = await asyncio.to_thread(c.delete, f"/v1/sessions/{session['session_id']}", headers=headers)
            assert stopped.status_code == 200, stopped.text
            await wait_until(lambda: not worker.sessions, 60)
            feeder.cancel()
            await worker.aclose()
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)
            await store.aclose()
            return first, second, finished, published, bridge, worker

        first, second, finished, published, bridge, worker = asyncio.run(main())
    assert first.interrupted is False and first.playback_position == pytest.approx(1.6, abs=1e-6)
    assert second.interrupted is True and 0 <= second.playback_position < 1.6
    assert len(finished) == 2
    assert published > 40 and bridge.publisher.stats.published >= published
    assert bridge.stats.user_frames_sent > 0 and bridge.stats.user_audio_sent > 0
    assert worker.counters["orders_join"] == 1 and worker.counters["orders_leave"] == 1
    assert sum(worker.ended.values()) == 1
