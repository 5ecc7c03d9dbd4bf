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


def test_auc_and_roc_equal_sklearn_with_ties():
    """The rank-sum AUC (average ranks for ties) is scikit-learn's; every ROC point kept is a
    point of scikit-learn's full curve, and a long curve is cut to at most ROC_POINTS points."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(10, 3000))
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.normal(0, 1, n) + 0.8 * labels, int(rng.integers(0, 3)))  # ties
        assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), 1e-12)
    labels = rng.integers(0, 2, 50_000)
    scores = rng.normal(0, 1, 50_000) + labels
    with metrics._ranking_of(scores, labels) as ranking:
        roc = ranking.roc()
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    full = set(zip(fpr.tolist(), tpr.tolist()))
    assert 1000 < len(roc["fpr"]) <= metrics.ROC_POINTS
    assert all(point in full for point in zip(roc["fpr"], roc["tpr"]))
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert np.abs(np.diff(roc["fpr"]) + np.diff(roc["tpr"])).max() < 0.01  # no long gap


def _youden_by_sklearn(scores: np.ndarray, labels: np.ndarray) -> float:
    """The highest threshold maximizing J, between distinct scores (never below all of them)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)  # [0]: inf
    best = int(np.argmax(tpr[1:-1] - fpr[1:-1]))
    return (thresholds[1 + best] + thresholds[2 + best]) / 2


def test_metrics_at_scale_agree_with_pandas_and_sklearn(table_at_scale):
    folder, frame = table_at_scale
    key = {"lambda": 0.1}
    rows = frame[frame["lambda"] == 0.1]
    val, test = rows[rows["split"] == "val"], rows[rows["split"] == "test"]
    record = metrics.calibrate(folder, key=key)
    healthy_val = val.loc[val["label"] != 1, "anomaly_score"]
    assert record["threshold"] == np.percentile(healthy_val, 99)  # exact, not approximate
    assert "acae_score" not in record["levels"]["patch"]  # all NaN: no threshold
    result = metrics.evaluate(folder, key=key)  # thresholds calibrated on val now
    labelled = test[test["label"] >= 0]
    assert result["n"] == len(labelled)
    for name, column in metrics.SCORES.items():
        if column == "acae_score":
            assert name not in result["scores"]
            continue
        oriented = metrics.oriented(labelled[column].to_numpy(), column)
        row = result["scores"][name]
        assert row["auc"] == pytest.approx(roc_auc_score(labelled["label"], oriented), 1e-12)
        threshold = record["levels"]["patch"][column]["value"]
        called = oriented > threshold
        assert row["threshold"] == threshold
        assert row["tp"] == int((called & (labelled["label"] == 1)).sum())
        assert row["fp"] == int((called & (labelled["label"] == 0)).sum())
        assert len(row["roc"]["fpr"]) <= metrics.ROC_POINTS
    small = labelled[(labelled["label"] == 0) | (labelled["anomaly_fraction"] <= 0.03)]
    assert result["scores"]["A"]["auc_small"] == pytest.approx(
        roc_auc_score(small["label"], small["anomaly_score"]), 1e-12
    )
    # a supervised threshold on labelled test patches, as scikit-learn's curve gives it
    youden = metrics.calibrate(folder, method="youden", split="test", key=key)
    assert youden["levels"]["patch"]["residual_score"]["value"] == pytest.approx(
        _youden_by_sklearn(labelled["residual_score"].to_numpy(), labelled["label"].to_numpy())
    )
    # volume level: the max of each volume's patch scores, the label from the manifest's
    volume = metrics.evaluate(folder, threshold=120.0, level="volume", key=key)
    maxima = test.groupby("volume_id").agg(
        score=("anomaly_score", "max"), label=("volume_label", "max")
    )
    assert volume["n"] == len(maxima)
    assert volume["scores"]["A"]["auc"] == pytest.approx(
        roc_auc_score(maxima["label"], maxima["score"]), 1e-12
    )
    assert volume["scores"]["A"]["tp"] == int(((maxima["score"] > 120) & maxima["label"]).sum())
    # every key side by side, each as scikit-learn computes it
    for row in metrics.compare(folder):
        chosen = frame[(frame["lambda"] == row["lambda"]) & (frame["split"] == "test")]
        chosen = chosen[chosen["label"] >= 0]
        assert row["n"] == len(chosen)
        assert row["P_D"] == pytest.approx(roc_auc_score(chosen["label"], 1 - chosen["p_d"]))
