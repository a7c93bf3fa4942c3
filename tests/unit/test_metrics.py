"""Motion metrics against small cases computed by hand (the expected numbers are worked out in
the comments, not by the code under test), plus the `avatar-forcing eval` report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.apps.cli import main
from avatar_forcing.metrics import fd, frechet_distance, pcc, rpcc, sid, variance
from avatar_forcing.metrics.motion import EXPRESSION_CLUSTERS, MOTION_CLUSTERS, POSE_CLUSTERS, fit_clusters


def col(*values: float) -> np.ndarray:
    return np.array(values, float)[:, None]  # (T, 1)


# --- PCC / rPCC ---------------------------------------------------------------------------------


def test_pcc_of_a_small_case() -> None:
    # x = 1 2 3 4, u = 1 3 2 4: deviations (-1.5 -0.5 0.5 1.5) and (-1.5 0.5 -0.5 1.5);
    # products 2.25 - 0.25 - 0.25 + 2.25 = 4; squares 5 and 5 -> 4 / 5 = 0.8.
    assert pcc(col(1, 2, 3, 4), col(1, 3, 2, 4)) == pytest.approx(0.8)
    assert pcc(col(4, 3, 2, 1), col(1, 3, 2, 4)) == pytest.approx(-0.8)
    # Flattened over frames x features: [[1, 2], [3, 4]] is the sequence 1 2 3 4.
    assert pcc(np.array([[1.0, 2], [3, 4]]), np.array([[1.0, 3], [2, 4]])) == pytest.approx(0.8)
    assert pcc(col(5, 5, 5, 5), col(1, 3, 2, 4)) == 0.0  # a frozen avatar correlates with nothing


def test_rpcc_per_sequence_and_pooled() -> None:
    user = [col(1, 3, 2, 4), col(1, 3, 2, 4)]
    gt = [col(1, 2, 3, 4), col(1, 2, 3, 4)]  # PCC(gt, user) = 0.8 in both
    generated = [col(4, 3, 2, 1), col(5, 5, 5, 5)]  # PCC -0.8 and 0
    # per sequence: |0.8 - (-0.8)| = 1.6 and |0.8 - 0| = 0.8 -> mean 1.2
    assert rpcc(gt, generated, user) == pytest.approx(1.2)
    # pooled: gt/user concatenated keep PCC 0.8 (the same deviations twice: 8 / sqrt(10 * 10)).
    # generated 4 3 2 1 5 5 5 5 has mean 3.75, deviations .25 -.75 -1.75 -2.75 1.25 1.25 1.25 1.25;
    # with the user's deviations -1.5 .5 -.5 1.5 (twice): products -.375 -.375 .875 -4.125 + 1.25 * 0
    # = -4; squares 17.5 and 10 -> PCC = -4 / sqrt(175); rPCC = 0.8 + 4 / sqrt(175).
    assert rpcc(gt, generated, user, pooled=True) == pytest.approx(0.8 + 4 / math.sqrt(175))
    assert rpcc(gt, gt, user) == 0.0  # the ground truth itself scores 0


def test_rpcc_rejects_mismatched_sequences_naming_them() -> None:
    with pytest.raises(ValueError, match=r"generated\[0\]: 3 frames; expected 4 like gt\[0\]"):
        rpcc([col(1, 2, 3, 4)], [col(1, 2, 3)], [col(1, 3, 2, 4)])
    with pytest.raises(ValueError, match=r"user: 2 sequences; expected 1"):
        rpcc([col(1, 2, 3, 4)], [col(1, 2, 3, 4)], [col(1, 3, 2, 4), col(1, 3, 2, 4)])
    with pytest.raises(ValueError, match=r"generated\[0\]: 2 parameters per frame; expected 1"):
        rpcc([col(1, 2)], [np.ones((2, 2))], [col(1, 2)])
    with pytest.raises(ValueError, match=r"gt\[0\]: expected finite"):
        rpcc([col(1, np.nan)], [col(1, 2)], [col(1, 2)])


# --- SID ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Three tight, far-apart clusters of 5 frames each, around (0, 0), (10, 0) and (0, 10)."""
    jitter = np.random.default_rng(0).uniform(-0.1, 0.1, (15, 2))
    centres = np.repeat(np.array([[0.0, 0], [10, 0], [0, 10]]), 5, axis=0)
    return centres + jitter


@pytest.mark.parametrize(
    ("near", "expected"),
    [
        ([0, 0, 0, 0], 0.0),  # one cluster: no diversity
        ([0, 0, 1, 1], 1.0),  # two equal halves: 1 bit
        ([0, 1, 2], math.log2(3)),  # all three equally: log2 3
        ([0, 0, 1, 2], 1.5),  # 1/2, 1/4, 1/4: 0.5 * 1 + 2 * 0.25 * 2 = 1.5 bits
    ],
)
def test_sid_is_the_entropy_in_bits_of_the_generated_frames_clusters(blobs, near, expected) -> None:
    centres = np.array([[0.0, 0], [10, 0], [0, 10]])
    generated = centres[near] + 0.3  # each generated frame lies nearest one ground-truth cluster
    assert sid(blobs, generated, k=3) == pytest.approx(expected)


def test_sid_with_the_default_40_clusters_on_a_grid() -> None:
    grid = np.array([[x, y] for x in range(8) for y in range(5)], float) * 10  # 40 distinct points
    gt = np.repeat(grid, 3, axis=0)  # each 3 times: k-means with k = 40 finds the 40 points
    generated = grid[[0, 5, 10, 15, 20, 25, 30, 35]] + 0.5  # 8 different clusters, once each
    assert sid(gt, generated, k=EXPRESSION_CLUSTERS) == pytest.approx(3.0)  # log2 8
    assert sid(gt, gt, k=EXPRESSION_CLUSTERS) == pytest.approx(math.log2(40))  # its maximum


def test_kmeans_is_deterministic_and_needs_k_distinct_frames(blobs) -> None:
    data = np.random.default_rng(1).normal(size=(200, 4))
    np.testing.assert_array_equal(fit_clusters(data, 5), fit_clusters(data, 5))
    assert (EXPRESSION_CLUSTERS, POSE_CLUSTERS, MOTION_CLUSTERS) == (40, 20, 40)
    with pytest.raises(ValueError, match="15 distinct frames; expected at least k = 20"):
        sid(blobs, blobs, k=POSE_CLUSTERS)


# --- Var ----------------------------------------------------------------------------------------


def test_var_is_over_time_then_averaged_over_features_and_sequences() -> None:
    # [[0, 0], [2, 4]]: feature variances (ddof 0) 1 and 4 -> 2.5
    # [[1, 1], [1, 1], [4, 1]]: mean 2, variance (1 + 1 + 4) / 3 = 2, and 0 -> 1
    assert variance([np.array([[0.0, 0], [2, 4]])]) == pytest.approx(2.5)
    assert variance([np.array([[0.0, 0], [2, 4]]), np.array([[1.0, 1], [1, 1], [4, 1]])]) == pytest.approx(1.75)
    # Not the variance of all values pooled (DIM's mymetrics): that would be var(0, 0, 2, 4) = 2.75.
    assert variance(np.array([[0.0, 0], [2, 4]])) != pytest.approx(2.75)


# --- FD -----------------------------------------------------------------------------------------


def test_fd_of_one_dimensional_gaussians() -> None:
    # 1-D: FD = (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2 = (m1 - m2)^2 + (s1 - s2)^2.
    # gt 0 2: mean 1, sample variance 2; generated 1 3 5: mean 3, sample variance (4 + 0 + 4) / 2 = 4
    # -> 4 + (sqrt 2 - 2)^2 = 10 - 4 sqrt 2
    assert fd([col(0, 2)], [col(1, 3, 5)]) == pytest.approx(10 - 4 * math.sqrt(2))
    # averaged over sequences: the second pair is identical (0)
    assert fd([col(0, 2), col(1, 2, 6)], [col(1, 3, 5), col(1, 2, 6)]) == pytest.approx((10 - 4 * math.sqrt(2)) / 2)


def test_frechet_distance_of_rotated_gaussians() -> None:
    # Covariances sharing eigenvectors R: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt a_i - sqrt b_i)^2
    # with a = (4, 1), b = (1, 9): (2 - 1)^2 + (1 - 3)^2 = 5; means differ by (1, 2): 5 -> 10.
    angle = math.radians(30)
    R = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    s1, s2 = R @ np.diag([4.0, 1]) @ R.T, R @ np.diag([1.0, 9]) @ R.T
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, 2]), s2) == pytest.approx(10.0)
    assert frechet_distance(np.ones(2), s1, np.ones(2), s1) == pytest.approx(0.0, abs=1e-9)


def test_fd_with_fewer_frames_than_features_stays_finite() -> None:
    frames = np.random.default_rng(0).normal(size=(3, 6))  # rank-2 covariance in 6-D: singular
    assert fd([frames], [frames]) == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(fd([frames], [frames[::-1] + 1]))
    with pytest.raises(ValueError, match=r"generated\[0\]: 1 frame; expected >= 2"):
        fd([frames], [frames[:1]])


# --- the eval command ---------------------------------------------------------------------------


@pytest.fixture()
def sequences(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    gt_dir, gen_dir = tmp_path / "gt", tmp_path / "gen"
    gt_dir.mkdir()
    gen_dir.mkdir()
    for name in ("a", "b"):
        user = rng.normal(size=(60, 8))
        avatar = 0.5 * user + rng.normal(size=(60, 8))
        np.savez(
            gt_dir / f"{name}.npz",
            avatar_motion=avatar,
            user_motion=user,
            pose=rng.normal(size=(60, 6)),
            user_pose=rng.normal(size=(60, 6)),
        )
        if name == "a":
            np.save(gen_dir / "a.npy", avatar)  # .npy: the avatar motion alone
        else:
            np.savez(gen_dir / "b.npz", avatar_motion=avatar)
    return gen_dir, gt_dir


def test_eval_writes_a_json_report_of_each_family_both_sides_have(sequences, tmp_path: Path, capsys) -> None:
    gen_dir, gt_dir = sequences
    out = tmp_path / "report.json"
    assert (
        main(["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--json", str(out), "--no-latency"])
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report["families"]) == {"motion"}  # pose only in the ground truth: skipped
    m = report["families"]["motion"]
    # generated == ground truth: rPCC 0, FD 0, equal Var and SID
    assert m["rpcc"] == pytest.approx(0.0) and m["fd"] == pytest.approx(0.0, abs=1e-6)
    assert m["var"] == pytest.approx(m["var_gt"]) and m["sid"] == pytest.approx(m["sid_gt"])
    assert (m["sequences"], m["frames"], m["sid_clusters"]) == (2, 120, 40)
    assert report["latency"] is None
    assert "motion" in capsys.readouterr().out


def test_eval_reports_bad_inputs_naming_the_file(sequences, tmp_path: Path, capsys) -> None:
    gen_dir, gt_dir = sequences
    (gen_dir / "b.npz").write_bytes(b"not a zip")
    assert main(["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--no-latency"]) == 2
    assert "b.npz: not a readable" in capsys.readouterr().err
    np.savez(gen_dir / "b.npz", avatar_motion=np.zeros((50, 8)))
    assert main(["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--no-latency"]) == 2
    assert "b: motion frame counts differ" in capsys.readouterr().err
    assert main(["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--no-latency", "--trim"]) == 0
    np.save(gen_dir / "c.npy", np.zeros((60, 8)))
    assert main(["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--no-latency"]) == 2
    assert "['c'] have no ground truth" in capsys.readouterr().err


def test_eval_includes_the_engines_measured_latency(sequences, tmp_path: Path) -> None:
    gen_dir, gt_dir = sequences
    out = tmp_path / "report.json"
    argv = ["eval", "--generated", str(gen_dir), "--ground-truth", str(gt_dir), "--json", str(out)]
    assert main([*argv, "--latency-config", "tiny", "--latency-blocks", "1", "--device", "cpu"]) == 0
    latency = json.loads(out.read_text())["latency"]
    assert (latency["config"], latency["nfe"], latency["block"], latency["device"]) == ("tiny", 10, 10, "cpu")
    assert math.isfinite(latency["block_ms"]) and latency["block_ms"] > 0
    assert latency["latency_s"] == pytest.approx(10 / 25 + latency["block_ms"] / 1000)
