"""Motion metrics of [P] §5 / App. D.3 on per-frame parameter arrays: rPCC, SID, Var, FD.

Inputs are sequences of per-frame parameters, each (T, F): motion latents (F = 512) by
default, or 3DMM expression (F = 50) / pose (F = 6) parameters where an extractor supplied
them. "gt" is the ground-truth avatar, "generated" the model's avatar for the same inputs,
"user" the ground-truth user it reacted to. Formulas (docs/metrics.md has the reasons):

    PCC(X, U)  = Σ_i (x_i − x̄)(u_i − ū) / sqrt(Σ_i (x_i − x̄)² · Σ_i (u_i − ū)²)
                 over all T·F values of a sequence, flattened (DIM's convention); 0 when
                 either side is constant (a frozen avatar correlates with nothing)
    rPCC       = mean over sequences of |PCC(gt, user) − PCC(generated, user)|
                 (pooled=True: one PCC over all sequences concatenated, as DIM computes it)
    SID        = −Σ_c p_c log2 p_c, p_c = share of generated frames (all sequences pooled)
                 nearest to centre c of a k-means fit on the pooled ground-truth frames
    Var        = mean over sequences of (1/F) Σ_f Var_t(x_{t,f})   (population variance, ddof 0)
    FD         = mean over sequences of ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^{1/2})
                 μ, Σ: per-sequence mean and sample covariance (ddof 1) over frames
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
from scipy.cluster.vq import kmeans2, vq

# k of the k-means in SID: 40 clusters for expression and 20 for pose (DIM's values, which
# the paper follows via L2L; the paper's own k is lost in our copy). Motion latents carry
# expression and pose together; they get the expression value.
EXPRESSION_CLUSTERS = 40
POSE_CLUSTERS = 20
MOTION_CLUSTERS = 40
KMEANS_SEED = 0  # k-means++ initialisation seed: the same data gives the same clusters
KMEANS_ITERATIONS = 100  # Lloyd iterations after the k-means++ start
FD_EPS = 1e-6  # added to both covariance diagonals when (Σ_g Σ_r)^{1/2} is not finite (singular)
FD_IMAG_ATOL = 1e-3  # the square root's imaginary part (round-off) is dropped up to this size

Sequences = Sequence[np.ndarray] | np.ndarray


def as_sequences(value: Sequences, name: str, width: int | None = None) -> list[np.ndarray]:
    """One (T, F) array or a list of them -> list of float64 (T, F); ValueError naming `name`[i]."""
    items = [value] if isinstance(value, np.ndarray) and value.ndim == 2 else list(value)
    if not items:
        raise ValueError(f"{name}: no sequences; expected at least one (T, F) array")
    out = []
    for i, item in enumerate(items):
        array = np.asarray(item)
        label = f"{name}[{i}]"
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"{label}: expected a (T, F) array of per-frame parameters, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ValueError(f"{label}: expected finite numbers, got dtype {array.dtype} with NaN/inf or non-numbers")
        width = array.shape[1] if width is None else width
        if array.shape[1] != width:
            raise ValueError(f"{label}: {array.shape[1]} parameters per frame; expected {width} like the others")
        out.append(array.astype(np.float64))
    return out


def _paired(first: list[np.ndarray], second: list[np.ndarray], names: tuple[str, str]) -> None:
    if len(first) != len(second):
        raise ValueError(f"{names[1]}: {len(second)} sequences; expected {len(first)} like {names[0]}")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{names[1]}[{i}]: {b.shape[0]} frames; expected {a.shape[0]} like {names[0]}[{i}]")


# --- rPCC -------------------------------------------------------------------------------------


def pcc(x: np.ndarray, u: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays over all their values (flattened)."""
    x, u = np.asarray(x, np.float64).ravel(), np.asarray(u, np.float64).ravel()
    if x.shape != u.shape:
        raise ValueError(f"pcc: {x.size} values vs {u.size}; expected equal shapes")
    dx, du = x - x.mean(), u - u.mean()
    denominator = np.sqrt((dx @ dx) * (du @ du))
    return float(dx @ du / denominator) if denominator > 0 else 0.0


def rpcc(gt: Sequences, generated: Sequences, user: Sequences, pooled: bool = False) -> float:
    """|PCC(gt, user) − PCC(generated, user)|, per sequence then averaged (or pooled)."""
    gt = as_sequences(gt, "gt")
    generated = as_sequences(generated, "generated", gt[0].shape[1])
    user = as_sequences(user, "user", gt[0].shape[1])
    _paired(gt, generated, ("gt", "generated"))
    _paired(gt, user, ("gt", "user"))
    if pooled:
        gt, generated, user = ([np.concatenate(s)] for s in (gt, generated, user))
    return float(np.mean([abs(pcc(g, u) - pcc(x, u)) for g, x, u in zip(gt, generated, user, strict=True)]))


# --- SID --------------------------------------------------------------------------------------


class TooFewFramesError(ValueError):
    """The ground truth has fewer distinct frames than k-means clusters."""


def fit_clusters(frames: np.ndarray, k: int, seed: int = KMEANS_SEED) -> np.ndarray:
    """k-means (k-means++ start, seeded) of (N, F) frames -> (k, F) centres. Deterministic."""
    distinct = np.unique(frames, axis=0).shape[0]
    if distinct < k:
        raise TooFewFramesError(f"sid: the ground truth has {distinct} distinct frames; expected at least k = {k}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "One of the clusters is empty": kept as it was
        centres, _ = kmeans2(frames, k, iter=KMEANS_ITERATIONS, minit="++", rng=np.random.default_rng(seed))
    return centres


def entropy_bits(labels: np.ndarray, k: int) -> float:
    """Shannon entropy (log2) of the histogram of `labels` over k bins; empty bins add 0."""
    p = np.bincount(labels, minlength=k) / labels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def sid(gt: Sequences, generated: Sequences, k: int, seed: int = KMEANS_SEED) -> float:
    """Shannon index of the generated frames' clusters, clusters fitted on the ground truth."""
    gt = as_sequences(gt, "gt")
    generated = as_sequences(generated, "generated", gt[0].shape[1])
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    centres = fit_clusters(np.concatenate(gt), k, seed)
    labels, _ = vq(np.concatenate(generated), centres)
    return entropy_bits(labels, k)


# --- Var --------------------------------------------------------------------------------------


def variance(sequences: Sequences, name: str = "generated") -> float:
    """Variance along time (ddof 0), averaged over features, then over sequences."""
    return float(np.mean([s.var(axis=0).mean() for s in as_sequences(sequences, name)]))


# --- FD ---------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) of two Gaussians."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular: handled below
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * FD_EPS
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(root.imag, 0, atol=FD_IMAG_ATOL):
            raise ValueError(
                f"fd: the covariance product's square root has imaginary part {np.abs(root.imag).max():.3g}"
            )
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def gaussian(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, F) -> mean (F,) and sample covariance (F, F), ddof 1."""
    return frames.mean(axis=0), np.atleast_2d(np.cov(frames, rowvar=False))


def fd(gt: Sequences, generated: Sequences) -> float:
    """Fréchet distance between each generated sequence and its ground truth, averaged."""
    gt = as_sequences(gt, "gt")
    generated = as_sequences(generated, "generated", gt[0].shape[1])
    if len(gt) != len(generated):
        raise ValueError(f"generated: {len(generated)} sequences; expected {len(gt)} like gt")
    for name, seqs in (("gt", gt), ("generated", generated)):
        for i, s in enumerate(seqs):
            if s.shape[0] < 2:
                raise ValueError(f"{name}[{i}]: {s.shape[0]} frame; expected >= 2 for a covariance")
    return float(np.mean([frechet_distance(*gaussian(x), *gaussian(g)) for g, x in zip(gt, generated, strict=True)]))
