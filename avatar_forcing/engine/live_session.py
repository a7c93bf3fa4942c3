"""In-process live session: raw media in, avatar frames out, one block at a time.

The embedded counterpart of the distributed service: the avatar's audio, the user's
audio and the user's camera frames arrive in any chunk sizes; each audio stream goes
through the bounded-window streaming encoder, each camera frame through the face
tracker and the motion encoder, and the motion stream emits blocks as soon as all
three condition streams cover them. The state (audio buffers, face box, motion
stream) serialises to bytes and resumes in another process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avatar_forcing.config import SAMPLE_RATE
from avatar_forcing.engine.motion_stream import STREAMS, MotionStream, StreamOptions
from avatar_forcing.engine.portrait import PortraitEncoding, decode_frames, encode_portrait, encode_user_motion
from avatar_forcing.engine.streaming_audio import DEFAULT_LEFT_CONTEXT_S, StreamingAudioFeatures
from avatar_forcing.media.face_crop import FaceCropper, FaceTrack
from avatar_forcing.nn.model import AvatarForcing


@dataclass
class AvatarFrames:
    frame_index: int  # session frame index of frames[0]
    latents: Tensor  # (n, 512)
    frames: np.ndarray  # (n, S, S, 3) uint8


class LiveSession:
    def __init__(
        self,
        model: AvatarForcing,
        portrait_crop: np.ndarray,
        options: StreamOptions | None = None,
        seed: int = 0,
        audio_left_context_s: float = DEFAULT_LEFT_CONTEXT_S,
    ) -> None:
        self.model = model
        options = options or StreamOptions()
        self.portrait: PortraitEncoding = encode_portrait(model.motion_autoencoder, portrait_crop)
        # The motion stream consumes whole blocks, so encoding audio one block at a time adds
        # no latency and runs the encoder `block` times less often than frame by frame.
        self.audio = {
            name: StreamingAudioFeatures(
                model.audio_encoder, left_context_s=audio_left_context_s, hop_frames=options.block
            )
            for name in ("avatar_audio", "user_audio")
        }
        self.user_face = FaceTrack(FaceCropper.for_model(model.config.motion_autoencoder))
        self.motion = MotionStream(model.block_sampler(), self.portrait.reference_motion, options, seed)

    # -- input ---------------------------------------------------------------------------

    def push_avatar_audio(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        self.motion.push(avatar_audio=self.audio["avatar_audio"].push(samples, sample_rate))

    def push_user_audio(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        self.motion.push(user_audio=self.audio["user_audio"].push(samples, sample_rate))

    def push_user_frames(self, frames: np.ndarray, source: str = "user camera") -> None:
        """Camera frames (n, H, W, 3) uint8 at the session's frame rate."""
        if not isinstance(frames, np.ndarray) or frames.ndim != 4:
            raise ValueError(
                f"user frames: expected a uint8 array (n, H, W, 3), got {getattr(frames, 'shape', frames)}"
            )
        crops = self.user_face.crops(frames, source)
        if len(crops):
            self.motion.push(user_motion=encode_user_motion(self.model.motion_autoencoder, crops))

    def finish(self) -> None:
        """End of input: flush the audio encoders and extend shorter streams by their last frame."""
        self.motion.push(avatar_audio=self.audio["avatar_audio"].flush())
        self.motion.push(user_audio=self.audio["user_audio"].flush())
        lengths = {name: self.motion.inputs[name].shape[0] for name in STREAMS}
        longest = max(lengths.values())
        for name, length in lengths.items():
            if 0 < length < longest:
                self.motion.push(**{name: self.motion.inputs[name][-1:].expand(longest - length, -1)})
            elif length == 0:
                self.motion.push(**{name: torch.zeros(longest, self.motion.config.motion_dim)})  # never heard
        self.motion.finish()

    # -- output --------------------------------------------------------------------------

    def pull(self) -> list[AvatarFrames]:
        out = []
        for block in self.motion.pull():
            frames = decode_frames(self.model.motion_autoencoder, self.portrait, block.latents)
            out.append(AvatarFrames(block.frame_index, block.latents, frames))
        return out

    # -- state ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        state = {
            "motion": torch.frombuffer(bytearray(self.motion.to_bytes()), dtype=torch.uint8),
            "audio": {name: stream.state_dict() for name, stream in self.audio.items()},
            "user_face": self.user_face.state(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Continue a session saved by `to_bytes` (same model and portrait)."""
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
            motion = bytes(state["motion"].numpy().tobytes())
        except Exception as exc:
            raise ValueError(f"live session state: not a valid state blob ({exc})") from exc
        self.motion = MotionStream.from_bytes(self.model.block_sampler(), motion)
        for name, stream in self.audio.items():
            stream.load_state_dict(state["audio"][name])
        self.user_face.load_state(state["user_face"])
