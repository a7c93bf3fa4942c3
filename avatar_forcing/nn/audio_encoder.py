"""Audio encoder: wav2vec2 features at the video frame rate, `docs/model-spec.md` §2.

    waveform (B, N) float32, 16 kHz
      └─ normalise per clip (zero mean, unit variance, like Wav2Vec2FeatureExtractor)
      └─ replicate-pad the end to T * 640 samples
      └─ wav2vec2.feature_extractor (conv stack) ──► (B, C, F)        ~50 Hz, F = 2T - 1
      └─ linear interpolation along time, align_corners=True ──► (B, C, T)   25 Hz
      └─ wav2vec2.feature_projection ──► (B, T, H)
      └─ wav2vec2.encoder: pos-conv + LayerNorm (hidden_states[0]), then L layers
      └─ hidden_states[1:] stacked layer-major ──► (B, T, L*H)        9216 for wav2vec2-base
      └─ audio_projection: Linear(L*H -> 512), LayerNorm, SiLU ──► (B, T, 512)

The interpolation sits *inside* the network, between the conv stack and the projection,
so the transformer runs at 25 Hz. `wav2vec2` is a stock `transformers.Wav2Vec2Model`
(frozen, always in eval mode); we call its pieces in the order above because its own
`forward` has no hook for the interpolation. Parameter names are the transformers ones
under `audio_encoder.wav2vec2.`, and `audio_encoder.audio_projection.{0,1}.*` as in the
released `flow_transformer.pth`.

With T * 640 samples the conv stack (receptive field 400, stride 320) yields F = 2T - 1
frames, and align_corners=True maps video frame t exactly onto conv frame 2t (samples
[640t, 640t + 400)): the interpolation is then a plain every-other-frame pick.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from avatar_forcing.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioConfig

logger = logging.getLogger(__name__)

NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor's variance epsilon
PROJECTION_LN_EPS = 1e-5

# -----------------------------------------------------------------------------
# input validation (also used by the services)


def validate_waveform(
    wave: Tensor | np.ndarray, *, sample_rate: int, name: str, ndim: int | tuple[int, ...] = 1
) -> None:
    """Raise ValueError naming `name` unless `wave` is a finite, non-empty float waveform at 16 kHz.

    `ndim` is the accepted number of dimensions: 1 for one mono clip (N,), 2 for a batch (B, N).
    Checking that several tracks have matching lengths is the caller's business.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"{name}: sample rate {sample_rate} Hz; expected {SAMPLE_RATE} Hz (resample first)")
    if isinstance(wave, np.ndarray):
        is_float = np.issubdtype(wave.dtype, np.floating)
    elif isinstance(wave, Tensor):
        is_float = wave.is_floating_point()
    else:
        raise ValueError(f"{name}: got {type(wave).__name__}; expected a float numpy array or torch tensor")
    if not is_float:
        raise ValueError(f"{name}: dtype {wave.dtype}; expected float32 samples in [-1, 1]")
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if wave.ndim not in allowed:
        shapes = " or ".join({1: "(N,)", 2: "(B, N)"}.get(d, f"{d}-D") for d in allowed)
        raise ValueError(f"{name}: shape {tuple(wave.shape)}; expected {shapes}")
    num_samples = wave.size if isinstance(wave, np.ndarray) else wave.numel()
    if num_samples == 0:
        raise ValueError(f"{name}: empty (shape {tuple(wave.shape)}); expected at least one sample")
    finite = np.isfinite(wave).all() if isinstance(wave, np.ndarray) else bool(torch.isfinite(wave).all())
    if not finite:
        raise ValueError(f"{name}: contains NaN or inf; expected finite samples")


def num_frames_for(num_samples: int) -> int:
    """Video frames covered by `num_samples` at 16 kHz / 25 fps: ceil(N * 25 / 16000)."""
    return -(-num_samples * FPS // SAMPLE_RATE)


def normalize_waveform(wave: Tensor) -> Tensor:
    """(B, N) -> (B, N): zero mean, unit variance per row, as Wav2Vec2FeatureExtractor does.

    Statistics are taken in float64 (long clips); the result has the input's dtype.
    """
    w = wave.double()
    mean = w.mean(dim=-1, keepdim=True)
    var = w.var(dim=-1, unbiased=False, keepdim=True)
    return ((w - mean) / torch.sqrt(var + NORM_EPS)).to(wave.dtype)


def pad_to_frames(wave: Tensor, num_frames: int) -> Tensor:
    """(B, N) -> (B, num_frames * 640), repeating the last sample (never truncating)."""
    missing = num_frames * SAMPLES_PER_FRAME - wave.shape[-1]
    if missing <= 0:
        return wave
    return torch.cat([wave, wave[:, -1:].expand(-1, missing)], dim=-1)


# -----------------------------------------------------------------------------
# the encoder


def make_audio_projection(layer_dim: int, feature_dim: int = 512) -> nn.Sequential:
    """Stacked layer features (..., L*H) -> (..., feature_dim): Linear, LayerNorm(eps 1e-5), SiLU."""
    return nn.Sequential(
        nn.Linear(layer_dim, feature_dim),
        nn.LayerNorm(feature_dim, eps=PROJECTION_LN_EPS),
        nn.SiLU(),
    )


@dataclass
class AudioEncoderTrace:
    """Intermediate activations of one wav2vec2 pass (what the parity fixture stores)."""

    conv_features: Tensor  # (B, C, F): conv stack output at ~50 Hz, before interpolation
    projected_features: Tensor  # (B, T, H): feature_projection output after interpolation
    hidden_states: tuple[Tensor, ...]  # L + 1 tensors (B, T, H); [0] = after pos-conv + LayerNorm


class AudioEncoder(nn.Module):
    """Frozen wav2vec2 + trainable projection: waveform (B, N) -> audio features (B, T, 512)."""

    def __init__(self, config: AudioConfig, wav2vec2: Wav2Vec2Model | None = None):
        super().__init__()
        if wav2vec2 is None:
            wav2vec2 = Wav2Vec2Model(Wav2Vec2Config(**config.wav2vec2))
        w2v = wav2vec2.config
        if w2v.do_stable_layer_norm:
            raise ValueError(
                "audio config: wav2vec2 do_stable_layer_norm=True is not supported; "
                "expected the post-LayerNorm encoder of wav2vec2-base"
            )
        self.config = config
        self.wav2vec2 = wav2vec2
        self.wav2vec2.requires_grad_(False)
        self.wav2vec2.eval()
        self.layer_dim = w2v.num_hidden_layers * w2v.hidden_size  # 12 * 768 = 9216
        self.audio_projection = make_audio_projection(self.layer_dim, config.feature_dim)

    def train(self, mode: bool = True) -> AudioEncoder:
        """wav2vec2 stays in eval mode (no dropout, LayerDrop or SpecAugment): it is frozen."""
        super().train(mode)
        self.wav2vec2.eval()
        return self

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, config: AudioConfig) -> AudioEncoder:
        """Load a local transformers-format wav2vec2 folder (e.g. `wav2vec2-base-960h`).

        Never touches the network (`local_files_only=True`). A CTC checkpoint is fine: its
        `wav2vec2.*` keys are taken and the head is dropped. `audio_projection` keeps its
        initial values; load it from `flow_transformer.pth` separately.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"wav2vec2 dir: {str(folder)!r} is not a directory; expected a local "
                "transformers folder such as wav2vec2-base-960h (config.json + weights)"
            )
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"wav2vec2 dir: {str(folder / 'config.json')!r} missing; expected a "
                "transformers-format folder (config.json + model.safetensors or pytorch_model.bin)"
            )
        wav2vec2, info = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        # masked_spec_embed only serves SpecAugment in training; anything else missing would stay random
        missing = sorted(k for k in info["missing_keys"] if k != "masked_spec_embed")
        mismatched = sorted(str(k) for k in info["mismatched_keys"])
        if missing or mismatched:
            raise ValueError(
                f"wav2vec2 dir {str(folder)!r}: missing keys {missing[:5]} ({len(missing)}), mismatched "
                f"shapes {mismatched[:5]} ({len(mismatched)}); expected a complete wav2vec2 checkpoint"
            )
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head."))
        if unexpected:
            logger.warning("wav2vec2 dir %s: ignored %d unexpected keys %s", folder, len(unexpected), unexpected[:5])
        expected = Wav2Vec2Config(**config.wav2vec2)
        got = wav2vec2.config
        for key in ("hidden_size", "num_hidden_layers", "conv_dim", "conv_kernel", "conv_stride"):
            if list(np.atleast_1d(getattr(got, key))) != list(np.atleast_1d(getattr(expected, key))):
                raise ValueError(
                    f"wav2vec2 dir {str(folder)!r}: {key} = {getattr(got, key)}; "
                    f"expected {getattr(expected, key)} from the audio config"
                )
        return cls(config, wav2vec2=wav2vec2.float())

    # -- forward pieces, in the order data flows ------------------------------

    def trace(self, waveform: Tensor, num_frames: int, *, normalize: bool = True) -> AudioEncoderTrace:
        """Run wav2vec2 with the interpolation to `num_frames` frames; keep every intermediate."""
        validate_waveform(waveform, sample_rate=SAMPLE_RATE, name="waveform", ndim=2)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: {num_frames!r}; expected an int >= 1")
        num_samples = waveform.shape[-1]
        if num_samples > num_frames * SAMPLES_PER_FRAME:
            raise ValueError(
                f"num_frames: {num_frames} frames cover {num_frames * SAMPLES_PER_FRAME} samples but the "
                f"waveform has {num_samples}; expected num_frames >= {num_frames_for(num_samples)}"
            )
        w2v = self.wav2vec2
        wave = waveform.to(device=self._device(), dtype=torch.float32)
        if normalize:
            wave = normalize_waveform(wave)
        wave = pad_to_frames(wave, num_frames)  # (B, T*640)

        conv = w2v.feature_extractor(wave)  # (B, C, F)
        x = F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)  # (B, C, T)
        x, _ = w2v.feature_projection(x.transpose(1, 2))  # (B, T, H)
        projected = x

        # wav2vec2.encoder, unrolled so that every layer output is kept (post-LN variant)
        enc = w2v.encoder
        x = enc.layer_norm(x + enc.pos_conv_embed(x))
        hidden = [x]
        for layer in enc.layers:
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return a tuple
            hidden.append(x)
        return AudioEncoderTrace(conv_features=conv, projected_features=projected, hidden_states=tuple(hidden))

    def layer_features(self, waveform: Tensor, num_frames: int, *, normalize: bool = True) -> Tensor:
        """(B, N) -> (B, num_frames, L*H): every transformer layer's output, layer-major per frame.

        `normalize=False` skips the per-clip zero-mean/unit-variance step, for callers that
        normalised already (the streaming encoder, which chooses its own statistics).
        """
        hidden = self.trace(waveform, num_frames, normalize=normalize).hidden_states[1:]
        B, T, H = hidden[0].shape
        return torch.stack(hidden, dim=2).reshape(B, T, len(hidden) * H)  # (B, T, L, H) -> (B, T, L*H)

    def forward(self, waveform: Tensor, num_frames: int, *, normalize: bool = True) -> Tensor:
        """(B, N) float32 16 kHz -> (B, num_frames, 512)."""
        return self.audio_projection(self.layer_features(waveform, num_frames, normalize=normalize))

    @torch.no_grad()
    def encode_clip(self, waveform: Tensor | np.ndarray) -> Tensor:
        """One mono clip (N,) -> (T, 512) with T = ceil(N * 25 / 16000), as the release does."""
        validate_waveform(waveform, sample_rate=SAMPLE_RATE, name="waveform", ndim=1)
        wave = torch.as_tensor(waveform, dtype=torch.float32, device=self._device())
        return self(wave[None], num_frames_for(wave.shape[0]))[0]

    def _device(self) -> torch.device:
        return self.audio_projection[0].weight.device
