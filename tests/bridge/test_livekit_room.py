"""The LiveKit adapter: its media half with the SDK's real sources offline, and against a real
server when LIVEKIT_URL (+ LIVEKIT_API_KEY / LIVEKIT_API_SECRET) is set."""

from __future__ import annotations

import asyncio
import os

import pytest
from livekit import rtc

from services.bridge.livekit_room import LiveKitAvatarTracks, LiveKitRoom

LIVEKIT_URL = os.environ.get("LIVEKIT_URL", "")
needs_server = pytest.mark.skipif(
    not (LIVEKIT_URL and os.environ.get("LIVEKIT_API_KEY") and os.environ.get("LIVEKIT_API_SECRET")),
    reason="no LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET to run",
)


def test_avatar_tracks_capture_queue_and_clear_with_the_real_sdk_sources():
    async def main():
        tracks = LiveKitAvatarTracks(32, 32, 16000)
        video = rtc.VideoFrame(32, 32, rtc.VideoBufferType.RGB24, bytes(32 * 32 * 3))
        for n in range(2):  # 80 ms of audio into a 100 ms queue
            await tracks.capture(video, rtc.AudioFrame(bytes(1280), 16000, 1, 640), n * 40_000)
        queued = tracks.queued_audio_s()
        tracks.clear_audio()  # an interruption drops what is queued
        cleared = tracks.queued_audio_s()
        await tracks.aclose()
        return queued, cleared

    queued, cleared = asyncio.run(main())
    assert queued > 0.0 and cleared == 0.0


def test_an_unconnected_room_has_no_identity_and_no_participants():
    async def main():
        room = LiveKitRoom("ws://127.0.0.1:9", "token")  # rtc.Room needs the running loop
        return room.identity, room.participants(), room.rtc_room.isconnected()

    assert asyncio.run(main()) == ("", [], False)


@needs_server
def test_bridge_session_against_a_real_livekit_server():
    """Agent (livekit-agents' DataStreamAudioOutput on an rtc.Room) and bridge in one real room."""
    import uuid

    from livekit import api
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from services.bridge.backend import FakeBackend, JoinOrder
    from services.bridge.runner import BridgeSession
    from tests.bridge.harness import tone

    room_name = f"af-bridge-test-{uuid.uuid4().hex[:8]}"
    key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]

    def token(identity: str, on_behalf: str = "") -> str:
        grants = api.VideoGrants(room_join=True, room=room_name)
        t = api.AccessToken(key, secret).with_kind("agent").with_identity(identity).with_grants(grants)
        if on_behalf:
            t = t.with_attributes({"lk.publish_on_behalf": on_behalf})
        return t.to_jwt()

    async def main():
        agent = rtc.Room()
        await agent.connect(LIVEKIT_URL, token("agent-1"))
        order = JoinOrder(
            "s1", room_name, LIVEKIT_URL, token("af-avatar-s1", "agent-1"), "t", "ava", "af-avatar-s1", "agent-1"
        )
        session = BridgeSession(LiveKitRoom(LIVEKIT_URL, order.bridge_token), FakeBackend(width=64, height=64), order)
        task = asyncio.create_task(session.run())
        output = DataStreamAudioOutput(
            agent, destination_identity="af-avatar-s1", wait_remote_track=rtc.TrackKind.KIND_VIDEO, sample_rate=16000
        )
        pcm = tone(1.0, rate=16000)
        for offset in range(0, pcm.shape[0], 3200):
            piece = pcm[offset : offset + 3200]
            await output.capture_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, piece.shape[0]))
        output.flush()
        event = await asyncio.wait_for(output.wait_for_playout(), 30)
        session.stop("test_end")
        await task
        await agent.disconnect()
        return event

    event = asyncio.run(main())
    assert event.interrupted is False and event.playback_position == pytest.approx(1.0, abs=0.05)
