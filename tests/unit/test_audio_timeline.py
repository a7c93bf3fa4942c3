"""The bounded audio timeline: placement by timestamp, silence in gaps, a moving start, O(chunk) writes."""

from __future__ import annotations

import numpy as np
import pytest

from services.ingress.timeline import AudioTimeline, AudioWindowError
from services.wire.errors import ValidationError

US_PER_SAMPLE = 1_000_000 // 16_000  # 62.5 us is not an integer: timestamps below are multiples of 1 ms


def us(sample: int) -> int:
    """The timestamp of `sample` (a multiple of 16, i.e. of 1 ms)."""
    assert sample % 16 == 0
    return sample // 16 * 1000


def pcm(start: int, stop: int) -> np.ndarray:
    """A signal whose every sample differs from its neighbours: misplaced samples show."""
    return (np.arange(start, stop) % 30_011 - 15_000).astype(np.int16)


def test_chunks_land_at_their_timestamps_gaps_and_the_future_are_silence():
    timeline = AudioTimeline("USER")
    timeline.write(0, pcm(0, 320))
    timeline.write(us(640), pcm(640, 960))  # a 20 ms gap
    assert timeline.end == 960
    got = timeline.read(0, 1280)
    np.testing.assert_array_equal(got[:320], pcm(0, 320))
    assert not got[320:640].any()
    np.testing.assert_array_equal(got[640:960], pcm(640, 960))
    assert not got[960:].any() and got.dtype == np.int16
    assert timeline.read(5, 5).shape == (0,)


def test_an_overlapping_chunk_is_refused_with_the_field_and_what_was_received():
    timeline = AudioTimeline("AVATAR")
    timeline.write(0, pcm(0, 640))
    with pytest.raises(ValidationError, match=r"audio\(AVATAR\)\.timestamp_us.*overlaps audio already received up to"):
        timeline.write(us(320), pcm(320, 960))
    assert timeline.end == 640


def test_released_samples_cannot_be_read_and_the_rest_is_intact():
    timeline = AudioTimeline("USER")
    timeline.write(0, pcm(0, 16_000))
    timeline.release(6_400)
    assert (timeline.start, timeline.kept) == (6_400, 9_600)
    np.testing.assert_array_equal(timeline.read(6_400, 16_000), pcm(6_400, 16_000))
    with pytest.raises(AudioWindowError, match=r"audio\(USER\): samples \[6399, 7000\).*only samples from 6400 on"):
        timeline.read(6_399, 7_000)
    timeline.release(100)  # never backwards
    assert timeline.start == 6_400


def test_a_read_returns_a_copy_that_later_writes_do_not_change():
    timeline = AudioTimeline("USER", capacity=1_024)
    timeline.write(0, pcm(0, 512))
    window = timeline.read(0, 512)
    for start in range(512, 20_000, 496):  # enough to move and grow the buffer
        timeline.write(us(start), pcm(start, start + 496))
        timeline.release(start - 256)
    np.testing.assert_array_equal(window, pcm(0, 512))


def test_releasing_past_the_end_stores_only_what_lies_after_it():
    timeline = AudioTimeline("USER")
    timeline.write(0, pcm(0, 640))
    timeline.release(48_000)  # the camera drove the horizon 3 s ahead of a silent microphone
    assert (timeline.kept, timeline.end) == (0, 640)
    timeline.write(us(47_680), pcm(47_680, 48_320))  # straddles the start: only its tail is kept
    assert (timeline.start, timeline.end, timeline.kept) == (48_000, 48_320, 320)
    np.testing.assert_array_equal(timeline.read(48_000, 48_320), pcm(48_000, 48_320))
    timeline.write(us(96_000), pcm(96_000, 96_640))  # a gap after the start: silence, stored
    assert not timeline.read(48_320, 96_000).any()


def test_truncate_drops_the_tail_and_writes_may_resume_there():
    timeline = AudioTimeline("AVATAR")
    timeline.write(0, pcm(0, 16_000))
    timeline.truncate(6_400)  # an interrupt at frame 10
    assert timeline.end == 6_400
    assert not timeline.read(6_400, 16_000).any()
    timeline.write(us(6_400), pcm(0, 640))  # new speech from the cursor
    np.testing.assert_array_equal(timeline.read(6_400, 7_040), pcm(0, 640))


def test_random_writes_releases_and_truncations_read_like_the_whole_session_kept():
    """Against the unbounded model (one array of the whole session): every read inside the kept window agrees."""
    rng = np.random.default_rng(3)
    timeline = AudioTimeline("USER", capacity=64)
    model = np.zeros(0, np.int16)
    for _ in range(3_000):
        op = rng.random()
        if op < 0.7:
            start = -(-timeline.end // 16) * 16  # the next whole millisecond
            if rng.random() < 0.3:
                start += 16 * int(rng.integers(1, 200))  # a gap
            chunk = pcm(start, start + int(rng.integers(1, 2_000)))
            timeline.write(us(start), chunk)
            model = np.concatenate([model, np.zeros(start - model.shape[0], np.int16), chunk])
        elif op < 0.9:
            timeline.release(timeline.start + int(rng.integers(0, 3_000)))
        elif op < 0.95:
            cut = timeline.end - int(rng.integers(0, 500))
            timeline.truncate(cut)
            model = model[: max(0, cut)]
        else:
            continue
        assert timeline.end == model.shape[0]
        lo = int(rng.integers(timeline.start, max(timeline.start, timeline.end) + 1))
        hi = lo + int(rng.integers(0, 3_000))
        expected = np.pad(model[lo:hi], (0, hi - lo - model[lo:hi].shape[0]))
        np.testing.assert_array_equal(timeline.read(lo, hi), expected)


def test_an_hour_of_20_ms_chunks_moves_less_than_it_writes_in_a_buffer_that_stops_growing():
    """What an ingress does: write each chunk, release all but the last 4.4 s (left context + a block)."""
    timeline = AudioTimeline("USER")
    chunk, window = 320, 70_400
    chunks = 3_600 * 16_000 // chunk
    signal = pcm(0, chunk)
    capacity_after_a_minute = None
    for i in range(chunks):
        timeline.write(us(i * chunk), signal)
        timeline.release((i + 1) * chunk - window)
        if i == 60 * 50:
            capacity_after_a_minute = timeline.capacity
    written = chunks * chunk
    assert timeline.kept == window
    assert timeline.capacity == capacity_after_a_minute <= 4 * window
    assert timeline.samples_moved <= written  # amortised: at most one sample moved per sample written
    np.testing.assert_array_equal(timeline.read(written - chunk, written), signal)
