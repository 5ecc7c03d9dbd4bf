"""Hyperparameter sweeps with Ray Tune: G's and D's learning rates, λ, z's learning rate, Γ.

Each trial trains its own G and D from the same initial weights on the patch table's ``train``
split, in one process (one Ray Tune function trainable with 1 CPU, or 1 GPU with
``train.use_gpu``; the pattern of Ray's own DCGAN example), with the per-step update shared with
``anogan-ray train`` (:func:`anogan_ray.pipelines.train.gan_step`). After every epoch the trial
exports its model as it would be scored (BatchNorm statistics finalized, eval mode), inverts a
fixed subset of the ``val`` patches and reports the objective, so ASHA can stop weak trials.

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
    out/_tune/<run_name>/     Ray Tune's experiment (trial checkpoints); re-running resumes it
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray import tune as ray_tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from anogan_ray import storage
from anogan_ray.config import Config, ConfigError, TuneConfig, config_from_dict
from anogan_ray.invert import invert_batch
from anogan_ray.model import build_models, finalize_batchnorm, sample_latent, save_bundle
from anogan_ray.patches import decode_pixels, patch_seed
from anogan_ray.pipelines import ensure_ray
from anogan_ray.pipelines.preprocess import read_patch_table
from anogan_ray.pipelines.train import gan_step

log = logging.getLogger(__name__)

TUNE_FOLDER = "_tune"  # Ray Tune's experiments inside the stage folder
BEST_MODEL = "best_model"
METRIC = "objective"  # what ASHA and the best-trial choice look at; always "higher is better"
_STATE_FILE = "state.pt"  # tensors and plain containers only (loaded with weights_only=True)
_BUNDLE_FOLDER = "bundle"  # the trial's exported model inside each checkpoint
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
class SweepData:
    """The training patches and the fixed evaluation set of a sweep (numpy; uint8 pixels)."""

    train_pixels: np.ndarray  # (N, 64, 64) uint8, the whole train split, ordered by patch id
    eval_pixels: np.ndarray  # (M, 64, 64) float32 in [-1, 1]: val subset, then lesioned copies
    eval_ids: list[str]  # M patch ids (seeds z); a lesioned copy's id ends in _SYNTHETIC_SUFFIX
    eval_labels: np.ndarray  # (M,) int8: 1 anomalous, 0 healthy, -1 unknown (val subset)
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


def _read_splits(patches: str) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {"patch_id", "label", "pixels"}}`` for train and val, each ordered by patch id."""
    try:
        table = read_patch_table(patches, ["train", "val"])
    except FileNotFoundError as err:
        raise TuneError(f"patch table {patches}: {err}") from err
    columns: dict[str, list] = {"patch_id": [], "label": [], "pixels": [], "split": []}
    for batch in table.select_columns(list(columns)).iter_batches(batch_format="numpy"):
        for name in columns:
            columns[name].append(batch[name])
    merged = {
        name: np.concatenate(parts) if parts else np.array([]) for name, parts in columns.items()
    }
    splits = {}
    for split in ("train", "val"):
        keep = merged["split"] == split
        if not keep.any():
            raise TuneError(
                f"patch table {patches}: no {split} patches (a sweep trains on `train` and "
                "evaluates on `val`; see DESIGN.md 3.2)"
            )
        ids = merged["patch_id"][keep].astype(str)
        order = np.argsort(ids, kind="stable")
        splits[split] = {
            "patch_id": ids[order],
            "label": merged["label"][keep][order].astype(np.int8),
            "pixels": np.stack(list(merged["pixels"][keep][order])).astype(np.uint8),
        }
    return splits


def load_sweep_data(patches: str, cfg: Config) -> SweepData:
    """Read the train and val splits and fix the evaluation set.

    The evaluation set is ``tune.val_patches`` val patches drawn with ``tune.seed`` (all of them
    when fewer), then lesioned copies of up to ``tune.synthetic_patches`` of its healthy ones.

    Raises:
        TuneError: a split is missing, fewer train patches than a batch, or an objective that
            the val split cannot support.
    """
    splits = _read_splits(patches)
    train, val = splits["train"], splits["val"]
    return make_sweep_data(
        train["pixels"], val["patch_id"], val["label"], val["pixels"], cfg, source=patches
    )


def make_sweep_data(
    train_pixels: np.ndarray,
    val_ids: np.ndarray,
    val_labels: np.ndarray,
    val_pixels: np.ndarray,
    cfg: Config,
    source: str = "patch table",
) -> SweepData:
    """The sweep's data from train patches and val patches (uint8 pixels, (N, 64, 64)).

    See :func:`load_sweep_data`; ``source`` names the input in errors.
    """
    tune_cfg = cfg.tune
    patches = source
    if len(train_pixels) < cfg.train.batch_size:
        raise TuneError(
            f"{patches}: {len(train_pixels)} train patches are fewer than "
            f"train.batch_size = {cfg.train.batch_size}"
        )
    val = {"patch_id": np.asarray(val_ids), "pixels": np.asarray(val_pixels)}
    labels = np.asarray(val_labels, dtype=np.int8)
    has_both = bool((labels == 1).any() and (labels == 0).any())
    objective = tune_cfg.objective
    if objective == "auto":
        objective = "labels" if has_both else "synthetic"
    if objective == "labels" and not has_both:
        raise TuneError(
            f"{patches}: tune.objective=labels needs healthy (label 0) and anomalous "
            f"(label 1) val patches; its val split has labels {sorted(set(labels.tolist()))}"
        )
    rng = np.random.default_rng(tune_cfg.seed)
    chosen = np.sort(rng.permutation(len(labels))[: tune_cfg.val_patches])
    eval_pixels = decode_pixels(val["pixels"][chosen])  # (M, 64, 64)
    eval_ids = [str(pid) for pid in val["patch_id"][chosen]]
    eval_labels = labels[chosen]
    # healthy: labelled 0, or (without labels) any val patch not marked anomalous
    healthy = np.flatnonzero(eval_labels == 0 if objective == "labels" else eval_labels != 1)
    sources = healthy[rng.permutation(len(healthy))[: tune_cfg.synthetic_patches]]
    sources.sort()
    if objective == "synthetic" and len(sources) < 2:
        raise TuneError(
            f"{patches}: the synthetic objective needs at least 2 healthy val patches "
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
    return SweepData(
        train_pixels=np.asarray(train_pixels, dtype=np.uint8),
        eval_pixels=np.concatenate([eval_pixels, lesioned]).astype(np.float32),
        eval_ids=eval_ids + [eval_ids[i] + _SYNTHETIC_SUFFIX for i in sources],
        eval_labels=np.concatenate([eval_labels, np.full(len(sources), -1, np.int8)]),
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
    data: SweepData,
    lambdas: list[float],
    *,
    steps: int,
    z_lr: float,
    batch_size: int,
    latent_prior: str,
) -> dict[str, Any]:
    """Invert the evaluation set at every λ and compute the sweep's metrics.

    G and D must be in their exported form (eval mode, final BatchNorm statistics).

    Returns:
        ``objective`` (the best λ's AUC under ``data.objective``), ``best_lambda``, per λ
        ``val_auc_lambda_…`` (labelled val AUC, when there are labels) and
        ``synthetic_auc_lambda_…`` (healthy vs lesioned copies), ``val_auc`` and
        ``synthetic_auc`` at the best λ, and ``healthy_residual``: the mean R(x) of the healthy
        patches that have a lesioned copy, at the best λ.
    """
    device = next(generator.parameters()).device
    pixels = torch.tensor(data.eval_pixels).unsqueeze(1)  # (M, 1, 64, 64); a writable copy
    known = data.eval_labels >= 0
    labelled = known.any() and len(set(data.eval_labels[known].tolist())) == 2
    metrics: dict[str, Any] = {}
    per_lambda = []
    for lambda_ in lambdas:
        anomaly, residual = [], []
        for start in range(0, len(data.eval_ids), batch_size):
            result = invert_batch(
                (generator, discriminator),
                pixels[start : start + batch_size].to(device),
                data.eval_ids[start : start + batch_size],
                lambda_=lambda_,
                steps=steps,
                z_lr=z_lr,
                latent_prior=latent_prior,
            )
            anomaly.append(result.anomaly_score)
            residual.append(result.residual_score)
        anomaly_score, residual_score = np.concatenate(anomaly), np.concatenate(residual)
        row = {"lambda": lambda_, "healthy_residual": math.nan}
        row["val_auc"] = (
            float(roc_auc_score(data.eval_labels[known], anomaly_score[known]))
            if labelled
            else math.nan
        )
        if data.synthetic.any():
            pair = data.synthetic | data.synthetic_source
            row["synthetic_auc"] = float(roc_auc_score(data.synthetic[pair], anomaly_score[pair]))
            row["healthy_residual"] = float(residual_score[data.synthetic_source].mean())
        else:
            row["synthetic_auc"] = math.nan
        metrics[lambda_key("val_auc", lambda_)] = row["val_auc"]
        metrics[lambda_key("synthetic_auc", lambda_)] = row["synthetic_auc"]
        per_lambda.append(row)
    key = "val_auc" if data.objective == "labels" else "synthetic_auc"
    best = max(per_lambda, key=lambda row: -math.inf if math.isnan(row[key]) else row[key])
    metrics.update(
        objective=best[key],
        best_lambda=best["lambda"],
        val_auc=best["val_auc"],
        synthetic_auc=best["synthetic_auc"],
        healthy_residual=best["healthy_residual"],
    )
    return metrics


def _exported_models(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    train_pixels: torch.Tensor,
    cfg: Config,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies of G and D as ``anogan-ray train`` exports them: final BatchNorm statistics."""
    model_cfg, train_cfg = cfg.model, cfg.train
    batch_size = train_cfg.batch_size
    num_batches = max(1, train_cfg.batchnorm_samples // batch_size)
    device = next(generator.parameters()).device
    exported_g, exported_d = copy.deepcopy(generator), copy.deepcopy(discriminator)
    latent_rng = torch.Generator().manual_seed(train_cfg.seed + 1)
    finalize_batchnorm(
        exported_g,
        (sample_latent(batch_size, model_cfg, latent_rng).to(device) for _ in range(num_batches)),
    )
    real_batches = min(num_batches, len(train_pixels) // batch_size)
    finalize_batchnorm(
        exported_d,
        (
            train_pixels[i * batch_size : (i + 1) * batch_size].to(device)
            for i in range(real_batches)
        ),
    )
    return exported_g.eval(), exported_d.eval()


def run_trial(trial_config: dict[str, Any], data: SweepData, base_config: dict[str, Any]) -> None:
    """The Tune trainable: train G and D epoch by epoch, reporting the objective after each.

    Resumes from the trial's last checkpoint (a restored sweep or a retried trial). Every trial
    starts from the same initial weights and draws the same z and batch order, so trials differ
    only in their hyperparameters.
    """
    cfg = config_from_dict(base_config)
    model_cfg, train_cfg = cfg.model, cfg.train
    lr_generator, lr_discriminator = trial_config["lr_generator"], trial_config["lr_discriminator"]
    device = torch.device("cuda" if train_cfg.use_gpu and torch.cuda.is_available() else "cpu")
    generator, discriminator = build_models(model_cfg, seed=train_cfg.seed)
    generator.to(device)
    discriminator.to(device)
    betas = (train_cfg.beta1, 0.999)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=lr_generator, betas=betas)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=lr_discriminator, betas=betas)
    first_epoch = 0
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            state = torch.load(
                os.path.join(checkpoint_dir, _STATE_FILE), map_location=device, weights_only=True
            )
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_generator"])
        optimizer_d.load_state_dict(state["optimizer_discriminator"])
        first_epoch = int(state["epoch"])

    train_pixels = torch.from_numpy(decode_pixels(data.train_pixels)).unsqueeze(1)  # (N, 1, 64, 64)
    batch_size = train_cfg.batch_size
    steps_per_epoch = len(train_pixels) // batch_size  # full batches only (BatchNorm)
    for epoch in range(first_epoch, train_cfg.epochs):
        started = time.monotonic()
        generator.train()
        discriminator.train()
        torch.manual_seed(train_cfg.seed * 1000 + epoch)  # z draws: the same in every trial
        order = torch.randperm(
            len(train_pixels), generator=torch.Generator().manual_seed(train_cfg.seed + epoch)
        )
        sums = torch.zeros(4)  # d_loss, g_loss, D(x), D(G(z))
        for step in range(steps_per_epoch):
            real = train_pixels[order[step * batch_size : (step + 1) * batch_size]].to(device)
            sums += gan_step(
                generator, discriminator, optimizer_g, optimizer_d, real, model_cfg
            ).cpu()
        train_seconds = time.monotonic() - started

        exported_g, exported_d = _exported_models(generator, discriminator, train_pixels, cfg)
        metrics = evaluate_objective(
            exported_g,
            exported_d,
            data,
            cfg.tune.lambdas,
            steps=int(trial_config["steps"]),
            z_lr=float(trial_config["z_lr"]),
            batch_size=cfg.score.batch_size,
            latent_prior=model_cfg.latent_prior,
        )
        means = (sums / max(steps_per_epoch, 1)).tolist()
        metrics.update(
            epoch=epoch + 1,
            objective_kind=data.objective,
            d_loss=means[0],
            g_loss=means[1],
            d_real=means[2],
            d_fake=means[3],
            train_seconds=round(train_seconds, 3),
            eval_seconds=round(time.monotonic() - started - train_seconds, 3),
        )
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            torch.save(
                {
                    "generator": generator.state_dict(),
                    "discriminator": discriminator.state_dict(),
                    "optimizer_generator": optimizer_g.state_dict(),
                    "optimizer_discriminator": optimizer_d.state_dict(),
                    "epoch": epoch + 1,
                },
                os.path.join(checkpoint_dir, _STATE_FILE),
            )
            save_bundle(
                os.path.join(checkpoint_dir, _BUNDLE_FOLDER),
                exported_g,
                exported_d,
                model_cfg,
                {
                    "run": f"tune trial {ray_tune.get_context().get_trial_id()}",
                    "epochs": epoch + 1,
                    "hyperparameters": {k: trial_config[k] for k in sorted(trial_config)},
                    "best_lambda": metrics["best_lambda"],
                    "objective": {data.objective: metrics["objective"]},
                },
            )
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(checkpoint_dir))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

_ARMED_INTERRUPTS: set[str] = set()  # interrupt callbacks that may fire in this process


class _InterruptAfterTrials(ray_tune.Callback):
    """Fault injection for tests: stop the sweep like Ctrl+C once ``count`` trials finished.

    Tune pickles its callbacks with the experiment; a restored copy stays silent because its
    token is armed only during the call of :func:`tune` that created it.
    """

    def __init__(self, count: int):
        self.count = count
        self.token = uuid.uuid4().hex

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.count -= 1
        if self.count == 0 and self.token in _ARMED_INTERRUPTS:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own "stop and save" signal


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


def _max_concurrent(cfg: Config) -> int:
    """Trials at once: the configured cap, and no more than the cluster's CPUs (or GPUs)."""
    resources = ray.cluster_resources()
    unit = "GPU" if cfg.train.use_gpu else "CPU"
    return max(1, min(cfg.tune.max_concurrent, int(resources.get(unit, 1))))


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


def tune(patches: str, out: str, cfg: Config, *, interrupt_after_trials: int | None = None) -> dict:
    """Sweep the learning rates (and z's rate, Γ) with Ray Tune, λ within each trial.

    Args:
        patches: the patch table folder (local or ``s3://``) with ``train`` and ``val`` splits.
        out: the stage folder (local or ``s3://``); see the module docstring for its layout.
        cfg: the whole configuration: ``cfg.tune`` the search space and scheduler, ``cfg.model``
            and ``cfg.train`` how each trial trains (``train.epochs`` at most), ``cfg.score``
            the inversion settings that ``tune.z_lr`` / ``tune.steps`` leave fixed.
        interrupt_after_trials: fault injection for tests: stop the sweep as Ctrl+C does once
            this many trials finished (raises :class:`SweepInterrupted`).

    Returns:
        The summary, also written to ``out/summary.json``.

    Raises:
        ConfigError: an invalid search space (before anything starts).
        TuneError: unusable patches, or a previous sweep of the same name with other settings.
        SweepInterrupted: the sweep stopped early; the same call again resumes it.
    """
    started = time.monotonic()
    check_search_space(cfg.tune)
    if (
        interrupt_after_trials is not None
        and threading.current_thread() is not threading.main_thread()
    ):
        raise ValueError("interrupt_after_trials needs tune() in the main thread (signals)")
    ensure_ray()
    data = load_sweep_data(patches, cfg)
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

    resources = {"cpu": 1, "gpu": 1} if cfg.train.use_gpu else {"cpu": 1}
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, data=data, base_config=cfg.to_dict()), resources
    )
    resumed = ray_tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    callback = _InterruptAfterTrials(interrupt_after_trials) if interrupt_after_trials else None
    if callback:
        _ARMED_INTERRUPTS.add(callback.token)
    try:
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
                    time_attr="training_iteration",  # one iteration = one epoch
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
                    # the variant generator caps concurrency itself (it ignores
                    # max_concurrent_trials): the configured cap, within the cluster's resources
                    search_alg=BasicVariantGenerator(
                        random_state=cfg.tune.seed, max_concurrent=_max_concurrent(cfg)
                    ),
                ),
                run_config=ray_tune.RunConfig(
                    name=cfg.tune.run_name,
                    storage_path=tune_path,
                    storage_filesystem=storage_fs,
                    checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1),
                    failure_config=ray_tune.FailureConfig(max_failures=cfg.train.max_failures),
                    callbacks=[callback] if callback else None,
                    verbose=0,
                ),
            )
        grid = tuner.fit()
    finally:
        if callback:
            _ARMED_INTERRUPTS.discard(callback.token)

    finished = grid.num_terminated + grid.num_errors
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
    model_id = _export_best(best, best_model)

    trials_url, history_url = (
        storage.join(out, "trials.parquet"),
        storage.join(out, "history.parquet"),
    )
    _write_parquet(trials_url, trials)
    _write_parquet(history_url, history)
    summary = {
        "stage": "tune",
        "patch_table": patches,
        "objective": data.objective,
        "metric": METRIC,
        "mode": "max",
        "scheduler": cfg.tune.scheduler,
        "trials": len(trials),
        "trials_errored": int(grid.num_errors),
        "trials_stopped_early": int(trials["stopped_early"].sum()),
        "val_patches": data.val_patches,
        "val_anomalous": data.val_anomalous,
        "eval_patches": int((~data.synthetic).sum()),
        "synthetic_patches": int(data.synthetic.sum()),
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
        data.objective,
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
        for key in (
            "objective",
            "best_lambda",
            "val_auc",
            "synthetic_auc",
            "healthy_residual",
            "d_loss",
            "g_loss",
            "d_real",
            "d_fake",
        ):
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
    wanted = [
        "trial_id",
        "epoch",
        "objective",
        "best_lambda",
        "val_auc",
        "synthetic_auc",
        "healthy_residual",
        "d_loss",
        "g_loss",
        "train_seconds",
        "eval_seconds",
    ]
    wanted += [lambda_key(n, lam) for lam in cfg.tune.lambdas for n in ("val_auc", "synthetic_auc")]
    history_frame = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    for column in wanted:
        if column not in history_frame:
            history_frame[column] = math.nan
    history_frame = history_frame[wanted].sort_values(["trial_id", "epoch"], ignore_index=True)
    return trials, history_frame


def _export_best(best: ray_tune.Result, url: str) -> str:
    """Copy the best trial's last exported bundle to ``url``; returns its ``model_id``."""
    if best.checkpoint is None:
        raise TuneError(f"best trial at {best.path} left no checkpoint")
    with best.checkpoint.as_directory() as checkpoint_dir:
        bundle_dir = os.path.join(checkpoint_dir, _BUNDLE_FOLDER)
        storage.makedirs(url)
        for name in sorted(os.listdir(bundle_dir)):
            with open(os.path.join(bundle_dir, name), "rb") as f:
                storage.write_bytes(storage.join(url, name), f.read())
    return json.loads(storage.read_bytes(storage.join(url, "bundle.json")))["model_id"]
