"""A call in the in-memory room: the agent (livekit-agents' own DataStreamAudioOutput), the human
(microphone and camera publishing SDK frames), and the bridge session on a fake session backend.
Everything runs on a virtual clock (tests/integration/virtual_time.py), so a 10-minute call takes
seconds and no assertion depends on the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

from services.bridge.backend import FakeBackend, JoinOrder
from services.bridge.memory_room import MemoryRoom, MemoryServer, MemoryTrack
from services.bridge.protocol import PUBLISH_ON_BEHALF
from services.bridge.runner import BridgeSession, BridgeSettings
from tests.integration.virtual_time import VirtualClock

AGENT = "agent-1"
HUMAN = "human-1"


def run_virtual(main: Callable[[], Awaitable[Any]], start: float = 1000.0) -> Any:
    clock = VirtualClock(start)
    with asyncio.Runner(loop_factory=clock.loop) as runner:
        return runner.run(main())


def order(session_id: str = "s1", agent: str = AGENT) -> JoinOrder:
    return JoinOrder(
        session_id=session_id,
        room="room",
        livekit_url="memory://",
        bridge_token="t",
        session_token="t",
        avatar_id="ava",
        avatar_identity=f"af-avatar-{session_id}",
        agent_identity=agent,
    )


def tone(seconds: float, rate: int = 24000, amplitude: int = 8000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


class Human:
    """The human: a microphone (48 kHz, 10 ms frames) and a camera (`fps`), real SDK frames."""

    def __init__(self, server: MemoryServer, identity: str = HUMAN, fps: float = 30.0) -> None:
        self.room = server.room(identity)
        self.fps = fps
        self.mic: MemoryTrack | None = None
        self.camera: MemoryTrack | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.camera_on = True

    async def join(self, camera: bool = True) -> None:
        await self.room.connect()
        self.mic = await self.room.publish_microphone()
        self._tasks.append(asyncio.create_task(self._speak()))
        if camera:
            self.camera = await self.room.publish_camera()
            self._tasks.append(asyncio.create_task(self._film()))

    async def _speak(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while not self.mic.ended:
            await asyncio.sleep(max(0.0, t0 + n * 0.01 - loop.time()))
            frame = rtc.AudioFrame.create(48000, 1, 480)
            np.frombuffer(frame.data, np.int16)[:] = 1000  # the SDK frame's own buffer
            await self.mic.capture_frame(frame)
            n += 1

    async def _film(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        pixels = np.full((48, 64, 4), 128, np.uint8)
        while not self.camera.ended:
            await asyncio.sleep(max(0.0, t0 + n / self.fps - loop.time()))
            if self.camera_on and not self.camera.ended:
                await self.camera.capture_frame(rtc.VideoFrame(64, 48, rtc.VideoBufferType.RGBA, pixels.tobytes()))
            n += 1

    async def leave(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.room.disconnect()


class Call:
    """One bridge session in a room with an agent and a human (see the module docstring)."""

    def __init__(
        self,
        server: MemoryServer | None = None,
        backend: FakeBackend | None = None,
        session_id: str = "s1",
        agent: str = AGENT,
        settings: BridgeSettings | None = None,
        wait_playback_start: bool = True,
        agent_rate: int = 24000,
    ) -> None:
        self.server = server or MemoryServer()
        self.backend = backend or FakeBackend()
        self.order = order(session_id, agent)
        self.agent_rate = agent_rate
        self.agent_room: MemoryRoom = self.server.room(agent, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        self.bridge_room: MemoryRoom = self.server.room(
            self.order.avatar_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT, **{PUBLISH_ON_BEHALF: agent}
        )
        self.session = BridgeSession(self.bridge_room, self.backend, self.order, settings or BridgeSettings())
        self.wait_playback_start = wait_playback_start
        self.output: DataStreamAudioOutput | None = None
        self.finished: list[Any] = []  # PlaybackFinishedEvent, as the agent saw them
        self.started: list[float] = []  # loop time of each playback_started the agent saw
        self.task: asyncio.Task[str] | None = None

    async def start(self) -> None:
        await self.agent_room.connect()
        self.output = DataStreamAudioOutput(
            self.agent_room,
            destination_identity=self.order.avatar_identity,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            sample_rate=self.agent_rate,
            wait_playback_start=self.wait_playback_start,
        )
        loop = asyncio.get_running_loop()
        self.output.on("playback_finished", self.finished.append)
        self.output.on("playback_started", lambda ev: self.started.append(loop.time()))
        self.task = asyncio.create_task(self.session.run())

    @property
    def stream(self):
        return self.backend.streams.get(self.order.session_id)

    async def say(self, pcm: np.ndarray, frame_s: float = 0.2, flush: bool = True) -> None:
        """What an AgentSession's audio path does with a TTS segment: frames into the sink, then flush."""
        assert self.output is not None
        step = round(frame_s * self.agent_rate)
        for offset in range(0, pcm.shape[0], step):
            piece = pcm[offset : offset + step]
            frame = rtc.AudioFrame(piece.tobytes(), self.agent_rate, 1, piece.shape[0])
            await self.output.capture_frame(frame)
        if flush:
            self.output.flush()

    async def end(self) -> str:
        assert self.task is not None
        self.session.stop("test_end")
        return await self.task

    def published(self) -> list[tuple[float, int, rtc.VideoFrame, rtc.AudioFrame]]:
        return self.bridge_room.published


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
