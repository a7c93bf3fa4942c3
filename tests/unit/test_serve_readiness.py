"""What makes the user's first `serve` + `client --realtime` session real time, without Ray: the
launcher's replica environment (worker priority), its warm-up step (real sessions through the
client's own streaming function, failures stop the start), the client's warm-start default under
--realtime and its pacing, and serve-bench driving the client's streaming function."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from services.client import cli as client_cli
from services.local import launcher, warmup
from services.local.errors import LauncherError


def test_replica_environment_runs_ray_workers_at_default_priority(tmp_path: Path):
    env = launcher.replica_environment("redis://127.0.0.1:6379/0", "s" * 32, "tiny", None, environ={})
    assert env["RAY_worker_niceness"] == "0"  # Ray's default 15 starves the replicas on a shared machine
    assert env["AF_MODEL_PRESET"] == env["AVATAR_FORCING_CONFIG"] == "tiny" and "AF_WEIGHTS_DIR" not in env
    kept = launcher.replica_environment("redis://x", "s" * 32, "tiny", tmp_path, environ={"RAY_worker_niceness": "5"})
    assert "RAY_worker_niceness" not in kept  # a value the user set is left alone
    assert kept["AF_WEIGHTS_DIR"] == str(tmp_path.resolve())


def test_serve_loads_an_installed_demo_model_by_default_for_tiny(tmp_path: Path, monkeypatch):
    from avatar_forcing.synthetic import demo_model
    from services.common.config import Settings
    from services.common.model_loader import resolve_weights

    demo = tmp_path / "demo-model"
    demo.mkdir()
    monkeypatch.setattr(demo_model, "DEMO_MODEL_DIR", demo)
    assert launcher.choose_weights("tiny", None, random_init=False) is None  # not installed: random weights
    (demo / "model.safetensors").write_bytes(b"")
    assert launcher.choose_weights("tiny", None, random_init=False) == demo
    assert launcher.choose_weights("tiny", None, random_init=True) is None  # --random-init: smoke runs
    assert launcher.choose_weights("paper", None, random_init=False) is None  # no paper-size demo model
    assert launcher.choose_weights("tiny", tmp_path, random_init=False) == tmp_path
    assert launcher.describe_weights(demo) == "demo model" and launcher.describe_weights(None) == "random"
    # the deployments' spelling of the same default (compose, k8s): AF_WEIGHTS_DIR=demo
    assert resolve_weights(Settings.from_env({"AF_WEIGHTS_DIR": "demo"}).weights_dir) == demo.resolve()


def _args(*extra: str):
    base = ["--portrait", "p.png", "--avatar-audio", "a.wav", "--user-video", "u.mp4", "--out", "o.mp4"]
    return client_cli.build_parser().parse_args(base + list(extra))


def test_realtime_client_warm_starts_by_default():
    assert client_cli.session_options(_args("--realtime")) == {"warm_start": True}
    assert client_cli.session_options(_args()) == {}
    assert client_cli.session_options(_args("--realtime", "--no-warm-start")) == {}
    assert client_cli.session_options(_args("--warm-start", "--seed", "3")) == {"seed": 3, "warm_start": True}


def _inputs(frames: int) -> client_cli.Inputs:
    samples = frames * client_cli.Limit.SAMPLES_PER_FRAME
    return client_cli.Inputs(
        portrait=b"png",
        avatar_audio=np.zeros(samples, np.float32),
        user_frames=np.zeros((frames, 8, 8, 3), np.uint8),
        user_audio=np.zeros(samples, np.float32),
        num_frames=frames,
    )


class _Stream:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, float]] = []
        self.began = 0.0

    async def send_avatar_audio(self, samples, timestamp_us):
        self.sent.append(("avatar", timestamp_us, asyncio.get_running_loop().time()))

    async def send_user_frame(self, frame, timestamp_us):
        self.sent.append(("frame", timestamp_us, asyncio.get_running_loop().time()))

    async def send_user_audio(self, samples, timestamp_us):
        self.sent.append(("user", timestamp_us, asyncio.get_running_loop().time()))

    async def end_input(self):
        self.sent.append(("end", 0, 0.0))


def test_realtime_pacing_sends_each_camera_frame_at_the_end_of_its_40_ms():
    import time

    stream = _Stream()
    stats = client_cli.Stats()

    async def run():
        clock = time.monotonic()
        await client_cli._send(stream, _inputs(3), stats, True, clock)
        return clock

    clock = asyncio.run(run())
    assert stats.first_input_at - clock >= 0.04 - 0.005  # frame 0 exists once its 40 ms have passed
    frames = [stamp for kind, stamp, _ in stream.sent if kind == "frame"]
    assert frames == [0, 40_000, 80_000] and stream.sent[0][0] == "avatar" and stream.sent[-1][0] == "end"


def test_warm_up_runs_one_then_concurrent_sessions_through_the_client_function(monkeypatch):
    calls: list[dict] = []

    async def fake_run_stream(target, token, inputs, *, realtime, options, on_error, **_):
        calls.append({"target": target, "realtime": realtime, "options": options})
        return client_cli.Stats(frames=inputs.num_frames)

    monkeypatch.setattr(client_cli, "run_stream", fake_run_stream)
    logs: list[str] = []
    took = warmup.warm_up("127.0.0.1:1", "tok", logs.append, sessions=2, inputs=_inputs(12))
    assert took >= 0 and len(calls) == 3 and all(c["realtime"] and c["options"]["warm_start"] for c in calls)
    assert "done" in logs[-1]


def test_a_failed_warm_up_stops_the_start(monkeypatch):
    async def short(target, token, inputs, **_):
        return client_cli.Stats(frames=inputs.num_frames - 1)

    monkeypatch.setattr(client_cli, "run_stream", short)
    with pytest.raises(LauncherError, match="warm-up session returned"):
        warmup.warm_up("127.0.0.1:1", "tok", lambda _: None, sessions=1, inputs=_inputs(12))


def test_warm_up_without_samples_is_skipped_and_said(tmp_path: Path, monkeypatch):
    assert warmup.sample_inputs(tmp_path) is None
    monkeypatch.setattr(warmup, "sample_inputs", lambda: None)
    logs: list[str] = []
    assert warmup.warm_up("127.0.0.1:1", "tok", logs.append) == 0.0 and "skipped" in logs[0]


def test_warm_up_inputs_are_the_repository_samples_cut_short():
    inputs = warmup.sample_inputs()
    assert inputs is not None and inputs.num_frames == warmup.WARMUP_FRAMES
    assert inputs.avatar_audio.shape[0] == warmup.WARMUP_FRAMES * client_cli.Limit.SAMPLES_PER_FRAME
    assert inputs.user_frames.shape[0] == warmup.WARMUP_FRAMES and inputs.portrait


def test_bench_sessions_drive_the_client_streaming_function(monkeypatch):
    from bench import sessions
    from bench.media import load_media

    seen = {}

    async def fake_run_stream(target, token, inputs, *, realtime, options, on_error, stats, **_):
        seen.update(realtime=realtime, options=options, frames=inputs.num_frames)
        stats.session_id = "s"
        for index in range(inputs.num_frames):
            stats.indices.append(index)
            stats.arrivals.append(float(index))
            stats.block_latency_ms.append(100.0)
            stats.degradation.append("DEGRADATION_NONE")
            stats.nfe.append(10)
            stats.frame_delay_ms.append(50.0)
        stats.last_frame_at = float(inputs.num_frames)
        return stats

    monkeypatch.setattr(client_cli, "run_stream", fake_run_stream)
    result = asyncio.run(sessions.paced_session("t", "tok", load_media(), 20, seed=4))
    assert seen == {"realtime": True, "options": {"warm_start": True, "seed": 4}, "frames": 20}
    assert result.continuous and result.degraded_frames() == 0 and result.block_latencies() == [100.0, 100.0]
