"""Benchmark: does the label-free sweep objective pick what the labelled val AUC would pick?

Writes the demo-sized phantom cohort with some pathological subjects moved into ``val`` (so the
``val`` split is labelled), preprocesses it, and runs ``anogan-ray tune`` (every trial a Ray Train
run) with the FIFO scheduler, so every trial reports every epoch. At each trial-epoch the sweep
records both the labelled val AUC of A(x) and the synthetic-lesion AUC (the objective used when
``val`` has no labels). Prints JSON: the Spearman rank correlation of the two over all
trial-epochs and over the trials' last epochs, the trial each one would choose, and the labelled
AUC lost by choosing with the synthetic objective.

    python benchmarks/bench_tune_agreement.py [--trials 8] [--epochs 4] [--out bench.json]
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
import pandas as pd
from scipy.stats import spearmanr

from anogan_ray.config import load_config
from anogan_ray.data.phantom import write_cohort
from anogan_ray.pipelines.preprocess import preprocess
from anogan_ray.pipelines.tune import tune


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC from its positive and negative counts."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    ) / (positives * negatives)
    return float(np.sqrt(variance))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="config preset (cohort, model, training)")
    parser.add_argument("--trials", type=int, default=8, help="trials (sampled learning rates)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per trial")
    parser.add_argument(
        "--pathological-in-val", type=int, default=2, help="pathological subjects moved to val"
    )
    parser.add_argument("--val-patches", type=int, default=160, help="tune.val_patches")
    parser.add_argument("--synthetic-patches", type=int, default=80, help="tune.synthetic_patches")
    parser.add_argument("--steps", type=int, default=30, help="inversion steps per evaluation")
    parser.add_argument("--workdir", default=None, help="keep the cohort and sweep here")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    cfg = load_config(
        args.preset,
        [
            f"train.epochs={args.epochs}",
            f"tune.num_samples={args.trials}",
            "tune.scheduler=fifo",
            "tune.lr_generator=[0.00005, 0.005]",
            "tune.lr_discriminator=[0.00005, 0.005]",
            "tune.lambdas=[0.1]",
            f"tune.val_patches={args.val_patches}",
            f"tune.synthetic_patches={args.synthetic_patches}",
            f"score.steps={args.steps}",
        ],
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or scratch
        started = time.monotonic()
        write_cohort(cfg.phantom, os.path.join(root, "cohort"))
        manifest_path = os.path.join(root, "cohort", "manifest.csv")
        manifest = pd.read_csv(manifest_path)
        pathological = sorted(manifest.loc[manifest["label"] == 1, "subject_id"].unique())
        moved = pathological[: args.pathological_in_val]
        manifest.loc[manifest["subject_id"].isin(moved), "split"] = "val"
        manifest.to_csv(manifest_path, index=False)
        preprocess(manifest_path, os.path.join(root, "preprocess"), cfg.preprocess)
        prepared = time.monotonic() - started
        summary = tune(os.path.join(root, "preprocess", "patches"), os.path.join(root, "tune"), cfg)
        history = pd.read_parquet(summary["history_table"])
        trials = pd.read_parquet(summary["trials_table"])

    eval_anomalous = round(
        summary["eval_patches"] * summary["val_anomalous"] / summary["val_patches"]
    )  # expected count in the random subset
    both = history.dropna(subset=["val_auc", "synthetic_auc"])
    last = trials.dropna(subset=["val_auc", "synthetic_auc"])
    by_labels = last.loc[last["val_auc"].idxmax()]
    by_synthetic = last.loc[last["synthetic_auc"].idxmax()]
    result = {
        "benchmark": "tune_agreement",
        "preset": args.preset,
        "trials": len(trials),
        "epochs": args.epochs,
        "val_patches": summary["val_patches"],
        "val_anomalous": summary["val_anomalous"],
        "eval_patches": summary["eval_patches"],
        "synthetic_patches": summary["synthetic_patches"],
        "trial_epochs": len(both),
        # how far apart two trials' AUCs must be before the evaluation set can tell them apart
        "standard_error_val_auc": round(
            auc_standard_error(
                float(last["val_auc"].mean()),
                eval_anomalous,
                summary["eval_patches"] - eval_anomalous,
            ),
            4,
        ),
        "standard_error_synthetic_auc": round(
            auc_standard_error(
                float(last["synthetic_auc"].mean()),
                summary["synthetic_patches"],
                summary["synthetic_patches"],
            ),
            4,
        ),
        "spearman_all_trial_epochs": round(
            float(spearmanr(both["synthetic_auc"], both["val_auc"]).statistic), 4
        ),
        "spearman_last_epochs": round(
            float(spearmanr(last["synthetic_auc"], last["val_auc"]).statistic), 4
        ),
        "spearman_neg_healthy_residual": summary["agreement_with_val_auc"][
            "spearman_neg_healthy_residual"
        ],
        "best_val_auc": round(float(by_labels["val_auc"]), 4),
        "val_auc_of_synthetic_choice": round(float(by_synthetic["val_auc"]), 4),
        "same_trial_chosen": bool(by_labels["trial_id"] == by_synthetic["trial_id"]),
        "per_trial": last[
            ["trial_id", "lr_generator", "lr_discriminator", "val_auc", "synthetic_auc"]
        ]
        .round(5)
        .to_dict("records"),
        "max_concurrent_trials": summary["max_concurrent_trials"],
        "prepare_seconds": round(prepared, 1),
        "sweep_seconds": summary["wall_seconds"],
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
