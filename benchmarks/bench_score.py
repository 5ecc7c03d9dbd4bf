"""Benchmark of the scoring pipeline: Ray Data throughput against the in-process core, and growth.

    python benchmarks/bench_score.py --sizes 20000,100000 --out bench_score.json

1. Pipeline share: the same patches scored in-process with :func:`score_patches` (one process,
   all cores) and by :func:`score` (Ray Data, actor pool); throughput of the second over the first.
2. Growth: a patch table of each size is scored by a fresh ``score`` job in a subprocess (its own
   local Ray) with a ``tiny`` model and a few steps; throughput and the peak memory of the job's
   whole process tree (driver, Ray services, workers; sum of RSS sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from anogan_ray.config import ScoreConfig, load_config
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import build_models, save_bundle
from anogan_ray.tables import decode_pixels, patch_id


def write_table(folder: str, n: int, rows_per_file: int = 50_000) -> None:
    """A patch table of n test patches (random layered textures), hive-partitioned by split."""
    from ray.data.extensions import ArrowTensorArray

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(256, 64, 64), dtype=np.uint8)
    os.makedirs(f"{folder}/split=test", exist_ok=True)
    for start in range(0, n, rows_per_file):
        count = min(rows_per_file, n - start)
        index = np.arange(start, start + count)
        table = pa.table(
            {
                "patch_id": [patch_id(f"v{i // 1024}", (i // 32) % 32, 0, i % 32) for i in index],
                "subject_id": [f"s{i // 1024}" for i in index],
                "volume_id": [f"v{i // 1024}" for i in index],
                "bscan": ((index // 32) % 32).astype(np.int32),
                "y": np.zeros(count, np.int32),
                "x": (index % 32).astype(np.int32),
                "pixels": ArrowTensorArray.from_numpy(base[index % 256]),
                "label": (index % 2).astype(np.int8),
                "anomaly_fraction": np.zeros(count, np.float32),
                "source": ["bench"] * count,
            }
        )
        pq.write_table(table, f"{folder}/split=test/part-{start // rows_per_file:05d}.parquet")


def run_job(patches: str, model: str, out: str, cfg: ScoreConfig) -> dict:
    """Run one ``score`` job in a subprocess; its summary plus the peak RSS of its process tree."""
    code = (
        "import json, sys; from anogan_ray.config import ScoreConfig; "
        "from anogan_ray.pipelines.score import score; "
        f"s = score({patches!r}, {model!r}, {out!r}, ScoreConfig(**json.loads(sys.argv[1])))"
    )
    settings = {
        "steps": cfg.steps,
        "z_lr": cfg.z_lr,
        "batch_size": cfg.batch_size,
        "rows_per_file": cfg.rows_per_file,
        "splits": cfg.splits,
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    job = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(settings)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = psutil.Process(job.pid)
    peak = 0
    while job.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.5)
    if job.returncode != 0:
        raise RuntimeError(f"score job failed with exit code {job.returncode}")
    with open(f"{out}/summary.json") as f:
        summary = json.load(f)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    summary["peak_rss_gib"] = round(peak / 2**30, 3)
    return summary


def pipeline_share(work: str, model_cfg, model: str, n: int, cfg: ScoreConfig) -> dict:
    """Ray Data scoring throughput as a share of the in-process core's, same patches."""
    patches = f"{work}/share_patches"
    write_table(patches, n)
    bundle_models = build_models(model_cfg, seed=0)
    for module in bundle_models:
        module.eval().requires_grad_(False)
    table = pq.read_table(f"{patches}/split=test")
    pixels = np.stack(
        [np.asarray(p, np.uint8).reshape(64, 64) for p in table["pixels"].to_pylist()]
    )
    ids = table["patch_id"].to_pylist()
    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    for i in range(0, n, cfg.batch_size):
        batch = torch.from_numpy(decode_pixels(pixels[i : i + cfg.batch_size]))[:, None]
        score_patches(bundle_models, batch, ids[i : i + cfg.batch_size], lambda_=cfg.lambda_,
                      steps=cfg.steps, z_lr=cfg.z_lr)  # fmt: skip
    core_rate = n / (time.perf_counter() - started)
    summary = run_job(patches, model, f"{work}/share_out", cfg)
    return {
        "patches": n,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "core_patches_per_s": round(core_rate, 2),
        "pipeline_patches_per_s": summary["patches_per_s"],
        "pipeline_patches_per_s_incl_startup": round(n / summary["wall_seconds"], 2),
        "share": round(summary["patches_per_s"] / core_rate, 3),
        "share_incl_startup": round(n / summary["wall_seconds"] / core_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share-preset", default="demo", help="model for the pipeline share")
    parser.add_argument("--share-patches", type=int, default=1024)
    parser.add_argument("--share-steps", type=int, default=20)
    parser.add_argument("--sizes", default="100000,1000000", help="growth: table sizes")
    parser.add_argument("--growth-steps", type=int, default=2)
    parser.add_argument("--out", default="bench_score.json")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_score_")
    result: dict = {"cores": os.cpu_count()}
    try:
        share_cfg = load_config(args.share_preset).model
        model = f"{work}/share_model"
        save_bundle(model, *build_models(share_cfg, seed=0), share_cfg)
        cfg = ScoreConfig(steps=args.share_steps, z_lr=0.05, batch_size=128, splits=["test"])
        result["pipeline_share"] = pipeline_share(work, share_cfg, model, args.share_patches, cfg)
        print(json.dumps(result["pipeline_share"]), flush=True)

        tiny = load_config("tiny").model
        tiny_model = f"{work}/tiny_model"
        save_bundle(tiny_model, *build_models(tiny, seed=0), tiny)
        growth = []
        for n in (int(s) for s in args.sizes.split(",")):
            patches = f"{work}/patches_{n}"
            write_table(patches, n)
            cfg = ScoreConfig(steps=args.growth_steps, z_lr=0.05, batch_size=256, splits=["test"])
            summary = run_job(patches, tiny_model, f"{work}/out_{n}", cfg)
            row = {
                "patches": n,
                "steps": args.growth_steps,
                "patches_scored": summary["patches_scored"],
                "wall_seconds": summary["wall_seconds"],
                "patches_per_s": summary["patches_per_s"],
                "peak_rss_gib": summary["peak_rss_gib"],
            }
            growth.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(patches, ignore_errors=True)
        result["growth"] = growth
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
