"""Distributed adversarial training: DDP replicas in step, resume after a failure, export, quality."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import ray
import torch

from anogan_ray import storage
from anogan_ray.config import load_config
from anogan_ray.core.model import load_bundle
from anogan_ray.core.networks import build_models, sample_latent
from anogan_ray.pipelines.train import TrainError, read_training_patches, train
from anogan_ray.tables import decode_pixels

TRAIN_PATCHES = 256  # tiny: batch 32, so 8 steps per epoch with 1 worker, 4 with 2
VAL_PATCHES = 32


def band_patches(count: int, rng: np.random.Generator) -> np.ndarray:
    """Healthy-looking flattened retina: horizontal layers of varying brightness plus speckle.

    Returns (count, 64, 64) float32 in [-1, 1].
    """
    rows = np.arange(64, dtype=np.float32)[:, None]  # (64, 1)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    frequency = rng.uniform(0.15, 0.3, (count, 1, 1))
    layers = 0.6 * np.sin(frequency * rows + phase) - 0.2  # (count, 64, 1)
    speckle = rng.normal(0, 0.08, (count, 64, 64))
    return np.clip(layers + speckle, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def patch_table(ray_local, write_patch_table, tmp_path_factory) -> str:
    """A train split of band patches and a val split of all-white patches: training on the val
    patches would show in the samples."""
    url = str(tmp_path_factory.mktemp("patches"))
    train_patches = band_patches(TRAIN_PATCHES, np.random.default_rng(0))
    write_patch_table(url, {"train": train_patches, "val": np.ones((VAL_PATCHES, 64, 64))})
    return url


def _config(*overrides: str):
    return load_config("tiny", ["train.batchnorm_samples=256", *overrides])


def test_only_the_train_split_is_read(patch_table):
    data = read_training_patches(patch_table)
    assert data.num_patches == TRAIN_PATCHES  # the val patches are left out
    assert sorted(data.dataset.columns()) == ["patch_id", "pixels"]  # labels never reach training


def test_training_batches_mix_volumes_in_a_seeded_order(ray_local, tmp_path):
    """Preprocess writes one volume per file; a training batch must still mix the cohort."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from anogan_ray.tables import patch_id

    volumes, per_volume = 8, 128
    (tmp_path / "split=train").mkdir()
    for v in range(volumes):
        ids = [patch_id(f"vol{v}", i // 8, 0, 32 * (i % 8)) for i in range(per_volume)]
        pixels = np.full((per_volume, 64, 64), v, np.uint8)
        table = pa.table({"patch_id": ids, "pixels": ArrowTensorArray.from_numpy(pixels)})
        pq.write_table(table, tmp_path / "split=train" / f"part-{v}.parquet")

    def volume_batches(seed: int) -> list[list[str]]:
        data = read_training_patches(str(tmp_path), seed=seed)
        batches = data.dataset.iter_batches(
            batch_size=32, batch_format="numpy", local_shuffle_buffer_size=256,
            local_shuffle_seed=seed,
        )  # fmt: skip
        return [[pid.split("/")[0] for pid in batch["patch_id"]] for batch in batches]

    batches = volume_batches(seed=0)
    assert len(batches) == volumes * per_volume // 32
    # every batch holds patches of most volumes (read in file order it would hold one)
    assert min(len(set(batch)) for batch in batches) >= volumes // 2
    assert volume_batches(seed=0) == batches  # reproducible
    assert volume_batches(seed=1) != batches


def test_missing_train_split_is_a_clear_error(ray_local, tmp_path):
    with pytest.raises(TrainError, match=r"no Parquet files under split=train"):
        train(str(tmp_path), str(tmp_path / "model"), _config())


def _registered_checkpoint(run_url: str) -> bool:
    snapshot = f"{run_url}/checkpoint_manager_snapshot.json"
    return storage.exists(snapshot) and bool(
        storage.read_json(snapshot).get("latest_checkpoint_result")
    )


def _train_killing_workers(patch_table: str, out: str, cfg, runs: list[str]) -> dict:
    """Run ``train`` and SIGKILL one Ray Train worker process in each of ``runs`` (run names, in
    the order they train) once Ray Train has registered a checkpoint of that run: the run's
    checkpoint-manager snapshot (written by the controller after it registers one) names it, so
    the restart must resume from it, whatever the machine's load.
    """
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(summary=train(patch_table, out, cfg)), daemon=True
    )
    runner.start()
    killed: list[int] = []
    while runner.is_alive() and len(killed) < len(runs):
        run = runs[len(killed)]
        if _registered_checkpoint(f"{out}/_runs/{run}"):
            workers = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.pid not in killed
            ]
            if workers:
                killed.append(workers[-1].pid)
                os.kill(killed[-1], signal.SIGKILL)
        time.sleep(0.02)
    runner.join(timeout=900)
    assert len(killed) == len(runs), f"training ended before a worker of {runs} was killed"
    assert "summary" in result, "training did not survive the killed workers"
    return result["summary"]


def _epoch_lines(run: str, since_ns: int) -> list[dict]:
    """The epoch lines of ``run`` in Ray Train's worker logs since ``since_ns``: what the driver
    prints (the tests' Ray does not forward worker output), as JSON records with the rank."""
    # Ray Train's JSON log of each worker's application logs, in the session's log folder (Ray
    # has no public accessor for that folder)
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "train")
    records = []
    for path in glob.glob(os.path.join(logs, "ray-train-app-worker-*.log")):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.startswith("{")]
    lines = [r for r in records if r["message"].startswith(f"{run} epoch ")]
    return sorted(
        (r for r in lines if r["timestamp_ns"] >= since_ns), key=lambda r: r["timestamp_ns"]
    )


def test_ddp_replicas_stay_identical_survive_a_killed_worker_and_resume(patch_table, bucket):
    """One 2-worker run on S3 storage: DDP, a real worker failure, a re-run, the export."""
    started_ns = time.time_ns()
    out = f"{bucket}/model"
    cfg = _config(
        "train.num_workers=2",
        "train.epochs=2",
        "train.checkpoint_every=2",
        "train.max_failures=1",
        "train.baselines=false",  # the aCAE's run on S3: test_object_storage.py
    )
    # A worker's process is SIGKILLed from outside (as an OOM killer would) once Ray Train has
    # registered a checkpoint, in the GAN's run and again in the encoder's (the same harness);
    # Ray Train restarts both workers from the latest checkpoint it registered. Never from step 0,
    # and each run still ends at its last step.
    summary = _train_killing_workers(patch_table, out, cfg, ["anogan", "anogan-encoder"])
    assert 2 <= summary["resumed_from_step"] < 8
    encoder = summary["other_models"]["encoder"]
    assert 2 <= encoder["resumed_from_step"] < encoder["steps"] == 8
    assert all(np.isfinite(v) for v in encoder["final_metrics"].values())
    assert summary["steps"] == 8 and summary["steps_per_epoch"] == TRAIN_PATCHES // 2 // 32
    # DDP kept both replicas bit-identical through G and D updates and the restart
    assert summary["replicas_identical"] is True
    assert summary["train_patches"] == TRAIN_PATCHES
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert np.isfinite(summary["final_metrics"][key])
    assert 0 < summary["final_metrics"]["d_real"] < 1
    assert summary["patches_per_s"] > 0
    assert storage.read_json(f"{out}/summary.json")["model_id"] == summary["model_id"]
    assert summary["samples"][-1] == f"{out}/samples/epoch_002.png"
    assert storage.read_bytes(summary["samples"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.list_files(f"{out}/_runs/anogan", suffix="state.pt")  # checkpoints on s3
    # rank 0 logged a line per epoch (again for the epochs redone after the restart), the last:
    # "anogan epoch 2/2, step 8/8: d_loss 1.38, ...; sliced W1 0.2, ...; 2.1 s, done"
    lines = _epoch_lines("anogan", started_ns)
    epochs = {int(re.match(r"anogan epoch (\d)/2, ", r["message"]).group(1)) for r in lines}
    assert epochs == {1, 2} and {r["world_rank"] for r in lines} == {0}
    assert all("d_loss" in r["message"] and "sliced W1" in r["message"] for r in lines)
    assert re.match(r"anogan epoch 2/2, step 8/8: .*; [\d.]+ s, done$", lines[-1]["message"])
    assert len(_epoch_lines("anogan-encoder", started_ns)) >= 2

    bundle = load_bundle(out)
    assert bundle.model_id == summary["model_id"]
    assert bundle.metadata["step"] == 8
    assert bundle.metadata["data_fingerprint"] == read_training_patches(patch_table).fingerprint
    # final BatchNorm statistics: G in eval mode samples like G in train mode
    assert summary["batchnorm_check"]["mean_abs_difference"] < 0.05
    initial_generator, _ = build_models(cfg.model, seed=cfg.train.seed)
    z = sample_latent(8, cfg.model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(bundle.generator(z), initial_generator.eval()(z))

    # re-running with the same run name continues the run instead of starting over
    # (the GAN's run goes on; the encoder's harness is the same)
    longer = _config("train.num_workers=2", "train.epochs=3", "train.checkpoint_every=2",
                     "train.encoder=false", "train.baselines=false")  # fmt: skip
    summary = train(patch_table, out, longer)
    assert summary["resumed_from_step"] == 8
    assert summary["steps"] == 12
    assert summary["replicas_identical"] is True
    assert load_bundle(out).metadata["step"] == 12

    # a run of another architecture under the same name is refused, not silently mixed
    other = _config("train.num_workers=2", "model.base_channels=4")
    with pytest.raises(TrainError, match="choose another train.run_name"):
        train(patch_table, out, other)


def _intensity_distance(samples: np.ndarray, data: np.ndarray) -> float:
    """Wasserstein-1 distance between the pixel intensity distributions."""
    quantiles = np.linspace(0.01, 0.99, 99)
    return float(np.abs(np.quantile(samples, quantiles) - np.quantile(data, quantiles)).mean())


def _row_profile_spread(patches: np.ndarray) -> float:
    """How strongly brightness varies between rows: the layered structure of a flat retina."""
    return float(patches.mean(axis=2).std(axis=1).mean())


@pytest.mark.slow
def test_training_teaches_g_the_healthy_patches_and_d_to_tell_them_apart(
    patch_table, tmp_path, monkeypatch
):
    cfg = _config(
        "train.epochs=10", "train.lr_generator=0.002", "train.lr_discriminator=0.0005",
        "train.encoder=false", "train.baselines=false",  # G and D are judged here
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a relative output folder: the workers run in folders of their own
    summary = train(patch_table, "model", cfg)
    assert summary["samples"] == [
        str(tmp_path / "model" / "samples" / f"epoch_{epoch:03d}.png") for epoch in range(1, 11)
    ]
    assert all(os.path.exists(path) for path in summary["samples"])
    bundle = load_bundle(str(tmp_path / "model"))
    dataset = read_training_patches(patch_table).dataset
    data = decode_pixels(dataset.take_batch(TRAIN_PATCHES, batch_format="numpy")["pixels"])
    # data: (256, 64, 64) in [-1, 1]
    initial_generator, _ = build_models(cfg.model, seed=cfg.train.seed)
    z = sample_latent(256, cfg.model, torch.Generator().manual_seed(5))
    with torch.no_grad():
        initial = initial_generator(z).squeeze(1).numpy()  # train mode: batch statistics
        trained = bundle.generator(z).squeeze(1).numpy()  # eval mode: final statistics
        real_logits = bundle.discriminator(torch.from_numpy(data[:, None]))  # (256,)
        early_logits = bundle.discriminator(torch.from_numpy(initial[:, None]))  # (256,)
    initial_distance = _intensity_distance(initial, data)
    trained_distance = _intensity_distance(trained, data)
    assert trained_distance < 0.5 * initial_distance, (initial_distance, trained_distance)
    data_spread = _row_profile_spread(data)
    assert abs(_row_profile_spread(trained) - data_spread) < 0.5 * abs(
        _row_profile_spread(initial) - data_spread
    )
    # D ranks real patches above G's early samples: AUC over all (real, early) pairs
    real_above_early = (real_logits[:, None] > early_logits[None, :]).float().mean()
    assert real_above_early > 0.95, float(real_above_early)
    assert summary["steps"] == 10 * TRAIN_PATCHES // 32
