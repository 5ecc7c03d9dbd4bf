"""Hyperparameter sweeps with Ray Tune: G's and D's learning rates, λ, z's learning rate, Γ.

Each trial is a Ray Train run (the Train V2 pattern): the trial's driver function starts the
same ``TorchTrainer`` as ``anogan-ray train`` (:func:`anogan_ray.pipelines.train.make_trainer`,
``train.num_workers`` DDP workers) with the trial's learning rates, and a
``TuneReportCallback`` forwards what its workers report to Tune. After every epoch rank 0 exports
the model as it would be scored (BatchNorm statistics finalized, eval mode), inverts a fixed
evaluation set and reports the objective, so ASHA can stop weak trials. The driver holds no CPU
(the workers do), and ``max_concurrent_trials`` is what the cluster's CPUs (or GPUs) can run.

On a cluster with GPUs each trial takes ``tune.gpus_per_trial`` of them (auto: one per DDP
worker), fractions included (a one-worker trial on a quarter of a GPU: four trials share it);
its evaluation then maps in bf16 with CUDA graphs, as ``score`` does
(:func:`~anogan_ray.core.fastpath.choose_fast_path`, checked against exact fp32 on a sample).

The objective, higher is better (:mod:`anogan_ray.core.objectives`): ``labels``, the AUC of A(x)
over the labelled ``val`` patches, when ``val`` holds healthy and anomalous patches; otherwise a
label-free one (``tune.objective``: ``synthetic`` ellipse lesions, ``cutpaste`` lesions drawn
from the data, the healthy ``residual``, the generative ``quality``, ``lesions``, ``cohort``: the
patches of healthy val volumes against the other val patches, unlabelled, or ``blend``, the mean
of ``cohort`` and ``synthetic``, the default where val has both kinds of volume). Every trial
reports every candidate its evaluation set allows, whichever ranks the sweep; where ``val`` is
labelled the summary says how well each label-free candidate agreed with the labels on this
sweep (Spearman with a bootstrap interval, regret). docs/tune.md has the measurements.

λ changes only the scoring, not the training: every λ of ``tune.lambdas`` is evaluated on the same
trained model, the trial reports each λ's metrics, and its objective is the best λ's (chosen on
the same patches, so this objective is optimistic by the choice of λ). z's learning rate and Γ
change the scoring too but are sampled per trial (a choice), since each value costs a full
inversion of the evaluation patches.

Layout of the stage folder ``out``:

    out/summary.json          best config, best objective, agreement of the objectives, timings
    out/trials.parquet        one row per trial: its config and last reported metrics
    out/history.parquet       one row per trial and epoch: every reported metric
    out/best_model/           the best trial's model bundle (``load_bundle``; score it as usual)
    out/best_model/sweep.json its leaderboard and agreement (``anogan-ray report`` shows them)
    out/_tune/<run_name>/     Ray Tune's experiment; re-running the same command resumes it
    out/_trials/<run_name>/<trial id>/   each trial's Ray Train run (``_runs/``) and ``samples/``
"""

from __future__ import annotations

import copy
import dataclasses
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

from anogan_ray import storage
from anogan_ray.config import Config, ConfigError, TuneConfig, config_from_dict
from anogan_ray.core import objectives
from anogan_ray.core.export import export_bundle, exported_models
from anogan_ray.core.fastpath import EXACT, FastPath, choose_fast_path, effective_path
from anogan_ray.core.invert import (
    CHECK_PATCHES,
    MAPPINGS,
    check_fast_path,
    in_fixed_rows,
    invert_batch,
)
from anogan_ray.core.metrics import auc
from anogan_ray.core.model import ENCODER_FILE, QUALITY_FILE, load_bundle, verify_bundle
from anogan_ray.core.objectives import OBJECTIVES, PER_LAMBDA_METRICS
from anogan_ray.pipelines.score import cluster_gpus
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
# what each trial reports at the sweep objective's λ (beside its per-λ metrics and each
# candidate objective at its own best λ), in the trials and history tables
_TRIAL_METRICS = (
    "objective", "best_lambda", "val_auc", "synthetic_auc", "cutpaste_auc", "healthy_residual",
    "cohort_auc", "sliced_wasserstein", "d_loss", "g_loss",
)  # fmt: skip
_LESION_SUFFIX = {"synthetic": "#synthetic-lesion", "cutpaste": "#cutpaste-lesion"}  # copy ids


class TuneError(ValueError):
    """Sweep input that cannot be used, or a previous sweep that does not match."""


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; running it again resumes it."""


def objective_key(name: str) -> str:
    """The trial metric holding candidate objective ``name`` at its own best λ."""
    return f"objective_{name}"


def objective_lambda_key(name: str) -> str:
    """The trial metric holding the λ at which candidate objective ``name`` is best."""
    return f"lambda_{name}"


# ---------------------------------------------------------------------------------------------
# Search space and resources
# ---------------------------------------------------------------------------------------------


def check_search_space(cfg: TuneConfig, num_workers: int = 1) -> None:
    """Reject a search space no trial could use, naming the key; nothing has started yet.

    Raises:
        ConfigError: a learning rate that is not positive, a range that is not [low, high],
            λ outside [0, 1], inversion steps below 1, or GPUs per trial that are not auto, a
            number >= 0, or (with several DDP workers) a whole GPU for each.
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
    check_gpus_per_trial(cfg, num_workers)


def check_gpus_per_trial(cfg: TuneConfig, num_workers: int = 1) -> None:
    """``tune.gpus_per_trial`` is auto or a number >= 0, and gives DDP workers a GPU each."""
    gpus = cfg.gpus_per_trial
    if gpus == "auto":
        return
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0:
        raise ConfigError(
            f"tune.gpus_per_trial: expected auto or a number of GPUs >= 0 (0.25: a quarter of "
            f"one), got {gpus!r}"
        )
    share = gpus / num_workers
    if gpus and (share > 1 or (num_workers > 1 and share != 1)):
        raise ConfigError(
            f"tune.gpus_per_trial={gpus:g} with train.num_workers={num_workers}: each DDP worker "
            f"takes one whole GPU (workers cannot share one, and one uses no more), so set "
            f"tune.gpus_per_trial={num_workers} or train.num_workers={max(1, math.ceil(gpus))}"
        )


def trial_gpus(cfg: Config, mapping_sweep: bool = False) -> float:
    """The GPUs each trial takes: ``tune.gpus_per_trial``, or for auto one per DDP worker (one
    per mapping trial) when the cluster has GPUs or its autoscaler can add them (or
    ``train.use_gpu`` says so), else 0.

    Raises:
        TuneError: GPUs asked for on a cluster that has none and cannot get one.
    """
    gpus = cfg.tune.gpus_per_trial
    _, reachable = cluster_gpus()
    if gpus == "auto":
        wanted = cfg.train.use_gpu and not mapping_sweep
        if not (reachable or wanted):
            return 0.0
        gpus = 1 if mapping_sweep else cfg.train.num_workers
    gpus = float(gpus)
    if gpus and not reachable:
        raise TuneError(
            f"trials asked for {gpus:g} GPU(s) each (tune.gpus_per_trial or train.use_gpu), but "
            "this cluster has no GPU and its autoscaler cannot add one; set "
            "tune.gpus_per_trial=0 (and train.use_gpu=false) or use a cluster with GPU workers"
        )
    return gpus


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
    """The fixed patches every trial inverts after every epoch (numpy).

    The first ``count`` rows are the val subset; after them come the lesioned copies of some of
    its healthy patches, each copy pointing at its original (``source``).
    """

    pixels: np.ndarray  # (M, 64, 64) float32 in [-1, 1]: val subset, then lesioned copies
    ids: list[str]  # M patch ids (seed z); a copy's id is its original's with _LESION_SUFFIX
    labels: np.ndarray  # (M,) int8: 1 anomalous, 0 healthy, -1 unknown (copies: -1)
    kind: np.ndarray  # (M,) str: "val", or the copy's lesions: "synthetic" or "cutpaste"
    source: np.ndarray  # (M,) int: a copy's original (a row of the val subset); -1 for val rows
    healthy: np.ndarray  # (M,) bool: a val patch of a volume without anomalous patches
    reference: np.ndarray  # (M,) bool: a val patch of a volume whose every patch is labelled 0
    objective: str  # the resolved tune.objective: "labels" or a label-free one
    val_patches: int  # patches in the val split
    val_anomalous: int  # of them labelled anomalous

    @property
    def count(self) -> int:
        """Rows of the val subset."""
        return int((self.kind == "val").sum())

    def copies(self, kind: str) -> np.ndarray:
        """Rows of the lesioned copies of one kind."""
        return np.flatnonzero(self.kind == kind)


def add_synthetic_lesion(patch: np.ndarray, seed: int) -> np.ndarray:
    """The ``synthetic`` objective's lesion (:func:`anogan_ray.core.objectives.ellipse_lesion`)."""
    return objectives.ellipse_lesion(patch, seed)


def load_evaluation_set(patches: str, cfg: Config) -> EvaluationSet:
    """Read the ``val`` split and fix the evaluation set (see :func:`make_evaluation_set`).

    Raises:
        TableError: no val split.
        TuneError: no val patches, or an objective that the val split cannot support.
    """
    ids, volumes, labels, pixels = read_val_split(patches)
    return make_evaluation_set(ids, labels, pixels, cfg, source=patches, volumes=volumes)


def read_val_split(patches: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``val`` patches of a patch table, ordered by patch id: their ids, volume ids, labels
    (int8) and uint8 pixels (N, 64, 64).

    Raises:
        TableError: no val split.
        TuneError: no val patches.
    """
    table = read_patch_table(patches, ["val"])
    columns: dict[str, list] = {"patch_id": [], "volume_id": [], "label": [], "pixels": []}
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
    volumes = np.concatenate(columns["volume_id"]).astype(str)[order]
    labels = np.concatenate(columns["label"])[order].astype(np.int8)
    pixels = np.stack(list(np.concatenate(columns["pixels"])[order])).astype(np.uint8)
    return ids[order], volumes, labels, pixels


def resolve_objective(
    name: str, labelled: bool, reference: np.ndarray, source: str = "patch table"
) -> str:
    """``tune.objective`` made concrete: auto is ``labels`` when ``labelled`` (val holds healthy
    and anomalous patches), else :data:`~anogan_ray.core.objectives.DEFAULT_LABEL_FREE` when the
    evaluation subset has patches of healthy volumes and of others (``reference``: per patch,
    whether its volume is healthy), else :data:`~anogan_ray.core.objectives.FALLBACK_LABEL_FREE`.

    Raises:
        TuneError: ``labels``, or an objective made of ``cohort_auc``, without the patches it
            needs.
    """
    cohort = bool(reference.any() and not reference.all())
    if name == "auto":
        if labelled:
            return "labels"
        default = objectives.DEFAULT_LABEL_FREE
        needs_cohort = "cohort_auc" in OBJECTIVES[default].metrics
        return default if cohort or not needs_cohort else objectives.FALLBACK_LABEL_FREE
    if name == "labels" and not labelled:
        raise TuneError(
            f"{source}: tune.objective=labels needs healthy (label 0) and anomalous (label 1) "
            "val patches; its val split has none of one of them"
        )
    if "cohort_auc" in OBJECTIVES[name].metrics and not cohort:
        raise TuneError(
            f"{source}: the {name} objective needs val patches of healthy volumes (every patch "
            "labelled 0, e.g. manifest label 0) and of other volumes (diseased or unlabelled) "
            f"among the tune.val_patches drawn; have {int(reference.sum())} and "
            f"{int((~reference).sum())}"
        )
    return name


def make_evaluation_set(
    val_ids: np.ndarray,
    val_labels: np.ndarray,
    val_pixels: np.ndarray,
    cfg: Config,
    source: str = "patch table",
    volumes: np.ndarray | None = None,
) -> EvaluationSet:
    """The evaluation set from val patches (uint8 pixels, (N, 64, 64)).

    ``tune.val_patches`` val patches drawn with ``tune.seed`` (all of them when fewer), then
    lesioned copies of its healthy patches: ``tune.synthetic_patches`` with an ellipse and
    ``tune.cutpaste_patches`` with a lesion drawn from the data (the donor: another healthy patch
    of the subset, of another volume where there is one). Healthy patches are those of volumes
    with no anomalous val patch (``volumes``: each patch's volume id; without them, each patch is
    its own volume), so the label-free objectives see what a cohort without labels would have:
    healthy volumes. The ``cohort`` objective's reference is the patches of volumes whose every
    patch is labelled 0; the rest of the subset is its unlabelled cohort. ``source`` names the
    input in errors.
    """
    tune_cfg = cfg.tune
    labels = np.asarray(val_labels, dtype=np.int8)
    volumes = np.asarray(volumes if volumes is not None else val_ids, dtype=str)
    rng = np.random.default_rng(tune_cfg.seed)
    chosen = np.sort(rng.permutation(len(labels))[: tune_cfg.val_patches])
    eval_pixels = decode_pixels(np.asarray(val_pixels)[chosen])  # (n, 64, 64)
    eval_ids = [str(pid) for pid in np.asarray(val_ids)[chosen]]
    eval_labels, eval_volumes = labels[chosen], volumes[chosen]
    lesion_volumes = set(volumes[labels == 1].tolist())
    healthy = np.array([v not in lesion_volumes for v in eval_volumes]) & (eval_labels != 1)
    if not healthy.any():  # every val volume has a lesion: its patches labelled healthy
        healthy = eval_labels == 0
    reference = np.isin(eval_volumes, list(healthy_volumes(volumes, labels)))
    has_both = bool((labels == 1).any() and (labels == 0).any())
    objective = resolve_objective(tune_cfg.objective, has_both, reference, source)
    healthy_rows = np.flatnonzero(healthy)
    wanted = {"synthetic": tune_cfg.synthetic_patches, "cutpaste": tune_cfg.cutpaste_patches}
    needed = [k for k in _LESION_SUFFIX if f"{k}_auc" in OBJECTIVES[objective].metrics]
    for kind in needed:
        if len(healthy_rows) < 2 or wanted[kind] < 2:
            raise TuneError(
                f"{source}: the {objective} objective needs at least 2 healthy val patches and "
                f"tune.{kind}_patches >= 2 (have {len(healthy_rows)} and {wanted[kind]})"
            )
    pixels, ids = [eval_pixels], list(eval_ids)
    kinds, sources = ["val"] * len(eval_ids), [-1] * len(eval_ids)
    for offset, (kind, suffix) in enumerate(_LESION_SUFFIX.items()):
        order = np.random.default_rng([tune_cfg.seed, offset]).permutation(healthy_rows)
        originals = np.sort(order[: wanted[kind]])
        copies = []
        for i in originals:
            seed = patch_seed(eval_ids[i] + suffix)
            if kind == "synthetic":
                copies.append(objectives.ellipse_lesion(eval_pixels[i], seed))
            else:
                donor = _donor(i, healthy_rows, eval_volumes, seed)
                copies.append(objectives.data_lesion(eval_pixels[i], eval_pixels[donor], seed)[0])
        if copies:
            pixels.append(np.stack(copies))
        ids += [eval_ids[i] + suffix for i in originals]
        kinds += [kind] * len(originals)
        sources += [int(i) for i in originals]
    count = len(kinds)
    return EvaluationSet(
        pixels=np.concatenate(pixels).astype(np.float32),
        ids=ids,
        labels=np.concatenate([eval_labels, np.full(count - len(eval_ids), -1, np.int8)]),
        kind=np.array(kinds),
        source=np.array(sources, dtype=np.int64),
        healthy=np.concatenate([healthy, np.zeros(count - len(eval_ids), bool)]),
        reference=np.concatenate([reference, np.zeros(count - len(eval_ids), bool)]),
        objective=objective,
        val_patches=len(labels),
        val_anomalous=int((labels == 1).sum()),
    )


def healthy_volumes(volumes: np.ndarray, labels: np.ndarray) -> set[str]:
    """The volumes (of per-patch ``volumes`` and ``labels``) whose every patch is labelled 0:
    the ``cohort`` objective's reference."""
    return set(volumes[labels == 0].tolist()) - set(volumes[labels != 0].tolist())


def _donor(row: int, healthy_rows: np.ndarray, volumes: np.ndarray, seed: int) -> int:
    """A healthy row to draw a lesion from: of another volume where there is one."""
    others = healthy_rows[(volumes[healthy_rows] != volumes[row])]
    if not len(others):
        others = healthy_rows[healthy_rows != row] if len(healthy_rows) > 1 else healthy_rows
    return int(others[np.random.default_rng(seed).integers(len(others))])


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def lambda_key(metric: str, lambda_: float) -> str:
    """The name of a per-λ metric, e.g. ``val_auc_lambda_0.1``."""
    return f"{metric}_lambda_{lambda_:g}"


def evaluation_path(device: torch.device, patches: int) -> tuple[FastPath, str]:
    """How an evaluation's mapping steps run on ``device``: as ``score`` runs them by default
    (bf16, channels_last, CUDA graphs on CUDA, compiled only for enough ``patches``; exact fp32
    on CPU), and why."""
    return choose_fast_path(device, "auto", "auto", True, "auto", patches_per_actor=patches)


def evaluate_objective(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    evaluation: EvaluationSet,
    lambdas: list[float],
    *,
    steps: int,
    z_lr: float,
    latent_prior: str,
    encoder: torch.nn.Module | None = None,
    path: FastPath = EXACT,
    fixed_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Invert the evaluation set at every λ and compute the sweep's metrics.

    G and D must be in their exported form (eval mode, final BatchNorm statistics). With an
    ``encoder`` the mapping starts from z = E(x) (``encoder+iterative``; ``encoder`` when
    ``steps`` is 0) instead of the patch id's seed. ``path`` is how the Γ steps run; one that is
    not exact fp32 is checked on the first λ against exact fp32 on a few patches, as the scorer
    checks it, and beyond its tolerance the evaluation maps in exact fp32. ``fixed_metrics`` are
    metrics that do not depend on λ (``sliced_wasserstein``).

    Returns:
        Per λ ``val_auc_lambda_…`` (labelled val AUC, when there are labels),
        ``synthetic_auc_lambda_…`` and ``cutpaste_auc_lambda_…`` (healthy patches vs their
        lesioned copies), ``healthy_residual_lambda_…`` (mean R(x) of the healthy val
        patches) and ``cohort_auc_lambda_…`` (the patches of healthy val volumes vs the other val
        patches, unlabelled); for every objective the evaluation set allows, its value at its own
        best λ (:func:`objective_key`) and that λ (:func:`objective_lambda_key`); ``objective`` (that
        of ``evaluation.objective``), ``best_lambda``, and every per-λ metric at that λ; the
        ``fixed_metrics``; ``path`` (what the steps ran on).
    """
    device = next(generator.parameters()).device
    pixels = torch.tensor(evaluation.pixels).unsqueeze(1)  # (M, 1, 64, 64); a writable copy
    initial_z = None
    if encoder is not None:
        with torch.no_grad():
            initial_z = in_fixed_rows(encoder, pixels, device)  # (M, nz)
    known = evaluation.labels >= 0
    healthy = evaluation.healthy
    val_rows = np.flatnonzero(evaluation.kind == "val")
    cohort = (~evaluation.reference[val_rows]).astype(np.int8)  # 1: not of a healthy volume
    fixed = dict(fixed_metrics or {})
    metrics: dict[str, Any] = {}
    per_lambda = []
    for index, lambda_ in enumerate(lambdas):
        settings = dict(lambda_=lambda_, steps=steps, z_lr=z_lr, latent_prior=latent_prior)
        result = invert_batch(
            (generator, discriminator), pixels, evaluation.ids, initial_z=initial_z, path=path,
            **settings,
        )  # fmt: skip
        if index == 0 and path.needs_check():
            sample = slice(0, CHECK_PATCHES)
            ok, worst = check_fast_path(
                (generator, discriminator), pixels[sample], evaluation.ids[sample],
                result.anomaly_score[sample], path=effective_path(path), lambda_=lambda_,
                steps=steps, z_lr=z_lr,
                initial_z=None if initial_z is None else initial_z[sample],
            )  # fmt: skip
            metrics["path_check_rel_diff"] = worst
            if not ok:
                log.warning(
                    "%s differs from exact fp32 by %.2e; mapping in fp32", path.label(), worst
                )
                path = dataclasses.replace(EXACT, cuda_graph=path.cuda_graph)
                result = invert_batch(
                    (generator, discriminator), pixels, evaluation.ids, initial_z=initial_z,
                    path=path, **settings,
                )  # fmt: skip
        anomaly, residual = result.anomaly_score, result.residual_score
        row: dict[str, Any] = {"lambda": lambda_, **fixed}
        row["val_auc"] = auc(anomaly[known], evaluation.labels[known])
        for kind in _LESION_SUFFIX:
            copies = evaluation.copies(kind)
            pair = np.concatenate([evaluation.source[copies], copies])
            is_copy = np.r_[np.zeros(len(copies)), np.ones(len(copies))]
            row[f"{kind}_auc"] = auc(anomaly[pair], is_copy) if len(copies) else math.nan
        row["healthy_residual"] = float(residual[healthy].mean()) if healthy.any() else math.nan
        row["cohort_auc"] = auc(anomaly[val_rows], cohort)
        for name in PER_LAMBDA_METRICS:
            metrics[lambda_key(name, lambda_)] = row[name]
        per_lambda.append(row)
    for name, (value, lambda_) in objectives.best_objectives(per_lambda).items():
        metrics[objective_key(name)] = value
        metrics[objective_lambda_key(name)] = lambda_
    best = per_lambda[objectives.best_over_lambdas(evaluation.objective, per_lambda)]
    metrics.update(
        objective=objectives.objective_value(evaluation.objective, best),
        best_lambda=best["lambda"],
        **{name: best[name] for name in PER_LAMBDA_METRICS},
        **fixed,
        path=effective_path(path).label(),
    )
    return metrics


class EpochEvaluation:
    """What a trial's rank 0 runs after every epoch: export G and D, invert, report metrics.

    Called by the training loop with the epoch's state (see
    :func:`anogan_ray.pipelines.train.make_trainer`); the models are exported exactly as
    ``anogan-ray train`` exports its bundle, so the best trial's objective describes the bundle
    that :func:`tune` exports. The epoch's generative quality is the figure the training loop
    wrote to ``quality_url`` just before (``generative_quality.json`` of the trial's run).
    """

    def __init__(
        self,
        evaluation: EvaluationSet,
        real_pixels: np.ndarray,
        cfg: Config,
        quality_url: str | None = None,
    ):
        self.evaluation = evaluation
        self.real_pixels = real_pixels  # D's BatchNorm patches (train.batchnorm_pixels)
        self.config = cfg.to_dict()  # the trial's (trial_settings): its Γ and z rate in `score`
        self.quality_url = quality_url

    def quality(self, epoch: float) -> float:
        """The sliced Wasserstein distance training logged at the end of ``epoch`` (NaN if none:
        an epoch cut short by ``train.max_steps``)."""
        if self.quality_url is None or not storage.exists(self.quality_url) or epoch % 1:
            return math.nan
        record = storage.read_json(self.quality_url).get("epochs", {}).get(str(int(epoch)))
        return float(record["sliced_wasserstein"]) if record else math.nan

    def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        cfg = config_from_dict(self.config)
        device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
        generator, discriminator = exported_models(state, cfg, self.real_pixels, device)
        path, _ = evaluation_path(device, len(self.evaluation.ids) * len(cfg.tune.lambdas))
        metrics = evaluate_objective(
            generator,
            discriminator,
            self.evaluation,
            cfg.tune.lambdas,
            steps=cfg.score.steps,
            z_lr=cfg.score.z_lr,
            latent_prior=cfg.model.latent_prior,
            path=path,
            fixed_metrics={"sliced_wasserstein": self.quality(float(state["epoch"]))},
        )
        metrics.update(
            objective_kind=self.evaluation.objective,
            eval_seconds=round(time.monotonic() - started, 3),
        )
        return metrics


def trial_settings(
    base_config: dict[str, Any], trial_config: dict[str, Any], gpus: float | None = None
) -> Config:
    """The whole configuration of one trial: the base one with the trial's hyperparameters, on
    GPUs when it takes some (``gpus``; None keeps ``train.use_gpu``).

    A trial reports (and checkpoints) once per epoch, the unit ASHA decides on.
    """
    settings = copy.deepcopy(base_config)
    settings["train"]["lr_generator"] = float(trial_config["lr_generator"])
    settings["train"]["lr_discriminator"] = float(trial_config["lr_discriminator"])
    settings["train"]["checkpoint_every"] = 2**31 - 1  # no reports between epoch ends
    if gpus is not None:
        settings["train"]["use_gpu"] = gpus > 0
    settings["score"]["z_lr"] = float(trial_config["z_lr"])
    settings["score"]["steps"] = int(trial_config["steps"])
    return config_from_dict(settings)


def trial_folder(out: str, cfg: Config, trial_id: str) -> str:
    """Where a trial's Ray Train run keeps its checkpoints and sample grids."""
    return storage.join(out, TRIALS_FOLDER, cfg.tune.run_name, trial_id)


def trial_scaling(cfg: Config, gpus: float) -> ray.train.ScalingConfig:
    """What one trial's Ray Train run asks for: ``train.num_workers`` workers of one CPU each,
    and ``gpus`` GPUs split evenly over them (a fraction of one for a one-worker trial)."""
    workers = cfg.train.num_workers
    resources = {"CPU": 1, "GPU": gpus / workers} if gpus else {"CPU": 1}
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=bool(gpus), resources_per_worker=resources
    )


def run_trial(
    trial_config: dict[str, Any],
    training: TrainingPatches,
    evaluation: EvaluationSet,
    real_pixels: np.ndarray,
    base_config: dict[str, Any],
    out: str,
    gpus: float = 0.0,
) -> None:
    """A trial's driver (the Tune trainable): one Ray Train run with the trial's settings.

    The run is kept in the trial's folder (:func:`trial_folder`, named by the trial id), so a
    restored sweep's trial resumes its run from the last checkpoint. Every trial starts from the
    same initial weights, and each worker shuffles its batches with a seed (``train.seed``).
    The run takes ``gpus`` GPUs (:func:`trial_scaling`).
    """
    cfg = trial_settings(base_config, trial_config, gpus)
    trial_id = ray_tune.get_context().get_trial_id()
    folder = trial_folder(out, cfg, trial_id)
    trainer = make_trainer(
        training,
        folder,
        cfg,
        epoch_end=EpochEvaluation(evaluation, real_pixels, cfg, storage.join(folder, QUALITY_FILE)),
        callbacks=[TuneReportCallback()],
    )
    scaling = trial_scaling(cfg, gpus)
    if scaling.resources_per_worker != trainer.scaling_config.resources_per_worker:
        # make_trainer gives each worker a whole GPU (`train`'s way); a trial may take a part
        trainer = ray.train.torch.TorchTrainer(
            trainer.train_loop_per_worker,
            train_loop_config=trainer.train_loop_config,
            torch_config=trainer.backend_config,
            scaling_config=scaling,
            run_config=trainer.run_config,
            datasets=trainer.datasets,
            dataset_config=trainer.data_config,
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
    """The (mapping, Γ, z rate) settings of a mapping sweep: ``tune.mappings`` (all the bundle can
    run when empty) x ``tune.steps`` (``score.steps`` when empty) x ``tune.z_lr`` (``score.z_lr``
    when empty); ``encoder`` runs no steps (so no z rate), and ``encoder+iterative`` with Γ = 0 is
    the same as ``encoder``, so each appears once."""
    mappings = cfg.tune.mappings or (list(MAPPINGS) if has_encoder else ["iterative"])
    unknown = sorted(set(mappings) - set(MAPPINGS))
    if unknown:
        raise ConfigError(f"tune.mappings: {unknown} are not mappings ({', '.join(MAPPINGS)})")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in cfg.tune.steps):
        raise ConfigError(f"tune.steps: expected whole numbers >= 0, got {cfg.tune.steps!r}")
    if any(not value > 0 for value in cfg.tune.z_lr):
        raise ConfigError(f"tune.z_lr: learning rates must be positive, got {cfg.tune.z_lr!r}")
    if not has_encoder and set(mappings) - {"iterative"}:
        raise TuneError(
            f"tune.mappings {mappings}: the model bundle has no encoder E (train it with "
            "train.encoder=true, or sweep only `iterative`)"
        )
    steps = cfg.tune.steps or [cfg.score.steps]
    rates = cfg.tune.z_lr or [cfg.score.z_lr]
    settings = set()
    for mapping in mappings:
        for gamma in steps:
            for rate in rates:
                if mapping == "encoder" or gamma == 0:  # no steps: z's rate plays no part
                    start = "encoder" if mapping == "encoder+iterative" else mapping
                    settings.add((0, start, rates[0]))
                else:
                    settings.add((gamma, mapping, rate))
    return [{"mapping": m, "steps": s, "z_lr": r} for s, m, r in sorted(settings)]


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


def trial_device() -> torch.device:
    """CUDA when Ray gave this trial a GPU and CUDA works in its process, else the CPU (with a
    warning when a GPU was given: the trial still runs, only slower)."""
    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda")
    if gpu_ids:
        log.warning(
            "trial given GPU %s, but CUDA is not available here; mapping on the CPU", gpu_ids
        )
    return torch.device("cpu")


def run_mapping_trial(
    trial_config: dict[str, Any], model: str, evaluation: EvaluationSet, cfg: Config
) -> None:
    """A mapping-sweep trial (the Tune trainable): the bundle's metrics under one (mapping, Γ, z
    rate) on the evaluation set at every λ, and what a patch costs (seconds on this trial's CPU
    or GPU). On a GPU the steps run in bf16 with CUDA graphs, as ``score`` maps
    (:func:`evaluation_path`)."""
    setting = trial_config["setting"]
    device = trial_device()
    if device.type == "cpu":
        torch.set_num_threads(1)
    bundle = load_bundle(model, device=device)
    encoder = bundle.encoder if setting["mapping"] != "iterative" else None
    patches = len(evaluation.ids) * len(cfg.tune.lambdas)
    path, why = evaluation_path(device, patches)
    started = time.perf_counter()
    metrics = evaluate_objective(
        bundle.generator,
        bundle.discriminator,
        evaluation,
        cfg.tune.lambdas,
        steps=setting["steps"],
        z_lr=setting["z_lr"],
        latent_prior=bundle.model_config.latent_prior,
        encoder=encoder,
        path=path,
    )
    seconds = time.perf_counter() - started
    ray_tune.report(
        {
            **metrics,
            **setting,
            "seconds_per_patch": seconds / patches,
            "device": device.type,
            "path_reason": why,
            "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()),
            "node_id": ray.get_runtime_context().get_node_id(),
        }
    )


_MAPPING_COLUMNS = (
    "mapping", "steps", "z_lr", "objective", "best_lambda", "val_auc", "synthetic_auc",
    "cutpaste_auc", "healthy_residual", "cohort_auc", "seconds_per_patch", "device", "path",
    "gpu_ids", "node_id",
)  # fmt: skip


def sweep_mappings(patches: str, model: str, out: str, cfg: Config) -> dict[str, Any]:
    """Sweep the mapping, Γ and z's rate of one trained bundle with Ray Tune (``tune --model``).

    One trial per setting of :func:`mapping_settings`, each scoring the ``val`` evaluation set
    (as a training sweep's trials do) at every λ of ``tune.lambdas``: the cheapest setting that
    keeps the objective is what a cohort should be scored with. On a cluster with GPUs each trial
    takes ``tune.gpus_per_trial`` of one (auto: a whole GPU) and maps in bf16 with CUDA graphs
    like ``score``. Writes ``out/mappings.parquet`` and ``out/summary.json``.

    Raises:
        TuneError: an objective that does not depend on the mapping (``quality``), a bundle
            without the encoder a mapping needs, or GPUs asked for that the cluster cannot have.
    """
    started = time.monotonic()
    check_gpus_per_trial(cfg.tune)
    patches, out, model = storage.absolute(patches), storage.absolute(out), storage.absolute(model)
    check_sweep_inputs(patches, model)
    if cfg.tune.objective == "quality":
        raise TuneError(
            "tune --model: tune.objective=quality ranks trained models, not the mappings of one "
            f"(it does not depend on them); choose one of {', '.join(objectives.LABEL_FREE[:3])}"
        )
    ensure_ray()
    index = storage.read_json(storage.join(model, "bundle.json"))
    settings = mapping_settings(cfg, ENCODER_FILE in index.get("sha256", {}))
    evaluation = load_evaluation_set(patches, cfg)
    if not OBJECTIVES[evaluation.objective].per_lambda:  # auto chose a model-level objective
        evaluation.objective = objectives.LAMBDA_CHOOSER
    gpus = trial_gpus(cfg, mapping_sweep=True)
    resources = {"cpu": 1, "gpu": gpus} if gpus else {"cpu": 1}
    concurrent = max_concurrent_trials(cfg, gpus, workers=1)
    storage_fs, tune_path = storage.arrow_filesystem(storage.join(out, TUNE_FOLDER))
    trainable = ray_tune.with_parameters(
        run_mapping_trial, model=model, evaluation=evaluation, cfg=cfg
    )
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(trainable, resources),
        param_space={"setting": ray_tune.grid_search(settings)},
        tune_config=ray_tune.TuneConfig(max_concurrent_trials=concurrent),
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
        rows.append({k: m.get(k) if isinstance(m.get(k), str) else _finite(m.get(k))
                     for k in _MAPPING_COLUMNS})  # fmt: skip
    table = pd.DataFrame(rows).sort_values(["steps", "mapping", "z_lr"]).reset_index(drop=True)
    _write_parquet(storage.join(out, "mappings.parquet"), table)
    best = table["objective"].max()
    keeps = table[table["objective"] >= best - cfg.tune.auc_tolerance]
    cheapest = keeps.sort_values("seconds_per_patch").iloc[0]
    summary = {
        "stage": "tune-mappings",
        "model": model,
        "objective_kind": evaluation.objective,
        "evaluation_patches": len(evaluation.ids),
        "gpus_per_trial": gpus,
        "max_concurrent_trials": concurrent,
        "mappings": table.to_dict("records"),
        "cheapest_within_tolerance": {
            "mapping": cheapest["mapping"],
            "steps": int(cheapest["steps"]),
            "z_lr": float(cheapest["z_lr"]),
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


def max_concurrent_trials(cfg: Config, gpus: float = 0.0, workers: int | None = None) -> int:
    """Trials at once: the configured cap, and no more than the cluster can hold, each trial
    taking ``gpus`` GPUs when it takes any (the GPUs the cluster has or its autoscaler can add),
    else one CPU for each of its ``workers`` (``train.num_workers``; its driver takes none)."""
    workers = cfg.train.num_workers if workers is None else workers
    if gpus:
        fits = int(max(cluster_gpus()) / gpus + 1e-9)
    else:
        fits = int(ray.cluster_resources().get("CPU", 0)) // workers
    return max(1, min(cfg.tune.max_concurrent, fits))


def _write_parquet(url: str, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    storage.write_bytes(url, buffer.getvalue())


_LEADERBOARD_COLUMNS = (
    "trial_id", "objective", "val_auc", "synthetic_auc", "cutpaste_auc", "healthy_residual",
    "cohort_auc", "sliced_wasserstein", "best_lambda", "epochs", "stopped_early", "lr_generator",
    "lr_discriminator", "z_lr", "steps",
)  # fmt: skip


def leaderboard_table(trials: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The best ``top`` trials, best first: the objective that ranked them, the labelled AUC
    (NaN without labels) and every label-free measure at the objective's λ, the settings."""
    board = trials.sort_values("objective", ascending=False, na_position="last").head(top)
    board = board[[c for c in _LEADERBOARD_COLUMNS if c in board]]
    return board.dropna(axis=1, how="all").reset_index(drop=True)


def format_leaderboard(trials: pd.DataFrame, top: int = 10) -> str:
    """The best ``top`` trials as a text table, best first (:func:`leaderboard_table`)."""
    return leaderboard_table(trials, top).to_string(index=False, float_format="%.4g")


def leaderboard(out: str, top: int = 10) -> str:
    """The leaderboard of the sweep in the stage folder ``out`` (its ``trials.parquet``) and,
    where ``val`` was labelled, how well each label-free objective agreed with the labels."""
    with storage.open_file(storage.join(out, "trials.parquet")) as f:
        text = format_leaderboard(pd.read_parquet(f), top=top)
    summary_url = storage.join(out, "summary.json")
    agreement = (
        storage.read_json(summary_url).get("agreement") if storage.exists(summary_url) else None
    )
    if agreement:
        text += "\n\n" + format_agreement(agreement)
    return text


def sweep_agreement(trials: pd.DataFrame, history: pd.DataFrame, cfg: Config) -> dict | None:
    """How well each label-free objective ranked this sweep's trials as the labels did (None
    when ``val`` has no labels): over the trials' last reports (what picks the best trial),
    Spearman's rank correlation with a bootstrap 95 % interval and the regret (best labelled
    AUC minus the labelled AUC, at the objective's λ, of the trial the objective ranks first);
    over every trial-epoch, Spearman alone."""
    labelled = objective_key("labels")
    if labelled not in trials or trials[labelled].notna().sum() == 0:
        return None
    candidates = {}
    for name in objectives.LABEL_FREE:
        key = objective_key(name)
        if key not in trials or trials[key].notna().sum() < 2:
            continue
        at_pick = [
            row.get(lambda_key("val_auc", row[objective_lambda_key(name)]), math.nan)
            if np.isfinite(row.get(objective_lambda_key(name), math.nan))
            else math.nan
            for row in trials.to_dict("records")
        ]
        result = objectives.agreement(trials[key], trials[labelled], at_pick, seed=cfg.tune.seed)
        result["picked_trial"] = trials["trial_id"].iloc[result.pop("picked")]
        if key in history and labelled in history:
            rho = objectives.spearman(history[key], history[labelled])
            result["spearman_trial_epochs"] = round(rho, 4) if math.isfinite(rho) else None
            result["trial_epochs"] = int(history[[key, labelled]].notna().all(axis=1).sum())
        candidates[name] = result
    return {
        "against": "labels",
        "best_val_auc": _finite(trials[labelled].max()),
        "default_label_free": objectives.DEFAULT_LABEL_FREE,
        "objectives": candidates,
    }


def format_agreement(agreement: dict[str, Any]) -> str:
    """The agreement of :func:`sweep_agreement` as a text table, one row per objective."""
    rows = []
    for name, result in agreement["objectives"].items():
        low, high = result["spearman_ci95"]
        rows.append({
            "label-free objective": name + (" (default)" if name == agreement["default_label_free"] else ""),
            "trials": result["trials"],
            "Spearman": result["spearman"],
            "95% interval": "" if low is None else f"[{low:.2f}, {high:.2f}]",
            "regret": result["regret"],
            "picks": result["picked_trial"],
        })  # fmt: skip
    header = f"agreement with the labelled val AUC (best {agreement['best_val_auc']:.4f}):"
    return header + "\n" + pd.DataFrame(rows).to_string(index=False, float_format="%.4g")


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
    check_search_space(cfg.tune, cfg.train.num_workers)
    patches, out = storage.absolute(patches), storage.absolute(out)  # trials run elsewhere
    check_sweep_inputs(patches)
    ensure_ray()
    gpus = trial_gpus(cfg)
    evaluation = load_evaluation_set(patches, cfg)
    if evaluation.objective != "labels":
        log.warning(
            "val split %s: no labelled anomalous patches, so the sweep ranks trials by the "
            "label-free %s objective, which agrees with labels only partly (docs/tune.md); "
            "label a few pathological volumes for val if you can",
            patches,
            evaluation.objective,
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
            gpus=gpus,
        ),
        {"cpu": 0, "memory": _DRIVER_MEMORY},
    )
    concurrent = max_concurrent_trials(cfg, gpus)
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
    agreement = sweep_agreement(trials, history, cfg)
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
        "eval_patches": evaluation.count,
        "healthy_eval_patches": int(evaluation.healthy.sum()),
        "synthetic_patches": len(evaluation.copies("synthetic")),
        "cutpaste_patches": len(evaluation.copies("cutpaste")),
        "gpus_per_trial": gpus,
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
            **{
                name: _finite(best_row[name])
                for name in (*PER_LAMBDA_METRICS, "sliced_wasserstein")
            },
            "epochs": int(best_row["epochs"]),
        },
        # where val is labelled: how each label-free objective ranked this sweep's trials
        "agreement": agreement,
        "best_model": best_model,
        "model_id": model_id,
        "trials_table": trials_url,
        "history_table": history_url,
        "experiment": experiment_url,
        "resumed": resumed,
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    storage.write_json(
        storage.join(best_model, objectives.SWEEP_FILE),
        {
            "objective": evaluation.objective,
            "objective_description": OBJECTIVES[evaluation.objective].description,
            "trials": len(trials),
            "leaderboard": json_records(leaderboard_table(trials)),
            "agreement": agreement,
            "summary": storage.join(out, "summary.json"),
        },
    )
    log.info(
        "sweep %s: best trial %s, %s %.4f",
        experiment_url,
        summary["best"]["trial_id"],
        evaluation.objective,
        summary["best"]["objective"],
    )
    return summary


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows as JSON-ready dicts (NaN as None, numpy scalars as Python's)."""
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        for row in frame.astype(object).to_dict("records")
    ]


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
            "step": int(metrics.get("step", 0) or 0),
            "stopped_early": result.error is None and epochs < cfg.train.epochs,
            "objective_kind": metrics.get("objective_kind"),
        }
        for key in (*_TRIAL_METRICS, "d_real", "d_fake", *_candidate_columns(cfg)):
            row[key] = metrics.get(key, math.nan)
        row["path"] = metrics.get("path")
        row["trial_path"] = result.path
        rows.append(row)
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            frame = frame.copy()
            frame["trial_id"] = row["trial_id"]
            history.append(frame)
    trials = pd.DataFrame(rows)
    wanted = ["trial_id", "epoch", *_TRIAL_METRICS, "train_seconds", "eval_seconds"]
    wanted += _candidate_columns(cfg)
    history_frame = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    for column in wanted:
        if column not in history_frame:
            history_frame[column] = math.nan
    history_frame = history_frame[wanted].sort_values(["trial_id", "epoch"], ignore_index=True)
    return trials, history_frame


def _candidate_columns(cfg: Config) -> list[str]:
    """Each candidate objective at its best λ and that λ, and every per-λ metric."""
    columns = [k for n in OBJECTIVES for k in (objective_key(n), objective_lambda_key(n))]
    return columns + [lambda_key(m, lam) for lam in cfg.tune.lambdas for m in PER_LAMBDA_METRICS]


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
