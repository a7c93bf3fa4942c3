"""The avatar protocol against livekit-agents' own DataStreamAudioOutput, in the in-memory room
on a virtual clock: segments, playback events (exactly once, positions), interruption."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from livekit import rtc

from services.bridge import protocol
from services.bridge.backend import frame_marker
from services.bridge.memory_room import wait_until
from tests.bridge.harness import AGENT, Call, Human, run_virtual, tone


def frames_with_speech(call: Call) -> list[int]:
    return [i for i, (_, _, _, audio) in enumerate(call.published()) if np.any(np.frombuffer(audio.data, np.int16))]


def test_one_segment_plays_in_full_and_finishes_once_after_playout():
    async def main():
        call = Call()
        human = Human(call.server)
        await human.join()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        await call.say(tone(1.0))
        assert loop.time() - sent_at < 0.5  # pushed faster than real time
        event = await asyncio.wait_for(call.output.wait_for_playout(), 5)
        finished_at = loop.time()
        await asyncio.sleep(1.0)  # nothing more arrives
        reason = await call.end()
        await human.leave()
        return call, event, sent_at, finished_at, reason

    call, event, sent_at, finished_at, reason = run_virtual(main)
    assert len(call.finished) == 1 and call.finished[0] is event
    assert event.interrupted is False
    assert event.playback_position == pytest.approx(1.0, abs=1e-6)
    assert len(call.started) == 1 and sent_at < call.started[0] < finished_at
    # finished only once the segment's last frame was published: 24 frame periods after its first
    assert finished_at - call.started[0] >= 24 * 0.04 - 1e-6
    speech = frames_with_speech(call)
    assert len(speech) == 25  # 1 s of speech in 25 consecutive published frames
    assert speech == list(range(speech[0], speech[0] + 25))
    assert reason == "test_end"


def test_segments_back_to_back_and_empty_segment_each_finish_once_in_order():
    async def main():
        call = Call()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        await call.say(tone(0.6))
        await call.say(tone(0.4, freq=330))
        # an empty segment, through the agent's own API: a stream opened and closed with no audio
        await call.output.capture_frame(rtc.AudioFrame(b"", 24000, 1, 0))
        call.output.flush()
        await call.say(tone(0.2))
        await asyncio.wait_for(call.output.wait_for_playout(), 10)
        await asyncio.sleep(0.5)
        await call.end()
        return call

    call = run_virtual(main)
    positions = [(round(e.playback_position, 3), e.interrupted) for e in call.finished]
    assert positions == [(0.6, False), (0.4, False), (0.0, False), (0.2, False)]
    assert [f[0] for f in call.session.stats.finished] == [0, 1, 2, 3]  # one report per stream, in order
    assert call.session.stats.started_sent == 3  # the empty segment never started


def test_clear_buffer_stops_speech_within_one_block_and_reports_the_position_played():
    async def main():
        call = Call()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        loop = asyncio.get_running_loop()
        await call.say(tone(3.0))
        await wait_until(lambda: call.started, 5)
        await asyncio.sleep(1.0)
        cleared_at = loop.time()
        call.output.clear_buffer()  # what the AgentSession does on a barge-in
        event = await asyncio.wait_for(call.output.wait_for_playout(), 5)
        reported_at = loop.time()
        index = call.stream.interrupted_frame_index
        await asyncio.sleep(1.0)
        # speech after the interruption plays in full
        await call.say(tone(0.5, freq=440))
        after = await asyncio.wait_for(call.output.wait_for_playout(), 5)
        await asyncio.sleep(0.2)
        await call.end()
        return call, event, after, cleared_at, reported_at, index

    call, event, after, cleared_at, reported_at, index = run_virtual(main)
    assert event.interrupted is True
    played_before_clear = cleared_at - call.started[0]
    assert abs(event.playback_position - played_before_clear) <= 0.04 + 1e-6  # what was actually published
    assert reported_at - cleared_at < 0.1  # the agent's fallback (2 s) never fires
    assert call.stream.interrupts == 1 and index is not None
    published = call.published()
    after_clear = [(t, audio, video) for t, _, video, audio in published if cleared_at < t < cleared_at + 1.0]
    # no stale speech is heard after the clear: the buffered frames were silenced
    assert after_clear and all(not np.any(np.frombuffer(a.data, np.int16)) for _, a, _ in after_clear)
    # the avatar is back to listening (frames generated without speech) within one block plus the buffers
    block = call.stream.block
    first_listening = next(
        t
        for t, _, video in after_clear
        if not frame_marker(np.frombuffer(video.data, np.uint8).reshape(video.height, video.width, 3))[1]
    )
    assert first_listening - cleared_at <= (2 * block + 2) * 0.04 + 1e-6

    # and no talking face is published after the clear either: the frames buffered or in flight
    # (generated with the cleared speech, before Interrupted.frame_index) are dropped, the last
    # image published before the clear is held until the first listening frame
    def marker(video: rtc.VideoFrame) -> int:
        return frame_marker(np.frombuffer(video.data, np.uint8).reshape(video.height, video.width, 3))[0]

    last_before = marker([video for t, _, video, _ in published if t <= cleared_at][-1])
    shown = [marker(video) for t, _, video, _ in published if cleared_at < t < cleared_at + 1.0]
    assert all(i == last_before or i >= index for i in shown), (last_before, index, shown)
    assert shown[-1] >= index and call.session.publisher.stats.interrupted > 0
    assert after.interrupted is False and after.playback_position == pytest.approx(0.5, abs=1e-6)
    assert [round(p, 2) for _, p, _ in call.session.stats.finished][1:] == [0.5]
    assert len(call.finished) == 2  # exactly once per segment


def test_clear_with_two_segments_pending_reports_each_once():
    async def main():
        call = Call()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        await call.say(tone(1.0))
        await call.say(tone(1.0, freq=330))  # queued behind the first
        await wait_until(lambda: call.started, 5)
        await asyncio.sleep(0.3)
        call.output.clear_buffer()
        await asyncio.wait_for(call.output.wait_for_playout(), 5)
        await asyncio.sleep(0.5)
        await call.end()
        return call

    call = run_virtual(main)
    assert [e.interrupted for e in call.finished] == [True, True]
    assert 0.2 < call.finished[0].playback_position < 0.4 and call.finished[1].playback_position == 0.0
    assert len(call.session.stats.finished) == 2


def test_playback_started_is_dropped_for_good_when_the_agent_did_not_ask_for_it():
    async def main():
        call = Call(wait_playback_start=False)
        await call.start()
        await wait_until(lambda: call.published(), 5)
        for _ in range(2):
            await call.say(tone(0.4))
            await asyncio.wait_for(call.output.wait_for_playout(), 5)
        await call.end()
        return call

    call = run_virtual(main)
    assert [round(e.playback_position, 3) for e in call.finished] == [0.4, 0.4]
    assert call.session.stats.started_sent == 0 and call.session.stats.rpc_failures == 0
    assert call.session._started_supported is False


def test_a_lost_trailer_is_ended_by_the_next_stream_and_audio_goes_on():
    async def main():
        call = Call()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        lp = call.agent_room.local_participant
        attrs = {"sample_rate": "16000", "num_channels": "1"}
        dest = [call.order.avatar_identity]
        lost = await lp.stream_bytes(
            "AUDIO_a", topic=protocol.AUDIO_STREAM_TOPIC, destination_identities=dest, attributes=attrs
        )
        await lost.write(tone(0.4, rate=16000).tobytes())  # ... and its trailer never comes
        await asyncio.sleep(0.2)
        nxt = await lp.stream_bytes(
            "AUDIO_b", topic=protocol.AUDIO_STREAM_TOPIC, destination_identities=dest, attributes=attrs
        )
        await nxt.write(tone(0.4, rate=16000).tobytes())
        await nxt.aclose()
        await asyncio.sleep(2.0)
        await call.end()
        return call

    call = run_virtual(main)
    assert [(i, round(p, 3), x) for i, p, x in call.session.stats.finished] == [(0, 0.4, False), (1, 0.4, False)]


def test_streams_and_clear_buffer_from_anyone_but_the_agent_are_refused():
    async def main():
        call = Call()
        intruder = call.server.room("intruder", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD)
        await intruder.connect()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        writer = await intruder.local_participant.stream_bytes(
            "AUDIO_x",
            topic=protocol.AUDIO_STREAM_TOPIC,
            destination_identities=[call.order.avatar_identity],
            attributes={"sample_rate": "16000", "num_channels": "1"},
        )
        await writer.write(tone(0.5, rate=16000).tobytes())
        await writer.aclose()
        answer = await intruder.perform_rpc(call.order.avatar_identity, protocol.RPC_CLEAR_BUFFER, "")
        await asyncio.sleep(1.0)
        await call.end()
        return call, answer

    call, answer = run_virtual(main)
    assert answer == "reject"
    assert call.session.stats.rejected_streams == 1 and call.session.stats.segments == 0
    assert not any(np.any(np.frombuffer(a.data, np.int16)) for *_, a in call.published())


def test_playback_finished_payload_is_what_the_agent_parses():
    from livekit.agents.voice.io import PlaybackFinishedEvent

    event = PlaybackFinishedEvent(**json.loads(protocol.playback_finished_payload(1.25, True)))
    assert event.playback_position == 1.25 and event.interrupted is True
    with pytest.raises(ValueError):
        protocol.stream_format({"sample_rate": "16000"})
    assert AGENT  # the harness's agent identity is the order's


def test_an_agent_sessions_audio_path_says_and_is_interrupted_through_the_bridge():
    """livekit-agents' AgentSession with the sink as its audio output (what an avatar plugin sets up):
    `say()` with pre-synthesized audio plays through the bridge; `interrupt()` clears it."""
    from livekit.agents import Agent, AgentSession

    async def main():
        call = Call()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        session = AgentSession()
        session.output.audio = call.output  # set before start: the session uses it as its audio sink
        await session.start(agent=Agent(instructions="test"))

        async def audio(seconds: float):
            pcm = tone(seconds)
            for offset in range(0, pcm.shape[0], 4800):  # 200 ms TTS frames
                piece = pcm[offset : offset + 4800]
                yield rtc.AudioFrame(piece.tobytes(), 24000, 1, piece.shape[0])

        first = session.say("hello", audio=audio(2.0), add_to_chat_ctx=False)
        await asyncio.wait_for(first.wait_for_playout(), 10)
        second = session.say("and then", audio=audio(3.0), add_to_chat_ctx=False)
        await wait_until(lambda: len(call.started) == 2, 5)
        await asyncio.sleep(1.0)
        second.interrupt()
        await asyncio.wait_for(second.wait_for_playout(), 5)
        await session.aclose()
        await call.end()
        return call, first, second

    call, first, second = run_virtual(main)
    assert not first.interrupted and second.interrupted
    assert (round(call.finished[0].playback_position, 2), call.finished[0].interrupted) == (2.0, False)
    assert call.finished[1].interrupted and abs(call.finished[1].playback_position - 1.0) <= 0.04 + 1e-6
    assert call.session.stats.clears == 1 and len(call.finished) == 2
