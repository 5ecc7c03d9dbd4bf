"""The scoring stage: patch table -> score table with Ray Data, exactly once, rejects, summary."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from ray.data.extensions import ArrowTensorArray

from anogan_ray import storage
from anogan_ray.analysis import query
from anogan_ray.analysis.report import report
from anogan_ray.config import ScoreConfig
from anogan_ray.core import metrics
from anogan_ray.pipelines import progress
from anogan_ray.pipelines.commit import commit_staged, staging_folder
from anogan_ray.pipelines.score import score
from anogan_ray.pipelines.validate import REJECT_REASON, prepare_batch
from anogan_ray.tables import ScoringKey, TableError, encode_pixels, patch_id


def _patch_rows(images: np.ndarray, labels: np.ndarray, split: str, volume: str) -> dict:
    n = len(images)
    return {
        "patch_id": [patch_id(volume, i // 8, 0, (i % 8) * 32) for i in range(n)],
        "subject_id": [volume.split("-")[0]] * n,
        "volume_id": [volume] * n,
        "bscan": np.arange(n, dtype=np.int32) // 8,
        "y": np.zeros(n, np.int32),
        "x": (np.arange(n, dtype=np.int32) % 8) * 32,
        "split": [split] * n,
        "label": labels.astype(np.int8),
        "anomaly_fraction": labels.astype(np.float32) * 0.1,
        "source": [f"synthetic://{volume}"] * n,
    }


def write_patch_table(url: str, parts: list[dict], pixels: list) -> None:
    """A patch table like preprocess writes: Parquet, hive-partitioned by split.

    ``pixels`` holds, per part, a uint8 (n, 64, 64) array (the contract's tensor column) or a
    list of float lists (a table written by some other tool).
    """
    fs, path = storage.arrow_filesystem(url)
    for i, (rows, values) in enumerate(zip(parts, pixels)):
        if isinstance(values, np.ndarray):
            column = ArrowTensorArray.from_numpy(values)
        else:
            column = pa.array(values, pa.list_(pa.float32()))
        table = pa.table({**{k: v for k, v in rows.items() if k != "split"}, "pixels": column})
        target = f"{path}/split={rows['split'][0]}/part-{i}.parquet"
        if not storage.is_remote(url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        pq.write_table(table, target, filesystem=fs)


def read_scores(out: str, table: str = "scores") -> pa.Table:
    files = storage.list_files(storage.join(out, table), ".parquet")
    fs, _ = storage.arrow_filesystem(out)
    return pads.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs).to_table()


@pytest.fixture(scope="module")
def cohort_images(synthetic_patches):
    """24 healthy val patches; 24 healthy + 24 anomalous test patches."""
    return {
        "val": synthetic_patches(24, seed=10),
        "test_healthy": synthetic_patches(24, seed=11),
        "test_anomalous": synthetic_patches(24, seed=12, anomalous=True),
    }


def _standard_table(url: str, images: dict) -> int:
    parts = [
        _patch_rows(images["val"], np.zeros(24), "val", "s1-v"),
        _patch_rows(images["test_healthy"], np.zeros(24), "test", "s2-h"),
        _patch_rows(images["test_anomalous"], np.ones(24), "test", "s3-a"),
    ]
    pixels = [encode_pixels(images[k]) for k in ("val", "test_healthy", "test_anomalous")]
    write_patch_table(url, parts, pixels)
    return 72


def test_scores_every_patch_once_on_s3_and_rerun_adds_nothing(
    ray_local, bucket, tiny_bundle, cohort_images, tmp_path
):
    patches, out = f"{bucket}/patches", f"{bucket}/score"
    total = _standard_table(patches, cohort_images)
    cfg = ScoreConfig(steps=20, z_lr=0.05, batch_size=16, reference_score=True, save_z=True)

    summary = score(patches, tiny_bundle, out, cfg)

    table = read_scores(out)
    ids = table["patch_id"].to_pylist()
    assert len(ids) == len(set(ids)) == total == summary["patches_scored"]
    assert summary["patches_rejected"] == 0
    assert storage.read_json(f"{out}/summary.json")["patches_scored_total"] == total
    # throughput after the first batch of 16 (the actors' start-up left out), and with it
    assert summary["patches_per_s_after_first_batch"] > 0 and summary["patches_per_s"] > 0
    assert "pixels" not in table.column_names
    assert set(table["model_id"].to_pylist()) == {summary["model_id"]}
    assert np.all(np.isfinite(table["anomaly_score"].to_numpy()))
    assert np.all(np.isfinite(table["ref_anomaly_score"].to_numpy()))
    assert set(summary["auc"]) == {
        "anomaly_score", "residual_score", "discrimination_score", "p_d", "ref_anomaly_score",
        "ref_discrimination_score",
    }  # fmt: skip

    again = score(patches, tiny_bundle, out, cfg)
    assert again["patches_scored"] == 0
    assert again["patches_skipped_already_done"] == total
    assert read_scores(out).num_rows == total

    # another λ is another scoring key: one more row per patch, not a duplicate
    other = score(patches, tiny_bundle, out, ScoreConfig(lambda_=0.3, steps=5, batch_size=32))
    assert other["patches_scored"] == total
    assert read_scores(out).num_rows == 2 * total

    # every reader takes exactly one key; without one it fails and names the keys present
    scores = f"{out}/scores"
    for read in (metrics.evaluate, query.top_k, query.aggregate):
        with pytest.raises(TableError, match=r"several scoring keys(.|\n)*lambda=0.3"):
            read(scores)
    first = metrics.evaluate(scores, key={"lambda": 0.1})
    second = metrics.evaluate(scores, key=other["key"])  # the key as score's summary prints it
    assert first["n"] == second["n"] == 48  # the test split's patches, each counted once
    assert (first["key"], second["key"]) == (summary["key"], other["key"])
    assert first["scores"]["A"]["auc"] != second["scores"]["A"]["auc"]
    top = query.top_k(scores, k=100, key={"lambda": 0.3})
    assert top.num_rows == total and set(top["lambda"].to_pylist()) == {0.3}
    volumes = query.aggregate(scores, level="volume", key=other["key"])
    assert sum(volumes["patches"].to_pylist()) == total
    assert query.keys(scores)["key"].to_pylist() == sorted([summary["key"], other["key"]])
    with pytest.raises(TableError, match="no scoring key matches"):
        metrics.evaluate(scores, key={"lambda": 0.2})
    # side by side, on purpose: one row per key, each AUC as evaluated for that key alone
    rows = metrics.compare(scores)
    assert [row["key"] for row in rows] == sorted([summary["key"], other["key"]])
    for row, result in zip(rows, sorted([first, second], key=lambda r: r["key"])):
        assert row["n"] == 48 and row["A"] == pytest.approx(result["scores"]["A"]["auc"])
    # the report of real scores from a trained model: the patches it puts first are the lesions
    pictures = report(scores, str(tmp_path / "report"), patches=patches, model=tiny_bundle,
                      key={"lambda": 0.1}, top_k=8, marker_patches=16, clusters=2)  # fmt: skip
    assert {"roc", "top_k", "tsne", "markers"} <= set(pictures["images"])
    assert pictures["auc"]["A"] == pytest.approx(first["scores"]["A"]["auc"])
    assert pictures["auc"]["A"] > 0.7  # the floor of the tiny model (test_invert.AUC_FLOOR)
    markers = pq.read_table(str(tmp_path / "report" / "markers.parquet")).to_pandas()
    assert (markers["label"].head(8) == 1).mean() >= 0.75  # the top-8 are mostly lesions
    assert len(pictures["keys"]) == 2  # and every key of the table side by side
    assert "Every scoring key" in (tmp_path / "report" / "index.html").read_text()


def test_malformed_patches_go_to_rejects_and_the_rest_is_scored(
    ray_local, tmp_path, tiny_bundle, synthetic_patches
):
    """A patch table written by another tool, with a float list `pixels` column."""
    good = encode_pixels(synthetic_patches(10, seed=20)).astype(np.float32)
    values = [row.ravel().tolist() for row in good]
    values += [
        [float("nan")] * 4096,  # NaN pixels
        [1.0] * 1000,  # wrong size
        [300.0] * 4096,  # outside 0..255
    ]
    rows = _patch_rows(np.zeros((13, 64, 64)), np.zeros(13), "test", "s9-bad")
    patches, out = str(tmp_path / "patches"), str(tmp_path / "score")
    write_patch_table(patches, [rows], [values])

    summary = score(patches, tiny_bundle, out, ScoreConfig(steps=5, batch_size=8))

    assert summary["patches_scored"] == 10
    assert summary["patches_rejected"] == 3
    rejects = read_scores(out, "rejects").to_pydict()
    reasons = dict(zip(rejects["patch_id"], rejects["reason"]))
    assert set(reasons) == set(rows["patch_id"][10:])
    assert "NaN" in reasons[rows["patch_id"][10]]
    assert "1000 values" in reasons[rows["patch_id"][11]]
    assert "outside 0..255" in reasons[rows["patch_id"][12]]
    assert set(read_scores(out)["patch_id"].to_pylist()) == set(rows["patch_id"][:10])
    # the rejects are not retried (nor duplicated) by a re-run
    assert (
        score(patches, tiny_bundle, out, ScoreConfig(steps=5, batch_size=8))["patches_rejected"]
        == 0
    )
    assert read_scores(out, "rejects").num_rows == 3


def test_cpu_actors_take_a_cpu_each_and_leave_one_to_the_reads(ray_local):
    from anogan_ray.pipelines.score import _resources

    # one node of 2 CPUs: two one-thread actors asking half a CPU each (a read needs a whole one)
    device, pool, resources, threads = _resources(ScoreConfig(device="cpu"))
    assert (device, pool.min_size, pool.max_size) == ("cpu", 2, 2)
    assert resources == {"num_cpus": 0.5} and threads == 1
    # one actor asked for, or one block to score: it gets both CPUs' threads, one CPU of Ray's
    for cfg, blocks in ((ScoreConfig(device="cpu", num_actors=1), None), (ScoreConfig(), 1)):
        _, pool, resources, threads = _resources(cfg, blocks)
        assert pool.min_size == 1 and resources == {"num_cpus": 1.0} and threads == 2


def test_scores_on_a_ray_of_one_cpu(tmp_path, tiny_bundle, synthetic_patches):
    """A one-CPU machine (a small VM, a container's quota): the actor must leave the file listing
    its CPU, or the job waits forever (it did, when each actor asked for a whole CPU)."""
    n = 16
    images = synthetic_patches(n, seed=40)
    patches, out = str(tmp_path / "patches"), str(tmp_path / "score")
    write_patch_table(
        patches, [_patch_rows(images, np.zeros(n), "test", "s5-c")], [encode_pixels(images)]
    )
    code = (
        "import json, ray; from anogan_ray.config import ScoreConfig; "
        "from anogan_ray.pipelines.score import score; "
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False); "
        f"s = score({patches!r}, {tiny_bundle!r}, {out!r}, ScoreConfig(steps=1, z_lr=0.05)); "
        "print(json.dumps([s['patches_scored'], s['actors']]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert job.stdout.strip().splitlines()[-1] == f"[{n}, 1]"
    ids = read_scores(out)["patch_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n


def test_tensor_pixels_are_validated_as_a_whole_like_row_by_row():
    """The whole-array check of a tensor `pixels` column keeps and rejects what the row-by-row
    check does, with the same reasons."""
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 255, size=(6, 64, 64))
    pixels[1, 5, 5] = np.nan
    pixels[3, 0, 0] = 256.0
    pixels[4, 9, 9] = -0.5
    batch = {"patch_id": np.array([f"p{i}" for i in range(6)]), "split": np.array(["test"] * 6)}
    as_array = prepare_batch({**batch, "pixels": pixels}, ["test"])
    rows = np.empty(6, dtype=object)
    rows[:] = list(pixels.reshape(6, -1))
    by_row = prepare_batch({**batch, "pixels": rows}, ["test"])
    assert as_array[REJECT_REASON].tolist() == by_row[REJECT_REASON].tolist()
    assert [bool(r) for r in as_array[REJECT_REASON]] == [False, True, False, True, True, False]
    np.testing.assert_array_equal(as_array["pixels"], by_row["pixels"])
    assert as_array["pixels"].dtype == np.uint8


def test_the_reading_and_commit_tasks_do_not_load_torch():
    """What the reading and commit tasks run comes without PyTorch: a Ray worker that loads it
    holds ~190 MiB more and spends ~1 s more starting, and Ray keeps idle workers around."""
    code = (
        "import pickle, sys; from anogan_ray.pipelines.validate import PreparePatches; "
        "from anogan_ray.pipelines.commit import commit_staged, done_keys; "
        "pickle.dumps(PreparePatches(['test'])); print('torch' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False"


def test_commit_keeps_each_patch_once_and_drops_partial_files(tmp_path):
    """Staged files that repeat committed rows, repeat rows among themselves (a retried task) or
    lack their footer (a killed writer) commit every patch exactly once."""
    key = ScoringKey("m1", 0.1, 5, 0.01, "iterative")

    def staged(ids, reasons=None):
        n = len(ids)
        return pa.table(
            {
                "patch_id": ids,
                "split": ["test"] * n,
                "source": ["s"] * n,
                "anomaly_score": np.arange(n, dtype=np.float32),
                REJECT_REASON: reasons or [""] * n,
                **{c: [v] * n for c, v in key.row().items()},
            }
        )

    out = str(tmp_path / "score")
    run = tmp_path / "score" / os.path.relpath(staging_folder(out, key), out) / "run1"
    run.mkdir(parents=True)
    pq.write_table(staged(["a", "b"]), run / "0.parquet")
    assert commit_staged(out, key)["scored"] == 2
    run.mkdir(parents=True)
    pq.write_table(staged(["b", "c", "d", "c"]), run / "1.parquet")  # b committed, c twice
    pq.write_table(staged(["d", "e", "x"], ["", "", "bad pixels"]), run / "2.parquet")
    pq.write_table(staged(["f"]), run / "3.parquet")
    (run / "3.parquet").write_bytes((run / "3.parquet").read_bytes()[:100])  # no footer

    counts = commit_staged(out, key)

    assert counts == {"scored": 3, "rejected": 1, "duplicates": 3, "partial_files": 1}
    ids = read_scores(out)["patch_id"].to_pylist()
    assert sorted(ids) == ["a", "b", "c", "d", "e"]
    assert read_scores(out, "rejects")["patch_id"].to_pylist() == ["x"]
    assert not (tmp_path / "score" / "_staging").exists()
    # the staged files' rows are gathered into one file per table and commit
    assert len(storage.list_files(storage.join(out, "scores"), ".parquet")) == 2
    assert len(storage.list_files(storage.join(out, "rejects"), ".parquet")) == 1


def test_killed_job_resumes_and_scores_every_patch_exactly_once(
    ray_local, tmp_path, tiny_bundle, synthetic_patches, caplog, monkeypatch
):
    """... and the re-run's progress lines count, and time, only the patches it has left."""
    n = 128
    images = synthetic_patches(n, seed=30)
    patches, out = str(tmp_path / "patches"), str(tmp_path / "score")
    write_patch_table(
        patches, [_patch_rows(images, np.zeros(n), "test", "s4-k")], [encode_pixels(images)]
    )
    # Enough steps per batch that the run is many seconds from its second staged file to its end,
    # however fast the machine: the kill must land mid-run. Files land by time (flush_s), long
    # before rows_per_file rows are scored.
    settings = "steps=60, z_lr=0.05, batch_size=8, rows_per_file=10_000, flush_s=0.5"
    code = (
        "from anogan_ray.config import ScoreConfig; from anogan_ray.pipelines.score import score; "
        f"score({patches!r}, {tiny_bundle!r}, {out!r}, ScoreConfig({settings}))"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    staging = tmp_path / "score" / "_staging"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if len(list(staging.rglob("*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # a real kill, mid-run
    job.wait()
    assert not (tmp_path / "score" / "summary.json").exists()
    staged = sorted(staging.rglob("*.parquet"))

    # a job of another scoring key into the same folder leaves the killed key's staging alone
    other = score(patches, tiny_bundle, out, ScoreConfig(steps=1, z_lr=0.05, batch_size=32))
    assert other["patches_scored"] == n and other["patches_recovered_from_earlier_run"] == 0
    assert all(path.exists() for path in staged)

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.5)
    caplog.set_level(logging.INFO, logger="anogan_ray")
    summary = score(patches, tiny_bundle, out, ScoreConfig(steps=60, z_lr=0.05, batch_size=8))

    rows = read_scores(out)
    ids = rows.filter(pads.field("steps") == 60)["patch_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n  # every patch, exactly once
    assert summary["patches_recovered_from_earlier_run"] > 0  # the killed run's finished files
    assert summary["patches_scored"] < n  # the re-run scored only what was left
    assert summary["patches_scored_total"] == n
    assert not list(staging.rglob("*.parquet"))
    # progress: "scored 40 / 96 patches (41.7 %), 3.1 patches/s, about 18 s left", ..., "done"
    left = summary["patches_scored"]
    pattern = re.compile(rf"scored (\d+) / {left} patches \([\d.]+ %\)(.*)")
    lines = [m for r in caplog.records if (m := pattern.fullmatch(r.getMessage()))]
    counts = [int(m.group(1)) for m in lines]
    assert len(lines) >= 3 and counts == sorted(counts) and counts[-1] == left
    assert re.fullmatch(r", [\d.,]+ patches/s, done; \d actors?: cpu fp32 .*", lines[-1].group(2))
    assert any(re.fullmatch(r", [\d.,]+ patches/s, about .+ left;.*", m.group(2)) for m in lines)


def test_the_scorer_switches_off_a_fast_path_beyond_its_tolerance(
    tiny_bundle, cohort_images, monkeypatch, caplog
):
    """A fast path (here score.compile) whose first-batch scores differ from eager fp32 beyond
    its tolerance (here set below anything measurable) is switched off, with a warning, and the
    batch is scored eagerly."""
    import torch

    from anogan_ray.core import fastpath
    from anogan_ray.pipelines.score import PatchScorer

    monkeypatch.setattr(fastpath, "ROUNDING_RTOL", -1.0)
    rows = _patch_rows(cohort_images["val"][:8], np.zeros(8), "val", "s1-v")
    batch = prepare_batch(
        {**{k: np.asarray(v) for k, v in rows.items()},
         "pixels": encode_pixels(cohort_images["val"][:8])},
        ["val"],
    )  # fmt: skip
    cfg = ScoreConfig(steps=5, z_lr=0.05, compile=True, splits=["val"])
    scorer = PatchScorer(tiny_bundle, cfg, "cpu", torch.get_num_threads())
    with caplog.at_level(logging.WARNING):
        out = scorer(batch)
    assert scorer.path == fastpath.EXACT and "compiled differs from exact fp32" in caplog.text
    assert np.isfinite(out["anomaly_score"]).all()


def test_staged_rows_land_in_a_file_by_time_before_the_row_count_is_reached(tmp_path):
    """score.flush_s bounds what a kill loses: rows that waited flush_s seconds are written to a
    staged file although far fewer than rows_per_file have come, and leaving flushes the rest."""
    from anogan_ray.pipelines.commit import StagedWriter

    folder = str(tmp_path / "staging")
    block = pa.table({"patch_id": ["a", "b"], "anomaly_score": [1.0, 2.0]})
    with StagedWriter(folder, rows_per_file=10_000, flush_s=0.2) as writer:
        writer.add(block)
        deadline = time.monotonic() + 30
        while not storage.list_files(folder, ".parquet") and time.monotonic() < deadline:
            time.sleep(0.05)
        landed = storage.list_files(folder, ".parquet")
        assert len(landed) == 1 and pq.read_table(landed[0]).num_rows == 2
        writer.add(block.slice(0, 1))
    files = storage.list_files(folder, ".parquet")
    assert sum(pq.read_table(f).num_rows for f in files) == 3
