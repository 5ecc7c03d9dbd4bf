"""Benchmark: do the sweep's label-free objectives pick what the labelled val AUC would pick?

For each data set it writes a labelled ``val`` split, then for each seed runs ``anogan-ray tune``
(every trial a Ray Train run; FIFO, so every trial reports every epoch; ``tune.objective=labels``
so the sweep itself ranks by the labels) with lr_G and lr_D log-uniform in [5e-5, 5e-3]. Every
trial-epoch reports the labelled AUC and every label-free candidate
(``anogan_ray/core/objectives.py``) on the same trained model, on a small evaluation set
(``--sweep-val-patches``, ``--sweep-lesion-patches``). Then each trial's final model (its last
checkpoint, the model the sweep picks among) is evaluated once more by the sweep's own
``EpochEvaluation`` on a large evaluation set (``--val-patches``: all of val by default;
``--lesion-patches`` copies of each kind): the agreement is measured on those numbers.

For each candidate it prints Spearman's rank correlation with the labelled AUC over the trials'
final models with a percentile bootstrap 95 % interval over the trials, Spearman over every
trial-epoch of the sweep (small evaluation set), and the regret: the best labelled AUC of the
sweep minus the labelled AUC of the trial the candidate ranks first. Per data set also the trials
of all seeds pooled (their regret: the mean of the sweeps').

With ``--halves`` it also deals val's volumes into two halves (healthy and other volumes each
alternately) and measures every candidate computed on one half against the labelled AUC on the
other, both ways: agreement with labels on patches the candidate never saw, beside the labelled
AUC of one half predicting the other's (how far the labels agree with themselves).

Data sets (``--sets``):

* ``phantom``: the demo cohort with ``--pathological`` pathological subjects, ``--pathological-in-val``
  of them moved into ``val`` beside its healthy ones (patch labels from the lesion masks).
* ``brick``, ``grass``, ``gravel``: ``benchmarks/bench_images.py``'s photograph sets (pasted
  defects with their masks); its ``test`` images join ``val``, so ``val`` holds 50 normal and
  50 defect images (patch labels from the defect masks).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_tune_agreement.py --sets phantom,grass,brick \\
        --seeds 0,1 --trials 8 --epochs 4 --work /tmp/agreement --out agreement.json

Finished sweeps and final evaluations in ``--work`` are reused; ``--reevaluate`` evaluates the
final models again (the current code and sizes; nothing is retrained).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_images beside this file

from anogan_ray import storage  # noqa: E402
from anogan_ray.config import Config, load_config  # noqa: E402
from anogan_ray.core import objectives  # noqa: E402
from anogan_ray.core.model import QUALITY_FILE  # noqa: E402
from anogan_ray.pipelines import tune as sweep  # noqa: E402

PHOTOS = ("brick", "grass", "gravel")


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC from its positive and negative counts."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    ) / (positives * negatives)
    return float(np.sqrt(variance))


# ---------------------------------------------------------------------------------------------
# Labelled val splits
# ---------------------------------------------------------------------------------------------


def prepare_phantom(root: Path, cfg: Config, pathological_in_val: int) -> str:
    from anogan_ray.data.phantom import write_cohort
    from anogan_ray.pipelines.preprocess import preprocess

    manifest_path = root / "cohort" / "manifest.csv"
    write_cohort(cfg.phantom, str(root / "cohort"))
    manifest = pd.read_csv(manifest_path)
    pathological = sorted(manifest.loc[manifest["label"] == 1, "subject_id"].unique())
    manifest.loc[manifest["subject_id"].isin(pathological[:pathological_in_val]), "split"] = "val"
    manifest.to_csv(manifest_path, index=False)
    preprocess(str(manifest_path), str(root / "preprocess"), cfg.preprocess)
    return str(root / "preprocess" / "patches")


def prepare_photos(name: str, root: Path, cfg: Config, seed: int) -> str:
    from bench_images import write_photo_set

    from anogan_ray.data.manifest import build_manifest
    from anogan_ray.pipelines.preprocess import preprocess

    images = root / "images"
    write_photo_set(name, images, seed)
    if not list(images.glob("*/defect/*_mask.png")):
        raise SystemExit(
            f"{images}: bench_images.write_photo_set wrote no defect masks (X_mask.png); this "
            "benchmark needs patch labels from them"
        )
    manifest = str(root / "manifest.csv")
    build_manifest(
        str(images), manifest, modality="image", split_from_folder=True,
        label_from_folder={"normal": 0, "defect": 1},
    )  # fmt: skip
    table = pd.read_csv(manifest)
    table.loc[table["split"] == "test", "split"] = "val"  # a larger labelled val
    table.to_csv(manifest, index=False)
    preprocess(manifest, str(root / "preprocess"), cfg.preprocess)
    return str(root / "preprocess" / "patches")


# ---------------------------------------------------------------------------------------------
# The trials' final models on a large evaluation set
# ---------------------------------------------------------------------------------------------


def complete_objectives(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (final models' metrics) with every objective the stored per-λ metrics allow,
    for objectives newer than the evaluation: the sweep's own :func:`objectives.best_objectives`
    on them (nothing is inverted again)."""
    prefix = "val_auc_lambda_"
    lambdas = [float(c[len(prefix) :]) for c in frame if c.startswith(prefix)]
    frame = frame.copy()
    for index, row in frame.iterrows():
        per_lambda = [
            {"lambda": lam, "sliced_wasserstein": row.get("sliced_wasserstein", math.nan)}
            | {
                m: row.get(sweep.lambda_key(m, lam), math.nan)
                for m in objectives.PER_LAMBDA_METRICS
            }
            for lam in lambdas
        ]
        for name, (value, lambda_) in objectives.best_objectives(per_lambda).items():
            if not np.isfinite(row.get(sweep.objective_key(name), math.nan)):
                frame.loc[index, sweep.objective_key(name)] = value
                frame.loc[index, sweep.objective_lambda_key(name)] = lambda_
    return frame


def volume_halves(volumes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per val patch, whether its volume falls in half A: the healthy volumes (every patch
    labelled 0) and the others are each dealt alternately, in id order, into halves A and B."""
    healthy = sweep.healthy_volumes(volumes, labels)
    others = set(volumes.tolist()) - healthy
    in_a = {v: i % 2 == 0 for group in (healthy, others) for i, v in enumerate(sorted(group))}
    return np.array([in_a[v] for v in volumes.tolist()])


def evaluate_final_models(
    patches: str, out: str, cfg: Config, evaluation: sweep.EvaluationSet | None = None
) -> pd.DataFrame:
    """Every trial's metrics on its final model (its last checkpoint) with the sweep's own
    ``EpochEvaluation`` on ``evaluation`` (default: ``cfg``'s evaluation set of the whole val
    split): one row per trial."""
    from anogan_ray.pipelines.train import batchnorm_pixels, read_training_patches

    trials = pd.read_parquet(storage.join(out, "trials.parquet"))
    evaluation = evaluation or sweep.load_evaluation_set(patches, cfg)
    real_pixels = batchnorm_pixels(read_training_patches(patches, seed=cfg.train.seed), cfg)
    counts = {
        "eval_patches": evaluation.count,
        "eval_anomalous": int((evaluation.labels == 1).sum()),
        "eval_healthy": int(evaluation.healthy.sum()),
        "synthetic_copies": len(evaluation.copies("synthetic")),
        "cutpaste_copies": len(evaluation.copies("cutpaste")),
    }
    rows = []
    for trial in trials.to_dict("records"):
        trial_cfg = sweep.trial_settings(cfg.to_dict(), trial, gpus=0)
        folder = sweep.trial_folder(out, trial_cfg, trial["trial_id"])
        run = storage.join(folder, sweep.RUNS_FOLDER, trial_cfg.train.run_name)
        last = storage.join(run, sweep.checkpoint_name(int(trial["step"])), "state.pt")
        state = torch.load(io.BytesIO(storage.read_bytes(last)), weights_only=True)
        evaluate = sweep.EpochEvaluation(
            evaluation, real_pixels, trial_cfg, storage.join(folder, QUALITY_FILE)
        )
        metrics = evaluate({**state, "epoch": float(trial["epochs"])})
        settings = {k: trial[k] for k in ("lr_generator", "lr_discriminator", "epochs", "step")}
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        rows.append({"trial_id": trial["trial_id"], **settings, **counts, **flat})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------


def evaluate_halves(patches: str, out: str, cfg: Config) -> pd.DataFrame:
    """:func:`evaluate_final_models` on each half of val's volumes (:func:`volume_halves`): one
    row per trial and half (``half``: "A" or "B")."""
    ids, volumes, labels, pixels = sweep.read_val_split(patches)
    in_a = volume_halves(volumes, labels)
    frames = []
    for half, rows in (("A", in_a), ("B", ~in_a)):
        evaluation = sweep.make_evaluation_set(
            ids[rows], labels[rows], pixels[rows], cfg, source=f"{patches} (half {half})",
            volumes=volumes[rows],
        )  # fmt: skip
        frames.append(evaluate_final_models(patches, out, cfg, evaluation).assign(half=half))
    return pd.concat(frames, ignore_index=True)


def cross_half_rows(halves: pd.DataFrame, seed: int) -> dict:
    """Per label-free candidate, its agreement when it is computed on one half of val's volumes
    and the labelled AUC on the other (independent patches and volumes): both directions. The
    labelled AUC itself is the first row, the ceiling: how well one half's labels predict the
    other's."""
    labelled = sweep.objective_key("labels")
    by_half = {h: frame.set_index("trial_id") for h, frame in halves.groupby("half")}
    result = {}
    for name in ("labels", *objectives.LABEL_FREE):
        key = sweep.objective_key(name)
        rows = {}
        for mine, other in (("A", "B"), ("B", "A")):
            if key not in by_half[mine] or by_half[mine][key].notna().sum() < 3:
                continue
            truth = by_half[other][labelled].reindex(by_half[mine].index)
            row = objectives.agreement(by_half[mine][key], truth, seed=seed)
            row["picked_trial"] = by_half[mine].index[row.pop("picked")]
            rows[f"{mine}->{other}"] = row
        if rows:
            result[name] = rows
    return result


def cross_half_records(halves: pd.DataFrame, name: str, seeds: str, seed: int) -> list[dict]:
    """:func:`cross_half_rows` as flat records of the data set ``name`` and its ``seeds``."""
    return [
        {"set": name, "seeds": seeds, "candidate": candidate, "direction": direction, **row}
        for candidate, directions in cross_half_rows(halves, seed).items()
        for direction, row in directions.items()
    ]


def agreement_rows(trials: pd.DataFrame, history: pd.DataFrame, seed: int) -> dict:
    """Per label-free candidate: agreement over the trials' last epochs and all trial-epochs."""
    labelled = sweep.objective_key("labels")
    result = {}
    for name in objectives.LABEL_FREE:
        key = sweep.objective_key(name)
        if key not in trials or trials[key].notna().sum() < 3:
            continue
        row = objectives.agreement(trials[key], trials[labelled], seed=seed)
        row["picked_trial"] = trials["trial_id"].iloc[row.pop("picked")]
        if key not in history:  # a candidate newer than the sweep: its final models only
            row.update(spearman_trial_epochs=None, spearman_trial_epochs_ci95=[None, None])
            result[name] = row
            continue
        rho, *low_high = objectives.spearman_interval(history[key], history[labelled], seed=seed)
        row["spearman_trial_epochs"] = round(rho, 4) if math.isfinite(rho) else None
        row["spearman_trial_epochs_ci95"] = [round(v, 4) for v in low_high]
        row["trial_epochs"] = int(history[[key, labelled]].notna().all(axis=1).sum())
        result[name] = row
    return result


def format_table(rows: list[dict]) -> str:
    """A markdown table of agreement rows."""
    header = (
        "| set | seeds | candidate | trials | Spearman, final models [95 % CI] | "
        "Spearman, trial-epochs | regret | best labelled AUC |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        low, high = r["spearman_ci95"]
        ci = "" if low is None else f" [{low:.2f}, {high:.2f}]"
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.2f}"
        epochs = r.get("spearman_trial_epochs")
        epochs = "n/a" if epochs is None else f"{epochs:.2f}"
        regret = "n/a" if r["regret"] is None else f"{r['regret']:.3f}"
        lines.append(
            f"| {r['set']} | {r['seeds']} | {r['candidate']} | {r['trials']} | {rho}{ci} | "
            f"{epochs} | {regret} | {r['best_val_auc']:.3f} |"
        )
    return "\n".join(lines)


def evaluated(
    evaluate,
    file: str,
    lesion_patches: int,
    *,
    patches: str,
    out: str,
    overrides: list[str],
    args: argparse.Namespace,
    timings: dict[str, float],
) -> pd.DataFrame:
    """``evaluate``'s table of a sweep's final models (all of val, ``lesion_patches`` copies of
    each kind), kept in ``out/file`` and reused unless ``--reevaluate``; its time in ``timings``."""
    path = Path(out) / file
    if args.reevaluate or not path.exists():
        started = time.monotonic()
        sizes = [
            f"tune.val_patches={args.val_patches}",
            f"tune.synthetic_patches={lesion_patches}",
            f"tune.cutpaste_patches={lesion_patches}",
        ]
        evaluate(patches, out, load_config(args.preset, [*overrides, *sizes])).to_parquet(path)
        timings[f"{Path(out).parent.name}_{Path(out).name}_{path.stem}_s"] = round(
            time.monotonic() - started, 1
        )
    return complete_objectives(pd.read_parquet(path))


def format_cross_half(rows: list[dict]) -> str:
    """A markdown table of cross-half agreement rows."""
    lines = [
        "| set | seeds | candidate | halves | trials | Spearman [95 % CI] | regret |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        low, high = r["spearman_ci95"]
        ci = "" if low is None else f" [{low:.2f}, {high:.2f}]"
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.2f}"
        regret = "n/a" if r["regret"] is None else f"{r['regret']:.3f}"
        lines.append(
            f"| {r['set']} | {r['seeds']} | {r['candidate']} | {r['direction']} | {r['trials']} "
            f"| {rho}{ci} | {regret} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="phantom,grass,brick", help="phantom and/or photo sets")
    parser.add_argument("--seeds", default="0,1", help="sweep seeds (tune.seed and train.seed)")
    parser.add_argument("--preset", default="demo", help="config preset (model, training)")
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per trial")
    parser.add_argument(
        "--pathological", type=int, default=8, help="phantom: pathological subjects"
    )
    parser.add_argument(
        "--pathological-in-val", type=int, default=4, help="phantom: of them moved to val"
    )
    parser.add_argument(
        "--val-patches", type=int, default=100_000, help="val patches, final evaluation"
    )
    parser.add_argument(
        "--lesion-patches", type=int, default=384, help="copies of each kind, final evaluation"
    )
    parser.add_argument("--sweep-val-patches", type=int, default=128, help="tune.val_patches")
    parser.add_argument(
        "--sweep-lesion-patches", type=int, default=32, help="tune.synthetic/cutpaste_patches"
    )
    parser.add_argument("--steps", type=int, default=20, help="inversion steps per evaluation")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="more overrides"
    )
    parser.add_argument("--work", required=True, help="data sets and sweeps (kept; reused)")
    parser.add_argument("--reevaluate", action="store_true", help="evaluate final models again")
    parser.add_argument(
        "--halves", action="store_true",
        help="also: each candidate on one half of val's volumes against the labels on the other",
    )  # fmt: skip
    parser.add_argument(
        "--half-lesion-patches", type=int, default=64, help="copies of each kind, per half"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from anogan_ray.ray_env import ensure_ray

    ensure_ray()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    per_sweep, pooled, cross_half, timings = [], [], [], {}
    for name in args.sets.split(","):
        base = [
            f"train.epochs={args.epochs}",
            f"tune.num_samples={args.trials}",
            "tune.scheduler=fifo",
            "tune.objective=labels",
            "tune.lr_generator=[0.00005, 0.005]",
            "tune.lr_discriminator=[0.00005, 0.005]",
            "tune.lambdas=[0.1]",
            f"tune.val_patches={args.sweep_val_patches}",
            f"tune.synthetic_patches={args.sweep_lesion_patches}",
            f"tune.cutpaste_patches={args.sweep_lesion_patches}",
            f"score.steps={args.steps}",
            "tune.gpus_per_trial=0",
            f"phantom.pathological_subjects={args.pathological}",
            *args.overrides,
        ]
        root = work / name
        patches = root / "preprocess" / "patches"
        started = time.monotonic()
        if not patches.exists():
            root.mkdir(parents=True, exist_ok=True)
            cfg = load_config(args.preset, base)
            if name == "phantom":
                prepare_phantom(root, cfg, args.pathological_in_val)
            elif name in PHOTOS:
                prepare_photos(name, root, cfg, seed=0)
            else:
                raise SystemExit(f"--sets: unknown set {name!r} (phantom, {', '.join(PHOTOS)})")
        timings[f"{name}_prepare_s"] = round(time.monotonic() - started, 1)
        all_trials, all_history, all_halves = [], [], []
        for seed in seeds:
            seeded = [*base, f"tune.seed={seed}", f"train.seed={seed}", f"tune.run_name=seed{seed}"]
            cfg = load_config(args.preset, seeded)
            out = str(root / f"tune-seed{seed}")
            if not (Path(out) / "summary.json").exists():
                sweep.tune(str(patches), out, cfg)
            summary = json.loads((Path(out) / "summary.json").read_text())
            timings[f"{name}_seed{seed}_sweep_s"] = summary["wall_seconds"]
            history = pd.read_parquet(summary["history_table"])
            kept = dict(patches=str(patches), out=out, overrides=seeded, args=args, timings=timings)
            trials = evaluated(
                evaluate_final_models, "final_models.parquet", args.lesion_patches, **kept
            ).assign(seed=seed)
            history = history.assign(seed=seed)
            all_trials.append(trials)
            if args.halves:
                halves = evaluated(
                    evaluate_halves, "final_models_halves.parquet", args.half_lesion_patches, **kept
                ).assign(seed=seed)
                all_halves.append(halves)
                cross_half += cross_half_records(halves, name, str(seed), seed)
            all_history.append(history)
            labelled = trials[sweep.objective_key("labels")]
            anomalous, patches_evaluated = trials["eval_anomalous"][0], trials["eval_patches"][0]
            for candidate, row in agreement_rows(trials, history, seed).items():
                per_sweep.append({
                    "set": name, "seeds": str(seed), "candidate": candidate,
                    "best_val_auc": float(labelled.max()),
                    "val_auc_range": [float(labelled.min()), float(labelled.max())],
                    "standard_error_val_auc": round(auc_standard_error(
                        float(labelled.mean()), int(anomalous),
                        int(patches_evaluated - anomalous)), 4),
                    "eval_patches": int(patches_evaluated),
                    "eval_anomalous": int(anomalous),
                    **row,
                })  # fmt: skip
        if all_halves:
            halves = pd.concat(all_halves)
            halves = halves.assign(trial_id=halves["seed"].astype(str) + "/" + halves["trial_id"])
            cross_half += cross_half_records(halves, name, ",".join(map(str, seeds)), 0)
        trials, history = pd.concat(all_trials), pd.concat(all_history)
        trials = trials.assign(trial_id=trials["seed"].astype(str) + "/" + trials["trial_id"])
        history = history.assign(trial_id=history["seed"].astype(str) + "/" + history["trial_id"])
        for candidate, row in agreement_rows(trials, history, 0).items():
            regrets = [r["regret"] for r in per_sweep if r["set"] == name
                       and r["candidate"] == candidate and r["regret"] is not None]  # fmt: skip
            pooled.append({
                "set": name, "seeds": ",".join(map(str, seeds)), "candidate": candidate,
                "best_val_auc": float(trials[sweep.objective_key("labels")].max()),
                **row,
                "regret_pooled": row["regret"],
                "regret": float(np.mean(regrets)) if regrets else None,  # mean of the sweeps'
            })  # fmt: skip
        columns = ["trial_id", "lr_generator", "lr_discriminator", "epochs"] + [
            sweep.objective_key(n) for n in objectives.OBJECTIVES
        ]
        print(f"\n{name}: trials (final models)")
        print(
            trials[[c for c in columns if c in trials]].to_string(index=False, float_format="%.4g")
        )
    print("\nper sweep:\n" + format_table(per_sweep))
    print("\npooled over seeds (regret: mean of the sweeps'):\n" + format_table(pooled))
    if cross_half:
        print("\ncandidate on one half of val's volumes, labels on the other:")
        print(format_cross_half(cross_half))
    result = {
        "benchmark": "tune_agreement",
        "argv": sys.argv[1:] if argv is None else argv,
        "per_sweep": per_sweep,
        "pooled": pooled,
        "cross_half": cross_half,
        "timings": timings,
        "reevaluated": args.reevaluate,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
