"""What a sweep maximizes, with and without lesion labels, and how well two objectives agree.

A sweep (``anogan-ray tune``) ranks trained models. With labelled ``val`` patches it ranks them by
the AUC of A(x) on those patches (``labels``). Most cohorts have none, so every trial also reports
label-free candidates, none of which reads a patch label: the first five are computed from
healthy ``val`` patches only (patches of ``val`` volumes with no anomalous patch, or every
``val`` patch when there are no labels), ``cohort`` from which volumes are healthy:

- ``synthetic``: the AUC of A(x) between healthy patches and copies of the same patches with one
  pasted ellipse we drew (a dark, fluid-like pocket or a bright, foci-like spot): the sweep's
  label-free objective until issue 32, and the one used where ``cohort`` cannot be.
- ``cutpaste``: the same AUC with lesions drawn from the data itself (:func:`data_lesion`): a
  region of the patch moved elsewhere in it (CutPaste, Li et al. 2021), a region of a patch of
  another healthy volume pasted in, or a region's texture moved to another tissue's gray level.
- ``residual``: the mean residual R(x) of the healthy patches (lower is better), the mean of the A
  map |x − G(z_Γ)| over them times the patch's pixels.
- ``quality``: the sliced Wasserstein distance between G's samples and real training patches that
  training logs every epoch (``generative_quality.json``; lower is better).
- ``lesions``: the mean of the ``synthetic`` and ``cutpaste`` AUCs.
- ``cohort``: the AUC of A(x) between the patches of healthy ``val`` volumes (every patch
  labelled 0) and the other ``val`` patches, taken unlabelled: volumes of diseased or unknown
  eyes, whose patch labels it never reads. Those are a mix of a share π of anomalous patches and
  healthy-looking ones, so its expectation is π · AUC(healthy, anomalous) + (1 − π) · AUC(healthy,
  their healthy-looking patches): the labelled AUC, scaled, wherever a diseased eye's
  healthy-looking patches look like a healthy eye's (positive-unlabelled learning's identity). It
  needs what a user training AnoGAN has anyway, which volumes are healthy, and some others.
- ``blend``: the mean of the ``cohort`` and ``synthetic`` AUCs: the real lesions of the cohort,
  unbiased but few, with many lesions we drew, plentiful but of shapes we chose. The two err
  independently, and their mean ranked with the labels best over the data sets and the ways of
  measuring of docs/tune.md: the label-free objective a sweep uses by default.

Every objective is oriented so that higher is better (:func:`objective_value`). λ changes the
scores, not the model: a per-λ objective is maximized over ``tune.lambdas``; one that does not
depend on λ (``quality``) takes the λ of :data:`LAMBDA_CHOOSER`.

:func:`agreement` measures, on a sweep whose ``val`` split is labelled, how well a label-free
objective ranks trials as the labels do: Spearman's rank correlation with a bootstrap confidence
interval, and the regret (the best labelled AUC of the sweep minus the labelled AUC of the trial
the objective picks). docs/tune.md has the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata, spearmanr

SWEEP_FILE = "sweep.json"  # beside a sweep's best model bundle: its leaderboard and agreement


@dataclass(frozen=True)
class Objective:
    """One way to rank a sweep's trials."""

    name: str  # the value of tune.objective
    metrics: tuple[str, ...]  # the per-λ (or fixed) trial metrics it is made of (their mean)
    higher_is_better: bool
    per_lambda: bool  # whether it changes with λ (else λ is chosen by LAMBDA_CHOOSER)
    needs_labels: bool
    description: str


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("labels", ("val_auc",), True, True, True,
                  "AUC of A(x) on the labelled val patches"),
        Objective("synthetic", ("synthetic_auc",), True, True, False,
                  "AUC of A(x), healthy val patches vs copies with a pasted ellipse"),
        Objective("cutpaste", ("cutpaste_auc",), True, True, False,
                  "AUC of A(x), healthy val patches vs copies with a lesion drawn from the data"),
        Objective("residual", ("healthy_residual",), False, True, False,
                  "mean residual R(x) of the healthy val patches (lower is better)"),
        Objective("quality", ("sliced_wasserstein",), False, False, False,
                  "sliced Wasserstein distance of G's samples to real patches (lower is better)"),
        Objective("lesions", ("synthetic_auc", "cutpaste_auc"), True, True, False,
                  "mean of the synthetic and cutpaste AUCs"),
        Objective("cohort", ("cohort_auc",), True, True, False,
                  "AUC of A(x), healthy val volumes' patches vs the other val patches, unlabelled"),
        Objective("blend", ("cohort_auc", "synthetic_auc"), True, True, False,
                  "mean of the cohort and synthetic AUCs"),
    )
}  # fmt: skip
LABEL_FREE = tuple(name for name, o in OBJECTIVES.items() if not o.needs_labels)
# The label-free objective tune.objective=auto uses when val has no labels, chosen by the
# agreement measured in docs/tune.md, and the one it uses when val cannot support the default
# (cohort_auc needs patches of healthy volumes and of others).
DEFAULT_LABEL_FREE = "blend"
FALLBACK_LABEL_FREE = "synthetic"
LAMBDA_CHOOSER = "cutpaste"  # picks λ for an objective that does not depend on it
PER_LAMBDA_METRICS = (
    "val_auc", "synthetic_auc", "cutpaste_auc", "healthy_residual", "cohort_auc",
)  # fmt: skip


def objective_value(name: str, metrics: dict[str, Any]) -> float:
    """The objective ``name`` from one evaluation's metrics, oriented higher = better (NaN when a
    metric it needs is missing or not finite)."""
    objective = OBJECTIVES[name]
    values = [float(metrics.get(m, math.nan)) for m in objective.metrics]
    if not all(math.isfinite(v) for v in values):
        return math.nan
    mean = float(np.mean(values))
    return mean if objective.higher_is_better else -mean


def best_objectives(per_lambda: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Every objective at its own best λ, ``{name: (value, λ)}``, those that are finite; each row
    of ``per_lambda`` holds one λ's metrics and its ``"lambda"``."""
    best = {}
    for name in OBJECTIVES:
        at = per_lambda[best_over_lambdas(name, per_lambda)]
        value = objective_value(name, at)
        if math.isfinite(value):
            best[name] = (value, at["lambda"])
    return best


def best_over_lambdas(name: str, per_lambda: list[dict[str, Any]]) -> int:
    """The index of the λ (a row of ``per_lambda``, each holding that λ's metrics) at which the
    objective ``name`` is best; λ-free objectives take :data:`LAMBDA_CHOOSER`'s λ; the first λ
    when nothing is finite."""
    chooser = name if OBJECTIVES[name].per_lambda else LAMBDA_CHOOSER
    values = [objective_value(chooser, row) for row in per_lambda]
    finite = [v if math.isfinite(v) else -math.inf for v in values]
    return int(np.argmax(finite)) if finite else 0


# ---------------------------------------------------------------------------------------------
# Lesions: drawn by us (an ellipse) or from the data
# ---------------------------------------------------------------------------------------------


def ellipse_lesion(patch: np.ndarray, seed: int) -> np.ndarray:
    """A copy of a (64, 64) patch in [-1, 1] with one elliptic lesion that contrasts with it.

    The lesion imitates the two kinds of retinal anomaly the paper shows: on bright tissue a
    dark, fluid-like pocket, on dark tissue a bright, hyperreflective spot; 8-18 pixels across,
    keeping the patch's own speckle. The same seed gives the same lesion.
    """
    rng = np.random.default_rng(seed)
    height, width = patch.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    center_y, center_x = rng.uniform(16, height - 16), rng.uniform(16, width - 16)
    radius_y, radius_x = rng.uniform(4, 7), rng.uniform(5, 9)
    inside = ((rows - center_y) / radius_y) ** 2 + ((cols - center_x) / radius_x) ** 2 <= 1
    local = patch[inside]
    level = -0.9 if local.mean() > -0.2 else 0.9
    lesioned = patch.copy()
    lesioned[inside] = np.clip(level + (local - local.mean()) * 0.5, -1, 1)
    return lesioned


DATA_LESION_KINDS = ("cutpaste", "transplant", "intensity")
MIN_CHANGE = 0.2  # a drawn lesion changes its pixels by at least this on average ([-1, 1] scale)
_ATTEMPTS = 12  # draws per lesion before the most visible one is kept


def _rectangle(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """A CutPaste rectangle: 2-15 % of the patch's area, aspect ratio 0.3-3.3."""
    area = rng.uniform(0.02, 0.15) * size * size
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
    height = int(np.clip(round(math.sqrt(area * aspect)), 4, size - 8))
    width = int(np.clip(round(math.sqrt(area / aspect)), 4, size - 8))
    return height, width


def _draw(
    kind: str, patch: np.ndarray, donor: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    size = patch.shape[0]
    lesioned = patch.copy()
    mask = np.zeros(patch.shape, bool)
    if kind in ("cutpaste", "transplant"):
        height, width = _rectangle(rng, size)
        source = patch if kind == "cutpaste" else donor
        sy, sx = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        ty, tx = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        lesioned[ty : ty + height, tx : tx + width] = source[sy : sy + height, sx : sx + width]
        mask[ty : ty + height, tx : tx + width] = True
        return lesioned, mask
    # intensity: a soft blob keeps the patch's texture at the gray level of another tissue
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(10, size - 10, 2)
    ry, rx = rng.uniform(4, 11, 2)
    distance = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
    weight = np.clip(1.5 - distance, 0.0, 1.0)  # 1 inside, a soft rim of half a radius
    mask = weight > 0
    height, width = _rectangle(rng, size)
    sy, sx = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    level = float(donor[sy : sy + height, sx : sx + width].mean())
    local = float(patch[mask].mean())
    lesioned = np.clip(patch + weight * (level - local), -1, 1).astype(patch.dtype)
    return lesioned, mask


def data_lesion(
    patch: np.ndarray, donor: np.ndarray, seed: int, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """A copy of a (64, 64) patch in [-1, 1] with one lesion drawn from the data, its mask and
    its kind (:data:`DATA_LESION_KINDS`, chosen by the seed unless given):

    - ``cutpaste``: a rectangle of the patch (2-15 % of its area) pasted elsewhere in it;
    - ``transplant``: a rectangle of ``donor`` (a healthy patch of another volume) pasted in;
    - ``intensity``: a soft blob of the patch moved to the mean gray level of a region of
      ``donor``, its texture kept.

    Of up to 12 draws the first that changes its pixels by at least :data:`MIN_CHANGE` on average
    is kept (a rectangle of background pasted onto background is no lesion), else the most
    visible. The same seed gives the same lesion.
    """
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = DATA_LESION_KINDS[int(rng.integers(len(DATA_LESION_KINDS)))]
    if kind not in DATA_LESION_KINDS:
        raise ValueError(f"lesion kind {kind!r}: expected one of {', '.join(DATA_LESION_KINDS)}")
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_ATTEMPTS):
        lesioned, mask = _draw(kind, patch, donor, rng)
        change = float(np.abs(lesioned - patch)[mask].mean())
        if change >= MIN_CHANGE:
            return lesioned, mask, kind
        if best is None or change > best[0]:
            best = (change, lesioned, mask)
    assert best is not None
    return best[1], best[2], kind


# ---------------------------------------------------------------------------------------------
# Agreement of a label-free objective with the labels
# ---------------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of the finite pairs; NaN with fewer than 3 or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 3 or np.ptp(x[both]) == 0 or np.ptp(y[both]) == 0:
        return math.nan
    return float(spearmanr(x[both], y[both]).statistic)


def spearman_interval(
    x: Sequence[float],
    y: Sequence[float],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Spearman's rank correlation and its percentile bootstrap interval over the pairs.

    The pairs (trials) are resampled with replacement; a resample with a constant side (its
    correlation undefined) is left out. (NaN, NaN, NaN) with fewer than 3 finite pairs.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    both = np.isfinite(x) & np.isfinite(y)
    x, y = x[both], y[both]
    rho = spearman(x, y)
    if not math.isfinite(rho):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(resamples, len(x)))  # (resamples, pairs)
    # Spearman's rho is Pearson's r of the (average) ranks, for every resample at once
    rank_x, rank_y = rankdata(x[draws], axis=1), rankdata(y[draws], axis=1)
    rank_x -= rank_x.mean(axis=1, keepdims=True)
    rank_y -= rank_y.mean(axis=1, keepdims=True)
    scale = np.sqrt((rank_x**2).sum(axis=1) * (rank_y**2).sum(axis=1))
    defined = scale > 0
    values = (rank_x * rank_y).sum(axis=1)[defined] / scale[defined]
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail]) if len(values) else (math.nan, math.nan)
    return rho, float(low), float(high)


def pick(objective: Sequence[float], labelled: Sequence[float]) -> int:
    """The index of the trial the objective ranks first among those with a finite objective and
    labelled AUC; -1 if none."""
    objective, labelled = np.asarray(objective, float), np.asarray(labelled, float)
    both = np.isfinite(objective) & np.isfinite(labelled)
    if not both.any():
        return -1
    index = np.flatnonzero(both)
    return int(index[np.argmax(objective[both])])


def agreement(
    objective: Sequence[float],
    labelled: Sequence[float],
    labelled_at_pick: Sequence[float] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How well one objective ranks trials as the labels do.

    Args:
        objective: per trial, the objective (higher is better).
        labelled: per trial, the labelled objective (its AUC at its own best λ).
        labelled_at_pick: per trial, the labelled AUC at the λ the objective chose (defaults to
            ``labelled``): what picking that trial by the objective actually gets.

    Returns:
        ``{"trials", "spearman", "spearman_ci95", "regret", "picked"}`` (``picked``: the index of
        the trial the objective ranks first; -1 if none).
    """
    labelled_at_pick = labelled if labelled_at_pick is None else labelled_at_pick
    rho, low, high = spearman_interval(objective, labelled, resamples=resamples, seed=seed)
    best = np.nanmax(np.asarray(labelled, float)) if np.isfinite(labelled).any() else math.nan
    picked = pick(objective, labelled_at_pick)
    # the regret: against the best labelled AUC at any λ, not only at the chosen ones
    gap = float(best - np.asarray(labelled_at_pick, float)[picked]) if picked >= 0 else math.nan
    finite = np.isfinite(np.asarray(objective, float)) & np.isfinite(np.asarray(labelled, float))
    return {
        "trials": int(finite.sum()),
        "spearman": _rounded(rho),
        "spearman_ci95": [_rounded(low), _rounded(high)],
        "regret": _rounded(gap),
        "picked": picked,
    }


def _rounded(value: float, digits: int = 4) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None
