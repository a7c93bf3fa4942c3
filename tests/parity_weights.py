"""Rebuild the parity fixture's parameters from its fill rule (fixture README, "Fill rule").

Every parameter is `randn(shape, generator=crc32(name)) * std + mean`, so a module
whose parameter names match the release gets bit-identical weights.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "official-parity"


def load_params_table() -> dict[str, dict]:
    return json.loads((FIXTURE_DIR / "params.json").read_text())["params"]


def fill_value(name: str, entry: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    value = torch.randn(entry["shape"], generator=generator, dtype=torch.float32)
    return value * entry["std"] + entry["mean"]


@torch.no_grad()
def fill_module(module: torch.nn.Module, prefix: str, group: str) -> None:
    """Fill every parameter of `module` by the rule; names must match the table exactly.

    `prefix` is prepended to the module's own parameter names to form the release's
    name (the seed). Missing or extra names fail loudly.
    """
    table = {k: v for k, v in load_params_table().items() if v["group"] == group}
    own = {prefix + n: p for n, p in module.named_parameters()}
    missing = sorted(set(table) - set(own))
    unexpected = sorted(set(own) - set(table))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for name, param in own.items():
        entry = table[name]
        assert list(param.shape) == entry["shape"], f"{name}: {list(param.shape)} != {entry['shape']}"
        value = fill_value(name, entry)
        param.copy_(value)
