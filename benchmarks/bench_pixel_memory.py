"""Memory of ``evaluate --level pixel`` as the cohort grows: synthetic maps of N B-scans.

Writes a synthetic cohort (``--bscans`` B-scans of 160 x 256 pixels in volumes of 10, each
with a mask of a few elliptic lesions, modality ``image``) and its map table (the contract's
schema, one method: residuals that are higher inside lesions, plus noise), then runs
:func:`anogan_ray.analysis.pixels.evaluate_pixels` in a fresh process per size and reports its
peak resident memory and time. Flat memory across sizes is the claim being checked.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pixel_memory.py --sizes 200,2000 \\
        --work /tmp/pixel-memory --out pixel_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HEIGHT, WIDTH, PER_VOLUME = 160, 256, 10
KEY = {"model_id": "synthetic", "lambda": 0.1, "steps": 10, "z_lr": 0.05, "mapping": "iterative"}


def write_cohort(root: Path, bscans: int, seed: int = 0) -> str:
    """Masks, a manifest and a map table of ``bscans`` B-scans under ``root``; the manifest."""
    from anogan_ray import tables

    rng = np.random.default_rng(seed)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(exist_ok=True)
    rows, manifest = [], ["subject_id,volume_id,path,modality,split,label,mask_path"]
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for v in range(-(-bscans // PER_VOLUME)):
        volume = f"v{v:05d}"
        split = "val" if v % 5 == 0 else "test"
        masks = np.zeros((PER_VOLUME, HEIGHT, WIDTH), np.uint8)
        for b in range(PER_VOLUME):
            if split == "test":
                for code in rng.integers(1, 4, size=3):
                    cy, cx = rng.uniform(20, HEIGHT - 20), rng.uniform(20, WIDTH - 20)
                    ry, rx = rng.uniform(3, 12, 2)
                    masks[b][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = code
            residual = rng.gamma(2.0, 0.1, (HEIGHT, WIDTH)) + 0.1 * (masks[b] > 0)
            rows.append(
                {
                    "volume_id": volume, "subject_id": volume, "bscan": b, "split": split,
                    "method": "A", "combine": "mean", "top": 0, "left": 0, "height": HEIGHT,
                    "width": WIDTH, "residual": tables.encode_map(residual),
                    "reconstruction": tables.encode_reconstruction(
                        rng.uniform(-1, 1, (HEIGHT, WIDTH))
                    ),
                    "patches": 28, "frame_width": WIDTH, "x_scale": 1.0, "y_scale": 1.0,
                    "shift": [0] * WIDTH, **KEY,
                }
            )  # fmt: skip
        np.save(root / "masks" / f"{volume}.npy", masks)
        label = 0 if split == "val" else 1
        manifest.append(
            f"{volume},{volume},masks/{volume}.npy,image,{split},{label},masks/{volume}.npy"
        )
        if len(rows) >= 500:
            pq.write_table(
                pa.Table.from_pylist(rows, schema=tables.map_schema()),
                root / "maps" / f"part-{v:05d}.parquet",
            )
            rows = []
    if rows:
        pq.write_table(
            pa.Table.from_pylist(rows, schema=tables.map_schema()), root / "maps" / "last.parquet"
        )
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return str(root / "manifest.csv")


def measure(root: Path, standardize: bool) -> dict:
    """Run the evaluation in a child process: its peak RSS (MiB) and seconds."""
    code = (
        "from anogan_ray.analysis.pixels import evaluate_pixels; import json; "
        f"r = evaluate_pixels({str(root / 'maps')!r}, {str(root / 'manifest.csv')!r}, "
        f"splits=['val', 'test'], standardize={standardize}, smooth_sigma=2.0); "
        "print(json.dumps({'bscans': r['bscans'], 'auroc': r['methods']['A']['auroc']}))"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "seconds": round(seconds, 1),
            "peak_rss_mib_largest_child_so_far": round(peak, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,2000", help="B-scans per run, ascending")
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:  # ascending: the peak is cumulative
        root = Path(args.work) / f"n{size}"
        write_cohort(root, size)
        maps_bytes = sum(f.stat().st_size for f in (root / "maps").iterdir())
        row = {"bscans_written": size, "map_table_mib": round(maps_bytes / 2**20, 1)}
        row.update(measure(root, standardize=True))
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).write_text(json.dumps({"results": results, "pid": os.getpid()}, indent=2))


if __name__ == "__main__":
    main()
