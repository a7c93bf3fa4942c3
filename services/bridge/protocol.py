"""livekit-agents' avatar protocol (livekit/agents/voice/avatar/_datastream_io.py, 1.8.9): the
names are the wire contract, so they are spelled here once.

Agent -> avatar: one byte stream per speech segment on topic `AUDIO_STREAM_TOPIC`, attributes
`sample_rate` / `num_channels`, raw interleaved int16 little-endian PCM, sent faster than real
time; closing the stream ends the segment. RPC `RPC_CLEAR_BUFFER` (payload "") interrupts.
Avatar -> agent: RPC `RPC_PLAYBACK_STARTED` (payload "") and `RPC_PLAYBACK_FINISHED` with the
JSON of the agent's `PlaybackFinishedEvent`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from services.wire.errors import ValidationError

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"  # livekit-agents' ATTRIBUTE_PUBLISH_ON_BEHALF
STREAM_IDLE_TIMEOUT_S = 10.0  # a segment with no chunk for this long lost its trailer: end it
RPC_RETRIES = 3
RPC_RETRY_DELAY_S = 0.1


def playback_finished_payload(playback_position: float, interrupted: bool) -> str:
    """The payload the agent parses with `PlaybackFinishedEvent(**json.loads(payload))`."""
    return json.dumps(
        {
            "playback_position": float(playback_position),
            "interrupted": bool(interrupted),
            "synchronized_transcript": None,
        }
    )


def stream_format(attributes: Mapping[str, str] | None) -> tuple[int, int]:
    """(sample_rate, num_channels) of an audio byte stream, from its attributes."""
    attributes = attributes or {}
    try:
        sample_rate = int(attributes["sample_rate"])
        channels = int(attributes["num_channels"])
    except (KeyError, ValueError):
        raise ValidationError(
            "lk.audio_stream attributes",
            f"got {dict(attributes)!r}; expected integer 'sample_rate' and 'num_channels'",
        ) from None
    if not 8000 <= sample_rate <= 192_000 or not 1 <= channels <= 8:
        raise ValidationError(
            "lk.audio_stream attributes", f"got sample_rate={sample_rate}, num_channels={channels}; out of range"
        )
    return sample_rate, channels
