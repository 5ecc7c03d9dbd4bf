"""Queries over score tables agree with a direct pyarrow computation; errors say what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from anogan_ray import storage
from anogan_ray.analysis import query
from anogan_ray.tables import TableError


def _direct(scores: str):
    """The score table read with plain pyarrow, as the reference."""
    return ds.dataset(scores, format="parquet", partitioning="hive").to_table()


def test_top_k_matches_pyarrow_sort(scored_cohort):
    reference = _direct(scored_cohort["scores"])
    test_rows = reference.filter(pc.equal(reference["split"], "test"))
    expected = test_rows.sort_by([("anomaly_score", "descending"), ("patch_id", "ascending")])
    got = query.top_k(scored_cohort["scores"], k=10, split="test")
    assert got["patch_id"].to_pylist() == expected["patch_id"].to_pylist()[:10]
    assert "z" not in got.column_names  # the latent vector is not for terminals
    one = query.top_k(scored_cohort["scores"], k=5, subject="p1", volume="p1_od")
    assert set(one["subject_id"].to_pylist()) == {"p1"} and one.num_rows == 5
    with pytest.raises(TableError, match="no scoring key matches model_id=other"):
        query.top_k(scored_cohort["scores"], k=3, key={"model_id": "other"})


def test_aggregates_match_pyarrow(scored_cohort):
    threshold = 120.0
    got = query.aggregate(scored_cohort["scores"], level="volume", threshold=threshold)
    reference = _direct(scored_cohort["scores"]).to_pandas()
    assert got.num_rows == reference["volume_id"].nunique()
    for row in got.to_pylist():
        rows = reference[reference["volume_id"] == row["volume_id"]]
        assert row["patches"] == len(rows)
        assert row["max_score"] == pytest.approx(rows["anomaly_score"].max())
        assert row["mean_score"] == pytest.approx(rows["anomaly_score"].mean())
        assert row["above_threshold"] == int((rows["anomaly_score"] > threshold).sum())
        assert row["share_above_threshold"] == pytest.approx(
            (rows["anomaly_score"] > threshold).mean()
        )
        assert row["anomalous_patches"] == int((rows["label"] == 1).sum())
    maxima = got["max_score"].to_pylist()
    assert maxima == sorted(maxima, reverse=True)  # most anomalous first
    subjects = query.aggregate(scored_cohort["scores"], level="subject")
    assert subjects["subject_id"].to_pylist()[:2] == ["p0", "p1"] or set(
        subjects["subject_id"].to_pylist()[:2]
    ) == {"p0", "p1"}  # the pathological subjects lead
    assert subjects["share_above_threshold"].null_count == subjects.num_rows  # no threshold


def test_sql_over_several_tables_and_s3(scored_cohort, bucket):
    remote = f"{bucket}/scores"
    for path in storage.list_files(scored_cohort["scores"], ".parquet"):
        relative = path[len(scored_cohort["scores"]) + 1 :]
        storage.write_bytes(f"{remote}/{relative}", storage.read_bytes(path))
    counts = query.sql(remote, "SELECT split, COUNT(*) AS n FROM scores GROUP BY split ORDER BY 1")
    reference = _direct(scored_cohort["scores"])
    assert counts.to_pylist() == [
        {"split": s, "n": int(pc.sum(pc.equal(reference["split"], s)).as_py())}
        for s in ("test", "val")
    ]
    both = query.sql([scored_cohort["scores"], remote], "SELECT COUNT(*) AS n FROM scores")
    assert both["n"][0].as_py() == 2 * reference.num_rows


def test_errors_name_the_problem(scored_cohort, tmp_path):
    with pytest.raises(TableError, match="no Parquet files"):
        query.top_k(str(tmp_path / "nothing"))
    with pytest.raises(TableError, match="'no_such_score'.*available: patch_id"):
        query.top_k(scored_cohort["scores"], score="no_such_score")
    with pytest.raises(TableError, match="failed.*SELEC"):
        query.sql(scored_cohort["scores"], "SELEC 1")
    with pytest.raises(TableError, match="level"):
        query.aggregate(scored_cohort["scores"], level="eye")


def test_columns_united_across_files(scored_cohort, tmp_path):
    """A table where one run wrote GAN_R and another did not reads as one, nulls where absent."""
    folder = tmp_path / "mixed"
    shutil.copytree(scored_cohort["scores"], folder)
    victim = sorted(folder.glob("split=val/*.parquet"))[0]
    pq.write_table(pq.read_table(victim).drop(["ref_anomaly_score"]), victim)
    result = query.sql(
        str(folder), "SELECT COUNT(ref_anomaly_score) AS n, COUNT(*) AS m FROM scores"
    )
    n, m = result["n"][0].as_py(), result["m"][0].as_py()
    assert m == _direct(scored_cohort["scores"]).num_rows
    assert n == m - pq.read_metadata(victim).num_rows


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "table"])
def test_write_result_round_trips(scored_cohort, tmp_path, fmt):
    table = query.top_k(scored_cohort["scores"], k=4)
    target = str(tmp_path / f"top.{ {'table': 'txt'}.get(fmt, fmt) }")
    query.write_result(table, target, fmt)
    if fmt == "parquet":
        assert pq.read_table(target)["patch_id"].to_pylist() == table["patch_id"].to_pylist()
    elif fmt == "json":
        records = json.loads(Path(target).read_text())
        assert [r["patch_id"] for r in records] == table["patch_id"].to_pylist()
        assert np.allclose(
            [r["anomaly_score"] for r in records], table["anomaly_score"].to_pylist()
        )
    else:
        text = Path(target).read_text()
        assert all(pid in text for pid in table["patch_id"].to_pylist())


def test_write_result_prints_a_table(scored_cohort, capsys):
    query.write_result(query.aggregate(scored_cohort["scores"], level="subject"))
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["subject_id", "model_id", "patches"]
    assert len(printed.splitlines()) == 2 + 6  # header, rule, one line per subject
