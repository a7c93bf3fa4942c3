"""The media a client sent in a session, checked and placed on the session timeline.

Frame i covers the samples [640 i, 640 (i+1)) of every audio source and the camera frame
nearest i * 40 ms. The media horizon is how far the user's (real-time) media has arrived, or
the avatar audio's when no user media comes at all; gaps are silence, missing camera frames
repeat the previous one. A bad message raises `ValidationError` naming the field; the
pipeline answers it in the stream and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME
from services.common.telemetry import metrics
from services.ingress.timeline import AudioTimeline
from services.wire.errors import ValidationError
from services.wire.images import check_side, decode_image
from services.wire.protos import Limit, pb

__all__ = ["FRAME_US", "MediaState", "decode_camera_image"]

FRAME_US = 1_000_000 // Limit.FPS


@dataclass
class MediaState:
    """Audio timelines, camera frames not yet used, and the cursors of a session's input."""

    video_grace_frames: int = 5  # how far the camera may lag the microphone before its frames are held
    avatar: AudioTimeline = field(default_factory=lambda: AudioTimeline("AVATAR"))
    user: AudioTimeline = field(default_factory=lambda: AudioTimeline("USER"))
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    last_frame: np.ndarray | None = None
    user_media_seen: bool = False
    ended: bool = False
    next_block_frame: int = 0  # first frame of the next block to prepare
    video_end: int = 0  # samples covered by camera frames received so far (kept after frames are used)
    # The next block is scheduled at once, from the media that has arrived, instead of waiting for
    # its last frame (set by an Interrupt that asks for it, cleared when that block is scheduled).
    prompt: bool = False

    def on_audio(self, chunk: pb.AudioChunk) -> None:
        if chunk.sample_rate != Limit.SAMPLE_RATE:
            raise ValidationError("audio.sample_rate", f"got {chunk.sample_rate}; expected {Limit.SAMPLE_RATE}")
        if chunk.source not in (pb.AVATAR, pb.USER):
            raise ValidationError("audio.source", "expected AVATAR or USER")
        if chunk.timestamp_us < 0:
            raise ValidationError("audio.timestamp_us", f"got {chunk.timestamp_us}; expected >= 0")
        data = chunk.pcm_s16le
        if not data or len(data) % 2 or len(data) // 2 > Limit.MAX_AUDIO_CHUNK_SAMPLES:
            raise ValidationError(
                "audio.pcm_s16le", f"{len(data)} bytes; expected 2 to {2 * Limit.MAX_AUDIO_CHUNK_SAMPLES}, even"
            )
        timeline = self.avatar if chunk.source == pb.AVATAR else self.user
        if chunk.source == pb.AVATAR:
            ahead = chunk.timestamp_us // 1000 - self.next_block_frame * FRAME_US // 1000
            if ahead > Limit.MAX_BUFFERED_AUDIO_MS:
                raise ValidationError(
                    "audio.timestamp_us",
                    f"{ahead} ms ahead of generation; at most {Limit.MAX_BUFFERED_AUDIO_MS} ms may be buffered",
                )
        else:
            self.user_media_seen = True
        timeline.write(chunk.timestamp_us, np.frombuffer(data, "<i2").astype(np.int16))

    def on_video(self, video: pb.VideoFrame) -> None:
        if video.timestamp_us < 0:
            raise ValidationError("video.timestamp_us", f"got {video.timestamp_us}; expected >= 0")
        index = (video.timestamp_us + FRAME_US // 2) // FRAME_US
        if index < self.next_block_frame:
            metrics().count_dropped("late_video")
            return  # older than the generation cursor: dropped, as the contract says
        self.frames[index] = decode_camera_image(video.image, "video.image")
        self.video_end = max(self.video_end, (index + 1) * SAMPLES_PER_FRAME)
        self.user_media_seen = True

    def on_interrupt(self, prompt: bool = False) -> pb.Interrupted:
        """The avatar stops speaking: its audio after the generation cursor is dropped. With `prompt`,
        the block at the cursor is scheduled at once (`schedule.next_block`)."""
        frame = self.next_block_frame
        self.avatar.truncate(frame * SAMPLES_PER_FRAME)
        self.prompt = self.prompt or (prompt and not self.ended)
        return pb.Interrupted(frame_index=frame)

    def horizon(self) -> int:
        """Samples of the timeline that have arrived (the real-time media's, see the module doc).

        With both a microphone and a camera, a block waits for both, but never more than
        `video_grace_frames` for a lagging or stalled camera (its frames are then held).
        """
        if not self.user_media_seen:
            return self.avatar.end
        video_end = (max(self.frames) + 1) * SAMPLES_PER_FRAME if self.frames else 0
        video_end = max(video_end, self.video_end)
        if self.user.end == 0:
            return video_end
        if video_end == 0:
            return self.user.end
        grace = self.video_grace_frames * SAMPLES_PER_FRAME
        return min(self.user.end, max(video_end, self.user.end - grace))

    def take_frames(self, first: int, frames: int) -> np.ndarray | None:
        """The camera frames of [first, first + frames), held across gaps; None before the first one."""
        images = []
        for index in range(first, first + frames):
            frame = self.frames.pop(index, None)
            if frame is not None:
                self.last_frame = frame
            if self.last_frame is None:
                for later in range(index + 1, first + frames):  # behind the cursor from now on: never used
                    self.frames.pop(later, None)
                return None
            images.append(self.last_frame)
        return np.stack(images)


def decode_camera_image(image: pb.Image, field: str) -> np.ndarray:
    """A camera `Image` as uint8 RGB (H, W, 3). RAW_RGB is the ingress's own format; JPEG and PNG bytes
    go to the shared validator, which checks size, format and the sides their header declares before
    decoding anything (a small file may declare a huge image)."""
    if image.format == pb.RAW_RGB:
        w, h = image.width, image.height
        check_side(f"{field}.width/height", w, h)
        if len(image.data) != w * h * 3:
            raise ValidationError(f"{field}.data", f"{len(image.data)} bytes; expected width*height*3 = {w * h * 3}")
        return np.frombuffer(image.data, np.uint8).reshape(h, w, 3).copy()
    if image.format in (pb.JPEG, pb.PNG):
        return decode_image(image.data, f"{field}.data")
    raise ValidationError(f"{field}.format", "expected RAW_RGB, JPEG or PNG")
