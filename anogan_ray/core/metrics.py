"""ROC/AUC, the paper's clinical table and threshold calibration (``anogan-ray evaluate``).

Conventions, used everywhere:
- Every score is oriented so that higher means more anomalous. ``p_d`` (D's probability that x
  is real) is used as ``1 - p_d``; its thresholds live on that scale.
- A patch (volume, subject) is called anomalous when its score is strictly greater than the
  threshold.
- Labels: 1 anomalous, 0 healthy, -1 unknown (left out of every labelled metric).
- Volume and subject scores aggregate patch scores (``max`` by default: a volume is as anomalous
  as its worst patch); their label is 1 when any patch is annotated, 0 when all known labels are 0.

A threshold record (``threshold.json``) is stored in the model bundle folder, next to the weights
it belongs to ("stored with the model run"): the bundle's ``model_id`` hashes only the config and
weights, so adding it changes no id. It holds one threshold per level and score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from anogan_ray import storage, tables

# Short names (the paper's) -> score table columns, in the order of the paper's Table 1 (the
# baselines first, AnoGAN's scores, then the PCA baseline).
SCORES = {
    "aCAE": "acae_score",
    "P_D": "p_d",
    "GAN_R": "ref_anomaly_score",
    "D_ref": "ref_discrimination_score",
    "A": "anomaly_score",
    "R": "residual_score",
    "D": "discrimination_score",
    "PCA": "pca_score",
}
LOWER_IS_ANOMALOUS = ("p_d",)
METHODS = ("percentile", "youden", "f1")
LEVELS = ("patch", "volume", "subject")
AGGREGATES = ("max", "mean")
THRESHOLD_FILE = "threshold.json"
# Lesion-size strata of the patch-level AUC: anomalous patches with at most 3 % / more than 5 %
# annotated pixels (against all healthy patches). Half the phantom's anomalous patches are small.
LESION_STRATA = {"auc_small": (0.0, 0.03), "auc_large": (0.05, 1.0)}


class MetricsError(ValueError):
    """Scores or labels that cannot be evaluated as asked."""


def oriented(values: np.ndarray, column: str) -> np.ndarray:
    """Scores with higher = more anomalous (``1 - p_d`` for ``p_d``)."""
    values = np.asarray(values, dtype=np.float64)
    return 1.0 - values if column in LOWER_IS_ANOMALOUS else values


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------


def _best_cut(scores: np.ndarray, labels: np.ndarray, method: str) -> tuple[float, float]:
    """(threshold, criterion) maximizing Youden's J or F1 over cuts between distinct scores.

    The cut below the lowest score (everything anomalous) is never a candidate.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(1 - y)  # called anomalous: the top i + 1
    positives, negatives = tp[-1], fp[-1]
    cut = np.flatnonzero(s[:-1] > s[1:])  # last index of each run of equal scores, not the last
    if cut.size == 0:
        return math.nan, math.nan
    tp, fp = tp[cut], fp[cut]
    if method == "youden":
        criterion = tp / positives - fp / negatives
    else:
        criterion = 2 * tp / (2 * tp + fp + (positives - tp))
    best = int(np.argmax(criterion))  # first maximum: the highest threshold among ties
    i = cut[best]
    return float((s[i] + s[i + 1]) / 2), float(criterion[best])


def calibrate_threshold(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray | None = None,
    method: str = "percentile",
    percentile: float = 99.0,
) -> dict[str, Any]:
    """A threshold on ``scores`` (higher = more anomalous) from validation data.

    Args:
        scores: validation scores.
        labels: 1 / 0 / -1 per score; without them every score counts as healthy.
        method: ``percentile`` (of the scores of patches not labelled anomalous: healthy data
            alone), ``youden`` (max sensitivity + specificity - 1) or ``f1`` (max F1); the last
            two need both classes.
        percentile: for ``percentile``, in (0, 100).

    Returns:
        ``{"value", "method", "requested_method", "n", "n_anomalous", "note"}``. When the
        requested supervised method cannot give a useful threshold (no anomalies or no healthy
        cases in validation, or J / F1 of zero) it falls back to the healthy percentile and says
        so in ``note``; it never returns a threshold that calls every validation case anomalous.
    """
    if method not in METHODS:
        raise MetricsError(f"threshold method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < percentile < 100:
        raise MetricsError(f"percentile {percentile!r}: must be in (0, 100)")
    values = np.asarray(scores, dtype=np.float64)
    known = np.full(values.shape, -1) if labels is None else np.asarray(labels, dtype=np.int64)
    finite = np.isfinite(values)
    values, known = values[finite], known[finite]
    record: dict[str, Any] = {
        "requested_method": method,
        "n": int(values.size),
        "n_anomalous": int((known == 1).sum()),
        "note": "",
    }
    if method != "percentile":
        labelled = known >= 0
        s, y = values[labelled], known[labelled]
        if y.size == 0 or y.min() == y.max():
            record["note"] = (
                f"{method}: validation has {int((y == 1).sum())} anomalous and "
                f"{int((y == 0).sum())} healthy labelled cases, both are needed; "
                f"fell back to the {percentile:g}th percentile of healthy scores"
            )
        else:
            value, criterion = _best_cut(s, y, method)
            if math.isfinite(value) and criterion > 0:
                return {**record, "value": value, "method": method, method: criterion}
            record["note"] = (
                f"{method}: no cut separates the validation classes better than chance; "
                f"fell back to the {percentile:g}th percentile of healthy scores"
            )
    healthy = values[known != 1]
    if healthy.size == 0:
        raise MetricsError("cannot calibrate a threshold: no healthy validation scores")
    value = float(np.percentile(healthy, percentile))
    return {**record, "value": value, "method": "percentile", "percentile": float(percentile)}


def save_threshold(url: str, record: dict[str, Any]) -> str:
    """Write a threshold record to ``url``: a model bundle folder or a ``.json`` file."""
    target = url if url.endswith(".json") else storage.join(url, THRESHOLD_FILE)
    storage.write_json(target, record)
    return target


def load_threshold(url: str) -> dict[str, Any]:
    """Read a threshold record from a model bundle folder or a ``.json`` file."""
    target = url if url.endswith(".json") else storage.join(url, THRESHOLD_FILE)
    if not storage.exists(target):
        raise MetricsError(
            f"{target}: no threshold record; calibrate one first (metrics.calibrate / "
            "`anogan-ray evaluate --calibrate`) or give a number"
        )
    record = storage.read_json(target)
    if not isinstance(record, dict) or "levels" not in record:
        raise MetricsError(f"{target}: not a threshold record (no 'levels' key)")
    return record


def threshold_value(record: dict[str, Any], column: str = "anomaly_score", level: str = "patch"):
    """The threshold of one score at one level from a record, or None."""
    entry = record.get("levels", {}).get(level, {}).get(column)
    return None if entry is None else float(entry["value"])


# ---------------------------------------------------------------------------------------------
# The paper's table
# ---------------------------------------------------------------------------------------------


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC AUC (scikit-learn's) of scores oriented higher = more anomalous: the one AUC function.

    Cases with label -1 or a non-finite score are left out; NaN unless both classes remain.
    """
    values = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    keep = (y >= 0) & np.isfinite(values)
    if len(np.unique(y[keep])) < 2:
        return math.nan
    return float(roc_auc_score(y[keep], values[keep]))


def paper_table(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float | None = None,
) -> dict[str, float]:
    """Precision, recall, sensitivity, specificity (at ``threshold``) and AUC, as in the paper.

    Scores are higher = more anomalous; cases with label -1 or a non-finite score are left out.
    Without a threshold only the AUC is filled. A ratio with a zero denominator is NaN.
    """
    values = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    keep = (y >= 0) & np.isfinite(values)
    values, y = values[keep], y[keep]
    row: dict[str, float] = {"n": int(y.size), "n_anomalous": int(y.sum()), "auc": auc(values, y)}

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    if threshold is None:
        row.update(precision=math.nan, recall=math.nan, sensitivity=math.nan)
        row.update(specificity=math.nan)
        return row
    called = values > threshold
    tp = int((called & (y == 1)).sum())
    fp = int((called & (y == 0)).sum())
    fn = int((~called & (y == 1)).sum())
    tn = int((~called & (y == 0)).sum())
    row.update(tp=tp, fp=fp, fn=fn, tn=tn, threshold=float(threshold))
    row["precision"] = ratio(tp, tp + fp)
    row["recall"] = row["sensitivity"] = ratio(tp, tp + fn)
    row["specificity"] = ratio(tn, tn + fp)
    return row


# ---------------------------------------------------------------------------------------------
# Reading and aggregating the score table
# ---------------------------------------------------------------------------------------------


def read_scores(
    scores: str | Sequence[str], splits: Sequence[str] | None = None, key: str | dict | None = None
) -> pd.DataFrame:
    """One scoring key's ids, labels and scores (no ``z``) as a DataFrame.

    Raises:
        TableError: the table holds several scoring keys and ``key`` does not pick one.
    """
    wanted = ["patch_id", "subject_id", "volume_id", "bscan", "y", "x", "split", "label"]
    columns = [*wanted, "anomaly_fraction", "volume_label", *SCORES.values(), *tables.KEY_COLUMNS]
    frame, _ = tables.read_scores(scores, key, columns=columns, splits=splits)
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise MetricsError(f"score table {scores}: missing column(s) {', '.join(missing)}")
    return frame.reset_index(drop=True)


def key_text(frame: pd.DataFrame) -> str:
    """The scoring key of a one-key frame from :func:`read_scores`, as text."""
    row = frame.iloc[0]
    return str(tables.ScoringKey(*(row[c] for c in tables.KEY_COLUMNS)))


def score_columns(frame: pd.DataFrame) -> list[str]:
    """The score columns of ``frame`` that hold at least one finite value."""
    return [
        c
        for c in SCORES.values()
        if c in frame.columns and np.isfinite(frame[c].to_numpy(np.float64)).any()
    ]


def at_level(frame: pd.DataFrame, level: str = "patch", aggregate: str = "max") -> pd.DataFrame:
    """Patch rows, or one row per volume / subject with aggregated (oriented) scores and labels.

    Scores in the result are oriented (higher = more anomalous), at every level. A volume's
    (subject's) label is 1 when any of its patches is annotated or the manifest labels it 1
    (``volume_label``), 0 when it is known and neither, -1 otherwise.
    """
    if level not in LEVELS:
        raise MetricsError(f"level {level!r}: choose one of {', '.join(LEVELS)}")
    if aggregate not in AGGREGATES:
        raise MetricsError(f"aggregate {aggregate!r}: choose one of {', '.join(AGGREGATES)}")
    columns = score_columns(frame)
    out = frame.copy()
    for c in columns:
        out[c] = oriented(out[c].to_numpy(), c)
    if level == "patch":
        return out
    keys = ["subject_id", "volume_id"] if level == "volume" else ["subject_id"]
    # a volume (subject) is anomalous when a patch is annotated or the manifest labels it 1
    volume_label = out["volume_label"] if "volume_label" in out else pd.Series(-1, out.index)
    volume_label = volume_label.fillna(-1)
    out["_anomalous"] = ((out["label"] == 1) | (volume_label == 1)).astype(np.int64)
    out["_known"] = ((out["label"] >= 0) | (volume_label >= 0)).astype(np.int64)
    grouped = out.groupby(keys + ["split"], sort=True)
    result = grouped[columns].agg(aggregate)
    result["patches"] = grouped.size()
    anomalous, known = grouped["_anomalous"].sum(), grouped["_known"].sum()
    result["label"] = np.where(anomalous > 0, 1, np.where(known > 0, 0, -1))
    return result.reset_index()


# ---------------------------------------------------------------------------------------------
# Calibrate and evaluate
# ---------------------------------------------------------------------------------------------


def calibrate(
    scores: str | Sequence[str],
    out: str | None = None,
    method: str = "percentile",
    percentile: float = 99.0,
    split: str = "val",
    key: str | dict | None = None,
    aggregate: str = "max",
) -> dict[str, Any]:
    """Calibrate thresholds for every score and level on one split and (optionally) store them.

    Args:
        scores: score table folder(s) that include the calibration split.
        out: a model bundle folder (or ``.json`` path) to store ``threshold.json`` in.
        method, percentile: see :func:`calibrate_threshold`.
        split: the validation split (healthy subjects in the unsupervised setting).
        key: which scoring key's rows, when the table holds several (``tables.select_key``).
        aggregate: how patch scores become volume / subject scores.

    Returns:
        The threshold record; ``record["threshold"]`` is the patch-level A threshold.
    """
    frame = read_scores(scores, splits=[split], key=key)
    if frame.empty:
        raise MetricsError(
            f"score table {scores}: no {split!r} rows to calibrate on; score that split "
            "(score.splits) or give a threshold number"
        )
    levels: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        table = at_level(frame, level, aggregate)
        levels[level] = {
            column: calibrate_threshold(table[column], table["label"], method, percentile)
            for column in score_columns(table)
        }
    record = {
        "model_id": str(frame["model_id"].iloc[0]),
        "key": key_text(frame),
        "split": split,
        "method": method,
        "percentile": float(percentile),
        "aggregate": aggregate,
        "orientation": "higher is anomalous; p_d thresholds are on 1 - p_d; anomalous if > value",
        "threshold": levels["patch"].get("anomaly_score", {}).get("value"),
        "levels": levels,
    }
    if out is not None:
        record["path"] = save_threshold(out, record)
    return record


def evaluate(
    scores: str | Sequence[str],
    threshold: float | str | None = None,
    level: str = "patch",
    split: str = "test",
    key: str | dict | None = None,
    aggregate: str = "max",
    method: str = "percentile",
    percentile: float = 99.0,
    calibration_split: str = "val",
) -> dict[str, Any]:
    """ROC, AUC and the paper's table for every score present, at one level.

    Args:
        scores: score table folder(s), local or s3.
        threshold: a number (the A threshold at this level), a model bundle folder or
            ``threshold.json`` holding a calibrated record, or None to calibrate now on
            ``calibration_split`` with ``method`` / ``percentile`` (not stored).
        level: ``patch``, ``volume`` or ``subject``.
        split: the labelled split to evaluate.
        key: which scoring key's rows, when the table holds several (``tables.select_key``).
        aggregate: ``max`` or ``mean`` of patch scores per volume / subject.

    Returns:
        ``{"level", "split", "model_id", "n", "n_anomalous", "threshold_source", "scores":
        {short name: {"column", "auc", "precision", ..., "roc": {"fpr", "tpr"}}}}``.
    """
    frame = read_scores(scores, key=key)
    rows = frame[frame["split"] == split]
    evaluated = at_level(rows, level, aggregate)
    evaluated = evaluated[evaluated["label"] >= 0]
    note = None
    if level == "patch" and evaluated["label"].nunique() < 2:
        by_volume = at_level(rows, "volume", aggregate)
        by_volume = by_volume[by_volume["label"] >= 0]
        if by_volume["label"].nunique() == 2:  # labels per image / volume only (no masks)
            level, evaluated = "volume", by_volume
            note = (
                f"the patches of split {split!r} carry no healthy-and-anomalous labels but its "
                f"volumes do (manifest labels without masks): evaluated per volume, the volume "
                f"score being the {aggregate} of its patch scores"
            )
    if evaluated.empty or evaluated["label"].nunique() < 2:
        raise MetricsError(
            f"score table {scores}: split {split!r} at {level} level needs labelled healthy and "
            f"anomalous cases; it has {int((evaluated['label'] == 1).sum())} anomalous and "
            f"{int((evaluated['label'] == 0).sum())} healthy"
        )
    thresholds: dict[str, float] = {}
    if isinstance(threshold, (int, float)):
        thresholds["anomaly_score"] = float(threshold)
        source = "given"
    elif isinstance(threshold, str):
        record = load_threshold(threshold)
        for column in SCORES.values():
            value = threshold_value(record, column, level)
            if value is not None:
                thresholds[column] = value
        source = (
            threshold if threshold.endswith(".json") else storage.join(threshold, THRESHOLD_FILE)
        )
    else:
        calibration = frame[frame["split"] == calibration_split]
        if calibration.empty:
            source = f"none: no {calibration_split!r} rows to calibrate on"
        else:
            table = at_level(calibration, level, aggregate)
            for column in score_columns(table):
                entry = calibrate_threshold(table[column], table["label"], method, percentile)
                thresholds[column] = entry["value"]
            source = f"calibrated now on {calibration_split!r} ({method}), not stored"
    results: dict[str, Any] = {}
    for name, column in SCORES.items():
        if column not in score_columns(evaluated):
            continue
        values = evaluated[column].to_numpy(np.float64)
        labels = evaluated["label"].to_numpy(np.int64)
        row = paper_table(values, labels, thresholds.get(column))
        finite = np.isfinite(values)
        fpr, tpr, _ = roc_curve(labels[finite], values[finite])
        row["column"] = column
        row["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        if level == "patch" and "anomaly_fraction" in evaluated.columns:
            row.update(auc_by_lesion_size(values, labels, evaluated["anomaly_fraction"]))
        results[name] = row
    return {
        "level": level,
        "split": split,
        "aggregate": aggregate if level != "patch" else None,
        "model_id": str(frame["model_id"].iloc[0]),
        "key": key_text(frame),
        "n": int(len(evaluated)),
        "n_anomalous": int((evaluated["label"] == 1).sum()),
        "threshold_source": source,
        "note": note,
        "orientation": "higher is anomalous; P_D is evaluated as 1 - p_d",
        "scores": results,
    }


def compare(
    scores: str | Sequence[str], split: str = "test", level: str = "patch", aggregate: str = "max"
) -> list[dict[str, Any]]:
    """Every scoring key of a score table side by side: one row per key (model, λ, Γ, z's rate,
    mapping) with the AUC of each score at ``level`` on ``split`` (NaN without two classes).

    This is where a table holding several mappings or settings is read as a whole, on purpose.
    """
    rows = []
    for key in tables.scoring_keys(tables.open_dataset(scores)):
        frame = at_level(read_scores(scores, splits=[split], key=key.row()), level, aggregate)
        labels = frame["label"].to_numpy(np.int64)
        row: dict[str, Any] = {"key": str(key), **key.row(), "n": int((labels >= 0).sum())}
        for name, column in SCORES.items():
            if column in score_columns(frame):
                row[name] = auc(frame[column].to_numpy(np.float64), labels)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """:func:`compare`'s rows for the terminal: one line per scoring key."""
    names = [name for name in SCORES if any(name in row for row in rows)]
    head = f"{'mapping':<19}{'steps':>6}{'lambda':>8}{'z_lr':>8}{'model':>10}{'n':>7}"
    head += "".join(f"{name:>8}" for name in names)
    lines = [head, "-" * len(head)]
    for row in rows:
        line = f"{row['mapping']:<19}{row['steps']:>6}{row['lambda']:>8.3g}{row['z_lr']:>8.3g}"
        line += f"{row['model_id'][:8]:>10}{row['n']:>7}"
        line += "".join(f"{row.get(name, math.nan):>8.4f}" for name in names)
        lines.append(line)
    return "\n".join(lines)


def auc_by_lesion_size(
    scores: np.ndarray, labels: np.ndarray, anomaly_fraction: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Patch AUC with the anomalous patches restricted to each of :data:`LESION_STRATA`.

    Every healthy patch stays in each stratum; NaN where a stratum has no anomalous patch.
    """
    fraction = np.asarray(anomaly_fraction, dtype=np.float64)
    result = {}
    for name, (low, high) in LESION_STRATA.items():
        keep = (labels == 0) | ((labels == 1) & (fraction > low) & (fraction <= high))
        result[name] = paper_table(scores[keep], labels[keep])["auc"]
    return result


def format_paper_table(result: dict[str, Any]) -> str:
    """The paper's table (one row per score) for the terminal."""
    head = f"{'score':<7}{'precision':>10}{'recall':>9}{'sensitivity':>12}{'specificity':>12}"
    head += f"{'AUC':>8}{'threshold':>11}"
    strata = any("auc_small" in row for row in result["scores"].values())
    if strata:
        head += f"{'AUC<=3%':>9}{'AUC>5%':>8}"
    lines = [f"note: {result['note']}"] if result.get("note") else []
    lines += [
        f"{result['level']} level, split {result['split']}: {result['n']} cases, "
        f"{result['n_anomalous']} anomalous; thresholds: {result['threshold_source']}",
        head,
        "-" * len(head),
    ]
    for name, row in result["scores"].items():
        t = row.get("threshold")
        lines.append(
            f"{name:<7}{row['precision']:>10.4f}{row['recall']:>9.4f}{row['sensitivity']:>12.4f}"
            f"{row['specificity']:>12.4f}{row['auc']:>8.4f}"
            + (f"{t:>11.4g}" if t is not None else f"{'-':>11}")
            + (
                f"{row.get('auc_small', math.nan):>9.4f}{row.get('auc_large', math.nan):>8.4f}"
                if strata
                else ""
            )
        )
    return "\n".join(lines)
