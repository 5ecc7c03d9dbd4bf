"""ROC/AUC, the paper's clinical table and threshold calibration (``anogan-ray evaluate``).

Conventions, used everywhere:
- Every score is oriented so that higher means more anomalous. ``p_d`` (D's probability that x
  is real) is used as ``1 - p_d``; its thresholds live on that scale.
- A patch (volume, subject) is called anomalous when its score is strictly greater than the
  threshold.
- Labels: 1 anomalous, 0 healthy, -1 unknown (left out of every labelled metric).
- Volume and subject scores aggregate patch scores (``max`` by default: a volume is as anomalous
  as its worst patch); their label is 1 when any patch is annotated, 0 when all known labels are 0.

Every metric is computed in DuckDB over the score table's Parquet files (``tables.connect``), so
memory stays flat as the cohort grows: volume and subject scores are DuckDB aggregates, and each
score's cases are counted per distinct score value (:class:`Ranking`), from which the exact AUC
(rank sums with average ranks for ties, scikit-learn's value), the ROC curve (at most
:data:`ROC_POINTS` of its points), the paper's counts at a threshold, the Youden / F1 cut and the
healthy percentile (exact, numpy's linear interpolation) all follow. Only these small results
come into Python; the functions on arrays (:func:`auc`, :func:`paper_table`,
:func:`calibrate_threshold`) run the same code on an in-memory table.

A threshold record (``threshold.json``) is stored in the model bundle folder, next to the weights
it belongs to ("stored with the model run"): the bundle's ``model_id`` hashes only the config and
weights, so adding it changes no id. It holds one threshold per level and score.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

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
_NAMES = {column: name for name, column in SCORES.items()}
LOWER_IS_ANOMALOUS = ("p_d",)
METHODS = ("percentile", "youden", "f1")
LEVELS = ("patch", "volume", "subject")
AGGREGATES = ("max", "mean")
THRESHOLD_FILE = "threshold.json"
# Lesion-size strata of the patch-level AUC: anomalous patches with at most 3 % / more than 5 %
# annotated pixels (against all healthy patches). Half the phantom's anomalous patches are small.
LESION_STRATA = {"auc_small": (0.0, 0.03), "auc_large": (0.05, 1.0)}
# Most points of a returned ROC curve: every one is the exact (FPR, TPR) at a threshold; above
# this many distinct scores the curve keeps one point per 1/1000 of FPR + TPR.
ROC_POINTS = 2000


class MetricsError(ValueError):
    """Scores or labels that cannot be evaluated as asked."""


def oriented(values: np.ndarray, column: str) -> np.ndarray:
    """Scores with higher = more anomalous (``1 - p_d`` for ``p_d``)."""
    values = np.asarray(values, dtype=np.float64)
    return 1.0 - values if column in LOWER_IS_ANOMALOUS else values


# ---------------------------------------------------------------------------------------------
# One score's cases, counted per distinct value: the one place AUC, ROC and thresholds come from
# ---------------------------------------------------------------------------------------------

_tables = itertools.count()


class Ranking:
    """The cases of one score in DuckDB: per distinct finite score value, how many anomalous
    (``pos``), healthy (``neg``) and unlabelled (``unknown``) cases have it, and how many have it
    or a higher one (``tp``, ``fp``, ``at_or_above_healthy``).

    Every metric of this module is a sum over these rows, so a table of 10^7 patches needs one
    GROUP BY per score and the rows stay in DuckDB; only scalars and at most
    :data:`ROC_POINTS` ROC points come into Python. Use it as a context manager: the temporary
    table (as many rows as distinct scores) is dropped on exit.

    Args:
        con: a DuckDB connection.
        source: the table or view of cases, with a ``label`` column (1 / 0 / other).
        column: its score column (higher = more anomalous).
        fraction: its annotated-share column, for :meth:`auc_by_lesion_size`, or None.
    """

    def __init__(
        self, con: duckdb.DuckDBPyConnection, source: str, column: str, fraction: str | None
    ):
        self.con = con
        self.table = f"ranking_{next(_tables)}"
        strata = "".join(
            f', COUNT(*) FILTER (WHERE label = 1 AND "{fraction}" > {low} '
            f'AND "{fraction}" <= {high}) AS "{name}"'
            for name, (low, high) in (LESION_STRATA.items() if fraction else ())
        )
        con.execute(f"""
            CREATE TEMP TABLE {self.table} AS
            WITH counted AS (
                SELECT "{column}" AS s,
                       COUNT(*) FILTER (WHERE label = 1) AS pos,
                       COUNT(*) FILTER (WHERE label = 0) AS neg,
                       COUNT(*) FILTER (WHERE label IS DISTINCT FROM 1
                                        AND label IS DISTINCT FROM 0) AS unknown{strata}
                FROM {source}
                WHERE isfinite("{column}")
                GROUP BY 1
            )
            SELECT *,
                   CAST(SUM(pos) OVER above AS BIGINT) AS tp,
                   CAST(SUM(neg) OVER above AS BIGINT) AS fp,
                   CAST(SUM(neg + unknown) OVER above AS BIGINT) AS at_or_above_healthy
            FROM counted
            WINDOW above AS (ORDER BY s DESC ROWS UNBOUNDED PRECEDING)
        """)
        sums = ", ".join(f'CAST(COALESCE(SUM("{n}"), 0) AS BIGINT)' for n in self._strata())
        totals = con.execute(f"""
            SELECT CAST(COALESCE(SUM(pos), 0) AS BIGINT), CAST(COALESCE(SUM(neg), 0) AS BIGINT),
                   CAST(COALESCE(SUM(unknown), 0) AS BIGINT),
                   COUNT(*) FILTER (WHERE pos + neg > 0){", " + sums if sums else ""}
            FROM {self.table}
        """).fetchone()
        self.positives, self.negatives, self.unknown, self.labelled_values = totals[:4]
        self.stratum_positives = dict(zip(self._strata(), totals[4:], strict=True))

    def _strata(self) -> list[str]:
        present = {row[0] for row in self.con.execute(f"DESCRIBE {self.table}").fetchall()}
        return [name for name in LESION_STRATA if name in present]

    def __enter__(self) -> Ranking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {self.table}")

    @property
    def cases(self) -> int:
        """Cases with a finite score, labelled or not."""
        return self.positives + self.negatives + self.unknown

    def auc(self, positives: str = "pos") -> float:
        """ROC AUC: the Mann-Whitney U of the anomalous cases' ranks among the labelled ones,
        ties counting one half (average ranks), which is what scikit-learn's ``roc_auc_score``
        gives; NaN unless both classes are present. ``positives``: a lesion stratum's column
        instead of all anomalous cases (every healthy case stays)."""
        n_positive = self.positives if positives == "pos" else self.stratum_positives[positives]
        if n_positive == 0 or self.negatives == 0:
            return math.nan
        # each anomalous case scores 1 per healthy case below it and 1/2 per tie; times two
        (twice_u,) = self.con.execute(
            f'SELECT SUM("{positives}" * (2 * ({self.negatives} - fp) + neg)) FROM {self.table}'
        ).fetchone()
        return int(twice_u) / (2 * n_positive * self.negatives)

    def auc_by_lesion_size(self) -> dict[str, float]:
        """:meth:`auc` with the anomalous cases restricted to each of :data:`LESION_STRATA`."""
        return {name: self.auc(name) for name in self._strata()}

    def counts_above(self, threshold: float) -> tuple[int, int]:
        """(anomalous, healthy) cases whose score is strictly greater than ``threshold``."""
        tp, fp = self.con.execute(
            f"SELECT COALESCE(SUM(pos), 0), COALESCE(SUM(neg), 0) FROM {self.table} WHERE s > ?",
            [float(threshold)],
        ).fetchone()
        return int(tp), int(fp)

    def roc(self, max_points: int = ROC_POINTS) -> dict[str, list[float]]:
        """The ROC curve from (0, 0) to (1, 1) as ``{"fpr", "tpr"}``, at most ``max_points``.

        Each point is the exact (FPR, TPR) of calling the cases at or above one distinct score
        anomalous. With more distinct labelled scores than ``max_points`` the curve keeps, for
        each step of 1/1000-ish of FPR + TPR, the last point of that step, so no stretch of the
        curve longer than that is left out and the end point is always kept.
        """
        if self.positives == 0 or self.negatives == 0:
            return {"fpr": [], "tpr": []}
        steps = max(1, max_points - 2)
        if self.labelled_values <= max_points - 1:
            sql = f"SELECT fp, tp FROM {self.table} WHERE pos + neg > 0 ORDER BY s DESC"
        else:  # tp and fp grow as s falls: a step's maxima are its last point
            sql = f"""
                SELECT MAX(fp) AS fp, MAX(tp) AS tp FROM {self.table} WHERE pos + neg > 0
                GROUP BY floor((fp / {self.negatives} + tp / {self.positives}) * {steps} / 2)
                ORDER BY fp, tp
            """
        points = self.con.execute(sql).fetchall()
        return {
            "fpr": [0.0] + [fp / self.negatives for fp, _ in points],
            "tpr": [0.0] + [tp / self.positives for _, tp in points],
        }

    def best_cut(self, method: str) -> tuple[float, float]:
        """(threshold, criterion) maximizing Youden's J or F1 over cuts between distinct
        labelled scores; the first maximum from the top (the highest threshold among ties).

        The cut below the lowest score (everything anomalous) is never a candidate; (NaN, NaN)
        when there is no cut.
        """
        if method == "youden":
            criterion = (
                f"CAST(tp AS DOUBLE) / {self.positives} - CAST(fp AS DOUBLE) / {self.negatives}"
            )
        else:
            criterion = f"CAST(2 * tp AS DOUBLE) / (2 * tp + fp + ({self.positives} - tp))"
        found = self.con.execute(f"""
            WITH cuts AS (
                SELECT s, tp, fp, LEAD(s) OVER (ORDER BY s DESC) AS below
                FROM {self.table} WHERE pos + neg > 0
            )
            SELECT (s + below) / 2, {criterion} AS criterion FROM cuts WHERE below IS NOT NULL
            ORDER BY criterion DESC, s DESC LIMIT 1
        """).fetchone()
        return (math.nan, math.nan) if found is None else (float(found[0]), float(found[1]))

    def healthy_percentile(self, percentile: float) -> float:
        """The ``percentile`` of the scores of cases not labelled anomalous, exactly as
        ``np.percentile`` (linear interpolation) computes it on them."""
        healthy = self.negatives + self.unknown
        index = (healthy - 1) * (percentile / 100)
        lower = math.floor(index)
        upper = min(lower + 1, healthy - 1)
        # ascending 0-based ranks held by value s: healthy - at_or_above .. + (neg + unknown) - 1
        first = f"{healthy} - at_or_above_healthy"
        a, b = self.con.execute(f"""
            SELECT MAX(s) FILTER (WHERE {first} <= {lower} AND {lower} < {first} + neg + unknown),
                   MAX(s) FILTER (WHERE {first} <= {upper} AND {upper} < {first} + neg + unknown)
            FROM {self.table} WHERE neg + unknown > 0
        """).fetchone()
        gamma = index - lower
        difference = b - a  # numpy's _lerp, so the value is bit-for-bit np.percentile's
        return b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma


def _ranking_of(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray | None,
    fraction: Sequence[float] | np.ndarray | None = None,
) -> Ranking:
    """A :class:`Ranking` of arrays (an in-memory DuckDB table)."""
    values = np.asarray(scores, dtype=np.float64)
    columns = {
        "score": values,
        "label": np.full(values.shape, -1) if labels is None else np.asarray(labels, np.int64),
    }
    if fraction is not None:
        columns["fraction"] = np.asarray(fraction, dtype=np.float64)
    con = duckdb.connect()
    con.register("cases", pa.table(columns))
    return Ranking(con, "cases", "score", "fraction" if fraction is not None else None)


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------


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
    with _ranking_of(scores, labels) as ranking:
        return threshold_of(ranking, method, percentile)


def threshold_of(ranking: Ranking, method: str, percentile: float) -> dict[str, Any]:
    """:func:`calibrate_threshold` on a :class:`Ranking` (a score column of a table)."""
    if method not in METHODS:
        raise MetricsError(f"threshold method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < percentile < 100:
        raise MetricsError(f"percentile {percentile!r}: must be in (0, 100)")
    record: dict[str, Any] = {
        "requested_method": method,
        "n": ranking.cases,
        "n_anomalous": ranking.positives,
        "note": "",
    }
    if method != "percentile":
        if ranking.positives == 0 or ranking.negatives == 0:
            record["note"] = (
                f"{method}: validation has {ranking.positives} anomalous and "
                f"{ranking.negatives} healthy labelled cases, both are needed; "
                f"fell back to the {percentile:g}th percentile of healthy scores"
            )
        else:
            value, criterion = ranking.best_cut(method)
            if math.isfinite(value) and criterion > 0:
                return {**record, "value": value, "method": method, method: criterion}
            record["note"] = (
                f"{method}: no cut separates the validation classes better than chance; "
                f"fell back to the {percentile:g}th percentile of healthy scores"
            )
    if ranking.negatives + ranking.unknown == 0:
        raise MetricsError("cannot calibrate a threshold: no healthy validation scores")
    value = ranking.healthy_percentile(percentile)
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
    """ROC AUC (equal to scikit-learn's) of scores oriented higher = more anomalous: the one AUC
    function (:meth:`Ranking.auc`).

    Cases with label -1 or a non-finite score are left out; NaN unless both classes remain.
    """
    with _ranking_of(scores, labels) as ranking:
        return ranking.auc()


def paper_table(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float | None = None,
) -> dict[str, float]:
    """Precision, recall, sensitivity, specificity (at ``threshold``) and AUC, as in the paper.

    Scores are higher = more anomalous; cases with label -1 or a non-finite score are left out.
    Without a threshold only the AUC is filled. A ratio with a zero denominator is NaN.
    """
    with _ranking_of(scores, labels) as ranking:
        return table_row(ranking, threshold)


def table_row(ranking: Ranking, threshold: float | None = None) -> dict[str, float]:
    """:func:`paper_table` on a :class:`Ranking` (a score column of a table)."""
    positives, negatives = ranking.positives, ranking.negatives
    row: dict[str, float] = {
        "n": positives + negatives,
        "n_anomalous": positives,
        "auc": ranking.auc(),
    }

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    if threshold is None:
        row.update(precision=math.nan, recall=math.nan, sensitivity=math.nan)
        row.update(specificity=math.nan)
        return row
    tp, fp = ranking.counts_above(threshold)
    fn, tn = positives - tp, negatives - fp
    row.update(tp=tp, fp=fp, fn=fn, tn=tn, threshold=float(threshold))
    row["precision"] = ratio(tp, tp + fp)
    row["recall"] = row["sensitivity"] = ratio(tp, tp + fn)
    row["specificity"] = ratio(tn, tn + fp)
    return row


def auc_by_lesion_size(
    scores: np.ndarray, labels: np.ndarray, anomaly_fraction: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Patch AUC with the anomalous patches restricted to each of :data:`LESION_STRATA`.

    Every healthy patch stays in each stratum; NaN where a stratum has no anomalous patch.
    """
    with _ranking_of(scores, labels, anomaly_fraction) as ranking:
        return ranking.auc_by_lesion_size()


# ---------------------------------------------------------------------------------------------
# Reading and aggregating the score table
# ---------------------------------------------------------------------------------------------


def read_scores(
    scores: str | Sequence[str], splits: Sequence[str] | None = None, key: str | dict | None = None
) -> pd.DataFrame:
    """One scoring key's ids, labels and scores (no ``z``) as a DataFrame: for small tables
    (tests, notebooks); calibrate, evaluate, compare and report never load a table whole.

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


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE {relation}").fetchall()]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def score_columns(con: duckdb.DuckDBPyConnection, cases: str, where: str = "TRUE") -> list[str]:
    """The score columns of the relation ``cases`` that hold at least one finite value among
    the rows ``where`` keeps."""
    present = [c for c in SCORES.values() if c in _columns(con, cases)]
    if not present:
        return []
    counts = ", ".join(f'COUNT(*) FILTER (WHERE isfinite("{c}"))' for c in present)
    found = con.execute(f"SELECT {counts} FROM {cases} WHERE {where}").fetchone()
    return [c for c, n in zip(present, found, strict=True) if n > 0]


def at_level(
    con: duckdb.DuckDBPyConnection,
    split: str,
    level: str = "patch",
    aggregate: str = "max",
    rows: str = "scores",
) -> str:
    """The cases of ``split`` at ``level`` as a DuckDB relation; returns its name.

    Patch level: a view of the patch rows. Volume / subject level: a temporary table with one
    row per volume (subject), small enough to keep. Scores are oriented (higher = more
    anomalous; NaN read as NULL), at every level. A volume's (subject's) score is the
    ``aggregate`` of its patches' non-NaN scores; its label is 1 when any of its patches is
    annotated or the manifest labels it 1 (``volume_label``), 0 when it is known and neither,
    -1 otherwise.

    Args:
        con: a connection from :func:`anogan_ray.tables.connect`.
        split: the split's rows.
        level, aggregate: see :data:`LEVELS`, :data:`AGGREGATES`.
        rows: the relation holding one scoring key's patch rows.
    """
    if level not in LEVELS:
        raise MetricsError(f"level {level!r}: choose one of {', '.join(LEVELS)}")
    if aggregate not in AGGREGATES:
        raise MetricsError(f"aggregate {aggregate!r}: choose one of {', '.join(AGGREGATES)}")
    available = _columns(con, rows)
    name = f"cases_{next(_tables)}"
    oriented_columns = {
        c: tables.sql_number(
            f'1 - CAST("{c}" AS DOUBLE)' if c in LOWER_IS_ANOMALOUS else f'CAST("{c}" AS DOUBLE)'
        )
        for c in SCORES.values()
        if c in available
    }
    where = f"split = {_literal(split)}"
    if level == "patch":
        fraction = ', "anomaly_fraction"' if "anomaly_fraction" in available else ""
        scores = ", ".join(f'{sql} AS "{c}"' for c, sql in oriented_columns.items())
        con.execute(
            f"CREATE TEMP VIEW {name} AS SELECT patch_id, subject_id, volume_id, label{fraction}"
            f"{', ' + scores if scores else ''} FROM {rows} WHERE {where}"
        )
        return name
    keys = "subject_id, volume_id" if level == "volume" else "subject_id"
    scores = "".join(
        f', {aggregate.upper()}({sql}) AS "{c}"' for c, sql in oriented_columns.items()
    )
    volume_label = "volume_label" if "volume_label" in available else "-1"
    # a volume (subject) is anomalous when a patch is annotated or the manifest labels it 1
    con.execute(f"""
        CREATE TEMP TABLE {name} AS
        SELECT {keys}, split{scores}, COUNT(*) AS patches,
               CASE WHEN COUNT(*) FILTER (WHERE label = 1 OR {volume_label} = 1) > 0 THEN 1
                    WHEN COUNT(*) FILTER (WHERE label >= 0 OR {volume_label} >= 0) > 0 THEN 0
                    ELSE -1 END AS label
        FROM {rows} WHERE {where}
        GROUP BY {keys}, split ORDER BY {keys}
    """)
    return name


def _label_counts(con: duckdb.DuckDBPyConnection, cases: str) -> tuple[int, int]:
    """(anomalous, healthy) cases of a relation from :func:`at_level`."""
    anomalous, healthy = con.execute(
        f"SELECT COUNT(*) FILTER (WHERE label = 1), COUNT(*) FILTER (WHERE label = 0) FROM {cases}"
    ).fetchone()
    return int(anomalous), int(healthy)


# ---------------------------------------------------------------------------------------------
# Calibrate and evaluate
# ---------------------------------------------------------------------------------------------


def _thresholds(
    con: duckdb.DuckDBPyConnection, cases: str, method: str, percentile: float
) -> dict[str, dict[str, Any]]:
    """A calibrated threshold record per score column of ``cases`` (see :func:`threshold_of`)."""
    records = {}
    for column in score_columns(con, cases):
        with Ranking(con, cases, column, None) as ranking:
            records[column] = threshold_of(ranking, method, percentile)
    return records


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
    con, chosen = tables.connect(scores, key or {})
    (rows,) = con.execute(f"SELECT COUNT(*) FROM scores WHERE split = {_literal(split)}").fetchone()
    if rows == 0:
        raise MetricsError(
            f"score table {scores}: no {split!r} rows to calibrate on; score that split "
            "(score.splits) or give a threshold number"
        )
    levels = {
        level: _thresholds(con, at_level(con, split, level, aggregate), method, percentile)
        for level in LEVELS
    }
    record = {
        "model_id": chosen.model_id,
        "key": str(chosen),
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
        {short name: {"column", "auc", "precision", ..., "roc": {"fpr", "tpr"}}}}``; each ROC
        curve has at most :data:`ROC_POINTS` points, each exact (:meth:`Ranking.roc`).
    """
    con, chosen = tables.connect(scores, key or {})
    cases = at_level(con, split, level, aggregate)
    anomalous, healthy = _label_counts(con, cases)
    note = None
    if level == "patch" and not (anomalous and healthy):
        by_volume = at_level(con, split, "volume", aggregate)
        if all(_label_counts(con, by_volume)):  # labels per image / volume only (no masks)
            level, cases = "volume", by_volume
            anomalous, healthy = _label_counts(con, cases)
            note = (
                f"the patches of split {split!r} carry no healthy-and-anomalous labels but its "
                f"volumes do (manifest labels without masks): evaluated per volume, the volume "
                f"score being the {aggregate} of its patch scores"
            )
    if not (anomalous and healthy):
        raise MetricsError(
            f"score table {scores}: split {split!r} at {level} level needs labelled healthy and "
            f"anomalous cases; it has {anomalous} anomalous and {healthy} healthy"
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
        calibration = at_level(con, calibration_split, level, aggregate)
        (rows,) = con.execute(f"SELECT COUNT(*) FROM {calibration}").fetchone()
        if rows == 0:
            source = f"none: no {calibration_split!r} rows to calibrate on"
        else:
            records = _thresholds(con, calibration, method, percentile)
            thresholds = {column: entry["value"] for column, entry in records.items()}
            source = f"calibrated now on {calibration_split!r} ({method}), not stored"
    fraction = "anomaly_fraction" if level == "patch" else None
    if fraction not in _columns(con, cases):
        fraction = None
    present = score_columns(con, cases, "label >= 0")
    results: dict[str, Any] = {}
    for name, column in SCORES.items():
        if column not in present:
            continue
        with Ranking(con, cases, column, fraction) as ranking:
            row = table_row(ranking, thresholds.get(column))
            row["column"] = column
            row["roc"] = ranking.roc()
            row.update(ranking.auc_by_lesion_size())
        results[name] = row
    return {
        "level": level,
        "split": split,
        "aggregate": aggregate if level != "patch" else None,
        "model_id": chosen.model_id,
        "key": str(chosen),
        "n": anomalous + healthy,
        "n_anomalous": anomalous,
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
    con, _ = tables.connect(scores)
    rows = []
    for key in tables.scoring_keys(tables.open_dataset(scores)):
        con.execute(
            "CREATE OR REPLACE TEMP VIEW key_rows AS "
            f"SELECT * FROM scores WHERE {tables.key_condition(key)}"
        )
        cases = at_level(con, split, level, aggregate, rows="key_rows")
        anomalous, healthy = _label_counts(con, cases)
        (labelled,) = con.execute(f"SELECT COUNT(*) FROM {cases} WHERE label >= 0").fetchone()
        row: dict[str, Any] = {"key": str(key), **key.row(), "n": int(labelled)}
        for column in score_columns(con, cases):
            with Ranking(con, cases, column, None) as ranking:
                row[_NAMES[column]] = ranking.auc()
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


# ---------------------------------------------------------------------------------------------
# Pixel level: anomaly maps against pixel annotations
# ---------------------------------------------------------------------------------------------

# Pixel scores are counted in one bin per float16 value (the map table stores maps as float16),
# so every pixel metric below is exact for the float16-rounded scores, ties counting one half,
# in a fixed 2^16-bin histogram whatever the number of pixels.
PIXEL_BINS = 1 << 16
AUPRO_MAX_FPR = 0.3  # MVTec AD's integration limit of the PRO curve
REGION_OVERLAP = 0.3  # a lesion region is detected when this share of its pixels is flagged
_NEIGHBOURS = np.ones((3, 3), bool)  # 8-connectivity of lesion regions (as MVTec AD's code)


def float16_bins(values: np.ndarray) -> np.ndarray:
    """Finite scores -> their float16 value's rank among all float16 values (0 .. 2^16 − 1).

    The order of the bins is the order of the values (−0 and +0 share a bin), so a count per
    bin is a histogram in which every distinct float16 score has a bin of its own.
    """
    bits = (np.asarray(values, np.float16) + np.float16(0)).view(np.uint16)  # -0 -> +0
    return np.where(bits & 0x8000, ~bits & 0x7FFF, bits | 0x8000).astype(np.int64)


def bin_value(index: int) -> float:
    """The float16 score of a bin of :func:`float16_bins`."""
    index = int(index)
    bits = index & 0x7FFF if index & 0x8000 else (~index & 0x7FFF) | 0x8000
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def lesion_regions(lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions (8-connectivity) of a boolean lesion mask: (labels, count)."""
    from scipy import ndimage

    labels, count = ndimage.label(lesion, structure=_NEIGHBOURS)
    return labels, int(count)


class _Positives:
    """The annotated pixels of one group (all lesions, or one lesion type)."""

    def __init__(self) -> None:
        self.counts = np.zeros(PIXEL_BINS, np.int64)  # annotated pixels per bin
        self.region_share = np.zeros(PIXEL_BINS, np.float64)  # Σ 1 / |its region| per bin
        self.regions = 0
        self.detected = 0  # regions with overlap >= REGION_OVERLAP at the threshold


class PixelCounts:
    """One method's pixel scores over any number of B-scans, held as fixed-size histograms.

    :meth:`add` takes a map and its mask; the healthy pixels' scores, and per group (``all``
    lesions, and each lesion type of :meth:`add`'s ``types``) the annotated pixels' scores and
    each pixel's share of its connected lesion region, are counted per float16 bin. From these:

    * pixel AUROC (:meth:`auroc`): Mann-Whitney U over the bins, exact for float16 scores;
    * AUPRO (:meth:`aupro`): MVTec AD's per-region overlap curve. At a threshold t, PRO(t) is the
      mean over lesion regions of the share of the region's pixels scoring ≥ t, which is the sum
      over annotated pixels scoring ≥ t of 1 / (|region| · regions), so one weighted histogram
      gives the curve at every distinct score; integrated over FPR from 0 to 0.3 (trapezoids,
      the end point interpolated) and divided by 0.3;
    * the region detection rate at a threshold given before the maps are added (the share of
      regions with at least :data:`REGION_OVERLAP` of their pixels above it).

    Memory: 2^16 bins of 8 bytes for the healthy pixels and three such arrays per group, whatever
    the number of pixels (about 1.6 MB for all lesions and four types).
    """

    def __init__(self, threshold: float | None = None):
        self.negative = np.zeros(PIXEL_BINS, np.int64)
        self.groups: dict[str, _Positives] = {}
        self.threshold = threshold

    def add(
        self,
        scores: np.ndarray,
        mask: np.ndarray,
        types: dict[int, str] | None = None,
    ) -> None:
        """Count one map.

        Args:
            scores: (H, W) pixel scores, higher = more anomalous; NaN pixels are left out.
            mask: (H, W) annotation, 0 = healthy, any other value = lesion (its type code).
            types: lesion type name per mask value for the by-type groups (a value not in it is
                named ``value <k>``); None counts the ``all`` group only.
        """
        scores = np.asarray(scores, np.float32)
        mask = np.asarray(mask)
        if scores.shape != mask.shape:
            raise MetricsError(f"map of shape {scores.shape} and mask of shape {mask.shape}")
        covered = np.isfinite(scores)
        bins = float16_bins(scores[covered])
        lesion = mask != 0
        self.negative += np.bincount(bins[~lesion[covered]], minlength=PIXEL_BINS)
        groups = [("all", lesion)]
        if types is not None:
            for code in np.unique(mask[lesion]):
                code = code.item()
                groups.append((types.get(code, f"value {code:g}"), mask == code))
        for name, region_mask in groups:
            self._add_group(name, scores, covered, bins, region_mask)

    def _add_group(
        self,
        name: str,
        scores: np.ndarray,
        covered: np.ndarray,
        bins: np.ndarray,
        region_mask: np.ndarray,
    ) -> None:
        group = self.groups.setdefault(name, _Positives())
        if not region_mask.any():
            return
        labels, _ = lesion_regions(region_mask)
        labels_covered = labels[covered]
        inside = labels_covered > 0
        sizes = np.bincount(labels_covered, minlength=labels.max() + 1)  # covered pixels
        present = np.flatnonzero(sizes[1:] > 0) + 1
        group.counts += np.bincount(bins[inside], minlength=PIXEL_BINS)
        weights = 1.0 / sizes[labels_covered[inside]]
        group.region_share += np.bincount(bins[inside], weights, minlength=PIXEL_BINS)
        group.regions += len(present)
        if self.threshold is not None:
            flagged = np.bincount(
                labels_covered[inside],
                scores[covered][inside] > self.threshold,
                minlength=len(sizes),
            )
            group.detected += int(np.sum(flagged[present] >= REGION_OVERLAP * sizes[present]))

    def merge(self, other: PixelCounts) -> None:
        """Add another's counts (the same threshold) into these."""
        self.negative += other.negative
        for name, theirs in other.groups.items():
            mine = self.groups.setdefault(name, _Positives())
            mine.counts += theirs.counts
            mine.region_share += theirs.region_share
            mine.regions += theirs.regions
            mine.detected += theirs.detected

    def auroc(self, group: str = "all") -> float:
        """Pixel ROC AUC of the group's annotated pixels against every healthy pixel (ties
        count one half); NaN without both."""
        positive = self.groups[group].counts if group in self.groups else np.zeros(1)
        n_positive, n_negative = positive.sum(), self.negative.sum()
        if n_positive == 0 or n_negative == 0:
            return math.nan
        below = np.cumsum(self.negative) - self.negative  # healthy pixels in lower bins
        twice_u = np.sum(positive * (2 * below + self.negative).astype(np.float64))
        return float(twice_u / (2.0 * n_positive * n_negative))

    def pro_curve(self, group: str = "all") -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every distinct score from the highest down, starting at (0, 0)."""
        n_negative = self.negative.sum()
        positives = self.groups.get(group)
        if positives is None or positives.regions == 0 or n_negative == 0:
            return np.zeros(0), np.zeros(0)
        used = np.flatnonzero((self.negative > 0) | (positives.counts > 0))[::-1]  # descending
        fpr = np.cumsum(self.negative[used]) / n_negative
        pro = np.cumsum(positives.region_share[used]) / positives.regions
        return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])

    def aupro(self, group: str = "all", max_fpr: float = AUPRO_MAX_FPR) -> float:
        """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (MVTec AD)."""
        fpr, pro = self.pro_curve(group)
        if len(fpr) == 0:
            return math.nan
        return integrate_to(fpr, pro, max_fpr) / max_fpr

    def healthy_percentile(self, percentile: float) -> float:
        """The ``percentile`` of the healthy pixels' scores: the lowest float16 score with at
        least that share of healthy pixels at or below it (inverted CDF)."""
        total = self.negative.sum()
        if total == 0:
            raise MetricsError("no healthy pixels to calibrate a threshold on")
        cumulative = np.cumsum(self.negative)
        index = int(np.searchsorted(cumulative, math.ceil(total * percentile / 100.0)))
        return bin_value(min(index, PIXEL_BINS - 1))

    def share_above(self, threshold: float, group: str | None = None) -> float:
        """The share of healthy pixels (or of a group's annotated pixels) scoring > threshold."""
        counts = self.negative if group is None else self.groups[group].counts
        total = counts.sum()
        if total == 0:
            return math.nan
        first = int(float16_bins(np.array([threshold]))[0]) + 1
        return float(counts[first:].sum() / total)

    def summary(self, group: str = "all") -> dict[str, Any]:
        """AUROC, AUPRO, pixel and region counts and (with a threshold) the detection rate."""
        positives = self.groups.get(group, _Positives())
        row: dict[str, Any] = {
            "auroc": self.auroc(group),
            "aupro": self.aupro(group),
            "pixels": int(positives.counts.sum()),
            "regions": positives.regions,
        }
        if self.threshold is not None:
            row["regions_detected"] = positives.detected
            row["detection_rate"] = (
                positives.detected / positives.regions if positives.regions else math.nan
            )
            row["pixel_recall"] = (
                self.share_above(self.threshold, group) if row["pixels"] else math.nan
            )
        return row


def integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) (x ascending) from x[0] to ``x_max``; y at ``x_max``
    interpolated linearly between its neighbours (MVTec AD's ``trapezoid``)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if len(xs) < len(x):  # the point at x_max, between the last inside and the first beyond
        beyond = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[beyond - 1], x[beyond], y[beyond - 1], y[beyond]
        at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, x_max), np.append(ys, at)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
