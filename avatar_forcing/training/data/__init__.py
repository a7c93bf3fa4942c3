"""Training data: the conversation manifest, `prepare` (videos -> shards) and the shard dataset.

    manifest.py   JSONL of dyadic conversations (each side's video and separated voice)
    clips.py      per-frame face presence -> clip ranges (split on lost faces, drop short ones)
    shards.py     the on-disk format: safetensors shards, the resume ledger, index.json
    prepare.py    the pipeline (read, detect, crop, encode, write)
    dataset.py    ShardDataset: clips or fixed windows as tensors for the trainer

See docs/training-data.md.
"""

from avatar_forcing.training.data.dataset import ShardDataset
from avatar_forcing.training.data.manifest import Conversation, ManifestError, read_manifest

__all__ = ["Conversation", "ManifestError", "ShardDataset", "read_manifest"]
