"""Adversarial training of AnoGAN's DCGAN with Ray Train (DDP over N workers).

The driver (:func:`train`) reads the patch table's ``train`` split with Ray Data, starts a
``TorchTrainer`` whose workers each train on their shard (G and D each wrapped in DDP, gloo on
CPU, NCCL on GPU), and exports the final model bundle. Layout of the stage folder ``out``:

    out/config.json, generator.pt, discriminator.pt, bundle.json    the model bundle
    out/summary.json                                                steps, time, patches/s
    out/samples/epoch_001.png, ...                                  G(z) for a fixed z per epoch
    out/_runs/<run_name>/checkpoint_<step>/                         Ray Train checkpoints

Re-running with the same ``train.run_name`` resumes from the last checkpoint; a worker that
dies is restarted from it (``train.max_failures``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from anogan_ray import storage
from anogan_ray.config import Config, ModelConfig, config_from_dict
from anogan_ray.model import (
    Discriminator,
    Generator,
    build_models,
    finalize_batchnorm,
    sample_latent,
    save_bundle,
)
from anogan_ray.patches import decode_pixels
from anogan_ray.pipelines import ensure_ray
from anogan_ray.pipelines.preprocess import read_patch_table

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
RUNS_FOLDER = "_runs"  # Ray Train run storage inside the stage folder
SAMPLES_FOLDER = "samples"
_STATE_FILE = "state.pt"  # tensors and plain containers only (loaded with weights_only=True)
_META_FILE = "meta.json"  # model config, data fingerprint, step: checked before resuming
_SAMPLE_GRID = 8  # the epoch previews are 8 x 8 patches
_SHUFFLE_BUFFER = 1024  # rows in each worker's local shuffle buffer


class TrainError(ValueError):
    """Training input or a previous run that cannot be used."""


@dataclass
class TrainingPatches:
    """The ``train`` split of a patch table, read once and kept in Ray's object store."""

    dataset: ray.data.Dataset  # ``patch_id`` and ``pixels`` (uint8, 64 x 64), materialized
    num_patches: int
    fingerprint: str  # hash of the set of train patch ids (independent of files and order)
    url: str


def read_training_patches(patches: str) -> TrainingPatches:
    """Read the ``split=train`` partition of the patch table at ``patches``.

    ``patches`` is the patch table folder or the preprocess stage folder that holds it. Only
    ``patch_id`` and ``pixels`` are kept; labels are never used for training. The dataset is materialized,
    so every epoch reuses it and the training workers can take every CPU.

    Raises:
        TrainError: the table has no ``split=train`` partition or it holds no patches.
    """
    if storage.exists(storage.join(patches, "patches")):
        patches = storage.join(patches, "patches")  # the preprocess stage folder
    split_url = storage.join(patches, f"split={TRAIN_SPLIT}")
    files = storage.list_files(split_url, suffix=".parquet")
    if not files:
        raise TrainError(
            f"patch table {patches}: no Parquet files under split={TRAIN_SPLIT}/ "
            "(expected a table written by `anogan-ray preprocess`, hive-partitioned by split)"
        )
    table = read_patch_table(patches, [TRAIN_SPLIT]).select_columns(["patch_id", "pixels"])
    table = table.materialize()
    num_patches = table.count()
    if num_patches == 0:
        raise TrainError(f"patch table {patches}: split={TRAIN_SPLIT} holds no patches")
    # the fingerprint depends on which patches there are, not on file names or row order
    id_hash_sum = 0
    for batch in table.select_columns(["patch_id"]).iter_batches(batch_format="numpy"):
        for pid in batch["patch_id"]:
            id_hash_sum += int.from_bytes(hashlib.sha256(str(pid).encode()).digest()[:8], "little")
    fingerprint = hashlib.sha256(f"{num_patches}:{id_hash_sum % 2**64}".encode()).hexdigest()[:16]
    return TrainingPatches(table, num_patches, fingerprint, patches)


def train(patches: str, out: str, cfg: Config, *, crash_at_step: int | None = None) -> dict:
    """Train G and D on the patch table's ``train`` split and export the model bundle to ``out``.

    Args:
        patches: the patch table folder (local or ``s3://``).
        out: the stage folder; it becomes the model bundle (``load_bundle(out)``) and holds the
            run's checkpoints, sample grids and ``summary.json``.
        cfg: the whole configuration; ``cfg.model`` and ``cfg.train`` are used.
        crash_at_step: fault-injection for tests: the last worker kills its own process
            (SIGKILL) once at this step, in a run not restored from a checkpoint.

    Returns:
        The summary, also written to ``out/summary.json``.
    """
    started = time.monotonic()
    patches, out = storage.absolute(patches), storage.absolute(out)  # workers run elsewhere
    ensure_ray()
    train_cfg = cfg.train
    data = read_training_patches(patches)
    steps_per_epoch, total_steps = plan_steps(data, cfg)
    run_url = storage.join(out, RUNS_FOLDER, train_cfg.run_name)
    _check_previous_run(run_url, cfg.model, data.fingerprint)
    trainer = make_trainer(data, out, cfg, crash_at_step=crash_at_step)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainError(f"training run {run_url} finished without a checkpoint")
    metrics = dict(result.metrics)

    with result.checkpoint.as_directory() as checkpoint_dir:
        state = _read_state(checkpoint_dir)
    export = export_bundle(
        out,
        state,
        cfg,
        data,
        metadata={
            "run_name": train_cfg.run_name,
            "run": run_url,
            "step": state["step"],
            "epochs": state["step"] / steps_per_epoch,
            "data_fingerprint": data.fingerprint,
            "patch_table": patches,
            "train_patches": data.num_patches,
            "train_config": cfg.to_dict()["train"],
        },
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
        "final_metrics": {
            key: metrics.get(key) for key in ("d_loss", "g_loss", "d_real", "d_fake")
        },
        "replicas_identical": metrics.get("replicas_identical"),
        "model_id": export["model_id"],
        "bundle": out,
        "run": run_url,
        "samples": storage.list_files(storage.join(out, SAMPLES_FOLDER), suffix=".png"),
        "batchnorm_check": export["batchnorm_check"],
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    log.info("trained %s steps; bundle %s at %s", summary["steps"], export["model_id"], out)
    return summary


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
    epoch_end: EpochEnd | None = None,
    callbacks: list | None = None,
    crash_at_step: int | None = None,
) -> ray.train.torch.TorchTrainer:
    """The ``TorchTrainer`` of a training run: ``anogan-ray train`` and every sweep trial.

    The run's checkpoints go to ``out/_runs/<train.run_name>`` (the same name resumes), its
    sample grids to ``out/samples``.

    Args:
        epoch_end: called on rank 0 after every epoch (and at the last step) with the state of
            G and D (CPU state dicts, ``"generator"`` and ``"discriminator"``) and ``"epoch"``;
            the metrics it returns are reported with the epoch's. A sweep evaluates its
            objective here.
        callbacks: Ray Train callbacks (a sweep trial's ``TuneReportCallback``).
        crash_at_step: see :func:`train`.
    """
    train_cfg = cfg.train
    steps_per_epoch, total_steps = plan_steps(data, cfg)
    storage_fs, storage_path = storage.arrow_filesystem(storage.join(out, RUNS_FOLDER))
    loop_config = {
        "config": cfg.to_dict(),
        "out": out,
        "fingerprint": data.fingerprint,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "crash_at_step": crash_at_step,
        "epoch_end": epoch_end,
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
            name=train_cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={TRAIN_SPLIT: data.dataset},
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


# ---------------------------------------------------------------------------------------------
# The worker: one DDP replica of G and D
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (``prepare_model`` does not wrap a single worker)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real: torch.Tensor,
    model_cfg: ModelConfig,
    *,
    real_target: torch.Tensor | None = None,
    fake_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """One adversarial update of D, then of G, on a batch of real patches.

    G and D may be DDP-wrapped; z is drawn from torch's global generator, one per real patch.

    Args:
        real: (B, 1, 64, 64) patches in [-1, 1], on the models' device.
        real_target, fake_target: (B,) ones and zeros (made here when not given).

    Returns:
        A detached (4,) tensor: D's loss, G's loss, mean D(x), mean D(G(z)) before D's update.
    """
    batch_size = real.shape[0]
    if real_target is None:
        real_target = torch.ones(batch_size, device=real.device)
    if fake_target is None:
        fake_target = torch.zeros(batch_size, device=real.device)

    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    optimizer_d.zero_grad(set_to_none=True)
    real_logits = discriminator(real)  # (B,)
    loss_d_real = F.binary_cross_entropy_with_logits(real_logits, real_target)
    loss_d_real.backward()
    z = sample_latent(batch_size, model_cfg, device=real.device)  # (B, latent_dim)
    fake = generator(z)  # (B, 1, 64, 64)
    fake_logits = discriminator(fake.detach())
    loss_d_fake = F.binary_cross_entropy_with_logits(fake_logits, fake_target)
    loss_d_fake.backward()
    optimizer_d.step()

    # (2) Update G network: maximize log(D(G(z))), the non-saturating form of
    # minimizing log(1 - D(G(z))) (same fixed point, stronger gradients early on).
    # D runs outside its DDP wrapper with frozen weights: only G's gradients are synced.
    optimizer_g.zero_grad(set_to_none=True)
    plain_discriminator = _unwrap(discriminator).requires_grad_(False)
    loss_g = F.binary_cross_entropy_with_logits(plain_discriminator(fake), real_target)
    loss_g.backward()
    plain_discriminator.requires_grad_(True)
    optimizer_g.step()

    with torch.no_grad():
        return torch.stack(
            [
                (loss_d_real + loss_d_fake).detach(),
                loss_g.detach(),
                torch.sigmoid(real_logits).mean(),
                torch.sigmoid(fake_logits).mean(),
            ]
        )


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = config_from_dict(config["config"])
    model_cfg, train_cfg = cfg.model, cfg.train
    out, epoch_end = config["out"], config["epoch_end"]
    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    generator, discriminator = build_models(model_cfg, seed=train_cfg.seed)
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            state = _read_state(checkpoint_dir)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
    # Each network is its own DDP module: G's and D's gradients are averaged in their own
    # backward passes. DDP broadcasts rank 0's BatchNorm buffers at each forward.
    generator = ray.train.torch.prepare_model(generator)
    discriminator = ray.train.torch.prepare_model(discriminator)
    betas = (train_cfg.beta1, 0.999)
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=train_cfg.lr_generator, betas=betas)
    optimizer_d = torch.optim.Adam(
        discriminator.parameters(), lr=train_cfg.lr_discriminator, betas=betas
    )
    step = 0
    if state is not None:
        optimizer_g.load_state_dict(state["optimizer_generator"])
        optimizer_d.load_state_dict(state["optimizer_discriminator"])
        for group in optimizer_g.param_groups:  # the config's rates, not the checkpoint's
            group["lr"] = train_cfg.lr_generator
        for group in optimizer_d.param_groups:
            group["lr"] = train_cfg.lr_discriminator
        step = int(state["step"])
    start_step = step
    # every worker draws its own z; the epoch previews use one fixed z
    torch.manual_seed(train_cfg.seed * 1000 + rank + 7919 * step)
    preview_z = sample_latent(
        _SAMPLE_GRID**2, model_cfg, torch.Generator().manual_seed(train_cfg.seed)
    ).to(device)

    real_target = torch.ones(train_cfg.batch_size, device=device)
    fake_target = torch.zeros(train_cfg.batch_size, device=device)
    sums = torch.zeros(4, device=device)  # d_loss, g_loss, D(x), D(G(z)) since the last report
    sums_steps = 0
    shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
    train_started = time.monotonic()

    def report(epoch_done: float, with_checkpoint: bool, final: bool, evaluate: bool) -> None:
        nonlocal sums, sums_steps
        totals = torch.cat([sums, torch.tensor([float(sums_steps)], device=device)])
        if world_size > 1:
            torch.distributed.all_reduce(totals)
        means = (totals[:4] / totals[4].clamp(min=1)).tolist()
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch_done,
            "start_step": start_step,
            "d_loss": means[0],
            "g_loss": means[1],
            "d_real": means[2],  # mean D(x), a probability
            "d_fake": means[3],  # mean D(G(z)) before D's update
        }
        sums, sums_steps = torch.zeros_like(sums), 0
        if evaluate and epoch_end is not None and rank == 0:
            state = {
                "generator": _cpu_state(_unwrap(generator)),
                "discriminator": _cpu_state(_unwrap(discriminator)),
                "epoch": epoch_done,
            }
            metrics.update(epoch_end(state))
        if final:
            elapsed = time.monotonic() - train_started
            patches_seen = (step - start_step) * train_cfg.batch_size * world_size
            metrics["train_seconds"] = round(elapsed, 3)
            metrics["patches_per_s"] = round(patches_seen / elapsed, 2) if patches_seen else None
            digests = _replica_digests(generator, discriminator, world_size)
            metrics["replica_digests"] = digests
            metrics["replicas_identical"] = len(set(digests)) == 1
        if not (with_checkpoint and rank == 0):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            _write_checkpoint(
                checkpoint_dir,
                generator,
                discriminator,
                optimizer_g,
                optimizer_d,
                step,
                cfg,
                config["fingerprint"],
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                checkpoint_dir_name=checkpoint_name(step),
            )

    first_epoch = step // steps_per_epoch
    for epoch in range(first_epoch, train_cfg.epochs):
        if step >= total_steps:
            break
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
            if (
                config["crash_at_step"] is not None
                and state is None
                and step == config["crash_at_step"]
                and rank == world_size - 1
            ):
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker failure, for the tests
            real = torch.from_numpy(decode_pixels(batch["pixels"])).unsqueeze(1).to(device)
            # real: (B, 1, 64, 64) in [-1, 1]
            sums += gan_step(
                generator,
                discriminator,
                optimizer_g,
                optimizer_d,
                real,
                model_cfg,
                real_target=real_target,
                fake_target=fake_target,
            )
            sums_steps += 1
            step += 1
            end_of_epoch = batch_index + 1 == steps_per_epoch
            final = step >= total_steps
            if end_of_epoch and rank == 0:
                _write_sample_grid(out, epoch + 1, _unwrap(generator), preview_z)
            if end_of_epoch or final or step % train_cfg.checkpoint_every == 0:
                report(
                    step / steps_per_epoch,
                    with_checkpoint=True,
                    final=final,
                    evaluate=end_of_epoch or final,
                )
    if start_step >= total_steps:  # nothing left to train: the run had already finished
        report(step / steps_per_epoch, with_checkpoint=False, final=True, evaluate=True)


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint taken at ``step`` inside a run's storage."""
    return f"checkpoint_{step:09d}"


def _replica_digests(generator: nn.Module, discriminator: nn.Module, world_size: int) -> list:
    """sha256 of every worker's G and D parameters (identical when DDP kept them in step)."""
    digest = hashlib.sha256()
    for module in (_unwrap(generator), _unwrap(discriminator)):
        for tensor in module.parameters():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    digests = [digest.hexdigest()[:16]]
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, digests[0])
        digests = gathered
    return digests


def _write_checkpoint(
    checkpoint_dir: str,
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    step: int,
    cfg: Config,
    fingerprint: str,
) -> None:
    state = {
        "generator": _cpu_state(_unwrap(generator)),
        "discriminator": _cpu_state(_unwrap(discriminator)),
        "optimizer_generator": optimizer_g.state_dict(),
        "optimizer_discriminator": optimizer_d.state_dict(),
        "step": step,
    }
    torch.save(state, os.path.join(checkpoint_dir, _STATE_FILE))
    meta = {
        "step": step,
        "model": _model_dict(cfg.model),
        "data_fingerprint": fingerprint,
        "config": cfg.to_dict(),
    }
    with open(os.path.join(checkpoint_dir, _META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


def _read_state(checkpoint_dir: str) -> dict[str, Any]:
    path = os.path.join(checkpoint_dir, _STATE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def _write_sample_grid(out: str, epoch: int, generator: nn.Module, z: torch.Tensor) -> None:
    """``out/samples/epoch_XXX.png``: G(z) for a fixed z, 8 x 8 patches, so a user sees progress."""
    preview = copy.deepcopy(generator).train()  # batch statistics; training's buffers untouched
    samples = preview(z).squeeze(1).cpu().numpy()  # (64, 64, 64) in [-1, 1]
    storage.write_bytes(
        storage.join(out, SAMPLES_FOLDER, f"epoch_{epoch:03d}.png"), sample_grid_png(samples)
    )


def sample_grid_png(samples: np.ndarray, border: int = 2) -> bytes:
    """PNG bytes of up to 64 patches (N, H, W) in [-1, 1], laid out 8 per row."""
    count, height, width = samples.shape
    rows = -(-count // _SAMPLE_GRID)
    grid = np.full(
        (rows * (height + border) + border, _SAMPLE_GRID * (width + border) + border),
        255,
        np.uint8,
    )
    pixels = np.clip(np.rint((samples + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for index, patch in enumerate(pixels):
        top = border + (index // _SAMPLE_GRID) * (height + border)
        left = border + (index % _SAMPLE_GRID) * (width + border)
        grid[top : top + height, left : left + width] = patch
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Export: final BatchNorm statistics, then the bundle
# ---------------------------------------------------------------------------------------------


def batchnorm_pixels(data: TrainingPatches, cfg: Config) -> np.ndarray:
    """The real patches D's BatchNorm statistics are computed over: (N, 64, 64) uint8.

    The first ``train.batchnorm_samples`` patches of the training table (whole batches, at
    least one), always the same ones for the same table.
    """
    batch_size = cfg.train.batch_size
    count = max(1, cfg.train.batchnorm_samples // batch_size) * batch_size
    batch = data.dataset.limit(count).take_batch(count, batch_format="numpy")
    pixels = np.stack(list(batch["pixels"])).astype(np.uint8)
    return pixels[: len(pixels) // batch_size * batch_size]


def exported_models(
    state: dict[str, Any],
    cfg: Config,
    real_pixels: np.ndarray,
    device: torch.device | str = "cpu",
) -> tuple[Generator, Discriminator]:
    """G and D as they are scored: weights from ``state``, BatchNorm statistics finalized, eval.

    G's statistics are exact averages over ``cfg.train.batchnorm_samples`` seeded latent draws,
    D's over ``real_pixels`` (:func:`batchnorm_pixels`), both in training-sized batches; the
    same state gives the same models.
    """
    model_cfg, train_cfg = cfg.model, cfg.train
    generator, discriminator = Generator(model_cfg), Discriminator(model_cfg)
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    generator.to(device)
    discriminator.to(device)
    batch_size = train_cfg.batch_size
    num_batches = max(1, train_cfg.batchnorm_samples // batch_size)
    latent_rng = torch.Generator().manual_seed(train_cfg.seed + 1)
    finalize_batchnorm(
        generator,
        (sample_latent(batch_size, model_cfg, latent_rng).to(device) for _ in range(num_batches)),
    )
    real = torch.from_numpy(decode_pixels(real_pixels)).unsqueeze(1)  # (N, 1, 64, 64)
    finalize_batchnorm(discriminator, (chunk.to(device) for chunk in real.split(batch_size)))
    return generator.eval(), discriminator.eval()


def export_bundle(
    out: str,
    state: dict[str, Any],
    cfg: Config,
    data: TrainingPatches,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Write the model bundle at ``out`` from a training checkpoint's state.

    The models are :func:`exported_models` over :func:`batchnorm_pixels`. The result records
    how far G's eval-mode samples are from its train-mode samples on the same z.

    Returns:
        ``{"model_id": ..., "batchnorm_check": {...}}``.
    """
    generator, discriminator = exported_models(state, cfg, batchnorm_pixels(data, cfg))
    check = batchnorm_check(generator, cfg.model, cfg.train.batch_size, seed=cfg.train.seed + 2)
    model_id = save_bundle(
        out,
        generator,
        discriminator,
        cfg.model,
        {**metadata, "batchnorm_check": check},
    )
    return {"model_id": model_id, "batchnorm_check": check}


@torch.no_grad()
def batchnorm_check(
    generator: Generator, model_cfg: ModelConfig, batch_size: int, seed: int = 0
) -> dict[str, float]:
    """Compare G in eval mode (running statistics) with G in train mode (batch statistics).

    Returns the mean absolute pixel difference on the same z and each mode's pixel mean and
    standard deviation; after :func:`finalize_batchnorm` the two modes sample alike.
    """
    z = sample_latent(batch_size, model_cfg, torch.Generator().manual_seed(seed))
    was_training = generator.training
    eval_samples = generator.eval()(z)
    train_samples = copy.deepcopy(generator).train()(z)  # the copy's buffers absorb the update
    generator.train(was_training)
    return {
        "mean_abs_difference": float((eval_samples - train_samples).abs().mean()),
        "eval_mean": float(eval_samples.mean()),
        "train_mean": float(train_samples.mean()),
        "eval_std": float(eval_samples.std()),
        "train_std": float(train_samples.std()),
    }
