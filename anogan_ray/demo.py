"""``anogan-ray demo``: every stage, end to end, on the built-in synthetic cohort with a local Ray.

Layout of ``out`` (each stage folder is exactly what that stage's command writes):

    out/cohort/       phantom volumes, masks, true boundaries, manifest.csv
    out/preprocess/   patches/ (the patch table), rejects/, geometry/, summary.json
    out/model/        the model bundle, samples/ (G(z) per epoch), _runs/ (checkpoints)
    out/score/        scores/ (the score table), maps/ (the map table, score.save_maps),
                      rejects/, summary.json
    out/report/       PNGs and index.html
    out/summary.json  every stage's summary and the AUCs
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from anogan_ray import storage
from anogan_ray.config import Config

log = logging.getLogger(__name__)
DEMO_PERCENTILE = 90.0  # healthy val percentile of the demo's threshold (see run_demo)
# The demo's pixel-level evaluations (score.save_maps): the residual maps as stored, and with
# the documented post-processing (docs/maps.md: it helps A, the aCAE and PCA alike)
PIXEL_EVALUATIONS = {  # stage name: (column of the demo's table, options)
    "evaluate_pixels": ("as stored", {}),
    "evaluate_pixels_standardized": (
        "standardized + sigma 2",
        {"standardize": True, "smooth_sigma": 2.0},
    ),
}


def run_demo(out: str, cfg: Config) -> dict[str, Any]:
    """Run phantom -> preprocess -> train -> score -> evaluate -> report into ``out``."""
    from anogan_ray.analysis.report import report
    from anogan_ray.core import metrics
    from anogan_ray.data.phantom import write_cohort
    from anogan_ray.pipelines.preprocess import preprocess
    from anogan_ray.pipelines.score import score
    from anogan_ray.pipelines.train import train
    from anogan_ray.ray_env import ensure_ray

    started = time.perf_counter()
    ensure_ray()
    folders = {
        name: storage.join(out, name)
        for name in ("cohort", "preprocess", "model", "score", "report")
    }
    stages: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def stage(name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        log.info("demo: %s", name)
        t0 = time.perf_counter()
        result = func(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        stages[name] = result
        return result

    stage("phantom", write_cohort, cfg.phantom, folders["cohort"])
    stage(
        "preprocess",
        preprocess,
        storage.join(folders["cohort"], "manifest.csv"),
        folders["preprocess"],
        cfg.preprocess,
    )
    patches = storage.join(folders["preprocess"], "patches")
    stage("train", train, patches, folders["model"], cfg)
    stage("score", score, patches, folders["model"], folders["score"], cfg.score)
    scores = storage.join(folders["score"], "scores")
    # the paper does not say how it set its threshold; its specificities are 0.85-0.90, so the
    # demo reads its table at the 90th percentile of the healthy val scores (the CLI's default
    # is the 99th)
    threshold = metrics.calibrate(
        scores, out=folders["model"], method="percentile", percentile=DEMO_PERCENTILE
    )
    evaluation = stage("evaluate", metrics.evaluate, scores, threshold=folders["model"])
    print(metrics.format_paper_table(evaluation), file=sys.stderr)  # the paper's Table 1
    manifest = storage.join(folders["cohort"], "manifest.csv")
    if cfg.score.save_maps:  # where: each method's maps against the masks, val + test
        from anogan_ray.analysis.pixels import evaluate_pixels, format_pixel_comparison

        maps = storage.join(folders["score"], "maps")
        # the paper's residuals as they are, then with the post-processing docs/maps.md
        # measured for every method (healthy standardization, smoothing at 1/32 of a patch)
        pixels = {
            label: stage(name, evaluate_pixels, maps, manifest, splits=["val", "test"], **options)
            for name, (label, options) in PIXEL_EVALUATIONS.items()
        }
        print(format_pixel_comparison(pixels), file=sys.stderr)
    stage(
        "report", report, scores, folders["report"], patches=patches, model=folders["model"],
        manifest=manifest,
    )  # fmt: skip
    summary = {
        "out": out,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": timings,
        "auc": stages["score"].get("auc"),
        "paper_table": {  # the ROC curves are in the report's roc.png, not here
            **evaluation,
            "scores": {
                name: {k: v for k, v in row.items() if k != "roc"}
                for name, row in evaluation["scores"].items()
            },
        },
        "threshold": threshold,
        "pixel_level": {name: stages[name] for name in PIXEL_EVALUATIONS if name in stages},
        "stages": {
            k: v for k, v in stages.items() if k != "evaluate" and k not in PIXEL_EVALUATIONS
        },
        "report": storage.join(folders["report"], "index.html"),
    }
    if summary["pixel_level"]:  # pixel AUROC and AUPRO per evaluation and method
        summary["pixel_auc"] = {
            name: {m: {"auroc": r["auroc"], "aupro": r["aupro"]} for m, r in e["methods"].items()}
            for name, e in summary["pixel_level"].items()
        }
    storage.write_json(storage.join(out, "summary.json"), summary)
    keep = ("out", "seconds", "stage_seconds", "auc", "pixel_auc", "report")
    return {k: summary[k] for k in keep if k in summary}
