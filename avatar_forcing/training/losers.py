"""DPO's less-preferred motion: sampled with the user dropped, batched, cached on disk.

The loser of a clip is what a talking-only model makes of the avatar's audio alone (paper
§4.2): the full rollout of `sampling.reference.sample_motion` with user audio and user motion
zeroed (the sampler's "absent" form) and only audio guidance. Its condition chunks are the
streaming engine's (`engine.chunks.condition_span`): the first window as one chunk, then
[t - lookahead, t + block) per block, with the cross-attention cache of `BlockSampler`. By default the model is the
start checkpoint itself ("dropping user conditions"); `DPOConfig.loser_weights` names a
separately trained talking-only checkpoint instead, as the paper does.

Clips of one length run as one batched rollout (`BlockSampler.run` shares each forward pass
across requests), on CPU or GPU. Each clip's noise comes from its own generator seeded by
(seed, clip key), so a clip's loser does not depend on the batch it was made in. The cache is
one safetensors file of key -> (T, D) latents whose metadata fingerprints the generating
weights and options; a mismatch regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from avatar_forcing.engine.chunks import condition_span
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.sampling.block_sampler import BlockRequest, BlockSampler, Conditions, pad_frames
from avatar_forcing.sampling.euler import GuidanceScales
from avatar_forcing.training.batch import TrainingExample

CACHE_FORMAT = "avatar-forcing-losers-v1"


def noise_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


@torch.no_grad()
def sample_talking_only(
    flow: FlowTransformer,
    examples: Sequence[TrainingExample],
    nfe: int = 10,
    audio_guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Tensor]:
    """One (T, D) loser per example, on the flow's device, returned on CPU."""
    cfg = flow.config
    sampler = BlockSampler(flow.eval())
    guidance = GuidanceScales(audio=audio_guidance, user=0.0)  # the user row equals the unconditional one
    out: list[Tensor | None] = [None] * len(examples)
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_length.setdefault(e.frames, []).append(i)
    for T, indices in by_length.items():
        padded = cfg.window + max(0, -(-(T - cfg.window) // cfg.block)) * cfg.block
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            tracks, gens, refs = [], [], []
            for i in chunk:
                audio = pad_frames(examples[i].avatar_audio.float(), padded)
                tracks.append((audio, torch.zeros_like(audio), torch.zeros(padded, cfg.motion_dim)))
                gens.append(noise_generator(seed, examples[i].key))
                refs.append(examples[i].reference_motion.float())

            def conditions(j: int, frame: int, first: bool, tracks: list = tracks) -> Conditions:
                # The engine's condition chunk for the block starting at `frame` (`MotionStream`'s rule).
                a, b = condition_span(frame, first, cfg.window, cfg.block, cfg.lookahead)
                return Conditions(*(x[a:b] for x in tracks[j]))

            requests = [
                BlockRequest(
                    conditions(j, 0, True),
                    refs[j],
                    torch.randn((cfg.window, cfg.motion_dim), generator=gens[j]),
                    0,
                    nfe=nfe,
                    guidance=guidance,
                )
                for j in range(len(chunk))
            ]
            results = sampler.run(requests)
            outputs = [[r.latents] for r in results]
            for frame in range(cfg.window, T, cfg.block):
                requests = [
                    BlockRequest(
                        conditions(j, frame, False),
                        refs[j],
                        torch.randn((cfg.block, cfg.motion_dim), generator=gens[j]),
                        frame - cfg.lookahead,
                        context=results[j].tokens[-cfg.lookahead :],
                        cache=results[j].cache,
                        nfe=nfe,
                        guidance=guidance,
                    )
                    for j in range(len(chunk))
                ]
                results = sampler.run(requests)
                for j, r in enumerate(results):
                    outputs[j].append(r.latents)
            for j, i in enumerate(chunk):
                out[i] = torch.cat(outputs[j])[:T].cpu()
    return out  # type: ignore[return-value]


def weights_fingerprint(flow: FlowTransformer) -> str:
    digest = hashlib.sha1()
    for name, value in sorted(flow.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_fingerprint(flow: FlowTransformer, nfe: int, audio_guidance: float, seed: int) -> str:
    fields = {"format": CACHE_FORMAT, "weights": weights_fingerprint(flow), "nfe": nfe, "a_cfg": audio_guidance}
    return json.dumps({**fields, "seed": seed}, sort_keys=True)


def _read_cache(path: Path, fingerprint: str) -> dict[str, Tensor]:
    if not path.is_file():
        return {}
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        return {}  # other weights or options: regenerate
    return load_file(path)


def ensure_losers(
    flow: FlowTransformer,
    examples: Sequence[TrainingExample],
    cache_path: str | Path,
    nfe: int = 10,
    audio_guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Tensor]:
    """key -> loser (T, D) for every example: read from the cache, the missing ones generated and added."""
    keys = [e.key for e in examples]
    if len(set(keys)) != len(keys) or "" in keys:
        raise ValueError("dpo losers: examples need unique, non-empty keys (TrainingExample.key)")
    path = Path(cache_path)
    fingerprint = cache_fingerprint(flow, nfe, audio_guidance, seed)
    cached = _read_cache(path, fingerprint)
    missing = [e for e in examples if e.key not in cached or cached[e.key].shape[0] != e.frames]
    if missing:
        made = sample_talking_only(flow, missing, nfe, audio_guidance, seed, batch_size)
        cached.update({e.key: x.contiguous() for e, x in zip(missing, made, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(cached, tmp, metadata={"fingerprint": fingerprint})
        tmp.replace(path)
    return {k: cached[k] for k in keys}
