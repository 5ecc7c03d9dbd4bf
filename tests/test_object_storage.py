"""Object storage end to end (issue 8): phantom -> preprocess -> train -> score -> query with every
input and output in a bucket on the moto S3 server; only temporary files touch local disk."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

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
            "train.encoder=false",  # the encoder's run on S3: test_train.py's DDP test
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


# --- credentials never reach a log, a summary or an error (issue 16) ---------------------------


def _texts_under(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` as text (logs of the job's own Ray)."""
    return {
        str(path): path.read_bytes().decode(errors="replace")
        for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


def test_a_stage_on_s3_never_shows_the_credentials(bucket, tmp_path, tiny_config):
    """`anogan-ray preprocess` in a subprocess with its own Ray, distinctive AWS keys (moto takes
    any), debug logging, a volume whose s3 object is missing, then a manifest that is missing: the
    keys appear in no output of the command, of its Ray, in no summary and no reject."""
    key_id, secret = f"AKIDLEAKCHECK{secrets.token_hex(4).upper()}", f"Sx{secrets.token_hex(20)}"
    small = dataclasses.replace(
        tiny_config.phantom, healthy_subjects=2, pathological_subjects=1, bscans_per_volume=2
    )
    phantom.write_cohort(small, f"{bucket}/cohort")
    manifest = pd.read_csv(io.BytesIO(storage.read_bytes(f"{bucket}/cohort/manifest.csv")))
    gone = dict(manifest.iloc[0], volume_id="gone", path=f"{bucket}/cohort/gone.npy", mask_path="")
    manifest = pd.concat([manifest, pd.DataFrame([gone])], ignore_index=True)
    storage.write_bytes(f"{bucket}/cohort/with_missing.csv", manifest.to_csv(index=False).encode())

    ray_tmp = Path(tempfile.mkdtemp(prefix="ar-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a Ray of its own:
    env.update(  # its workers inherit these keys (the session's Ray has other ones)
        AWS_ACCESS_KEY_ID=key_id,
        AWS_SECRET_ACCESS_KEY=secret,
        RAY_TMPDIR=str(ray_tmp),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
    )
    cli = [str(Path(sys.executable).parent / "anogan-ray"), "--log-level", "DEBUG", "preprocess"]
    out = f"{bucket}/stage"
    try:
        ran = subprocess.run(
            [*cli, "--manifest", f"{bucket}/cohort/with_missing.csv", "--out", out,
             "--config", "tiny"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        failed = subprocess.run(
            [*cli, "--manifest", f"{bucket}/cohort/nowhere.csv", "--out", out, "--config", "tiny"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        ray_logs = _texts_under(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert ran.returncode == 0, ran.stderr[-4000:]
    summary = storage.read_json(f"{out}/summary.json")
    assert [r["volume_id"] for r in summary["rejects"]] == ["gone"]  # the s3 error was met
    rejects = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/rejects/rejects.parquet")))
    assert failed.returncode == 2 and "nowhere.csv" in failed.stderr  # the error message
    assert any(name.endswith(".log") or ".out" in name for name in ray_logs)  # Ray's logs read
    outputs = {
        "preprocess stdout": ran.stdout,
        "preprocess stderr": ran.stderr,
        "error stdout": failed.stdout,
        "error stderr": failed.stderr,
        "summary.json": json.dumps(summary),
        "rejects": json.dumps(rejects.to_pylist()),
        **ray_logs,
    }
    for name, text in outputs.items():
        assert secret not in text, f"the secret key is in {name}"
        assert key_id not in text, f"the access key id is in {name}"
