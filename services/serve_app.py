"""The Ray Serve application: four model deployments behind the session ingress.

`serve run services.serve_app:app` (or a Serve config with `import_path: services.serve_app:app`)
deploys it with settings from the environment; `build_app(args)` takes overrides
(`config`, `weights`, `redis_url`, ...) for the local launcher and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from avatar_forcing.config import ModelConfig, MotionAutoEncoderConfig, preset
from avatar_forcing.nn.checkpoints import CONFIG_FILE
from services.audio_features.deployment import AudioFeatures
from services.common.config import Settings
from services.decoder.deployment import FrameDecoder
from services.generator.deployment import Generator
from services.ingress.deployment import SessionIngress
from services.motion_encoder.deployment import MotionEncoder

ARG_TO_SETTING = {
    "config": "model_preset",
    "weights": "weights_dir",
    "redis_url": "redis_url",
    "redis_prefix": "redis_prefix",
    "max_sessions_per_replica": "max_sessions_per_replica",
    "history_blocks": "history_blocks",
}
INGRESS_ARGS = {"degrade", "latency_budget_s", "face_detect_every", "video_grace_frames", "prompt_after_interrupt"}
REPLICA_ARGS = {"generator_replicas"}


def settings_overrides(args: dict[str, Any]) -> dict[str, Any]:
    known = set(ARG_TO_SETTING) | INGRESS_ARGS | REPLICA_ARGS
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"app args: unknown {unknown}; expected some of {sorted(known)}")
    overrides = {ARG_TO_SETTING[k]: v for k, v in args.items() if k in ARG_TO_SETTING and v is not None}
    if "weights_dir" in overrides:
        overrides["weights_dir"] = Path(overrides["weights_dir"])
    return overrides


def autoencoder_config(settings: Settings) -> MotionAutoEncoderConfig:
    """The served auto-encoder's config: the ingress crops the user's camera to its size and framing."""
    if settings.weights_dir is not None:
        from services.common.model_loader import resolve_weights

        return ModelConfig.load(resolve_weights(settings.weights_dir) / CONFIG_FILE).motion_autoencoder
    return preset(settings.model_preset).motion_autoencoder


def build_app(args: dict[str, Any] | None = None) -> Application:
    args = args or {}
    overrides = settings_overrides(args)
    settings = Settings.from_env(overrides=overrides)
    generator = Generator
    if args.get("generator_replicas"):
        generator = Generator.options(num_replicas=int(args["generator_replicas"]))
    mae = autoencoder_config(settings)
    ingress = {k: args[k] for k in INGRESS_ARGS if k in args} | {"crop_scale": mae.crop_scale}
    return SessionIngress.bind(
        AudioFeatures.bind(overrides),
        MotionEncoder.bind(overrides),
        generator.bind(overrides),
        FrameDecoder.bind(overrides),
        overrides,
        mae.image_size,
        ingress,
    )


app = build_app()
