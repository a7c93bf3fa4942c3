"""Conversations -> shards of motion latents and audio features (`avatar-forcing prepare`).

Per conversation of the manifest (`manifest.py`):
1. read both videos at 25 fps and both voices at 16 kHz (`avatar_forcing.media.io`); the
   conversation is as long as the shortest of the four;
2. detect the face on every `detect_every`-th frame of each side (`FaceCropper.detect`); a
   frame counts where both sides have a face; gaps up to `max_gap` frames are bridged and
   longer ones split the conversation into clips (`clips.py`); clips shorter than `min_frames`
   are dropped and counted;
3. per clip: crop each side along its smoothed face track (`FaceCropper.crop_video`, the
   model's image size), encode the crops to motion latents (`encode_user_motion`, the same
   encoder for both sides), encode the clip's first avatar crop to the identity latent s_r and
   reference motion r_s (`encode_portrait`), and each side's voice to per-frame audio features
   (the audio encoder, bidirectional over the clip as the release encodes a file);
4. write the conversation's clips as one shard and append a ledger line (`shards.py`).

A conversation that fails (unreadable or missing file, ...) is reported, recorded as failed
and retried on the next run; the others go on. A finished conversation is skipped on the next
run, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from avatar_forcing.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar_forcing.engine.portrait import encode_portrait, encode_user_motion
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import load_audio, read_video
from avatar_forcing.nn.audio_encoder import AudioEncoder, num_frames_for
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from avatar_forcing.training.data import shards
from avatar_forcing.training.data.clips import plan_clips
from avatar_forcing.training.data.manifest import Conversation, read_manifest


@dataclass(frozen=True)
class PrepareOptions:
    """min_frames: shortest clip kept; 50 = one training window (2 s at 25 fps).
    max_gap: longest face-detection gap (frames) bridged inside a clip; 5 = 0.2 s, enough for
        a blink-length miss of the Haar detector, short enough that a lost face splits.
    max_frames: longest clip; longer stretches are cut (bounds the memory of a clip's crops,
        T x S x S x 3 bytes per side, and the audio encoder's attention); 750 = 30 s. 0 = no limit.
    detect_every: run the detector on every k-th frame for the presence test (k > 1 is faster;
        a frame takes the result of the last detected frame).
    batch_size: face crops per motion-encoder call.
    """

    min_frames: int = 50
    max_gap: int = 5
    max_frames: int = 750
    detect_every: int = 1
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("min_frames", 1), ("max_gap", 0), ("max_frames", 0), ("detect_every", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.max_frames and self.max_frames < self.min_frames:
            raise ValueError(f"max_frames: expected 0 or >= min_frames = {self.min_frames}, got {self.max_frames}")


@dataclass
class Encoders:
    """The frozen networks the data is encoded with."""

    motion_autoencoder: MotionAutoEncoder
    audio_encoder: AudioEncoder
    cropper: FaceCropper
    weights: str  # what the latents were made with (a weights folder, or "random-init:<preset>")

    @classmethod
    def from_model(cls, model, weights: str, detect_every: int = 1) -> Encoders:
        """From a loaded `AvatarForcing` (only its auto-encoder and audio encoder are used).
        `detect_every`: the crop track's detector runs on every k-th frame, interpolated between."""
        mae = model.motion_autoencoder.eval()
        cropper = FaceCropper.for_model(mae.config, detect_every=detect_every)
        return cls(mae, model.audio_encoder.eval(), cropper, weights)

    def settings(self, options: PrepareOptions) -> dict:
        mae = self.motion_autoencoder.config
        return {
            "format": shards.FORMAT,
            "version": shards.VERSION,
            "weights": self.weights,
            # the weights' content, not just their folder: a resume after the auto-encoder was
            # retrained or rescaled in place would otherwise mix latents of two encoders
            "encoders_sha256": encoders_digest(self.motion_autoencoder, self.audio_encoder),
            "image_size": mae.image_size,
            "motion_dim": mae.style_dim,
            "audio_dim": self.audio_encoder.audio_projection[0].out_features,
            "fps": FPS,
            "sample_rate": SAMPLE_RATE,
            "crop_scale": self.cropper.scale,
            "crop_lift": self.cropper.lift,
            "min_frames": options.min_frames,
            "max_gap": options.max_gap,
            "max_frames": options.max_frames,
            "detect_every": options.detect_every,
        }


def encoders_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the modules' parameters and buffers, names included."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class MediaError(ValueError):
    """A conversation's media file could not be read; names the conversation, field and file."""


def _read(conv: Conversation, field: str, reader: Callable):
    path = getattr(conv, field)
    try:
        return reader(path)
    except Exception as exc:  # PyAV, OpenCV and the OS each raise their own types
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise MediaError(f"conversation {conv.id!r}: {field}: {message}") from exc


def face_presence(
    cropper: FaceCropper, frames: np.ndarray, detect_every: int, label: str, progress: bool
) -> np.ndarray:
    """(T, H, W, 3) -> (T,) bool: a face was detected (frames between detections take the last result)."""
    present = np.zeros(frames.shape[0], bool)
    indices = range(0, frames.shape[0], detect_every)
    for index in tqdm(indices, desc=label, unit="frame", leave=False, disable=not progress):
        present[index : index + detect_every] = bool(cropper.detect(frames[index]))
    return present


def _motion_latents(mae: MotionAutoEncoder, crops: np.ndarray, batch_size: int) -> np.ndarray:
    """(T, S, S, 3) crops -> (T, D) motion latents, `batch_size` crops at a time (bounded memory)."""
    parts = [encode_user_motion(mae, crops[i : i + batch_size], batch_size) for i in range(0, len(crops), batch_size)]
    return torch.cat(parts).numpy()


@torch.no_grad()
def _audio_features(encoder: AudioEncoder, audio: np.ndarray, start: int, end: int) -> np.ndarray:
    """Frames [start, end) of a 16 kHz voice -> (end - start, A) features."""
    wave = torch.from_numpy(audio[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME].copy())
    param = encoder.audio_projection[0].weight
    return encoder(wave[None].to(param.device), end - start)[0].float().cpu().numpy()


def prepare_conversation(
    conv: Conversation, encoders: Encoders, options: PrepareOptions
) -> tuple[list[shards.Clip], shards.LedgerEntry]:
    """One conversation -> its clips and ledger entry. MediaError when a file cannot be read."""
    avatar_frames = _read(conv, "avatar_video", read_video).frames
    user_frames = _read(conv, "user_video", read_video).frames
    avatar_audio = _read(conv, "avatar_audio", load_audio)
    user_audio = _read(conv, "user_audio", load_audio)
    length = min(
        avatar_frames.shape[0],
        user_frames.shape[0],
        num_frames_for(avatar_audio.shape[0]),
        num_frames_for(user_audio.shape[0]),
    )
    entry = shards.LedgerEntry(id=conv.id, status="done", frames=length)
    if length == 0:
        return [], entry

    cropper = encoders.cropper
    present = np.ones(length, bool)
    for side, frames in (("avatar", avatar_frames), ("user", user_frames)):
        present &= face_presence(
            cropper, frames[:length], options.detect_every, f"{conv.id} {side} faces", options.progress
        )
    plan = plan_clips(present, options.min_frames, options.max_gap, options.max_frames)
    entry.dropped_clips, entry.dropped_frames = len(plan.dropped), plan.dropped_frames
    entry.no_face_frames = length - sum(e - s for s, e in plan.kept) - plan.dropped_frames

    mae = encoders.motion_autoencoder
    clips = []
    for start, end in plan.kept:
        span = f"frames {start}-{end - 1}"
        avatar_crops = cropper.crop_video(avatar_frames[start:end], f"{conv.avatar_video} {span}")
        user_crops = cropper.crop_video(user_frames[start:end], f"{conv.user_video} {span}")
        portrait = encode_portrait(mae, avatar_crops[0])
        clips.append(
            shards.Clip(
                avatar_motion=_motion_latents(mae, avatar_crops, options.batch_size),
                user_motion=_motion_latents(mae, user_crops, options.batch_size),
                avatar_audio=_audio_features(encoders.audio_encoder, avatar_audio, start, end),
                user_audio=_audio_features(encoders.audio_encoder, user_audio, start, end),
                identity=portrait.identity[0].float().cpu().numpy(),
                reference_motion=portrait.reference_motion.numpy(),
                conversation=conv.id,
                start_frame=start,
                reference_frame=start,
            )
        )
    entry.clips, entry.clip_frames = len(clips), sum(c.num_frames for c in clips)
    return clips, entry


def prepare(
    manifest: str | Path,
    out: str | Path,
    encoders: Encoders,
    options: PrepareOptions | None = None,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict:
    """Prepare every conversation of `manifest` not yet done in `out`; returns the index.

    Each failure is passed to `report` (stderr by default) and recorded in the ledger.
    """
    options = options or PrepareOptions()
    conversations = read_manifest(manifest)
    root = Path(out)
    (root / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    settings = encoders.settings(options)
    shards.check_settings(root, settings)
    ledger = shards.read_ledger(root)
    todo = [c for c in conversations if ledger.get(c.id) is None or ledger[c.id].status != "done"]
    skipped = len(conversations) - len(todo)
    if skipped:
        report(f"resuming: {skipped} of {len(conversations)} conversations already done")

    bar = tqdm(todo, desc="conversations", unit="conv", disable=not options.progress)
    for conv in bar:
        bar.set_postfix_str(conv.id)
        try:
            clips, entry = prepare_conversation(conv, encoders, options)
            if clips:
                entry.shard = shards.shard_name(conv.id)
                shards.write_shard(root / shards.SHARD_DIR / entry.shard, conv.id, clips)
        except Exception as exc:  # one bad conversation must not stop the others
            message = (
                str(exc) if isinstance(exc, MediaError) else f"conversation {conv.id!r}: {type(exc).__name__}: {exc}"
            )
            report(f"failed: {message}")
            entry = shards.LedgerEntry(id=conv.id, status="failed", error=message)
        shards.append_ledger(root, entry)
        ledger[conv.id] = entry
    return shards.write_index(root, settings, ledger, [c.id for c in conversations])
