"""Offline generation: portrait + avatar audio + user video -> an mp4 of the avatar.

The embedded default of the platform: the whole model in this process, no cluster.
Blocks flow through the same streaming engine the services use, and frames are
decoded and written as each block is done, so memory stays bounded for long clips.

Alignment: the avatar's audio sets the length (T = ceil(samples * 25 / 16000)
frames). The user's tracks are cut to T, or extended by repeating the last video
frame and by silence; the user's audio is `--user-audio`, else the user video's
own track, else silence.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar_forcing.config import SAMPLES_PER_FRAME
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.engine.portrait import PortraitEncoding, decode_frames, encode_portrait, encode_user_motion
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import VideoWriter, load_audio, load_image, read_video, side_by_side
from avatar_forcing.nn.audio_encoder import num_frames_for
from avatar_forcing.nn.model import AvatarForcing


@dataclass
class GenerationRequest:
    portrait: Path
    avatar_audio: Path
    user_video: Path
    out: Path
    user_audio: Path | None = None
    options: StreamOptions = field(default_factory=StreamOptions)
    seed: int = 0
    side_by_side: bool = False
    progress: bool = True


def fit_samples(samples: np.ndarray, length: int) -> np.ndarray:
    """Cut, or extend with silence, to exactly `length` samples."""
    return samples[:length] if samples.shape[0] >= length else np.pad(samples, (0, length - samples.shape[0]))


def fit_frames(frames: np.ndarray, length: int) -> np.ndarray:
    """Cut, or extend by repeating the last frame, to exactly `length` frames."""
    if frames.shape[0] >= length:
        return frames[:length]
    return np.concatenate([frames, np.repeat(frames[-1:], length - frames.shape[0], axis=0)])


@torch.no_grad()
def generate_blocks(
    model: AvatarForcing,
    portrait: PortraitEncoding,
    avatar_audio: np.ndarray,
    user_wave: np.ndarray,
    user_crops: np.ndarray,
    options: StreamOptions,
    seed: int = 0,
    use_user_motion: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """The avatar's frames, block by block: (index of the block's first frame, uint8 (n, S, S, 3)).

    avatar_audio sets the length T; user_wave must hold T * 640 samples and user_crops T face
    crops of the model's image size (`fit_samples`, `fit_frames`). `use_user_motion=False` gives
    the network zero user motion (a model trained without it: the ablation's variant (a)).
    """
    T = num_frames_for(avatar_audio.shape[0])
    encoder = model.audio_encoder
    avatar_features = encoder.encode_clip(avatar_audio)  # whole clip at once, as the release does
    # Silence has zero variance; normalising it would divide by ~0, so silent user audio stays zero.
    user_features = (
        encoder.encode_clip(user_wave) if np.abs(user_wave).max(initial=0) > 0 else torch.zeros_like(avatar_features)
    )
    user_motion = encode_user_motion(model.motion_autoencoder, user_crops)
    if not use_user_motion:
        user_motion = torch.zeros_like(user_motion)

    stream = MotionStream(model.block_sampler(), portrait.reference_motion, options, seed=seed)
    stream.push(avatar_features.float().cpu(), user_features[:T].float().cpu(), user_motion)
    stream.finish()
    while (block_request := stream.next_request()) is not None:
        block = stream.accept(stream.sampler.run([block_request], options.block)[0])
        if block is not None:
            yield block.frame_index, decode_frames(model.motion_autoencoder, portrait, block.latents)


@torch.no_grad()
def generate_video(model: AvatarForcing, request: GenerationRequest) -> int:
    """Write the video; returns the number of frames written."""
    cropper = FaceCropper.for_model(model.config.motion_autoencoder)
    portrait = encode_portrait(
        model.motion_autoencoder, cropper.crop_portrait(load_image(request.portrait), str(request.portrait))
    )

    avatar_audio = load_audio(request.avatar_audio, model.config.sample_rate)
    if avatar_audio.size == 0:
        raise ValueError(f"avatar audio {request.avatar_audio}: no samples")
    T = num_frames_for(avatar_audio.shape[0])
    clip = read_video(request.user_video, model.config.fps)
    user_wave = load_audio(request.user_audio, model.config.sample_rate) if request.user_audio else clip.audio
    if user_wave is None:
        user_wave = np.zeros(0, np.float32)
    user_wave = fit_samples(user_wave, T * SAMPLES_PER_FRAME)
    user_crops = fit_frames(cropper.crop_video(clip.frames, str(request.user_video)), T)
    user_raw = fit_frames(clip.frames, T) if request.side_by_side else None

    written = 0
    bar = tqdm(total=T, unit="frame", desc="generating", disable=not request.progress, file=sys.stderr)
    blocks = generate_blocks(model, portrait, avatar_audio, user_wave, user_crops, request.options, request.seed)
    with VideoWriter(
        request.out, fps=model.config.fps, audio=avatar_audio, sample_rate=model.config.sample_rate
    ) as writer:
        for frame_index, frames in blocks:
            for i, frame in enumerate(frames):
                if user_raw is not None:
                    frame = side_by_side(frame, user_raw[frame_index + i])
                writer.write(frame)
            written += len(frames)
            bar.update(len(frames))
    bar.close()
    return written
