"""Training throughput (patches/s) of the Ray Train DDP loop with 1 and 2 CPU workers.

    .venv/bin/python benchmarks/bench_train.py --steps 40 --out bench-train.json

Trains the ``demo`` model (base_channels 16, latent 64, batch 64 per worker) on a synthetic patch
table for a fixed number of steps, once per worker count, on a local Ray with 2 CPUs. Reported:
``patches_per_s`` measured inside the workers' training loop (G and D updates, DDP all-reduces,
checkpoints and sample grids; not Ray start-up), and the whole ``train()`` wall time (data read,
worker start-up, training, BatchNorm finalization and export). Each worker has 1 CPU, so torch
runs one thread per worker: 1 worker uses one core, 2 workers use both.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import ray

from anogan_ray.config import load_config
from anogan_ray.pipelines.train import train
from anogan_ray.tables import encode_pixels, patch_id


def write_band_patches(url: str, count: int, seed: int = 0) -> None:
    """A patch table of ``count`` flattened-retina-like train patches (horizontal layers)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(64, dtype=np.float32)[:, None]  # (64, 1)
    records = []
    for index in range(count):
        layers = 0.6 * np.sin(rng.uniform(0.15, 0.3) * rows + rng.uniform(0, 6.3)) - 0.2
        image = np.clip(layers + rng.normal(0, 0.08, (64, 64)), -1, 1)  # (64, 64)
        volume_id = f"bench{index // 256}/od"
        records.append(
            {
                "patch_id": patch_id(volume_id, index % 256, 0, 0),
                "subject_id": volume_id.split("/")[0],
                "volume_id": volume_id,
                "bscan": index % 256,
                "y": 0,
                "x": 0,
                "split": "train",
                "pixels": encode_pixels(image),
                "label": 0,
                "anomaly_fraction": float("nan"),
                "source": "synthetic",
            }
        )
    ray.data.from_items(records, override_num_blocks=4).write_parquet(url, partition_cols=["split"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--patches", type=int, default=2048, help="synthetic train patches")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        write_band_patches(f"{folder}/patches", args.patches)
        for workers in args.workers:
            cfg = load_config(
                "demo",
                [
                    f"train.num_workers={workers}",
                    f"train.max_steps={args.steps}",
                    f"train.checkpoint_every={args.steps}",
                    f"train.run_name=bench-{workers}",
                ],
            )
            started = time.perf_counter()
            summary = train(f"{folder}/patches", f"{folder}/model-{workers}", cfg)
            runs.append(
                {
                    "num_workers": workers,
                    "steps": summary["steps"],
                    "batch_size_per_worker": cfg.train.batch_size,
                    "patches_per_s": summary["patches_per_s"],
                    "train_loop_seconds": summary["train_seconds"],
                    "train_call_seconds": round(time.perf_counter() - started, 2),
                }
            )
    result = {
        "benchmark": "train_throughput",
        "model": "demo preset (base_channels 16, latent_dim 64, kernel 5)",
        "device": "cpu",
        "cpus": 2,
        "python": platform.python_version(),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
