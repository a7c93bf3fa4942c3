"""Streaming audio features over a bounded window (`docs/model-spec.md` §2, §7).

The release encodes a whole file at once: wav2vec2 is bidirectional (self-attention, a
128-tap positional conv, GroupNorm over time in the first conv layer) and the waveform is
normalised with whole-clip statistics, so every frame's feature depends on the whole clip.
A live stream cannot wait for the end. `StreamingAudioFeatures` re-runs the encoder on a
bounded window for each group of new frames:

    frames    ... | left context (C) | group k (hop) | lookahead (L) |
                    ^ window start                                   ^ window end
    group k = frames [k*hop, (k+1)*hop), emitted once audio up to frame (k+1)*hop + L has arrived

Each group's window depends only on its index (and, at `flush`, on the stream's length),
never on how the audio was chunked, so feeding the same samples in any chunk sizes gives
bit-identical features. The trade-off, measured by `avatar-forcing audio-drift`
(`docs/audio-streaming.md`):

* left context C: more context = closer to the whole-clip features, but every group pays
  for an encoder pass over C + hop + L frames (attention cost grows with the window).
* lookahead L: gives the bidirectional encoder some right context; each frame costs L
  frames (40 ms each) of extra latency.
* hop: frames emitted per encoder pass. hop=1 has the lowest latency and one pass per
  frame; a larger hop amortises the pass over `hop` frames but delays the first frame of a
  group by hop-1 frames. The generator consumes audio one block (10 frames) at a time.
* normalization: each window is normalised by its own mean/variance (the release uses
  whole-clip statistics). This hardly matters: wav2vec2-base's first conv has no bias and
  is followed by a GroupNorm over time, which cancels any affine rescaling of the input up
  to its eps. Normalising by the running statistics of the whole stream instead gave the
  same drift to 4 decimals, so only the per-window variant is kept.

Streamed features are *not* the release's features: the drift is measured, not zero,
except when the window covers the whole clip (C and L at least the clip length).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from avatar_forcing.config import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar_forcing.nn.audio_encoder import (
    AudioEncoder,
    normalize_waveform,
    pad_to_frames,
    validate_waveform,
)

# Defaults chosen from the drift measurement in docs/audio-streaming.md (random weights: re-measure
# with the real wav2vec2-base-960h). Past 4 s of left context the drift hardly falls while the cost
# keeps growing; lookahead bought ~1.5 % relative drift for 80 ms, so none by default; a hop of one
# generation block (10 frames) is ~10x cheaper per frame than hop 1 and drifts less.
DEFAULT_LEFT_CONTEXT_S = 4.0
DEFAULT_LOOKAHEAD_FRAMES = 0
DEFAULT_HOP_FRAMES = 10


class StreamingAudioFeatures:
    """Incremental (T, 512) audio features from a 16 kHz mono stream, bounded memory and cost.

    `push(samples)` takes any chunk size and returns the features of the frames completed by
    it (n, 512), possibly none. `flush()` ends the stream: the last partial frame is
    replicate-padded like the release pads a clip, and every remaining frame is returned.
    The state (`state_dict()`) is plain tensors and ints; the encoder is not part of it.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        *,
        left_context_s: float = DEFAULT_LEFT_CONTEXT_S,
        lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES,
        hop_frames: int = DEFAULT_HOP_FRAMES,
    ):
        if not left_context_s >= 0:
            raise ValueError(f"left_context_s: {left_context_s!r}; expected seconds >= 0")
        if not isinstance(lookahead_frames, int) or lookahead_frames < 0:
            raise ValueError(f"lookahead_frames: {lookahead_frames!r}; expected an int >= 0")
        if not isinstance(hop_frames, int) or hop_frames < 1:
            raise ValueError(f"hop_frames: {hop_frames!r}; expected an int >= 1")
        self.encoder = encoder
        self.left_context_frames = round(left_context_s * FPS)
        self.lookahead_frames = lookahead_frames
        self.hop_frames = hop_frames
        self.feature_dim = encoder.config.feature_dim
        self.reset()

    # -- state ----------------------------------------------------------------

    def reset(self) -> None:
        self._buffer = torch.zeros(0)  # raw samples from absolute index buffer_start on, float32 CPU
        self._pending: list[Tensor] = []  # chunks pushed since the buffer was last joined
        self.buffer_start = 0  # absolute sample index of buffer[0]
        self.samples_received = 0
        self.next_group = 0  # next group of hop_frames frames to emit
        self.finished = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer.clone(),
            "buffer_start": self.buffer_start,
            "samples_received": self.samples_received,
            "next_group": self.next_group,
            "finished": int(self.finished),
            # the settings, so that a state is never resumed under other ones
            "left_context_frames": self.left_context_frames,
            "lookahead_frames": self.lookahead_frames,
            "hop_frames": self.hop_frames,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        settings = {
            "left_context_frames": self.left_context_frames,
            "lookahead_frames": self.lookahead_frames,
            "hop_frames": self.hop_frames,
        }
        for key, expected in settings.items():
            if int(state[key]) != expected:
                raise ValueError(f"state {key}: {state[key]!r}; expected {expected} (this stream's setting)")
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float32).cpu()
        if buffer.ndim != 1 or int(state["buffer_start"]) + buffer.shape[0] != int(state["samples_received"]):
            raise ValueError(
                f"state buffer: {tuple(buffer.shape)} from sample {state['buffer_start']}; expected a 1-D "
                f"buffer ending at samples_received = {state['samples_received']}"
            )
        self._buffer, self._pending = buffer.clone(), []
        self.buffer_start = int(state["buffer_start"])
        self.samples_received = int(state["samples_received"])
        self.next_group = int(state["next_group"])
        self.finished = bool(state["finished"])

    # -- properties -----------------------------------------------------------

    @property
    def buffer(self) -> Tensor:
        """The raw samples held, from absolute sample index `buffer_start` to `samples_received`."""
        if self._pending:
            self._buffer = torch.cat([self._buffer, *self._pending])
            self._pending = []
        return self._buffer

    @property
    def frames_emitted(self) -> int:
        return self.next_group * self.hop_frames if not self.finished else self._total_frames()

    @property
    def latency_frames(self) -> int:
        """Worst-case delay, in whole frames, between a frame's audio ending and its feature."""
        return self.lookahead_frames + self.hop_frames - 1

    @property
    def window_frames(self) -> int:
        """Longest encoder window, in frames: left context + hop + lookahead."""
        return self.left_context_frames + self.hop_frames + self.lookahead_frames

    # -- streaming --------------------------------------------------------------

    @torch.no_grad()
    def push(self, samples: np.ndarray | Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """Append mono samples (N,), any N; return the features of newly completed frames (n, 512)."""
        if self.finished:
            raise RuntimeError("streaming audio: push after flush(); call reset() to start a new stream")
        if getattr(samples, "ndim", None) != 1 or samples.shape[0] > 0:  # an empty (0,) chunk is a no-op
            validate_waveform(samples, sample_rate=sample_rate, name="samples", ndim=1)
            if isinstance(samples, np.ndarray):
                samples = np.ascontiguousarray(samples)  # torch refuses negative strides
            chunk = torch.as_tensor(samples).detach().to(device="cpu", dtype=torch.float32)
            self._pending.append(chunk)  # joined to the buffer only when a group needs it
            self.samples_received += chunk.shape[0]
        available = self.samples_received // SAMPLES_PER_FRAME  # complete frames
        out = []
        while (self.next_group + 1) * self.hop_frames + self.lookahead_frames <= available:
            out.append(self._emit_group(self.next_group, total_frames=None))
        return self._concat(out)

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End of stream: pad the last partial frame, return every remaining frame (n, 512)."""
        if self.finished:
            return self._concat([])
        total = self._total_frames()
        out = []
        while self.next_group * self.hop_frames < total:
            out.append(self._emit_group(self.next_group, total_frames=total))
        self.finished = True
        return self._concat(out)

    # -- internals ------------------------------------------------------------

    def _total_frames(self) -> int:
        return -(-self.samples_received // SAMPLES_PER_FRAME)  # ceil: the last partial frame counts

    def _concat(self, features: list[Tensor]) -> Tensor:
        if not features:
            return torch.zeros(0, self.feature_dim, device=self.encoder._device())
        return torch.cat(features)

    def _emit_group(self, group: int, total_frames: int | None) -> Tensor:
        """Features of group `group`'s frames, from the window [start, end) frames; advances the state."""
        first = group * self.hop_frames
        last = first + self.hop_frames  # exclusive
        end = last + self.lookahead_frames
        if total_frames is not None:  # flushing: the stream ends at total_frames
            last, end = min(last, total_frames), min(end, total_frames)
        start = max(0, first - self.left_context_frames)
        self._drop_before(start * SAMPLES_PER_FRAME)

        window = self.buffer[: min(end * SAMPLES_PER_FRAME, self.samples_received) - self.buffer_start]
        self.next_group = group + 1
        return window_features(self.encoder, window, first - start, last - first)

    def _drop_before(self, sample: int) -> None:
        """Cut buffer samples before absolute index `sample` (never needed again)."""
        cut = sample - self.buffer_start
        if cut <= 0:
            return
        self._buffer = self.buffer[cut:].clone()
        self.buffer_start = sample


@torch.no_grad()
def window_features(encoder: AudioEncoder, window: Tensor, context_frames: int, num_frames: int) -> Tensor:
    """Features of frames [context_frames, context_frames + num_frames) of one audio window (n,).

    The window's real samples are normalised, replicate-padded to whole frames (as the release
    pads a clip) and encoded; the rows of the wanted frames are kept. This is all a streaming
    encoder computes per window, so a service given the same window returns the same features.
    """
    frames_in_window = -(-window.shape[0] // SAMPLES_PER_FRAME)
    wave = normalize_waveform(window[None])  # (1, n) real samples, unpadded
    wave = pad_to_frames(wave, frames_in_window)  # (1, frames_in_window * 640)
    features = encoder(wave, frames_in_window, normalize=False)[0]  # (frames_in_window, 512)
    return features[context_frames : context_frames + num_frames]
