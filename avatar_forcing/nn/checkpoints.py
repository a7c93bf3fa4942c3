"""Checkpoint I/O: the released files in, the project's own format in and out.

Released: `flow_transformer.pth` (keys `flow_transformer.*` and
`audio_encoder.audio_projection.*`), `motion_autoencoder.pth` (`motion_autoencoder.*`),
plain PyTorch state dicts, and a local `wav2vec2-base-960h` folder in transformers
format. Unlike the release, which silently skips unknown keys, loading is strict:
missing keys, unexpected keys and shape mismatches are all reported by name. The one
exception is the release's own non-parameter buffers: its flow transformer registers its
two attention masks as persistent buffers, so a `state_dict()` of the released model carries
them. We rebuild those masks from the config, so they are checked against the shape they
must have and reported as ignored (`RELEASE_BUFFERS`); every other key stays strict.

Own format: a directory with `config.json` (a `ModelConfig`) and
`model.safetensors` (the full state dict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from avatar_forcing.config import ModelConfig, paper
from avatar_forcing.nn.model import AvatarForcing
from avatar_forcing.nn.quantized import dequantize

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RELEASE_FLOW_FILE = "flow_transformer.pth"
RELEASE_MAE_FILE = "motion_autoencoder.pth"
RELEASE_FILES = {  # released file -> the key prefixes it holds
    RELEASE_FLOW_FILE: ("flow_transformer.", "audio_encoder.audio_projection."),
    RELEASE_MAE_FILE: ("motion_autoencoder.",),
}


# The release's persistent buffers that are not parameters of ours: (window, window) bool masks.
RELEASE_BUFFERS = ("flow_transformer.alignment_mask", "flow_transformer.block_bidir_causal_lookahead_mask")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _describe(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = [f"{source} does not match the model:"]
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if names:
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            parts.append(f"  {label}: {shown}")
    return "\n".join(parts)


def check_state(expected: dict[str, Tensor], given: dict[str, Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(_describe(source, missing, unexpected, mismatched))


def _read_pth(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some training scripts wrap the state dict; unwrap the common containers.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def drop_release_buffers(
    state: dict[str, Tensor], config: ModelConfig, source: str
) -> tuple[dict[str, Tensor], list[str]]:
    """`state` without the release's known mask buffers, and their names; a mis-shaped one raises."""
    window = config.flow.window
    wrong = [
        f"{k} (checkpoint {tuple(state[k].shape)}, expected ({window}, {window}))"
        for k in RELEASE_BUFFERS
        if k in state and tuple(state[k].shape) != (window, window)
    ]
    if wrong:
        raise CheckpointError(_describe(source, [], [], wrong))
    ignored = [k for k in RELEASE_BUFFERS if k in state]
    return {k: v for k, v in state.items() if k not in RELEASE_BUFFERS}, ignored


def load_release(
    flow_transformer: str | Path,
    motion_autoencoder: str | Path,
    wav2vec2_dir: str | Path,
    config: ModelConfig | None = None,
    on_ignored: Callable[[str], None] | None = None,
) -> AvatarForcing:
    """Build the model from the released checkpoints (local paths only).

    `on_ignored` receives one line per ignored release buffer (default: the log at INFO).
    """
    config = config or paper()
    report = on_ignored or log.info
    model = AvatarForcing(config)
    expected = model.state_dict()
    files = {RELEASE_FLOW_FILE: Path(flow_transformer), RELEASE_MAE_FILE: Path(motion_autoencoder)}
    merged: dict[str, Tensor] = {}
    for name, path in files.items():
        prefixes = RELEASE_FILES[name]
        state, ignored = drop_release_buffers(_read_pth(path), config, str(path))
        for key in ignored:
            report(f"{path}: ignored {key} (a mask the model rebuilds from its config)")
        wanted = {k: v for k, v in expected.items() if k.startswith(prefixes)}
        check_state(wanted, state, str(path))
        merged.update(state)
    from avatar_forcing.nn.audio_encoder import AudioEncoder

    wav2vec2 = AudioEncoder.from_pretrained_dir(wav2vec2_dir, config.audio).wav2vec2
    wav2vec2_state = {f"audio_encoder.wav2vec2.{k}": v for k, v in wav2vec2.state_dict().items()}
    wanted = {k: v for k, v in expected.items() if k.startswith("audio_encoder.wav2vec2.")}
    check_state(wanted, wav2vec2_state, str(wav2vec2_dir))
    merged.update(wav2vec2_state)
    model.load_state_dict(merged, strict=True)
    return model.eval()


def save_pretrained(model: AvatarForcing, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "avatar-forcing", "config": model.config.name})
    return directory


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> AvatarForcing:
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"weights: {path} not found; expected a directory made by `avatar-forcing convert` "
                f"(containing {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
    model = AvatarForcing(ModelConfig.load(config_path))
    state = dequantize(load_file(weights_path))  # int8-stored matrices (the demo model) back to float
    check_state(model.state_dict(), state, str(weights_path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def convert_release(
    flow_transformer: str | Path,
    motion_autoencoder: str | Path,
    wav2vec2_dir: str | Path,
    out_dir: str | Path,
    config: ModelConfig | None = None,
    on_ignored: Callable[[str], None] | None = None,
) -> Path:
    """Released files -> the project's format, in one call."""
    model = load_release(flow_transformer, motion_autoencoder, wav2vec2_dir, config, on_ignored)
    return save_pretrained(model, out_dir)
