"""The paper's table matches scikit-learn; thresholds are calibrated and never degenerate."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from anogan_ray.core import metrics


def test_paper_table_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(0, 1, 400) + 1.2 * labels
    labels[:20] = -1  # unknown labels are left out
    threshold = 0.6
    row = metrics.paper_table(scores, labels, threshold)
    known = labels >= 0
    y, predicted = labels[known], scores[known] > threshold
    assert row["precision"] == pytest.approx(precision_score(y, predicted))
    assert row["recall"] == row["sensitivity"] == pytest.approx(recall_score(y, predicted))
    assert row["specificity"] == pytest.approx(recall_score(1 - y, ~predicted))
    assert row["auc"] == pytest.approx(roc_auc_score(y, scores[known]))
    assert row["n"] == known.sum()


def test_supervised_thresholds_separate_labelled_validation():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(300, int), np.ones(60, int)]
    scores = np.r_[rng.normal(0, 1, 300), rng.normal(4, 1, 60)]
    for method in ("youden", "f1"):
        record = metrics.calibrate_threshold(scores, labels, method)
        assert record["method"] == method and record["note"] == ""
        assert 1.0 < record["value"] < 3.5
        row = metrics.paper_table(scores, labels, record["value"])
        assert row["sensitivity"] > 0.9 and row["specificity"] > 0.9


@pytest.mark.parametrize("method", ["percentile", "youden", "f1"])
def test_thresholds_on_validation_without_anomalies(method):
    """Healthy-only validation: a percentile threshold, never one that flags everything."""
    scores = np.random.default_rng(2).normal(100, 10, 500)
    record = metrics.calibrate_threshold(scores, np.zeros(500, int), method, percentile=95)
    assert record["method"] == "percentile"
    assert record["value"] == pytest.approx(np.percentile(scores, 95))
    assert (scores > record["value"]).mean() == pytest.approx(0.05, abs=0.01)
    if method != "percentile":
        assert "fell back" in record["note"]
    same = metrics.calibrate_threshold(np.full(50, 3.0), None, method)
    assert not (np.full(50, 3.0) > same["value"]).any()  # ties: nothing called anomalous


def test_calibrate_stores_with_the_model_and_evaluate_uses_it(scored_cohort, tmp_path):
    model = str(tmp_path / "bundle")
    record = metrics.calibrate(scored_cohort["scores"], out=model, method="youden")
    # validation holds healthy subjects only: Youden falls back to the healthy percentile
    patch = record["levels"]["patch"]["anomaly_score"]
    assert patch["method"] == "percentile" and "fell back" in patch["note"]
    assert metrics.load_threshold(model)["threshold"] == pytest.approx(record["threshold"])
    result = metrics.evaluate(scored_cohort["scores"], threshold=model)
    a = result["scores"]["A"]
    assert a["threshold"] == pytest.approx(record["threshold"])
    assert a["auc"] > 0.8 and a["specificity"] > 0.9  # 99th percentile of healthy validation
    assert set(result["scores"]) == {"A", "R", "D", "P_D", "GAN_R", "D_ref"}
    assert "precision" in metrics.format_paper_table(result)


def test_evaluate_agrees_with_sklearn_at_every_level(scored_cohort):
    frame = metrics.read_scores(scored_cohort["scores"], splits=["test"])
    result = metrics.evaluate(scored_cohort["scores"], threshold=130.0)
    assert result["n"] == len(frame) and result["n_anomalous"] == int((frame["label"] == 1).sum())
    assert result["scores"]["A"]["auc"] == pytest.approx(
        roc_auc_score(frame["label"], frame["anomaly_score"])
    )
    assert result["scores"]["P_D"]["auc"] == pytest.approx(
        roc_auc_score(frame["label"], 1 - frame["p_d"])  # low p_d is anomalous
    )
    volume = metrics.evaluate(scored_cohort["scores"], threshold=130.0, level="volume")
    maxima = frame.groupby("volume_id").agg(score=("anomaly_score", "max"), label=("label", "max"))
    assert volume["n"] == len(maxima)
    assert volume["scores"]["A"]["auc"] == pytest.approx(
        roc_auc_score(maxima["label"], maxima["score"])
    )
    assert volume["scores"]["A"]["sensitivity"] == pytest.approx(
        ((maxima["score"] > 130.0) & (maxima["label"] == 1)).sum() / (maxima["label"] == 1).sum()
    )
    subject = metrics.evaluate(scored_cohort["scores"], level="subject")
    assert subject["n"] == 4 and "calibrated now" in subject["threshold_source"]


def test_evaluate_without_labels_says_why(scored_cohort):
    with pytest.raises(metrics.MetricsError, match="split 'val'.*0 anomalous"):
        metrics.evaluate(scored_cohort["scores"], split="val")
    with pytest.raises(metrics.MetricsError, match="no threshold record"):
        metrics.evaluate(scored_cohort["scores"], threshold=scored_cohort["root"] + "/nowhere")
    assert math.isnan(metrics.paper_table([1.0, 2.0], [0, 0])["auc"])


def test_image_level_labels_are_evaluated_per_volume(scored_cohort, tmp_path):
    """A cohort labelled per image (no masks): healthy volumes' patches 0, pathological volumes'
    patches unknown; evaluate says so and reports the volume-level table."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = ds.dataset(scored_cohort["scores"], format="parquet", partitioning="hive").to_table()
    frame = table.to_pandas()
    pathological = frame["subject_id"].str.startswith("p")
    frame["volume_label"] = np.where(pathological, 1, 0).astype(np.int8)
    frame["label"] = np.where(pathological, -1, 0).astype(np.int8)
    frame["anomaly_fraction"] = np.where(pathological, np.nan, 0.0)
    (tmp_path / "scores").mkdir()
    pq.write_table(
        pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "scores" / "a.parquet"
    )
    result = metrics.evaluate(str(tmp_path / "scores"))
    test = frame[frame["split"] == "test"]
    assert result["level"] == "volume" and result["aggregate"] == "max"
    assert "evaluated per volume" in result["note"]
    assert result["n"] == test["volume_id"].nunique()
    assert result["n_anomalous"] == test[test["volume_label"] == 1]["volume_id"].nunique()
    assert "note: " in metrics.format_paper_table(result)
    # the volume score is the max of its patch scores; AUC as scikit-learn computes it
    volumes = test.groupby("volume_id").agg(
        score=("anomaly_score", "max"), label=("volume_label", "max")
    )
    assert result["scores"]["A"]["auc"] == pytest.approx(
        roc_auc_score(volumes["label"], volumes["score"])
    )
