"""Benchmark: B-scans per second per core through the whole per-volume preprocessing step.

Runs :func:`anogan_ray.data.retina.preprocess_volume` (read, normalize, resample, segment, flatten,
patch) in this one process on phantom volumes of the ``demo`` size (496 x 512, 11.5 µm), half in
training mode (random patches) and half in scoring mode (the grid), and prints JSON: throughput
per core (by wall clock and by this process's CPU time, which is robust to a busy machine), the
share of time in each step, and the segmentation error against the phantom's truth.

    python benchmarks/bench_preprocess.py [--volumes 6] [--preset demo] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from anogan_ray import storage
from anogan_ray.config import load_config
from anogan_ray.data import phantom, retina


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="demo", help="config preset for sizes (demo: 496 x 512)"
    )
    parser.add_argument("--volumes", type=int, default=6, help="phantom volumes to preprocess")
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes over the volumes (best kept)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    cfg = load_config(args.preset)
    phantom_cfg, preprocess_cfg = cfg.phantom, cfg.preprocess
    with tempfile.TemporaryDirectory() as folder:
        records, truths = [], []
        for index in range(args.volumes):
            volume = phantom.generate_volume(phantom_cfg, index, 0, pathological=index % 2 == 1)
            path = os.path.join(folder, f"v{index}.npy")
            mask_path = os.path.join(folder, f"m{index}.npy")
            np.save(path, volume.image)
            np.save(mask_path, volume.mask)
            truths.append(volume)
            records.append(
                {
                    "subject_id": f"s{index}",
                    "volume_id": f"v{index}",
                    "path": path,
                    "modality": "oct",
                    "split": "train" if index % 4 < 2 else "test",
                    "spacing_x_um": phantom_cfg.spacing_x_um,
                    "mask_path": mask_path,
                }
            )
        best = None
        for _ in range(args.repeats):
            steps = dict.fromkeys(retina.STEPS, 0.0)
            bscans = patches = 0
            wall, cpu = time.perf_counter(), time.process_time()
            results = []
            for record in records:
                result = retina.preprocess_volume(record, preprocess_cfg)
                results.append(result)
                bscans += result.bscans
                patches += result.num_patches
                for step, seconds in result.timings.items():
                    steps[step] += seconds
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if best is None or wall < best[0]:
                best = (wall, cpu, steps, bscans, patches, results)
        wall, cpu, steps, bscans, patches, results = best

    ilm_errors, bm_errors = [], []
    for volume, result in zip(truths, results):
        ilm = np.stack([g.ilm for g in result.geometry])
        bm = np.stack([g.bm for g in result.geometry])
        spacing, target = phantom_cfg.spacing_x_um, preprocess_cfg.target_spacing_um
        ilm_errors.append(np.abs(ilm - retina.resample_x(volume.ilm, spacing, target)).mean())
        bm_errors.append(np.abs(bm - retina.resample_x(volume.bm, spacing, target)).mean())
    total = sum(steps.values())
    report = {
        "benchmark": "preprocess_per_volume",
        "preset": args.preset,
        "bscan_shape": [phantom_cfg.height, phantom_cfg.width],
        "volumes": args.volumes,
        "bscans": bscans,
        "patches": patches,
        "wall_seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "bscans_per_second_per_core": round(bscans / wall, 2),
        "bscans_per_cpu_second": round(bscans / cpu, 2),
        "step_share": {step: round(seconds / total, 3) for step, seconds in steps.items()},
        "step_seconds": {step: round(seconds, 3) for step, seconds in steps.items()},
        "segmentation_mae_px": {
            "ilm": round(float(np.mean(ilm_errors)), 3),
            "bm": round(float(np.mean(bm_errors)), 3),
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
