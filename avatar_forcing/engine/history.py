"""Session history: what another replica needs to rebuild a session's KV cache.

After every block the stream records one `HistoryBlock`: the block's final clean
tokens (context included), the condition chunk they were generated with, and where
they sit. A bounded ring of these (in Redis, for the services) is enough to rebuild
the cache by replaying only the cache-writing call of each block, one forward pass
per block instead of NFE:

- if the ring still starts at the session's first window, the replay is exact;
- otherwise the oldest `window` frames of the ring are replayed as a first window
  (their deep-layer K/V then miss older context) and the remaining blocks on top.
  The departure from an uninterrupted run shrinks as the ring grows; it is measured
  by `avatar-forcing resume-drift` and documented in docs/resume.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_forcing.engine import session_state
from avatar_forcing.nn.kv_cache import FlowCache
from avatar_forcing.sampling.block_sampler import BlockSampler, Conditions


@dataclass
class HistoryBlock:
    start_frame: int  # absolute frame index of tokens[0]
    tokens: Tensor  # (L, 512) final clean tokens of the block, context included
    conditions: Tensor  # (L, 3, 512): avatar audio, user audio, user motion of the chunk
    rng_state: Tensor | None = None  # the noise generator's state after the block (to continue it)

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.tokens.shape[0]

    def condition_set(self) -> Conditions:
        return Conditions(*self.conditions.unbind(1))

    def to_bytes(self) -> bytes:
        tensors = {"tokens": self.tokens, "conditions": self.conditions}
        if self.rng_state is not None:
            tensors["rng_state"] = self.rng_state
        return session_state.pack("history-block", tensors, {"start_frame": self.start_frame})

    @classmethod
    def from_bytes(cls, data: bytes) -> HistoryBlock:
        try:
            tensors, meta = session_state.unpack(data, "history-block")
            return cls(int(meta["start_frame"]), tensors["tokens"], tensors["conditions"], tensors.get("rng_state"))
        except (ValueError, KeyError) as exc:  # named for the caller: a history entry in the store
            raise ValueError(f"history entry: not a valid HistoryBlock ({exc})") from None


def replay_history(
    sampler: BlockSampler, reference_motion: Tensor, history: list[HistoryBlock], block: int
) -> tuple[FlowCache, Tensor, Tensor]:
    """Rebuild (cache, context tokens, context conditions) from consecutive history blocks."""
    cfg = sampler.model.config
    if not history:
        raise ValueError("history: empty; at least the first window or `window` frames of blocks are needed")
    for previous, entry in itertools.pairwise(history):
        if entry.start_frame != previous.end_frame - cfg.lookahead:
            raise ValueError(
                f"history: block at frame {entry.start_frame} does not follow the block ending at "
                f"{previous.end_frame} (expected start {previous.end_frame - cfg.lookahead})"
            )
    first = history[0]
    if first.tokens.shape[0] == cfg.window:  # the session's own first window: exact replay
        cache = sampler.replay(first.condition_set(), first.tokens, first.start_frame, reference_motion, None, block)
        rest = history[1:]
    else:
        # Stitch the oldest blocks' frames into one pseudo first window of `window` frames.
        frames, conds, used = [], [], 0
        for entry in history:
            new_tokens = entry.tokens if not frames else entry.tokens[cfg.lookahead :]
            new_conds = entry.conditions if not conds else entry.conditions[cfg.lookahead :]
            frames.append(new_tokens)
            conds.append(new_conds)
            used += 1
            if sum(f.shape[0] for f in frames) >= cfg.window:
                break
        tokens, conditions = torch.cat(frames), torch.cat(conds)
        if tokens.shape[0] < cfg.window:
            raise ValueError(
                f"history: {tokens.shape[0]} frames; expected at least the window of {cfg.window} to rebuild"
            )
        end = first.start_frame + tokens.shape[0]
        tokens, conditions = tokens[-cfg.window :], conditions[-cfg.window :]
        start = end - cfg.window
        window_block = Conditions(*conditions.unbind(1))
        cache = sampler.replay(window_block, tokens, start, reference_motion, None, block)
        rest = history[used:]
        context, context_conds = tokens[-cfg.lookahead :], conditions[-cfg.lookahead :]
    for entry in rest:
        cache = sampler.replay(entry.condition_set(), entry.tokens, entry.start_frame, reference_motion, cache, block)
    last = history[-1] if rest or first.tokens.shape[0] == cfg.window else None
    if last is not None:
        context, context_conds = last.tokens[-cfg.lookahead :], last.conditions[-cfg.lookahead :]
    return cache, context, context_conds
