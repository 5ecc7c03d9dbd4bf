"""Training with Ray Train (DDP over N workers): one harness for every recipe, and the export.

The driver (:func:`train`) reads the patch table's ``train`` split with Ray Data (shuffled
across volumes, seeded), runs the GAN recipe and, with ``train.baselines``, the aCAE recipe
(:mod:`anogan_ray.core.recipes`) through the same harness (:func:`make_trainer`: each worker trains
its shard, every module wrapped in DDP, gloo on CPU, NCCL on GPU), fits the PCA baseline and
exports the model bundle. Layout of the stage folder ``out``:

    out/config.json, generator.pt, discriminator.pt, [acae.pt, pca.npz], bundle.json
                                                    the model bundle
    out/summary.json                                steps, time, patches/s, generative quality
    out/generative_quality.json                     sliced Wasserstein distance per epoch
    out/samples/epoch_001.png, ...                  G(z) for a fixed z per epoch
    out/_runs/<run_name>/checkpoint_<step>/         Ray Train checkpoints of the GAN
    out/_runs/<run_name>-acae/checkpoint_<step>/    ... of the aCAE

Re-running with the same ``train.run_name`` resumes from the last checkpoint; a worker that
dies is restarted from it (``train.max_failures``). Checkpoints are taken every
``train.checkpoint_every`` steps, at the last step, and at an epoch's end when the last one is
at least one poll of Ray Train's controller old (2 s on a cluster, 0.25 s on a local Ray; every
epoch's end in a Tune trial): the controller takes one report per poll and short epochs would
wait for it.

After the first epoch, the last, and any other that ends at least ``PROGRESS_EVERY_S`` after the
last such line, rank 0 logs one line (:func:`anogan_ray.pipelines.progress.epoch_line`): the
epoch and step, the recipe's step metrics averaged over the epoch, the generative quality, the
epoch's seconds and the time left; Ray forwards it to the driver's output. Short epochs (the
demo's take seconds) thus make a line every ``PROGRESS_EVERY_S``, as the other stages' progress.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn as nn

from anogan_ray import storage
from anogan_ray.config import Config, ModelConfig, config_from_dict
from anogan_ray.core.baselines import PCABaseline
from anogan_ray.core.export import SAMPLE_GRID, export_bundle, exported_models, sample_grid_png
from anogan_ray.core.model import QUALITY_FILE
from anogan_ray.core.networks import sample_latent
from anogan_ray.core.recipes import (
    ACAE,
    ENCODER,
    GAN,
    RECIPES,
    Recipe,
    freeze,
    patch_features,
    sliced_wasserstein,
    training_precision,
    unwrap,
)
from anogan_ray.pipelines.progress import PROGRESS_EVERY_S, epoch_line
from anogan_ray.ray_env import TRAIN_POLL_ENV, ensure_ray, hold_train_reports, train_log_level
from anogan_ray.tables import count_patches, decode_pixels, patch_table_url, read_patch_table

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
RUNS_FOLDER = "_runs"  # Ray Train run storage inside the stage folder
SAMPLES_FOLDER = "samples"
_STATE_FILE = "state.pt"  # tensors and plain containers only (loaded with weights_only=True)
_META_FILE = "meta.json"  # model config, data fingerprint, step: checked before resuming
_SHUFFLE_BUFFER = 1024  # rows in each worker's local shuffle buffer (on top of the global shuffle)
_QUALITY_SAMPLES = 512  # real and generated patches of the generative-quality figure
_PCA_SAMPLES = 20_000  # training patches the PCA baseline is fitted on (at most)


class TrainError(ValueError):
    """Training input or a previous run that cannot be used."""


@dataclass
class TrainingPatches:
    """The ``train`` split of a patch table, read once and kept in Ray's object store."""

    dataset: (
        ray.data.Dataset
    )  # ``patch_id`` and ``pixels`` (uint8, 64 x 64), shuffled, materialized
    num_patches: int
    fingerprint: str  # hash of the set of train patch ids (independent of files and order)
    url: str


def read_training_patches(patches: str, seed: int = 0) -> TrainingPatches:
    """Read the ``split=train`` partition of the patch table at ``patches``, shuffled.

    ``patches`` is the patch table folder or the preprocess stage folder that holds it. Only
    ``patch_id`` and ``pixels`` are kept; labels are never used for training. The rows are
    shuffled globally with ``seed`` (the table is written one volume per block, so without it a
    batch would come from one or two eyes and BatchNorm would see one eye per step) and the
    dataset is materialized, so every epoch reuses it and the training workers can take every
    CPU. Each epoch then reads it through a seeded local shuffle buffer.

    Raises:
        TrainError: the table has no ``split=train`` partition or it holds no patches.
        TableError: a file of it cannot be read or lacks a column of the patch table.
    """
    patches = patch_table_url(patches)  # the table, or the preprocess stage folder holding it
    check_training_patches(patches)
    options = ray.data.DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True  # files in order: seeded rows
    try:
        table = read_patch_table(patches, [TRAIN_SPLIT]).select_columns(["patch_id", "pixels"])
        table = table.random_shuffle(seed=seed).materialize()
    finally:
        options.preserve_order = saved
    num_patches = table.count()
    # the fingerprint depends on which patches there are, not on file names or row order
    id_hash_sum = 0
    for batch in table.select_columns(["patch_id"]).iter_batches(batch_format="numpy"):
        for pid in batch["patch_id"]:
            id_hash_sum += int.from_bytes(hashlib.sha256(str(pid).encode()).digest()[:8], "little")
    fingerprint = hashlib.sha256(f"{num_patches}:{id_hash_sum % 2**64}".encode()).hexdigest()[:16]
    return TrainingPatches(table, num_patches, fingerprint, patches)


def check_training_patches(patches: str) -> int:
    """Check, before any Ray work, that ``patches`` is a patch table with ``train`` patches.

    Returns:
        The number of ``train`` patches (from the Parquet footers).

    Raises:
        TrainError: the table has no ``split=train`` partition or it holds no patches.
        TableError: a file of it cannot be read or lacks a column of the patch table.
    """
    url = patch_table_url(patches)
    if not storage.list_files(storage.join(url, f"split={TRAIN_SPLIT}"), suffix=".parquet"):
        raise TrainError(
            f"patch table {url}: no Parquet files under split={TRAIN_SPLIT}/ "
            "(expected a table written by `anogan-ray preprocess`, hive-partitioned by split)"
        )
    count = count_patches(url, [TRAIN_SPLIT], columns=["patch_id", "pixels"])  # all it reads
    if count == 0:
        raise TrainError(f"patch table {url}: split={TRAIN_SPLIT} holds no patches")
    return count


def train(patches: str, out: str, cfg: Config) -> dict:
    """Train G and D (and the baselines) on the ``train`` split and export the bundle to ``out``.

    Args:
        patches: the patch table folder (local or ``s3://``).
        out: the stage folder; it becomes the model bundle (``load_bundle(out)``) and holds the
            run's checkpoints, sample grids and ``summary.json``.
        cfg: the whole configuration; ``cfg.model`` and ``cfg.train`` are used.

    Returns:
        The summary, also written to ``out/summary.json``.
    """
    started = time.monotonic()
    patches, out = storage.absolute(patches), storage.absolute(out)  # workers run elsewhere
    check_training_patches(patches)  # before Ray starts: a wrong folder is one line
    ensure_ray()
    train_cfg = cfg.train
    data = read_training_patches(patches, seed=train_cfg.seed)
    steps_per_epoch, total_steps = plan_steps(data, cfg)
    recipes = [GAN]
    recipes += [ENCODER] if train_cfg.encoder else []
    recipes += [ACAE] if train_cfg.baselines else []
    for recipe in recipes:
        _check_previous_run(run_url(out, cfg, recipe), cfg.model, data.fingerprint)
    real_pixels = batchnorm_pixels(data, cfg)
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # recipe -> (state, metrics)
    for recipe in recipes:
        frozen = None
        if recipe.frozen:  # the encoder maps onto the exported G and D, frozen
            generator, discriminator = exported_models(results[GAN.name][0], cfg, real_pixels)
            frozen = {"generator": generator, "discriminator": discriminator}
        trainer = make_trainer(
            data,
            out,
            cfg,
            recipe=recipe,
            frozen=frozen,
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise TrainError(
                f"training run {run_url(out, cfg, recipe)} finished without a checkpoint"
            )
        with result.checkpoint.as_directory() as checkpoint_dir:
            results[recipe.name] = (_read_state(checkpoint_dir), dict(result.metrics))
    state, metrics = results[GAN.name]
    pca = fit_pca(data, cfg) if train_cfg.baselines else None
    export = export_bundle(
        out,
        state,
        cfg,
        metadata={
            "run_name": train_cfg.run_name,
            "run": run_url(out, cfg, GAN),
            "step": state["step"],
            "epochs": state["step"] / steps_per_epoch,
            "data_fingerprint": data.fingerprint,
            "patch_table": patches,
            "train_patches": data.num_patches,
            "train_config": cfg.to_dict()["train"],
        },
        encoder_state=results[ENCODER.name][0] if ENCODER.name in results else None,
        acae_state=results[ACAE.name][0] if ACAE.name in results else None,
        pca=pca,
        real_pixels=real_pixels,
    )
    summary = {
        "stage": "train",
        "patch_table": patches,
        "train_patches": data.num_patches,
        "num_workers": train_cfg.num_workers,
        "steps": state["step"],
        "steps_per_epoch": steps_per_epoch,
        "epochs": state["step"] / steps_per_epoch,
        "resumed_from_step": metrics.get("start_step", 0),
        "wall_seconds": round(time.monotonic() - started, 2),
        "train_seconds": metrics.get("train_seconds"),
        "patches_per_s": metrics.get("patches_per_s"),
        "final_metrics": {name: metrics.get(name) for name in GAN.metric_names},
        "generative_quality": read_generative_quality(out),
        "replicas_identical": metrics.get("replicas_identical"),
        "other_models": {  # the encoder and the baselines, trained after the GAN
            name: {
                "steps": results[name][0]["step"],
                "resumed_from_step": m.get("start_step", 0),
                "train_seconds": m.get("train_seconds"),
                "final_metrics": {key: m.get(key) for key in RECIPES[name].metric_names},
            }
            for name, (_, m) in results.items()
            if name != GAN.name
        }
        | ({"pca": {"components": int(pca.components.shape[0])}} if pca is not None else {}),
        "model_id": export["model_id"],
        "bundle": out,
        "run": run_url(out, cfg, GAN),
        "samples": storage.list_files(storage.join(out, SAMPLES_FOLDER), suffix=".png"),
        "batchnorm_check": export["batchnorm_check"],
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    log.info("trained %s steps; bundle %s at %s", summary["steps"], export["model_id"], out)
    return summary


def recipe_config(cfg: Config, recipe: Recipe) -> Config:
    """The configuration a recipe trains with: the encoder's own epochs when given."""
    if recipe is ENCODER and cfg.train.encoder_epochs:
        return dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.encoder_epochs)
        )
    return cfg


def run_name(cfg: Config, recipe: Recipe = GAN) -> str:
    """The Ray Train run name of a recipe: ``train.run_name`` for the GAN, ``<name>-acae``, ..."""
    return cfg.train.run_name if recipe is GAN else f"{cfg.train.run_name}-{recipe.name}"


def run_url(out: str, cfg: Config, recipe: Recipe = GAN) -> str:
    """Where a recipe's Ray Train run keeps its checkpoints."""
    return storage.join(out, RUNS_FOLDER, run_name(cfg, recipe))


def plan_steps(data: TrainingPatches, cfg: Config) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` of a run over ``data``: full batches of every shard.

    Raises:
        TrainError: fewer training patches than one batch on every worker.
    """
    train_cfg = cfg.train
    shard_size = data.num_patches // train_cfg.num_workers  # streaming_split(equal=True)
    steps_per_epoch = shard_size // train_cfg.batch_size  # full batches only (BatchNorm)
    if steps_per_epoch == 0:
        raise TrainError(
            f"patch table {data.url}: {data.num_patches} training patches are fewer than "
            f"train.batch_size x train.num_workers = {train_cfg.batch_size * train_cfg.num_workers}"
        )
    total_steps = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)
    return steps_per_epoch, total_steps


EpochEnd = Callable[[dict[str, Any]], dict[str, Any]]


def make_trainer(
    data: TrainingPatches,
    out: str,
    cfg: Config,
    *,
    recipe: Recipe = GAN,
    epoch_end: EpochEnd | None = None,
    callbacks: list | None = None,
    frozen: dict[str, nn.Module] | None = None,
) -> ray.train.torch.TorchTrainer:
    """The ``TorchTrainer`` of a training run: ``anogan-ray train`` and every sweep trial.

    The run's checkpoints go to :func:`run_url` (the same name resumes), the GAN's sample grids
    to ``out/samples`` and its generative-quality figure to ``out/generative_quality.json``.

    Args:
        recipe: what is trained (:data:`anogan_ray.core.recipes.GAN` or another recipe).
        epoch_end: called on rank 0 after every epoch (and at the last step) with the state of
            the recipe's modules (CPU state dicts under their names, e.g. ``"generator"``) and
            ``"epoch"``; the metrics it returns are reported with the epoch's. A sweep evaluates
            its objective here.
        callbacks: Ray Train callbacks (a sweep trial's ``TuneReportCallback``).
        frozen: the recipe's frozen modules (the exported G and D for the encoder).
    """
    cfg = recipe_config(cfg, recipe)
    train_cfg = cfg.train
    steps_per_epoch, total_steps = plan_steps(data, cfg)
    storage_fs, storage_path = storage.arrow_filesystem(storage.join(out, RUNS_FOLDER))
    reference = None
    if recipe.samples is not None:  # fixed real patches for the generative-quality figure
        reference = _sample_pixels(data, 2 * _QUALITY_SAMPLES)
    loop_config = {
        "config": cfg.to_dict(),
        "recipe": recipe.name,
        "out": out,
        "fingerprint": data.fingerprint,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "epoch_end": epoch_end,
        "reference_pixels": reference,
        "frozen": {name: module.state_dict() for name, module in (frozen or {}).items()},
        "log_level": train_log_level(),
    }
    resources = {"CPU": 1, "GPU": 1} if train_cfg.use_gpu else {"CPU": 1}
    return ray.train.torch.TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, recipe),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            # its per-report and worker-group lines only when asked for (anogan-ray --verbose)
            logging_config=ray.train.LoggingConfig(log_level=loop_config["log_level"]),
        ),
        datasets={TRAIN_SPLIT: data.dataset},
        dataset_config=ray.train.DataConfig(execution_options=_ingest_options()),
    )


def _ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default options for feeding its workers, as ``DataConfig`` builds them from
    this driver's ``DataContext``, less the deprecated ``exclude_resources``: Ray 2.60's default
    passes it along and its dataset manager warns about it in every run."""
    options = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=options.resource_limits,
        preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    )


def _check_previous_run(run_url: str, model_cfg: ModelConfig, fingerprint: str) -> None:
    """Refuse to resume a run that trained another architecture or on other data."""
    for meta_url in storage.list_files(run_url, suffix=_META_FILE):
        meta = storage.read_json(meta_url)
        if meta["model"] != _model_dict(model_cfg):
            raise TrainError(
                f"run {run_url} was trained with model {meta['model']}, not "
                f"{_model_dict(model_cfg)}: choose another train.run_name or delete the run"
            )
        if meta["data_fingerprint"] != fingerprint:
            raise TrainError(
                f"run {run_url} was trained on other patches (fingerprint "
                f"{meta['data_fingerprint']}, now {fingerprint}): choose another train.run_name"
            )


def _model_dict(model_cfg: ModelConfig) -> dict[str, Any]:
    return json.loads(json.dumps(model_cfg.__dict__))


def _sample_pixels(data: TrainingPatches, count: int) -> np.ndarray:
    """The first ``count`` rows of the (shuffled) training table: (N, 64, 64) uint8.

    The table is shuffled across the cohort with ``train.seed`` when read, so its first rows are
    a random sample of every volume, always the same ones for the same table and seed.
    """
    batch = data.dataset.limit(count).take_batch(count, batch_format="numpy")
    return np.stack(list(batch["pixels"])).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The worker: one DDP replica of the recipe's modules
# ---------------------------------------------------------------------------------------------


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    hold_train_reports(config["log_level"])
    cfg = config_from_dict(config["config"])
    recipe = RECIPES[config["recipe"]]
    model_cfg, train_cfg = cfg.model, cfg.train
    out, epoch_end = config["out"], config["epoch_end"]
    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = training_precision(device, train_cfg.precision)

    modules = recipe.build(model_cfg, train_cfg.seed)
    freeze(recipe, modules, config["frozen"])
    trained = [name for name in modules if name not in recipe.frozen]
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            state = _read_state(checkpoint_dir)
        for name in trained:
            modules[name].load_state_dict(state[name])
    # Each trained module is its own DDP module: its gradients are averaged in its own backward
    # passes. DDP broadcasts rank 0's BatchNorm buffers at each forward.
    for name, module in modules.items():
        modules[name] = (
            ray.train.torch.prepare_model(module) if name in trained else module.to(device)
        )
    optimizers = recipe.optimizers(modules, train_cfg)
    step = 0
    if state is not None:
        rates = recipe.learning_rates(train_cfg)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state[f"optimizer_{name}"])
            for group in optimizer.param_groups:  # the config's rates, not the checkpoint's
                group["lr"] = rates[name]
        step = int(state["step"])
    start_step = step
    # every worker draws its own z; the epoch previews use one fixed z
    torch.manual_seed(train_cfg.seed * 1000 + rank + 7919 * step)
    preview_z = sample_latent(
        _QUALITY_SAMPLES, model_cfg, torch.Generator().manual_seed(train_cfg.seed)
    ).to(device)

    num_metrics = len(recipe.metric_names)
    # the step metrics and the number of steps (last column), summed since the last report
    # (row 0) and since the epoch began (row 1)
    sums = torch.zeros(2, num_metrics + 1, device=device)
    shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
    train_started = epoch_started = time.monotonic()
    epochs = math.ceil(total_steps / steps_per_epoch)

    last_report = time.monotonic()
    report_interval_s = float(os.environ.get(TRAIN_POLL_ENV, 2.0))  # Ray's default 2 s
    last_line: float | None = None  # when rank 0 last logged an epoch line

    def report(
        epoch_done: float,
        with_checkpoint: bool,
        final: bool,
        evaluate: bool,
        quality: float | None = None,
        optional: bool = False,
    ) -> None:
        """Log the epoch's line (``evaluate``) and report to Ray Train (a collective: every rank
        calls it at the same steps). An ``optional`` report (an epoch's end, outside Tune and
        between checkpoint steps) is made only when rank 0 last reported a poll of Ray Train's
        controller ago (it takes one report per poll, and a report made sooner waits for it);
        otherwise its metrics carry over to the next report."""
        nonlocal last_report, last_line
        due = not optional or (rank == 0 and time.monotonic() - last_report >= report_interval_s)
        totals = torch.cat([sums.flatten(), sums.new_tensor([float(due)])])
        if world_size > 1:
            torch.distributed.all_reduce(totals)  # rank 0's decision reaches every rank
        due = bool(totals[-1] > 0)
        since_report, this_epoch = totals[:-1].view_as(sums).tolist()
        if evaluate and this_epoch[-1] > 0:
            sums[1] = 0
            now = time.monotonic()
            if rank == 0 and (final or last_line is None or now - last_line >= PROGRESS_EVERY_S):
                last_line = now
                seconds_per_step = (now - train_started) / max(step - start_step, 1)
                epoch_means = [value / this_epoch[-1] for value in this_epoch[:-1]]
                line = epoch_line(
                    run_name(cfg, recipe),
                    math.ceil(epoch_done),
                    epochs,
                    step,
                    total_steps,
                    dict(zip(recipe.metric_names, epoch_means)),
                    epoch_seconds=now - epoch_started,
                    seconds_left=seconds_per_step * (total_steps - step),
                    quality=quality,
                )
                log.info(line)
        if not due:
            return
        means = [value / max(since_report[-1], 1) for value in since_report[:-1]]
        metrics: dict[str, Any] = {"step": step, "epoch": epoch_done, "start_step": start_step}
        metrics.update(zip(recipe.metric_names, means))
        sums[0] = 0
        if evaluate and epoch_end is not None and rank == 0:
            metrics.update(epoch_end({**_cpu_states(modules, trained), "epoch": epoch_done}))
        if final:
            elapsed = time.monotonic() - train_started
            patches_seen = (step - start_step) * train_cfg.batch_size * world_size
            metrics["train_seconds"] = round(elapsed, 3)
            metrics["patches_per_s"] = round(patches_seen / elapsed, 2) if patches_seen else None
            digests = _replica_digests([modules[name] for name in trained], world_size)
            metrics["replica_digests"] = digests
            metrics["replicas_identical"] = len(set(digests)) == 1
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as checkpoint_dir:
                _write_checkpoint(
                    checkpoint_dir,
                    recipe,
                    {name: modules[name] for name in trained},
                    optimizers,
                    step,
                    cfg,
                    config["fingerprint"],
                )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                    checkpoint_dir_name=checkpoint_name(step),
                )
        else:
            ray.train.report(metrics)
        last_report = time.monotonic()

    first_epoch = step // steps_per_epoch
    for epoch in range(first_epoch, train_cfg.epochs):
        if step >= total_steps:
            break
        epoch_started = time.monotonic()
        skip = step - epoch * steps_per_epoch  # batches this epoch already trained on (resume)
        batches = shard.iter_batches(
            batch_size=train_cfg.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=_SHUFFLE_BUFFER,
            # a seeded order per run seed, epoch and rank: the same on a resume and a rerun
            local_shuffle_seed=(train_cfg.seed * 1_000_003 + epoch * 1009 + rank) % 2**32,
        )
        for batch_index, batch in enumerate(batches):
            if batch_index >= steps_per_epoch or step >= total_steps:
                break
            if batch_index < skip:
                continue
            real = torch.from_numpy(decode_pixels(batch["pixels"])).unsqueeze(1).to(device)
            # real: (B, 1, 64, 64) in [-1, 1]
            with precision:
                step_metrics = recipe.step(modules, optimizers, real, model_cfg, train_cfg)
            sums += torch.cat([step_metrics, step_metrics.new_ones(1)])  # to both rows
            step += 1
            end_of_epoch = batch_index + 1 == steps_per_epoch
            final = step >= total_steps
            quality = None
            if end_of_epoch and rank == 0 and recipe.samples is not None:
                generator = unwrap(modules[recipe.samples])
                _write_sample_grid(out, epoch + 1, generator, preview_z[: SAMPLE_GRID**2])
                quality = _record_generative_quality(
                    out, epoch + 1, step, generator, preview_z, config["reference_pixels"]
                )
            checkpoint_due = step % train_cfg.checkpoint_every == 0
            if end_of_epoch or final or checkpoint_due:
                report(
                    step / steps_per_epoch,
                    with_checkpoint=True,
                    final=final,
                    evaluate=end_of_epoch or final,
                    quality=quality,
                    optional=not (final or checkpoint_due or epoch_end is not None),
                )
    if start_step >= total_steps:  # nothing left to train: the run had already finished
        report(step / steps_per_epoch, with_checkpoint=False, final=True, evaluate=True)


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint taken at ``step`` inside a run's storage."""
    return f"checkpoint_{step:09d}"


def _replica_digests(modules: list[nn.Module], world_size: int) -> list:
    """sha256 of every worker's parameters (identical when DDP kept them in step)."""
    digest = hashlib.sha256()
    for module in modules:
        for tensor in unwrap(module).parameters():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    digests = [digest.hexdigest()[:16]]
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, digests[0])
        digests = gathered
    return digests


def _write_checkpoint(
    checkpoint_dir: str,
    recipe: Recipe,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    step: int,
    cfg: Config,
    fingerprint: str,
) -> None:
    state: dict[str, Any] = {**_cpu_states(modules), "step": step}
    for name, optimizer in optimizers.items():
        state[f"optimizer_{name}"] = optimizer.state_dict()
    torch.save(state, os.path.join(checkpoint_dir, _STATE_FILE))
    meta = {
        "step": step,
        "recipe": recipe.name,
        "model": _model_dict(cfg.model),
        "data_fingerprint": fingerprint,
        "config": cfg.to_dict(),
    }
    with open(os.path.join(checkpoint_dir, _META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _cpu_states(
    modules: dict[str, nn.Module], names: list[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {key: value.detach().cpu() for key, value in unwrap(module).state_dict().items()}
        for name, module in modules.items()
        if names is None or name in names
    }


def _read_state(checkpoint_dir: str) -> dict[str, Any]:
    path = os.path.join(checkpoint_dir, _STATE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Progress a person can see: sample grids and the generative-quality figure
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _record_generative_quality(
    out: str, epoch: int, step: int, generator: nn.Module, z: torch.Tensor, reference: np.ndarray
) -> float:
    """Append this epoch's sliced Wasserstein distance (G's samples vs real patches) to the file
    and return it.

    G runs on a copy in train mode (batch statistics, as the previews), on a fixed z; the real
    patches are a fixed sample of the training table; the features are fixed (4 x 4 pools), so
    the figure does not depend on the D being trained. ``real_vs_real`` (two disjoint real samples)
    is the floor a perfect G would reach.
    """
    samples = copy.deepcopy(generator).train()(z).cpu().numpy()  # (N, 1, 64, 64)
    real = decode_pixels(reference)
    half = len(real) // 2
    features_real = patch_features(real[:half])
    url = storage.join(out, QUALITY_FILE)
    record = storage.read_json(url) if storage.exists(url) else {"epochs": {}}
    if "real_vs_real" not in record:
        record["real_vs_real"] = sliced_wasserstein(features_real, patch_features(real[half:]))
    record["metric"] = "sliced Wasserstein-1, 256 projections of 4x4-pooled patches"
    distance = sliced_wasserstein(features_real, patch_features(samples))
    record["epochs"][str(epoch)] = {"step": step, "sliced_wasserstein": distance}
    storage.write_json(url, record)
    return distance


def read_generative_quality(out: str) -> dict[str, Any] | None:
    """The generative-quality record of a training run folder (None when there is none)."""
    url = storage.join(out, QUALITY_FILE)
    return storage.read_json(url) if storage.exists(url) else None


@torch.no_grad()
def _write_sample_grid(out: str, epoch: int, generator: nn.Module, z: torch.Tensor) -> None:
    """``out/samples/epoch_XXX.png``: G(z) for a fixed z, 8 x 8 patches, so a user sees progress."""
    preview = copy.deepcopy(generator).train()  # batch statistics; training's buffers untouched
    samples = preview(z).squeeze(1).cpu().numpy()  # (64, 64, 64) in [-1, 1]
    storage.write_bytes(
        storage.join(out, SAMPLES_FOLDER, f"epoch_{epoch:03d}.png"), sample_grid_png(samples)
    )


# ---------------------------------------------------------------------------------------------
# Export: final BatchNorm statistics, then the bundle
# ---------------------------------------------------------------------------------------------


def batchnorm_pixels(data: TrainingPatches, cfg: Config) -> np.ndarray:
    """The real patches D's BatchNorm statistics are computed over: (N, 64, 64) uint8.

    A random sample of ``train.batchnorm_samples`` patches across the whole training table
    (whole batches, at least one; see :func:`_sample_pixels`).
    """
    batch_size = cfg.train.batch_size
    count = max(1, cfg.train.batchnorm_samples // batch_size) * batch_size
    pixels = _sample_pixels(data, count)
    return pixels[: len(pixels) // batch_size * batch_size]


def fit_pca(data: TrainingPatches, cfg: Config) -> PCABaseline:
    """The PCA baseline: ``train.pca_components`` components of a random training sample."""
    pixels = decode_pixels(_sample_pixels(data, min(data.num_patches, _PCA_SAMPLES)))
    return PCABaseline.fit(pixels, cfg.train.pca_components, seed=cfg.train.seed)
