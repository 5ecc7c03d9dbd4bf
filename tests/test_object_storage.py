"""Object storage end to end (issue 8): phantom -> preprocess -> train -> score -> query with every
input and output in a bucket on the moto S3 server; only temporary files touch local disk."""

from __future__ import annotations

import dataclasses
import io

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from anogan_ray import storage
from anogan_ray.analysis import query
from anogan_ray.config import load_config
from anogan_ray.data import phantom
from anogan_ray.pipelines.preprocess import preprocess
from anogan_ray.pipelines.score import score
from anogan_ray.pipelines.train import train


def _table(url: str, columns: list[str]):
    """All rows of a Parquet folder in the bucket (read through the project's storage helper)."""
    fs, _ = storage.arrow_filesystem(url)
    paths = [storage.filesystem(f)[1] for f in storage.list_files(url, ".parquet")]
    return pads.dataset(paths, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=columns
    )


def test_cohort_to_query_with_everything_in_a_bucket(ray_local, bucket):
    cfg = load_config(
        "tiny",
        [
            "train.batch_size=8",  # 32 train patches: 4 steps per epoch
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "train.batchnorm_samples=64",
            "score.steps=3",
            "score.batch_size=32",
        ],
    )
    small = dataclasses.replace(
        cfg.phantom, healthy_subjects=2, pathological_subjects=1, bscans_per_volume=2
    )  # moto is slow: a train, a healthy test and a pathological test volume
    cohort, stage = f"{bucket}/cohort", f"{bucket}/stage"

    phantom.write_cohort(small, cohort)
    prepared = preprocess(f"{cohort}/manifest.csv", f"{stage}/preprocess", cfg.preprocess)
    trained = train(f"{stage}/preprocess/patches", f"{stage}/model", cfg)
    scored = score(f"{stage}/preprocess/patches", f"{stage}/model", f"{stage}/score", cfg.score)

    patches = _table(f"{stage}/preprocess/patches", ["patch_id", "split"])
    assert patches.num_rows == prepared["patches_written"] > 0
    wanted = patches.filter(
        pc.is_in(patches["split"], value_set=pc.cast(["val", "test"], "string"))
    )
    scores = _table(f"{stage}/score/scores", ["patch_id", "model_id", "anomaly_score"])
    assert sorted(scores["patch_id"].to_pylist()) == sorted(wanted["patch_id"].to_pylist())
    assert scored["patches_scored"] == scored["patches_scored_total"] == wanted.num_rows
    assert set(scores["model_id"].to_pylist()) == {trained["model_id"]}
    assert storage.read_json(f"{stage}/model/bundle.json")["model_id"] == trained["model_id"]

    top = query.top_k(f"{stage}/score/scores", k=5)
    assert top.num_rows == 5
    ranked = top["anomaly_score"].to_pylist()
    assert ranked == sorted(ranked, reverse=True)
    assert ranked[0] == max(scores["anomaly_score"].to_pylist())
    query.write_result(top, f"{stage}/query/top5.csv")  # the query's answer lands in the bucket
    written = pacsv.read_csv(io.BytesIO(storage.read_bytes(f"{stage}/query/top5.csv")))
    assert written["patch_id"].to_pylist() == top["patch_id"].to_pylist()
