"""A synthetic patch table of any size (random layered textures), for the scoring benchmarks.

python benchmarks/synthetic_patches.py --patches 100000 --out /tmp/patches
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from anogan_ray.tables import patch_id


def write_table(folder: str, n: int, rows_per_file: int = 50_000, row_group: int = 4096) -> None:
    """A patch table of n test patches (random layered textures), hive-partitioned by split.

    Row groups of ``row_group`` rows, as ``preprocess`` writes them (a row group per block of one
    volume, ~3,700 patches at the paper preset): a reader holds about one in memory."""
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
        path = f"{folder}/split=test/part-{start // rows_per_file:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, required=True, help="rows of the table")
    parser.add_argument("--out", required=True, help="the table's folder")
    args = parser.parse_args()
    write_table(args.out, args.patches)


if __name__ == "__main__":
    main()
