"""The bridge session on the fake session backend, in the in-memory room, on a virtual clock:
pacing and AV alignment, the human's media in, jitter, the human leaving and returning, how a
session ends (and that it leaves nothing behind), a 10-minute call."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from livekit import rtc

from services.bridge.backend import FakeBackend, frame_marker
from services.bridge.memory_room import wait_until
from services.bridge.runner import BridgeSettings
from services.wire.errors import UnavailableError
from tests.bridge.harness import Call, Human, run_virtual, tone

FRAME = 0.04


def pcm(audio: rtc.AudioFrame) -> np.ndarray:
    return np.frombuffer(audio.data, np.int16)


def marker(video: rtc.VideoFrame) -> tuple[int, bool, bool]:
    return frame_marker(np.frombuffer(video.data, np.uint8).reshape(video.height, video.width, 3))


def assert_paced_and_aligned(call: Call) -> None:
    """Exactly 25 fps on a fixed grid; every frame carries exactly its own 640 samples."""
    published = call.published()
    times = np.array([t for t, *_ in published])
    assert np.allclose(np.diff(times), FRAME, atol=1e-9)  # no drift, no bursts
    assert [ts for _, ts, _, _ in published] == [n * 40_000 for n in range(len(published))]
    avatar = call.stream.avatar
    for _, _, video, audio in published:
        index = marker(video)[0]
        assert audio.samples_per_channel == 640 and audio.sample_rate == 16000
        expected = avatar[index * 640 : (index + 1) * 640]
        expected = np.pad(expected, (0, 640 - expected.shape[0]))
        assert np.array_equal(pcm(audio), expected), f"frame {index}: audio is not its own"


def test_published_media_is_paced_at_25_fps_with_each_frame_carrying_its_own_audio():
    async def main():
        call = Call()
        human = Human(call.server)
        await human.join()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        await call.say(tone(1.5))
        await asyncio.wait_for(call.output.wait_for_playout(), 5)
        await call.say(tone(0.7, freq=330))
        await asyncio.wait_for(call.output.wait_for_playout(), 5)
        await asyncio.sleep(0.5)
        await call.end()
        await human.leave()
        return call

    call = run_virtual(main)
    assert_paced_and_aligned(call)
    indices = [marker(v)[0] for _, _, v, _ in call.published()]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # in order, none held or lost
    speaking = [marker(v)[1] for _, _, v, _ in call.published()]
    # the avatar talks exactly while there is speech: each segment starts on a frame, 37.5 + 17.5 frames
    assert sum(speaking) == 38 + 18


def test_the_humans_camera_is_resampled_to_25_fps_and_the_microphone_to_16_khz():
    for fps in (30.0, 15.0):

        async def main(fps=fps):
            call = Call()
            human = Human(call.server, fps=fps)
            await human.join()
            await call.start()
            await asyncio.sleep(4.0)
            await call.end()
            await human.leave()
            return call

        call = run_virtual(main)
        stamps = np.array(call.stream.user_frame_stamps)
        assert len(stamps) >= 95  # ~4 s at 25 fps
        assert set(np.diff(stamps)) == {40_000}  # one frame per 40 ms slot, whatever the camera's rate
        assert call.stream.user_frame_shapes == {(48, 64, 3)}
        assert call.stream.user_audio_order_errors == 0
        # 48 kHz in, 16 kHz out: 4 s of microphone is ~64000 samples
        assert call.stream.user_audio_samples == pytest.approx(4.0 * 16000, rel=0.03)
        # the avatar reacted to the human's face: frames generated with the user's video
        assert any(marker(v)[2] for _, _, v, _ in call.published())


def test_face_lost_the_session_keeps_listening_to_audio_alone():
    async def main():
        call = Call()
        human = Human(call.server)
        await human.join()
        await call.start()
        await asyncio.sleep(2.0)
        human.camera_on = False  # the camera stops sending (face lost / camera muted)
        lost_at = asyncio.get_running_loop().time() - call.session._t0
        audio_before = call.stream.user_audio_samples
        await asyncio.sleep(3.0)
        audio_during = call.stream.user_audio_samples - audio_before
        human.camera_on = True
        await asyncio.sleep(1.0)
        await call.end()
        await human.leave()
        return call, lost_at, audio_during

    call, lost_at, audio_during = run_virtual(main)
    stamps = np.array(call.stream.user_frame_stamps) / 1e6
    during = stamps[(stamps > lost_at + 0.5 + FRAME) & (stamps < lost_at + 3.0)]
    assert during.size == 0  # no stale frames sent once the camera went quiet
    assert stamps.max() > lost_at + 3.0  # and video resumes
    assert audio_during == pytest.approx(3.0 * 16000, rel=0.03)  # audio went on alone
    assert_paced_and_aligned(call)  # the avatar's video never stopped


def test_jitter_and_late_blocks_are_absorbed_without_breaking_the_cadence():
    async def main(jitter):
        call = Call(backend=FakeBackend(jitter_s=jitter, seed=3), settings=BridgeSettings(prebuffer_frames=2))
        await call.start()
        await wait_until(lambda: call.published(), 5)
        await call.say(tone(2.0))
        await asyncio.wait_for(call.output.wait_for_playout(), 10)
        await asyncio.sleep(0.5)
        await call.end()
        return call

    small = run_virtual(lambda: main(0.07))
    assert small.session.publisher.stats.held == 0  # jitter under the 80 ms prebuffer: nothing held
    assert_paced_and_aligned(small)
    late = run_virtual(lambda: main(0.3))
    stats = late.session.publisher.stats
    assert stats.held > 0 and stats.dropped == 0
    times = np.array([t for t, *_ in late.published()])
    assert np.allclose(np.diff(times), FRAME, atol=1e-9)  # held frames keep the track at 25 fps
    indices = [marker(v)[0] for _, _, v, _ in late.published()]
    # late frames are still played, in order, none lost; a held frame repeats the one before
    assert [i for i, j in itertools.pairwise(indices) if j < i] == []
    assert sorted(set(indices)) == list(range(indices[0], indices[-1] + 1))
    assert len(indices) - len(set(indices)) == stats.held
    assert late.finished[-1].playback_position == pytest.approx(2.0, abs=1e-6)


def test_the_human_leaving_and_returning_keeps_the_session():
    async def main():
        call = Call(settings=BridgeSettings(human_grace_s=5.0))
        human = Human(call.server)
        await human.join()
        await call.start()
        await asyncio.sleep(2.0)
        await human.leave()
        left_at = asyncio.get_running_loop().time() - call.session._t0
        await asyncio.sleep(3.0)
        assert not call.task.done()
        back = Human(call.server)
        await back.join()
        await asyncio.sleep(2.0)
        await call.say(tone(0.4))
        await asyncio.wait_for(call.output.wait_for_playout(), 5)
        reason = await call.end()
        await back.leave()
        return call, left_at, reason

    call, left_at, reason = run_virtual(main)
    assert reason == "test_end" and call.session.stats.human_joins == 2
    stamps = np.array(call.stream.user_frame_stamps) / 1e6
    assert stamps[stamps > left_at + 3.0].size > 25  # the camera came back
    assert stamps[(stamps > left_at + 0.6) & (stamps < left_at + 3.0)].size == 0
    assert call.stream.user_audio_order_errors == 0  # the microphone resumed later on the timeline
    assert call.session.mic.resyncs >= 1
    assert_paced_and_aligned(call)


def test_the_human_not_returning_ends_the_session_after_the_grace_period():
    async def main():
        call = Call(settings=BridgeSettings(human_grace_s=3.0))
        human = Human(call.server)
        await human.join()
        await call.start()
        await asyncio.sleep(1.0)
        await human.leave()
        left = asyncio.get_running_loop().time()
        reason = await asyncio.wait_for(call.task, 10)
        return reason, asyncio.get_running_loop().time() - left

    reason, after = run_virtual(main)
    assert reason == "human_left" and after == pytest.approx(3.0, abs=0.05)


def _no_orphans(call: Call) -> None:
    names = [t.get_name() for t in asyncio.all_tasks()]
    assert not [n for n in names if n.startswith(("bridge-", "fake-stream-"))], names
    assert not call.session._tasks and not call.session.segments
    assert not call.bridge_room.isconnected()
    assert not call.bridge_room._byte_handlers and not call.bridge_room.local_participant._rpc_handlers
    assert not call.bridge_room._tracks  # the avatar's tracks were unpublished


@pytest.mark.parametrize("ending", ["room_closed", "agent_left", "session_ended", "session_failed", "stopped"])
def test_every_ending_is_clean_and_reports_unfinished_speech(ending):
    async def main():
        call = Call()
        human = Human(call.server)
        await human.join()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        await call.say(tone(3.0))
        await wait_until(lambda: call.started, 5)
        await asyncio.sleep(0.5)
        if ending == "room_closed":
            await call.server.close()
        elif ending == "agent_left":
            await call.agent_room.disconnect()
        elif ending == "session_ended":
            call.stream.stop()  # the gateway stopped the session: the stream ends with OK
        elif ending == "session_failed":
            call.stream.fail(UnavailableError("backend down"))
        else:
            call.session.stop("stopped")
        reason = await asyncio.wait_for(call.task, 10)
        await asyncio.sleep(0.1)
        _no_orphans(call)
        if human.room.isconnected():
            await human.leave()
        return call, reason

    call, reason = run_virtual(main)
    assert reason.startswith(ending)
    assert call.stream.closed
    # the segment in progress was reported exactly once, as interrupted
    assert [(i, x) for i, _, x in call.session.stats.finished] == [(0, True)]
    if ending in ("session_ended", "session_failed", "stopped"):  # the agent is still there to hear it
        assert len(call.finished) == 1 and call.finished[0].interrupted
        assert 0.4 < call.finished[0].playback_position < 1.0


def test_the_agent_never_joining_ends_the_session():
    async def main():
        call = Call(settings=BridgeSettings(agent_join_timeout_s=5.0))
        call.task = asyncio.create_task(call.session.run())  # no agent in the room
        return await asyncio.wait_for(call.task, 10)

    assert run_virtual(main) == "agent_never_joined"


def test_a_ten_minute_call_keeps_its_cadence_alignment_and_memory():
    minutes = 10

    async def main():
        call = Call()
        human = Human(call.server, fps=15.0)
        await human.join()
        await call.start()
        await wait_until(lambda: call.published(), 5)
        loop = asyncio.get_running_loop()
        publisher = call.session.publisher
        on_published, held_at = publisher.on_published, []

        def record_held(index):
            if index is None:
                held_at.append(loop.time())
            on_published(index)

        publisher.on_published = record_held
        segments = interrupted = 0
        end_at = loop.time() + minutes * 60
        while loop.time() < end_at - 20:
            await call.say(tone(4.0, freq=200 + segments % 7 * 40))
            segments += 1
            if segments % 3 == 0:  # every third turn the human barges in
                await asyncio.sleep(2.0)
                call.output.clear_buffer()
                interrupted += 1
            await asyncio.wait_for(call.output.wait_for_playout(), 10)
            await asyncio.sleep(6.0)  # the human talks; the avatar listens
        buffered_max = call.session.publisher.stats.max_buffered
        pending = len(call.session.segments)
        await asyncio.sleep(max(0.0, end_at - loop.time()))
        await call.end()
        await human.leave()
        return call, segments, interrupted, buffered_max, pending, held_at

    call, segments, interrupted, buffered_max, pending, held_at = run_virtual(main)
    published = call.published()
    times = np.array([t for t, *_ in published])
    assert len(published) == pytest.approx(minutes * 60 * 25, abs=30)
    assert times[-1] - times[0] == pytest.approx((len(times) - 1) * FRAME, abs=1e-6)  # no drift in 10 minutes
    assert call.session.publisher.stats.dropped == 0
    # the image is held only right after a clear (its talking frames dropped, the listening ones
    # not there yet), never for more than one block plus a tick
    clears = call.session.stats.clear_at
    block = call.stream.block
    assert len(clears) == interrupted and len(held_at) <= interrupted * (block + 1), len(held_at)
    assert all(any(0 <= t - c <= (block + 1) * FRAME + 1e-6 for c in clears) for t in held_at)
    assert len(call.finished) == segments  # exactly one report per segment
    assert sum(e.interrupted for e in call.finished) == interrupted
    assert [round(e.playback_position, 3) for e in call.finished if not e.interrupted] == [4.0] * (
        segments - interrupted
    )
    assert buffered_max <= 2 * call.stream.block and pending == 0  # nothing accumulates
    assert call.stream.user_audio_order_errors == 0
    assert len(call.stream.user_frame_stamps) == pytest.approx(minutes * 60 * 25, rel=0.01)
