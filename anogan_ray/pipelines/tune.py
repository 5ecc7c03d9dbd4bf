"""Hyperparameter sweeps with Ray Tune: G's and D's learning rates, λ, z's learning rate, Γ.

Each trial is a Ray Train run (the Train V2 pattern): the trial's driver function starts the
same ``TorchTrainer`` as ``anogan-ray train`` (:func:`anogan_ray.pipelines.train.make_trainer`,
``train.num_workers`` DDP workers) with the trial's learning rates, and a
``TuneReportCallback`` forwards what its workers report to Tune. After every epoch rank 0 exports
the model as it would be scored (BatchNorm statistics finalized, eval mode), inverts a fixed
evaluation set and reports the objective, so ASHA can stop weak trials. The driver holds no CPU
(the workers do), and ``max_concurrent_trials`` is what the cluster's CPUs (or GPUs) can run.

The objective, higher is better:

- ``labels``: the AUC of A(x) over the labelled ``val`` patches (needs healthy and anomalous ones).
- ``synthetic`` (no anomalous ``val`` patches): the AUC of A(x) between held-out healthy ``val``
  patches and copies of the same patches with one synthetic lesion pasted in (a dark, fluid-like
  or a bright, foci-like ellipse). README.md "Sweeps" says why this one.

λ changes only the scoring, not the training: every λ of ``tune.lambdas`` is evaluated on the same
trained model, the trial reports each λ's AUC, and its objective is the best λ's (chosen on the
same patches, so this objective is optimistic by the choice of λ). z's learning rate and Γ
change the scoring too but are sampled per trial (a choice), since each value costs a full
inversion of the evaluation patches.

Layout of the stage folder ``out``:

    out/summary.json          best config, best objective, agreement of the objectives, timings
    out/trials.parquet        one row per trial: its config and last reported metrics
    out/history.parquet       one row per trial and epoch: every reported metric
    out/best_model/           the best trial's model bundle (``load_bundle``; score it as usual)
    out/_tune/<run_name>/     Ray Tune's experiment; re-running the same command resumes it
    out/_trials/<run_name>/<trial id>/   each trial's Ray Train run (``_runs/``) and ``samples/``
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray import tune as ray_tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from scipy.stats import spearmanr

from anogan_ray import storage
from anogan_ray.config import Config, ConfigError, TuneConfig, config_from_dict
from anogan_ray.core.export import export_bundle, exported_models
from anogan_ray.core.invert import MAPPINGS, in_fixed_rows, invert_batch
from anogan_ray.core.metrics import auc
from anogan_ray.core.model import ENCODER_FILE, load_bundle, verify_bundle
from anogan_ray.pipelines.train import (
    RUNS_FOLDER,
    TrainingPatches,
    batchnorm_pixels,
    check_training_patches,
    checkpoint_name,
    make_trainer,
    plan_steps,
    read_training_patches,
)
from anogan_ray.ray_env import ensure_ray
from anogan_ray.tables import check_patch_table, decode_pixels, patch_seed, read_patch_table

log = logging.getLogger(__name__)

TUNE_FOLDER = "_tune"  # Ray Tune's experiments inside the stage folder
TRIALS_FOLDER = "_trials"  # each trial's Ray Train run
BEST_MODEL = "best_model"
METRIC = "objective"  # what ASHA and the best-trial choice look at; always "higher is better"
# what each trial reports (beside its per-λ AUCs), in the trials and history tables
_TRIAL_METRICS = (
    "objective", "best_lambda", "val_auc", "synthetic_auc", "healthy_residual", "d_loss", "g_loss",
)  # fmt: skip
_SYNTHETIC_SUFFIX = "#synthetic-lesion"  # appended to a patch id for its lesioned copy


class TuneError(ValueError):
    """Sweep input that cannot be used, or a previous sweep that does not match."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; running it again resumes it."""


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------


def check_search_space(cfg: TuneConfig) -> None:
    """Reject a search space no trial could use, naming the key; nothing has started yet.

    Raises:
        ConfigError: a learning rate that is not positive, a range that is not [low, high],
            λ outside [0, 1], or inversion steps below 1.
    """
    for key in ("lr_generator", "lr_discriminator"):
        bounds = getattr(cfg, key)
        if len(bounds) not in (1, 2):
            raise ConfigError(f"tune.{key}: expected [low, high] (or one value), got {bounds!r}")
        if any(not value > 0 for value in bounds):
            raise ConfigError(f"tune.{key}: learning rates must be positive, got {bounds!r}")
        if bounds[0] > bounds[-1]:
            raise ConfigError(f"tune.{key}: expected [low, high] with low <= high, got {bounds!r}")
    if not cfg.lambdas:
        raise ConfigError("tune.lambdas: expected at least one λ in [0, 1]")
    bad = [value for value in cfg.lambdas if not 0.0 <= value <= 1.0]
    if bad:
        raise ConfigError(f"tune.lambdas: λ must lie in [0, 1], got {bad!r}")
    if any(not value > 0 for value in cfg.z_lr):
        raise ConfigError(f"tune.z_lr: learning rates must be positive, got {cfg.z_lr!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in cfg.steps):
        raise ConfigError(f"tune.steps: expected whole numbers of at least 1, got {cfg.steps!r}")


def _dimension(values: list, fixed: Any, log_uniform: bool = False) -> Any:
    """A Tune search dimension: a constant, a log-uniform range or a choice."""
    if not values:
        return fixed
    if len(set(values)) == 1:
        return values[0]
    if log_uniform:
        return ray_tune.loguniform(values[0], values[-1])
    return ray_tune.choice(list(values))


def search_space(cfg: Config) -> dict[str, Any]:
    """The sampled hyperparameters; λ is not one of them (every trial evaluates every λ)."""
    tune_cfg = cfg.tune
    return {
        "lr_generator": _dimension(tune_cfg.lr_generator, None, log_uniform=True),
        "lr_discriminator": _dimension(tune_cfg.lr_discriminator, None, log_uniform=True),
        "z_lr": _dimension(tune_cfg.z_lr, cfg.score.z_lr),
        "steps": _dimension(tune_cfg.steps, cfg.score.steps),
    }


# ---------------------------------------------------------------------------------------------
# Data: read once on the driver, shared with every trial through the object store
# ---------------------------------------------------------------------------------------------


@dataclass
class EvaluationSet:
    """The fixed patches every trial inverts after every epoch (numpy)."""

    pixels: np.ndarray  # (M, 64, 64) float32 in [-1, 1]: val subset, then lesioned copies
    ids: list[str]  # M patch ids (seeds z); a lesioned copy's id ends in _SYNTHETIC_SUFFIX
    labels: np.ndarray  # (M,) int8: 1 anomalous, 0 healthy, -1 unknown (val subset)
    synthetic: np.ndarray  # (M,) bool: a lesioned copy
    synthetic_source: np.ndarray  # (M,) bool: a healthy val patch that has a lesioned copy
    objective: str  # "labels" or "synthetic"
    val_patches: int  # patches in the val split
    val_anomalous: int  # of them labelled anomalous


def add_synthetic_lesion(patch: np.ndarray, seed: int) -> np.ndarray:
    """A copy of a (64, 64) patch in [-1, 1] with one elliptic lesion that contrasts with it.

    The lesion imitates the two kinds of retinal anomaly the paper shows: on bright tissue a
    dark, fluid-like pocket, on dark tissue a bright, hyperreflective spot; 8-18 pixels across,
    keeping the patch's own speckle. The same seed gives the same lesion.
    """
    rng = np.random.default_rng(seed)
    height, width = patch.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    center_y, center_x = rng.uniform(16, height - 16), rng.uniform(16, width - 16)
    radius_y, radius_x = rng.uniform(4, 7), rng.uniform(5, 9)
    inside = ((rows - center_y) / radius_y) ** 2 + ((cols - center_x) / radius_x) ** 2 <= 1
    local = patch[inside]
    level = -0.9 if local.mean() > -0.2 else 0.9
    lesioned = patch.copy()
    lesioned[inside] = np.clip(level + (local - local.mean()) * 0.5, -1, 1)
    return lesioned


def load_evaluation_set(patches: str, cfg: Config) -> EvaluationSet:
    """Read the ``val`` split and fix the evaluation set.

    The evaluation set is ``tune.val_patches`` val patches drawn with ``tune.seed`` (all of them
    when fewer), then lesioned copies of up to ``tune.synthetic_patches`` of its healthy ones.

    Raises:
        TableError: no val split.
        TuneError: no val patches, or an objective that the val split cannot support.
    """
    table = read_patch_table(patches, ["val"])
    columns: dict[str, list] = {"patch_id": [], "label": [], "pixels": []}
    for batch in table.select_columns(list(columns)).iter_batches(batch_format="numpy"):
        for name in columns:
            columns[name].append(batch[name])
    if not sum(len(part) for part in columns["patch_id"]):
        raise TuneError(
            f"patch table {patches}: no val patches (a sweep trains on `train` and evaluates "
            "on `val`; see DESIGN.md 3.2)"
        )
    ids = np.concatenate(columns["patch_id"]).astype(str)
    order = np.argsort(ids, kind="stable")
    labels = np.concatenate(columns["label"])[order].astype(np.int8)
    pixels = np.stack(list(np.concatenate(columns["pixels"])[order])).astype(np.uint8)
    return make_evaluation_set(ids[order], labels, pixels, cfg, source=patches)


def make_evaluation_set(
    val_ids: np.ndarray,
    val_labels: np.ndarray,
    val_pixels: np.ndarray,
    cfg: Config,
    source: str = "patch table",
) -> EvaluationSet:
    """The evaluation set from val patches (uint8 pixels, (N, 64, 64)); see
    :func:`load_evaluation_set`. ``source`` names the input in errors."""
    tune_cfg = cfg.tune
    labels = np.asarray(val_labels, dtype=np.int8)
    has_both = bool((labels == 1).any() and (labels == 0).any())
    objective = tune_cfg.objective
    if objective == "auto":
        objective = "labels" if has_both else "synthetic"
    if objective == "labels" and not has_both:
        raise TuneError(
            f"{source}: tune.objective=labels needs healthy (label 0) and anomalous "
            f"(label 1) val patches; its val split has labels {sorted(set(labels.tolist()))}"
        )
    rng = np.random.default_rng(tune_cfg.seed)
    chosen = np.sort(rng.permutation(len(labels))[: tune_cfg.val_patches])
    eval_pixels = decode_pixels(np.asarray(val_pixels)[chosen])  # (M, 64, 64)
    eval_ids = [str(pid) for pid in np.asarray(val_ids)[chosen]]
    eval_labels = labels[chosen]
    # healthy: labelled 0, or (without labels) any val patch not marked anomalous
    healthy = np.flatnonzero(eval_labels == 0 if objective == "labels" else eval_labels != 1)
    sources = healthy[rng.permutation(len(healthy))[: tune_cfg.synthetic_patches]]
    sources.sort()
    if objective == "synthetic" and len(sources) < 2:
        raise TuneError(
            f"{source}: the synthetic objective needs at least 2 healthy val patches "
            f"and tune.synthetic_patches >= 2 (have {len(healthy)} and "
            f"{tune_cfg.synthetic_patches})"
        )
    lesioned = (
        np.stack([add_synthetic_lesion(eval_pixels[i], patch_seed(eval_ids[i])) for i in sources])
        if len(sources)
        else np.empty((0, *eval_pixels.shape[1:]), np.float32)
    )
    count = len(eval_ids)
    synthetic = np.zeros(count + len(sources), bool)
    synthetic[count:] = True
    synthetic_source = np.zeros(count + len(sources), bool)
    synthetic_source[sources] = True
    return EvaluationSet(
        pixels=np.concatenate([eval_pixels, lesioned]).astype(np.float32),
        ids=eval_ids + [eval_ids[i] + _SYNTHETIC_SUFFIX for i in sources],
        labels=np.concatenate([eval_labels, np.full(len(sources), -1, np.int8)]),
        synthetic=synthetic,
        synthetic_source=synthetic_source,
        objective=objective,
        val_patches=len(labels),
        val_anomalous=int((labels == 1).sum()),
    )


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def lambda_key(metric: str, lambda_: float) -> str:
    """The name of a per-λ metric, e.g. ``val_auc_lambda_0.1``."""
    return f"{metric}_lambda_{lambda_:g}"


def evaluate_objective(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    evaluation: EvaluationSet,
    lambdas: list[float],
    *,
    steps: int,
    z_lr: float,
    batch_size: int,
    latent_prior: str,
    encoder: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Invert the evaluation set at every λ and compute the sweep's metrics.

    G and D must be in their exported form (eval mode, final BatchNorm statistics). With an
    ``encoder`` the mapping starts from z = E(x) (``encoder+iterative``; ``encoder`` when
    ``steps`` is 0) instead of the patch id's seed.

    Returns:
        ``objective`` (the best λ's AUC under ``evaluation.objective``), ``best_lambda``, per λ
        ``val_auc_lambda_…`` (labelled val AUC, when there are labels) and
        ``synthetic_auc_lambda_…`` (healthy vs lesioned copies), ``val_auc`` and
        ``synthetic_auc`` at the best λ, and ``healthy_residual``: the mean R(x) of the healthy
        patches that have a lesioned copy, at the best λ.
    """
    device = next(generator.parameters()).device
    pixels = torch.tensor(evaluation.pixels).unsqueeze(1)  # (M, 1, 64, 64); a writable copy
    known = evaluation.labels >= 0
    metrics: dict[str, Any] = {}
    per_lambda = []
    for lambda_ in lambdas:
        anomaly, residual = [], []
        for start in range(0, len(evaluation.ids), batch_size):
            batch = pixels[start : start + batch_size].to(device)
            initial_z = None
            if encoder is not None:
                with torch.no_grad():
                    initial_z = in_fixed_rows(encoder, batch, device)
            result = invert_batch(
                (generator, discriminator),
                batch,
                evaluation.ids[start : start + batch_size],
                lambda_=lambda_,
                steps=steps,
                z_lr=z_lr,
                latent_prior=latent_prior,
                initial_z=initial_z,
            )
            anomaly.append(result.anomaly_score)
            residual.append(result.residual_score)
        anomaly_score, residual_score = np.concatenate(anomaly), np.concatenate(residual)
        row = {"lambda": lambda_, "healthy_residual": math.nan}
        row["val_auc"] = auc(anomaly_score[known], evaluation.labels[known])
        if evaluation.synthetic.any():
            pair = evaluation.synthetic | evaluation.synthetic_source
            row["synthetic_auc"] = auc(anomaly_score[pair], evaluation.synthetic[pair])
            row["healthy_residual"] = float(residual_score[evaluation.synthetic_source].mean())
        else:
            row["synthetic_auc"] = math.nan
        metrics[lambda_key("val_auc", lambda_)] = row["val_auc"]
        metrics[lambda_key("synthetic_auc", lambda_)] = row["synthetic_auc"]
        per_lambda.append(row)
    key = "val_auc" if evaluation.objective == "labels" else "synthetic_auc"
    best = max(per_lambda, key=lambda row: -math.inf if math.isnan(row[key]) else row[key])
    metrics.update(
        objective=best[key],
        best_lambda=best["lambda"],
        val_auc=best["val_auc"],
        synthetic_auc=best["synthetic_auc"],
        healthy_residual=best["healthy_residual"],
    )
    return metrics


class EpochEvaluation:
    """What a trial's rank 0 runs after every epoch: export G and D, invert, report metrics.

    Called by the training loop with the epoch's state (see
    :func:`anogan_ray.pipelines.train.make_trainer`); the models are exported exactly as
    ``anogan-ray train`` exports its bundle, so the best trial's objective describes the bundle
    that :func:`tune` exports.
    """

    def __init__(self, evaluation: EvaluationSet, real_pixels: np.ndarray, cfg: Config):
        self.evaluation = evaluation
        self.real_pixels = real_pixels  # D's BatchNorm patches (train.batchnorm_pixels)
        self.config = cfg.to_dict()  # the trial's (trial_settings): its Γ and z rate in `score`

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        cfg = config_from_dict(self.config)
        device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
        generator, discriminator = exported_models(state, cfg, self.real_pixels, device)
        metrics = evaluate_objective(
            generator,
            discriminator,
            self.evaluation,
            cfg.tune.lambdas,
            steps=cfg.score.steps,
            z_lr=cfg.score.z_lr,
            batch_size=cfg.score.batch_size,
            latent_prior=cfg.model.latent_prior,
        )
        metrics.update(
            objective_kind=self.evaluation.objective,
            eval_seconds=round(time.monotonic() - started, 3),
        )
        return metrics


def trial_settings(base_config: dict[str, Any], trial_config: dict[str, Any]) -> Config:
    """The whole configuration of one trial: the base one with the trial's hyperparameters.

    A trial reports (and checkpoints) once per epoch, the unit ASHA decides on.
    """
    settings = copy.deepcopy(base_config)
    settings["train"]["lr_generator"] = float(trial_config["lr_generator"])
    settings["train"]["lr_discriminator"] = float(trial_config["lr_discriminator"])
    settings["train"]["checkpoint_every"] = 2**31 - 1  # no reports between epoch ends
    settings["score"]["z_lr"] = float(trial_config["z_lr"])
    settings["score"]["steps"] = int(trial_config["steps"])
    return config_from_dict(settings)


def trial_folder(out: str, cfg: Config, trial_id: str) -> str:
    """Where a trial's Ray Train run keeps its checkpoints and sample grids."""
    return storage.join(out, TRIALS_FOLDER, cfg.tune.run_name, trial_id)


def run_trial(
    trial_config: dict[str, Any],
    training: TrainingPatches,
    evaluation: EvaluationSet,
    real_pixels: np.ndarray,
    base_config: dict[str, Any],
    out: str,
) -> None:
    """A trial's driver (the Tune trainable): one Ray Train run with the trial's settings.

    The run is kept in the trial's folder (:func:`trial_folder`, named by the trial id), so a
    restored sweep's trial resumes its run from the last checkpoint. Every trial starts from the
    same initial weights, and each worker shuffles its batches with a seed (``train.seed``).
    """
    cfg = trial_settings(base_config, trial_config)
    trial_id = ray_tune.get_context().get_trial_id()
    trainer = make_trainer(
        training,
        trial_folder(out, cfg, trial_id),
        cfg,
        epoch_end=EpochEvaluation(evaluation, real_pixels, cfg),
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

_DRIVER_MEMORY = 256 * 2**20  # bytes reserved for each trial's driver


def finished_trials(experiment_path: str, storage_fs: Any) -> int:
    """How many trials of a Tune experiment finished (ran to their end, were stopped by the
    scheduler, or failed for good), by the experiment state Tune saved last.

    Tune saves that state one last time when it stops, before it stops the trials still
    running, so it is the state a resume starts from: trials it records as running are resumed,
    finished ones are not. Tune's in-memory results cannot tell the two apart after an
    interruption (every stopped trial is "terminated"), and the ``done`` flag of a finished
    trial's last result is set in memory only: it may be missing from a restored experiment.
    """
    analysis = ray_tune.ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs)
    return sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in analysis.trials)


def mapping_settings(cfg: Config, has_encoder: bool) -> list[dict[str, Any]]:
    """The (mapping, Γ) pairs of a mapping sweep: ``tune.mappings`` (all the bundle can run when
    empty) x ``tune.steps`` (``score.steps`` when empty); ``encoder`` runs no steps, and
    ``encoder+iterative`` with Γ = 0 is the same as ``encoder``, so each appears once."""
    mappings = cfg.tune.mappings or (list(MAPPINGS) if has_encoder else ["iterative"])
    unknown = sorted(set(mappings) - set(MAPPINGS))
    if unknown:
        raise ConfigError(f"tune.mappings: {unknown} are not mappings ({', '.join(MAPPINGS)})")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in cfg.tune.steps):
        raise ConfigError(f"tune.steps: expected whole numbers >= 0, got {cfg.tune.steps!r}")
    if not has_encoder and set(mappings) - {"iterative"}:
        raise TuneError(
            f"tune.mappings {mappings}: the model bundle has no encoder E (train it with "
            "train.encoder=true, or sweep only `iterative`)"
        )
    steps = cfg.tune.steps or [cfg.score.steps]
    pairs = {(m, 0 if m == "encoder" else s) for m in mappings for s in steps}
    pairs = {("encoder", 0) if p == ("encoder+iterative", 0) else p for p in pairs}
    return [{"mapping": m, "steps": s} for m, s in sorted(pairs, key=lambda p: (p[1], p[0]))]


def check_sweep_inputs(patches: str, model: str | None = None) -> None:
    """Check on the driver, before Ray starts, what a sweep reads: the patch table's ``train``
    patches (a training sweep) or the model bundle (``tune --model``), and its ``val`` patches.

    Raises:
        TrainError, TableError, BundleError: naming the input and what is wrong with it.
        TuneError: the table has no val patches.
    """
    if model is None:
        check_training_patches(patches)
    else:
        verify_bundle(model)
    if check_patch_table(patches, ["val"]) == 0:
        raise TuneError(
            f"patch table {patches}: no val patches (a sweep trains on `train` and evaluates "
            "on `val`; see DESIGN.md 3.2)"
        )


def run_mapping_trial(
    trial_config: dict[str, Any], model: str, evaluation: EvaluationSet, cfg: Config
) -> None:
    """A mapping-sweep trial (the Tune trainable): the bundle's AUC under one (mapping, Γ) on the
    evaluation set at every λ, and what a patch costs (seconds on this trial's CPU or GPU)."""
    setting = trial_config["setting"]
    torch.set_num_threads(1)
    bundle = load_bundle(model)
    encoder = bundle.encoder if setting["mapping"] != "iterative" else None
    started = time.perf_counter()
    metrics = evaluate_objective(
        bundle.generator,
        bundle.discriminator,
        evaluation,
        cfg.tune.lambdas,
        steps=setting["steps"],
        z_lr=cfg.score.z_lr,
        batch_size=cfg.score.batch_size,
        latent_prior=bundle.model_config.latent_prior,
        encoder=encoder,
    )
    seconds = time.perf_counter() - started
    patches = len(evaluation.ids) * len(cfg.tune.lambdas)
    ray_tune.report({**metrics, **setting, "seconds_per_patch": seconds / patches})


def sweep_mappings(patches: str, model: str, out: str, cfg: Config) -> dict[str, Any]:
    """Sweep the mapping and Γ of one trained bundle with Ray Tune (``tune --model``).

    One trial per (mapping, Γ) of :func:`mapping_settings`, each scoring the ``val`` evaluation
    set (as a training sweep's trials do) at every λ of ``tune.lambdas``: the cheapest mapping
    that keeps the AUC is what a cohort should be scored with. Writes ``out/mappings.parquet``
    and ``out/summary.json``.
    """
    started = time.monotonic()
    patches, out, model = storage.absolute(patches), storage.absolute(out), storage.absolute(model)
    check_sweep_inputs(patches, model)
    ensure_ray()
    index = storage.read_json(storage.join(model, "bundle.json"))
    settings = mapping_settings(cfg, ENCODER_FILE in index.get("sha256", {}))
    evaluation = load_evaluation_set(patches, cfg)
    storage_fs, tune_path = storage.arrow_filesystem(storage.join(out, TUNE_FOLDER))
    tuner = ray_tune.Tuner(
        ray_tune.with_parameters(run_mapping_trial, model=model, evaluation=evaluation, cfg=cfg),
        param_space={"setting": ray_tune.grid_search(settings)},
        tune_config=ray_tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent),
        run_config=ray_tune.RunConfig(
            name=f"{cfg.tune.run_name}-mappings",
            storage_path=tune_path,
            storage_filesystem=storage_fs,
            verbose=0,
        ),  # fmt: skip
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error is not None:
            raise TuneError(f"mapping trial {result.config}: {result.error}")
        m = result.metrics
        rows.append({k: _finite(m.get(k)) if k not in ("mapping",) else m[k] for k in (
            "mapping", "steps", "objective", "best_lambda", "val_auc", "synthetic_auc",
            "seconds_per_patch")})  # fmt: skip
    table = pd.DataFrame(rows).sort_values(["steps", "mapping"]).reset_index(drop=True)
    _write_parquet(storage.join(out, "mappings.parquet"), table)
    best = table["objective"].max()
    keeps = table[table["objective"] >= best - cfg.tune.auc_tolerance]
    cheapest = keeps.sort_values("seconds_per_patch").iloc[0]
    summary = {
        "stage": "tune-mappings",
        "model": model,
        "objective_kind": evaluation.objective,
        "evaluation_patches": len(evaluation.ids),
        "mappings": table.to_dict("records"),
        "cheapest_within_tolerance": {
            "mapping": cheapest["mapping"],
            "steps": int(cheapest["steps"]),
            "objective": cheapest["objective"],
        },  # fmt: skip
        "auc_tolerance": cfg.tune.auc_tolerance,
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def _sweep_record(patches: str, cfg: Config) -> dict[str, Any]:
    """What a resumed sweep must share with the one it resumes."""
    settings = cfg.to_dict()
    return {
        "patch_table": patches,
        "model": settings["model"],
        "train": {k: v for k, v in settings["train"].items() if k not in ("run_name",)},
        "score": {k: settings["score"][k] for k in ("lambda_", "steps", "z_lr", "batch_size")},
        "tune": {k: v for k, v in settings["tune"].items() if k not in ("max_concurrent",)},
    }


def _trial_dirname(trial: Any) -> str:
    """``trial_<trial id>``: no timestamps or hyperparameters in folder names."""
    return f"trial_{trial.trial_id}"


def max_concurrent_trials(cfg: Config) -> int:
    """Trials at once: the configured cap, and no more than the cluster's CPUs (or GPUs) can
    hold, each trial taking ``train.num_workers`` of them (its drivers take none)."""
    unit = "GPU" if cfg.train.use_gpu else "CPU"
    available = int(ray.cluster_resources().get(unit, 0))
    return max(1, min(cfg.tune.max_concurrent, available // cfg.train.num_workers))


def _write_parquet(url: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    storage.write_bytes(url, buffer.getvalue())


def _spearman(x: pd.Series, y: pd.Series) -> float | None:
    both = x.notna() & y.notna()
    if both.sum() < 3 or x[both].nunique() < 2 or y[both].nunique() < 2:
        return None
    return round(float(spearmanr(x[both], y[both]).statistic), 4)


def format_leaderboard(trials: pd.DataFrame, top: int = 10) -> str:
    """The best ``top`` trials as a text table, best first."""
    columns = [
        "trial_id",
        "objective",
        "best_lambda",
        "val_auc",
        "synthetic_auc",
        "epochs",
        "stopped_early",
        "lr_generator",
        "lr_discriminator",
        "z_lr",
        "steps",
    ]
    board = trials.sort_values("objective", ascending=False, na_position="last").head(top)
    return board[[c for c in columns if c in board]].to_string(index=False, float_format="%.4g")


def leaderboard(out: str, top: int = 10) -> str:
    """The leaderboard of the sweep in the stage folder ``out`` (its ``trials.parquet``)."""
    with storage.open_file(storage.join(out, "trials.parquet")) as f:
        return format_leaderboard(pd.read_parquet(f), top=top)


def tune(
    patches: str, out: str, cfg: Config, *, callbacks: list[ray_tune.Callback] | None = None
) -> dict:
    """Sweep the learning rates (and z's rate, Γ) with Ray Tune, λ within each trial.

    Args:
        patches: the patch table folder (local or ``s3://``) with ``train`` and ``val`` splits.
        out: the stage folder (local or ``s3://``); see the module docstring for its layout.
        cfg: the whole configuration: ``cfg.tune`` the search space and scheduler, ``cfg.model``
            and ``cfg.train`` how each trial trains (``train.epochs`` at most), ``cfg.score``
            the inversion settings that ``tune.z_lr`` / ``tune.steps`` leave fixed.
        callbacks: Ray Tune callbacks for the sweep (loggers, progress hooks). Tune keeps them
            with the experiment: a resumed sweep runs the callbacks of the call that started it,
            with the state they saved (``Callback.get_state``), not the ones passed again.

    Returns:
        The summary, also written to ``out/summary.json``.

    Raises:
        ConfigError: an invalid search space (before anything starts).
        TuneError: unusable patches, or a previous sweep of the same name with other settings.
        SweepInterrupted: the sweep stopped early; the same call again resumes it.
    """
    started = time.monotonic()
    check_search_space(cfg.tune)
    patches, out = storage.absolute(patches), storage.absolute(out)  # trials run elsewhere
    check_sweep_inputs(patches)
    ensure_ray()
    evaluation = load_evaluation_set(patches, cfg)
    if evaluation.objective == "synthetic":
        log.warning(
            "val split %s has no anomalous patches: the sweep's objective is the synthetic-lesion "
            "AUC, which agreed poorly with the labelled AUC on the phantom (README.md, Sweeps); "
            "label a few pathological volumes for val if you can",
            patches,
        )
    training = read_training_patches(patches, seed=cfg.train.seed)
    plan_steps(training, cfg)  # enough patches for one batch per worker
    real_pixels = batchnorm_pixels(training, cfg)
    tune_root = storage.join(out, TUNE_FOLDER)
    experiment_url = storage.join(tune_root, cfg.tune.run_name)
    record_url = storage.join(tune_root, f"{cfg.tune.run_name}.json")
    record = _sweep_record(patches, cfg)
    if storage.exists(record_url) and storage.read_json(record_url) != record:
        raise TuneError(
            f"sweep {experiment_url} was started with other settings or patches (see "
            f"{record_url}): choose another tune.run_name or delete {tune_root}"
        )
    storage.write_json(record_url, record)
    storage_fs, tune_path = storage.arrow_filesystem(tune_root)
    experiment_path = f"{tune_path.rstrip('/')}/{cfg.tune.run_name}"

    # a trial's driver only waits on its Ray Train run, whose workers hold the CPUs or GPUs
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(
            run_trial,
            training=training,
            evaluation=evaluation,
            real_pixels=real_pixels,
            base_config=cfg.to_dict(),
            out=out,
        ),
        {"cpu": 0, "memory": _DRIVER_MEMORY},
    )
    concurrent = max_concurrent_trials(cfg)
    resumed = ray_tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    if resumed:
        log.info("resuming sweep %s", experiment_url)
        tuner = ray_tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    else:
        scheduler = None
        if cfg.tune.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="epoch",  # reported by the training loop; survives restarts
                max_t=cfg.train.epochs,
                grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                reduction_factor=cfg.tune.reduction_factor,
            )
        tuner = ray_tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=ray_tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=scheduler,
                num_samples=cfg.tune.num_samples,
                trial_dirname_creator=_trial_dirname,
                # max_concurrent_trials, set where Tune sets it for its default
                # searcher (passing both only warns); seeded: the same sampled rates
                search_alg=BasicVariantGenerator(
                    random_state=cfg.tune.seed, max_concurrent=concurrent
                ),
            ),
            run_config=ray_tune.RunConfig(
                name=cfg.tune.run_name,
                storage_path=tune_path,
                storage_filesystem=storage_fs,
                checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1),
                failure_config=ray_tune.FailureConfig(max_failures=cfg.train.max_failures),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    grid = tuner.fit()

    finished = finished_trials(experiment_path, storage_fs)
    if finished < cfg.tune.num_samples:
        raise SweepInterrupted(
            f"sweep {experiment_url} stopped with {finished} of {cfg.tune.num_samples} trials "
            "finished; run the same command again to resume it"
        )
    trials, history = _results_tables(grid, cfg)
    if trials["objective"].notna().sum() == 0:
        errors = [str(result.error) for result in grid if result.error is not None]
        raise TuneError(f"sweep {experiment_url}: no trial reported an objective: {errors[:3]}")
    best = grid.get_best_result(metric=METRIC, mode="max", scope="last")
    best_row = trials.loc[trials["trial_id"] == best.metrics["trial_id"]].iloc[0]
    best_model = storage.join(out, BEST_MODEL)
    model_id = _export_best(best, out, cfg, training, best_model)

    trials_url, history_url = (
        storage.join(out, "trials.parquet"),
        storage.join(out, "history.parquet"),
    )
    _write_parquet(trials_url, trials)
    _write_parquet(history_url, history)
    summary = {
        "stage": "tune",
        "patch_table": patches,
        "objective": evaluation.objective,
        "metric": METRIC,
        "mode": "max",
        "scheduler": cfg.tune.scheduler,
        "trials": len(trials),
        "trials_errored": int(grid.num_errors),
        "trials_stopped_early": int(trials["stopped_early"].sum()),
        "val_patches": evaluation.val_patches,
        "val_anomalous": evaluation.val_anomalous,
        "eval_patches": int((~evaluation.synthetic).sum()),
        "synthetic_patches": int(evaluation.synthetic.sum()),
        "max_concurrent_trials": concurrent,
        "best": {
            "trial_id": best_row["trial_id"],
            "config": {
                "lr_generator": float(best_row["lr_generator"]),
                "lr_discriminator": float(best_row["lr_discriminator"]),
                "z_lr": float(best_row["z_lr"]),
                "steps": int(best_row["steps"]),
                "lambda": float(best_row["best_lambda"]),
            },
            "objective": float(best_row["objective"]),
            "val_auc": _finite(best_row["val_auc"]),
            "synthetic_auc": _finite(best_row["synthetic_auc"]),
            "epochs": int(best_row["epochs"]),
        },
        # how the label-free objectives rank trial-epochs compared with the labelled val AUC
        "agreement_with_val_auc": {
            "points": int(history[["val_auc", "synthetic_auc"]].notna().all(axis=1).sum()),
            "spearman_synthetic_auc": _spearman(history["synthetic_auc"], history["val_auc"]),
            "spearman_neg_healthy_residual": _spearman(
                -history["healthy_residual"], history["val_auc"]
            ),
        },
        "best_model": best_model,
        "model_id": model_id,
        "trials_table": trials_url,
        "history_table": history_url,
        "experiment": experiment_url,
        "resumed": resumed,
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    log.info(
        "sweep %s: best trial %s, %s %.4f",
        experiment_url,
        summary["best"]["trial_id"],
        evaluation.objective,
        summary["best"]["objective"],
    )
    return summary


def _finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _results_tables(grid: ray_tune.ResultGrid, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial: config + last metrics, one row per trial and epoch)."""
    rows, history = [], []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        epochs = int(metrics.get("epoch", 0) or 0)
        row = {
            "trial_id": metrics.get("trial_id") or os.path.basename(result.path),
            "status": "error" if result.error is not None else "terminated",
            "lr_generator": config.get("lr_generator"),
            "lr_discriminator": config.get("lr_discriminator"),
            "z_lr": config.get("z_lr"),
            "steps": config.get("steps"),
            "epochs": epochs,
            "stopped_early": result.error is None and epochs < cfg.train.epochs,
            "objective_kind": metrics.get("objective_kind"),
        }
        for key in (*_TRIAL_METRICS, "d_real", "d_fake"):
            row[key] = metrics.get(key, math.nan)
        for lambda_ in cfg.tune.lambdas:
            for name in ("val_auc", "synthetic_auc"):
                key = lambda_key(name, lambda_)
                row[key] = metrics.get(key, math.nan)
        row["trial_path"] = result.path
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame.copy()
            frame["trial_id"] = row["trial_id"]
            history.append(frame)
    trials = pd.DataFrame(rows)
    wanted = ["trial_id", "epoch", *_TRIAL_METRICS, "train_seconds", "eval_seconds"]
    wanted += [lambda_key(n, lam) for lam in cfg.tune.lambdas for n in ("val_auc", "synthetic_auc")]
    history_frame = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    for column in wanted:
        if column not in history_frame:
            history_frame[column] = math.nan
    history_frame = history_frame[wanted].sort_values(["trial_id", "epoch"], ignore_index=True)
    return trials, history_frame


def _export_best(
    best: ray_tune.Result, out: str, cfg: Config, training: TrainingPatches, url: str
) -> str:
    """Export the best trial's last checkpoint as a model bundle at ``url``, as ``anogan-ray
    train`` exports its own; returns its ``model_id``."""
    metrics, trial_cfg = best.metrics, trial_settings(cfg.to_dict(), best.config)
    run = storage.join(
        trial_folder(out, trial_cfg, metrics["trial_id"]), RUNS_FOLDER, trial_cfg.train.run_name
    )
    checkpoint = storage.join(run, checkpoint_name(int(metrics["step"])), "state.pt")
    if not storage.exists(checkpoint):
        raise TuneError(f"best trial {metrics['trial_id']}: no checkpoint at {checkpoint}")
    state = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), weights_only=True)
    export = export_bundle(
        url,
        state,
        trial_cfg,
        real_pixels=batchnorm_pixels(training, trial_cfg),
        metadata={
            "run": f"tune trial {metrics['trial_id']}",
            "checkpoint": checkpoint,
            "step": int(metrics["step"]),
            "epochs": metrics["epoch"],
            "hyperparameters": {k: best.config[k] for k in sorted(best.config)},
            "best_lambda": metrics["best_lambda"],
            "objective": {metrics["objective_kind"]: metrics["objective"]},
            "patch_table": training.url,
            "train_config": trial_cfg.to_dict()["train"],
        },
    )
    return export["model_id"]
