"""Rolling KV caches of the flow transformer (model-spec §5, rollout steps 3-5).

One `FlowCache` serves a batch of rows (guidance rows of one or several sessions).
Per layer it holds the self-attention K/V of the frames that no longer depend on
look-ahead into unfinished frames, and the cross-attention K/V of the condition
frames just before the next block's condition chunk. Keys are stored already
rotated (RoPE), together with the absolute frame index of every entry, so masks
are evaluated on absolute indices and rows at different positions can share a
forward pass.

`BlockKV` is the working form for the calls of one block: per layer one buffer holding
[cached entries ; the block's new entries], so attention reads the cache without a
concatenation per call, and the next cache is cut out of it without one either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerKV:
    key: Tensor  # (R, heads, S, head_dim)
    value: Tensor  # (R, heads, S, head_dim)


@dataclass
class FlowCache:
    self_kv: list[LayerKV]  # per layer; keys rotated
    cross_kv: list[LayerKV]  # per layer; keys of the condition frames
    self_positions: Tensor  # (R, S) absolute frame index of each cached self entry
    cross_positions: Tensor  # (R, C) absolute frame index of each cached condition entry

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat name -> tensor map (for safetensors serialisation)."""
        out = {f"{prefix}self_positions": self.self_positions, f"{prefix}cross_positions": self.cross_positions}
        for i, (s, c) in enumerate(zip(self.self_kv, self.cross_kv, strict=True)):
            out[f"{prefix}layer{i}.self_k"] = s.key
            out[f"{prefix}layer{i}.self_v"] = s.value
            out[f"{prefix}layer{i}.cross_k"] = c.key
            out[f"{prefix}layer{i}.cross_v"] = c.value
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], depth: int, prefix: str = "") -> FlowCache:
        try:
            return cls(
                self_kv=[
                    LayerKV(tensors[f"{prefix}layer{i}.self_k"], tensors[f"{prefix}layer{i}.self_v"])
                    for i in range(depth)
                ],
                cross_kv=[
                    LayerKV(tensors[f"{prefix}layer{i}.cross_k"], tensors[f"{prefix}layer{i}.cross_v"])
                    for i in range(depth)
                ],
                self_positions=tensors[f"{prefix}self_positions"],
                cross_positions=tensors[f"{prefix}cross_positions"],
            )
        except KeyError as exc:
            raise ValueError(f"cache state: missing tensor {exc.args[0]!r}") from exc

    def to(self, device: torch.device | str) -> FlowCache:
        move = lambda kv: LayerKV(kv.key.to(device), kv.value.to(device))
        return FlowCache(
            [move(kv) for kv in self.self_kv],
            [move(kv) for kv in self.cross_kv],
            self.self_positions.to(device),
            self.cross_positions.to(device),
        )

    @staticmethod
    def concat(caches: list[FlowCache]) -> FlowCache:
        """Stack the rows of several caches (same lengths) for one batched forward."""
        depth = len(caches[0].self_kv)

        def cat(kind: str, i: int) -> LayerKV:
            kvs = [getattr(c, kind)[i] for c in caches]
            return LayerKV(torch.cat([kv.key for kv in kvs]), torch.cat([kv.value for kv in kvs]))

        return FlowCache(
            [cat("self_kv", i) for i in range(depth)],
            [cat("cross_kv", i) for i in range(depth)],
            torch.cat([c.self_positions for c in caches]),
            torch.cat([c.cross_positions for c in caches]),
        )

    def split(self, rows: list[int]) -> list[FlowCache]:
        """Inverse of `concat`: one cache per group of `rows`."""
        out, start = [], 0
        for n in rows:
            sl = slice(start, start + n)
            out.append(
                FlowCache(
                    [LayerKV(kv.key[sl], kv.value[sl]) for kv in self.self_kv],
                    [LayerKV(kv.key[sl], kv.value[sl]) for kv in self.cross_kv],
                    self.self_positions[sl],
                    self.cross_positions[sl],
                )
            )
            start += n
        return out


def roll_cache(
    previous: FlowCache | None,
    new_self: list[LayerKV],
    new_cross: list[LayerKV],
    positions: Tensor,
    cond_positions: Tensor,
    self_len: int,
    lookahead: int,
    cross_len: int,
) -> FlowCache:
    """The cache after a block whose final latents were just run at t = 0.

    Self: of [cached ; new] keep the `self_len` entries that end `lookahead` frames
    before the newest (those come back as the next block's context). Cross: keep the
    `cross_len` condition frames just before the next condition chunk, which starts
    `lookahead` frames before the end of this one.
    """

    def window(old: Tensor | None, new: Tensor, length: int, dim: int) -> Tensor:
        full = new if old is None else torch.cat([old, new], dim=dim)
        end = full.shape[dim] - lookahead
        if end - length < 0:
            raise ValueError(f"cache: {full.shape[dim]} entries cannot fill a cache of {length} + {lookahead}")
        return full.narrow(dim, end - length, length).contiguous()

    def roll(old: list[LayerKV] | None, new: list[LayerKV], length: int) -> list[LayerKV]:
        return [
            LayerKV(
                window(None if old is None else old[i].key, kv.key, length, 2),
                window(None if old is None else old[i].value, kv.value, length, 2),
            )
            for i, kv in enumerate(new)
        ]

    return FlowCache(
        self_kv=roll(None if previous is None else previous.self_kv, new_self, self_len),
        cross_kv=roll(None if previous is None else previous.cross_kv, new_cross, cross_len),
        self_positions=window(None if previous is None else previous.self_positions, positions, self_len, 1),
        cross_positions=window(None if previous is None else previous.cross_positions, cond_positions, cross_len, 1),
    )


@dataclass
class BlockKV:
    """Attention K/V shared by the forward calls of one block.

    Self: per layer a (R, h, S + L, d) buffer; entries [:S] are the cache, entries [S:] are
    overwritten by every call with its L new tokens (the last call's stay). Cross: per layer
    the cached condition frames followed by the block's condition chunk, fixed for the block.
    """

    self_kv: list[LayerKV]  # per layer (R, h, S + L, d)
    cross_kv: list[LayerKV]  # per layer (R, h, C + Lc, d)
    self_positions: Tensor  # (R, S + L)
    cross_positions: Tensor  # (R, C + Lc)
    cache_len: int  # S

    @classmethod
    def allocate(
        cls, cache: FlowCache | None, cond_kv: list[LayerKV], positions: Tensor, cond_positions: Tensor
    ) -> BlockKV:
        """Buffers for L = positions.shape[1] new tokens after `cache` (None: no cache, S = 0)."""
        R, L = positions.shape
        like = cond_kv[0].key  # (R, h, Lc, d)
        S = 0 if cache is None else cache.self_positions.shape[1]

        def self_buffer(cached: Tensor | None) -> Tensor:  # (R, h, S, d) -> (R, h, S + L, d)
            buffer = like.new_empty(R, like.shape[1], S + L, like.shape[3])
            if cached is not None:
                buffer[:, :, :S].copy_(cached)
            return buffer

        def after(cached: Tensor | None, new: Tensor, dim: int) -> Tensor:
            return new if cached is None else torch.cat([cached.to(new.device), new], dim=dim)

        self_kv, cross_kv = [], []
        for i, chunk in enumerate(cond_kv):
            old_self = None if cache is None else cache.self_kv[i]
            old_cross = None if cache is None else cache.cross_kv[i]
            self_kv.append(
                LayerKV(
                    self_buffer(None if old_self is None else old_self.key),
                    self_buffer(None if old_self is None else old_self.value),
                )
            )
            cross_kv.append(
                LayerKV(
                    after(None if old_cross is None else old_cross.key, chunk.key, 2),
                    after(None if old_cross is None else old_cross.value, chunk.value, 2),
                )
            )
        return cls(
            self_kv,
            cross_kv,
            after(None if cache is None else cache.self_positions, positions, 1),
            after(None if cache is None else cache.cross_positions, cond_positions, 1),
            S,
        )

    def __post_init__(self) -> None:
        # Views of the new entries, per layer (R, h, L, d): every call writes there.
        self._new = [LayerKV(kv.key[:, :, self.cache_len :], kv.value[:, :, self.cache_len :]) for kv in self.self_kv]

    def write(self, layer: int, key: Tensor, value: Tensor) -> LayerKV:
        """Store the new tokens' (R, h, L, d) K/V of one layer; returns the whole [cache ; new] K/V."""
        new = self._new[layer]
        new.key.copy_(key)
        new.value.copy_(value)
        return self.self_kv[layer]

    def new_entries(self, layer: int) -> LayerKV:
        """Views of the last call's new K/V of one layer (R, h, L, d); the next call overwrites them."""
        return self._new[layer]

    def roll(self, self_len: int, lookahead: int, cross_len: int) -> FlowCache:
        """The cache for the next block, after a cache-writing call (see `roll_cache`)."""
        return roll_cache(
            None, self.self_kv, self.cross_kv, self.self_positions, self.cross_positions, self_len, lookahead, cross_len
        )
