"""Pixel-level benchmark: the maps of a scored run against its masks, for A, the aCAE and PCA.

Run by hand on the folder ``anogan-ray demo --out DIR --set score.save_z=true`` leaves (or any
folder holding ``cohort/manifest.csv``, ``preprocess/``, ``model/`` and ``score/scores`` with z):
for each way of combining overlapping patches (``--combines``) it writes the map table with the
product's pass (:func:`anogan_ray.pipelines.maps.write_maps`, into ``--work``), then evaluates
every method's maps with the product's pixel evaluation
(:func:`anogan_ray.analysis.pixels.evaluate_pixels`), with and without the healthy
standardization and at each smoothing scale (``--sigmas``): post-processings applied to every
method alike. Each setting is evaluated on ``--splits`` and on test alone (the standardization
and the thresholds are fitted on val's healthy pixels). Patch-level AUCs of the same run are
added for reference. JSON out.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_maps.py --run /tmp/demo-maps \\
        --work /tmp/demo-maps-bench --out maps.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from anogan_ray import storage, tables
from anogan_ray.analysis.pixels import evaluate_pixels, format_pixel_table
from anogan_ray.config import ScoreConfig
from anogan_ray.core import metrics
from anogan_ray.pipelines.maps import write_maps


def pixel_table(
    run: str, work: str, combines: list[str], sigmas: list[float], splits: list[str],
    key: str | None = None, percentile: float = 99.0,
) -> dict[str, Any]:  # fmt: skip
    """Maps of ``run`` (one folder per combine under ``work``) evaluated at every sigma."""
    scores = os.path.join(run, "score", "scores")
    dataset = tables.open_dataset(scores)
    chosen = tables.select_key(dataset, key, f"score table {scores}")
    manifest = os.path.join(run, "cohort", "manifest.csv")
    patches = os.path.join(run, "preprocess", "patches")
    model = os.path.join(run, "model")
    patch_level = metrics.evaluate(scores, level="patch", split="test", key=chosen.row())
    result: dict[str, Any] = {
        "run": run,
        "key": str(chosen),
        "splits": splits,
        "patch_auc_test": {k: round(v["auc"], 4) for k, v in patch_level["scores"].items()},
        "maps": {},
        "pixel": [],
    }
    for combine in combines:
        out = os.path.join(work, combine)
        os.makedirs(out, exist_ok=True)
        link = os.path.join(out, "scores")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(scores), link)
        started = time.perf_counter()
        summary = write_maps(
            patches, model, out, chosen, ScoreConfig(splits=splits), combine=combine
        )
        summary["seconds_total"] = round(time.perf_counter() - started, 2)
        result["maps"][combine] = summary
        for standardize, sigma, evaluated in itertools.product(
            (False, True), sigmas, (splits, ["test"])
        ):
            evaluation = evaluate_pixels(
                storage.join(out, "maps"), manifest, key=chosen, splits=evaluated,
                percentile=percentile, smooth_sigma=sigma, standardize=standardize,
            )  # fmt: skip
            print(format_pixel_table(evaluation), flush=True)
            result["pixel"].append(
                {
                    "combine": combine,
                    "standardize": standardize,
                    "smooth_sigma": sigma,
                    "splits": evaluated,
                    "bscans": evaluation["bscans"],
                    "methods": {
                        method: {
                            k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                        }
                        for method, row in evaluation["methods"].items()
                    },
                }
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a demo output folder (scored with z)")
    parser.add_argument("--work", required=True, help="where the map tables are written")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--combines", default="mean,max")
    parser.add_argument("--sigmas", default="0,2,4,8", help="smoothing scales, pixels")
    parser.add_argument("--splits", default="val,test")
    parser.add_argument("--key", help="the scoring key, when the table holds several")
    parser.add_argument("--percentile", type=float, default=99.0)
    args = parser.parse_args()

    from anogan_ray.ray_env import ensure_ray

    ensure_ray()
    started = time.perf_counter()
    result = pixel_table(
        args.run, args.work, args.combines.split(","),
        [float(s) for s in args.sigmas.split(",")], args.splits.split(","),
        key=args.key, percentile=args.percentile,
    )  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result.update(seconds=round(time.perf_counter() - started, 1), commit=commit)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
