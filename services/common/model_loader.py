"""The model of a service process, loaded once and shared by every deployment in the process.

    model = load_model(settings)   # AvatarForcing in eval mode, on cuda when available

`settings.weights_dir` set: the converted checkpoint there (`avatar_forcing.nn.checkpoints.load_pretrained`);
the value `demo` names the installed demo model (`avatar_forcing.synthetic.demo_model`, tiny preset).
Unset: random weights of `settings.model_preset`, seeded so that every replica and process builds
the same weights (smoke runs and tests only: the output is not a face), with a loud warning.

One model per process and source: replicas that share a process (several deployments of one
Ray worker, or tests) share it. It is read-only after loading; callers must not train it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from avatar_forcing.config import preset
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.nn.model import AvatarForcing, random_model
from services.common.config import Settings

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # every process builds the same random weights
DEMO_WEIGHTS = "demo"  # AF_WEIGHTS_DIR=demo: the installed demo model

_lock = threading.Lock()
_models: dict[tuple[str, str, str], AvatarForcing] = {}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_weights(weights_dir: Path) -> Path:
    """A weights folder, absolute; `demo` is the installed demo model's folder."""
    if str(weights_dir) == DEMO_WEIGHTS:
        from avatar_forcing.synthetic.demo_model import weights_dir as demo_weights

        return demo_weights().resolve()
    return Path(weights_dir).resolve()


def load_model(settings: Settings, device: str | torch.device | None = None) -> AvatarForcing:
    """The process's model for these settings (built on the first call, cached after)."""
    device = torch.device(device) if device is not None else default_device()
    weights = str(resolve_weights(settings.weights_dir)) if settings.weights_dir is not None else ""
    key = (weights, "" if weights else settings.model_preset, str(device))
    with _lock:  # replicas constructed concurrently in one process build it once
        model = _models.get(key)
        if model is None:
            model = _build(settings, weights, device)
            _models[key] = model
        return model


def _build(settings: Settings, weights: str, device: torch.device) -> AvatarForcing:
    if weights:
        log.info("loading model weights from %s onto %s", weights, device)
        return load_pretrained(weights, device)
    log.warning(
        "AF_WEIGHTS_DIR is not set: using RANDOM weights of the %r preset (seed %d) on %s. "
        "The avatar will not look like a face; set AF_WEIGHTS_DIR to a converted checkpoint for real output.",
        settings.model_preset,
        RANDOM_SEED,
        device,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without reseeding the process's RNG
        model = random_model(preset(settings.model_preset), seed=RANDOM_SEED)
    return model.to(device).eval()
