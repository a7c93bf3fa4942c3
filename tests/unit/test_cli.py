"""`avatar-forcing generate`: an mp4 with the avatar's audio; clear errors for missing inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.apps.cli import main
from avatar_forcing.media.io import load_audio, read_video, save_audio, write_video

SAMPLES = Path(__file__).parents[2] / "samples"


@pytest.fixture(scope="module")
def short_inputs(tmp_path_factory):
    """1.6 s of the sample speech and user video (the first window plus a block and a partial one)."""
    root = tmp_path_factory.mktemp("inputs")
    speech = load_audio(SAMPLES / "avatar_speech.wav")[: int(1.62 * 16000)]
    save_audio(root / "speech.wav", speech)
    clip = read_video(SAMPLES / "user.mp4")
    write_video(root / "user.mp4", clip.frames[:30], audio=clip.audio[: 30 * 640])
    return root, speech.shape[0]


def test_generate_writes_an_mp4_with_the_avatar_audio(short_inputs, capsys):
    root, samples = short_inputs
    out = root / "out.mp4"
    code = main(
        [
            "generate",
            "--random-init",
            "--config",
            "tiny",
            "--portrait",
            str(SAMPLES / "portrait.png"),
            "--avatar-audio",
            str(root / "speech.wav"),
            "--user-video",
            str(root / "user.mp4"),
            "--out",
            str(out),
            "--side-by-side",
            "--quiet",
            "--nfe",
            "4",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "RANDOM WEIGHTS" in captured.err  # loud
    video = read_video(out)
    frames = -(-samples * 25 // 16000)  # the avatar audio sets the length
    assert video.num_frames == frames
    assert video.frames.shape[1] == 64 and video.frames.shape[2] > 64  # the user beside the avatar
    assert video.audio is not None and abs(video.audio.shape[0] - samples) < 2048
    assert np.abs(video.audio).max() > 0.01


def test_missing_weights_and_missing_files_are_clear_errors(short_inputs, capsys):
    root, _ = short_inputs
    args = [
        "generate",
        "--portrait",
        str(SAMPLES / "portrait.png"),
        "--avatar-audio",
        str(root / "speech.wav"),
        "--user-video",
        str(root / "user.mp4"),
        "--out",
        str(root / "x.mp4"),
    ]
    # the tiny preset falls back to the shipped demo model; the paper size has no such default
    with pytest.raises(SystemExit, match=r"no weights for --config paper.*--weights DIR.*--random-init"):
        main([*args, "--config", "paper"])
    with pytest.raises(SystemExit, match=r"--portrait .*nowhere\.png: file not found"):
        main([*args[:1], "--portrait", str(root / "nowhere.png"), *args[3:], "--random-init"])
    assert main([*args, "--weights", str(root / "no-weights")]) == 2
    assert "avatar-forcing convert" in capsys.readouterr().err


def test_the_library_never_imports_the_services_or_the_benchmark():
    import ast

    root = Path(__file__).parents[2] / "avatar_forcing"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(root.parent)}: {n}" for n in names if n.split(".")[0] in ("services", "bench")
            ]
    for path in sorted(root.rglob("*.py")):  # nor by name at run time (importlib)
        text = path.read_text()
        offenders += [f"{path.relative_to(root.parent)}: by name" for s in ('"services.', '"bench.') if s in text]
    assert offenders == []


@pytest.mark.parametrize(
    ("command", "option"), [("serve", "--grpc-port"), ("client", "--target"), ("serve-bench", "--config")]
)
def test_serving_commands_are_registered_by_their_packages(command, option, capsys):
    from avatar_forcing.apps.cli import registered_commands

    assert command in {entry.name for entry in registered_commands()}
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_bench_reports_every_stage_and_their_sum():
    import argparse
    import math

    import torch

    from avatar_forcing.config import preset
    from avatar_forcing.diagnostics.bench import stage_times
    from avatar_forcing.nn.model import random_model

    config = preset("tiny")
    args = argparse.Namespace(block=10, blocks=1)
    times = stage_times(random_model(config), config, args, torch.device("cpu"), torch.float32)
    assert set(times) == {"audio_features", "encode_user_motion", "decode_frames"}
    assert all(math.isfinite(ms) and ms > 0 for ms in times.values()), times
