"""Shared fixtures: a real moto S3 server on 127.0.0.1, one local Ray for the session, phantom data."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from anogan_ray.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over real HTTP on 127.0.0.1; the AWS_* variables point at it.

    Session-scoped and started before Ray, so Ray's workers inherit the endpoint.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its ``s3://`` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray with 2 CPUs for the whole session (as Ray's own tests do)."""
    import ray

    _start_local_ray()
    yield ray
    ray.shutdown()


def _start_local_ray() -> None:
    import ray

    from anogan_ray.ray_env import LOCAL_TRAIN_ENV

    if not ray.is_initialized():
        os.environ.update(LOCAL_TRAIN_ENV)  # as ensure_ray's local Ray; its workers inherit it
        ray.init(address="local", num_cpus=2, log_to_driver=False)


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


# ---------------------------------------------------------------------------------------------
# A small scored cohort for query / evaluate / report tests (written directly with pyarrow, so
# those tests do not need the preprocess, train and score stages to run).
# ---------------------------------------------------------------------------------------------

SCORED_SPLITS = {"h0": "val", "h3": "val", "h1": "test", "h2": "test", "p0": "test", "p1": "test"}
MASK_CODES = {"intraretinal_fluid": 1, "foci": 3, "drusen": 4}


def _bscan_with_lesions(rng, pathological: bool, height: int = 128, width: int = 224):
    """A flattened B-scan in [-1, 1] (layered retina) and a mask of lesion codes."""
    import numpy as np

    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    image = np.full((height, width), -0.85, np.float32)
    for top, bottom, value in ((16, 30, 0.3), (30, 70, -0.2), (70, 92, 0.0), (92, 104, 0.7)):
        image[top:bottom] = value
    image += rng.normal(0, 0.05, image.shape).astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    if pathological:
        for code, cx in zip((1, 3, 4), rng.permutation([24, 96, 176])):
            cx += int(rng.integers(-6, 7))
            if code == 1:  # fluid: a dark ellipse inside the retina
                blob = ((rows - 52) / 14.0) ** 2 + ((cols - cx) / 18.0) ** 2 <= 1
                image[blob] = -0.95
            elif code == 3:  # hyperreflective foci: a few bright dots
                blob = np.zeros_like(mask, bool)
                for dy, dx in ((-8, -6), (4, 7), (10, -3)):
                    blob |= (rows - 55 - dy) ** 2 + (cols - cx - dx) ** 2 <= 5
                image[blob] = 1.0
            else:  # drusen: a bright dome lifting the RPE band
                blob = ((rows - 92) / 10.0) ** 2 + ((cols - cx) / 16.0) ** 2 <= 1
                blob &= rows <= 92
                image[blob] = 0.8
            mask[blob] = code
    return np.clip(image, -1, 1), mask


@pytest.fixture(scope="session")
def scored_cohort(tmp_path_factory):
    """Patch table, score table (with z) and an untrained tiny model bundle on local disk.

    Six subjects (h* healthy, p* with intraretinal fluid, foci and drusen in every B-scan),
    3 B-scans of 128 x 224 each, grid patches with stride 32. Scores grow with the annotated
    share of a patch plus noise, so anomalies rank high but not perfectly. Returns a dict with
    the folders and ``types``: patch_id -> dominant lesion code (0 for none).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_ray.core.model import save_bundle
    from anogan_ray.core.networks import build_models
    from anogan_ray.tables import encode_pixels, patch_id

    cfg = load_config("tiny")
    root = tmp_path_factory.mktemp("scored")
    generator, discriminator = build_models(cfg.model, seed=0)
    model_id = save_bundle(str(root / "model"), generator, discriminator, cfg.model)
    rng = np.random.default_rng(7)
    patch_rows: dict[str, list] = {"val": [], "test": []}
    score_rows: dict[str, list] = {"val": [], "test": []}
    types = {}
    for subject, split in SCORED_SPLITS.items():
        volume = f"{subject}_od"
        for bscan in range(3):
            image, mask = _bscan_with_lesions(rng, subject.startswith("p"))
            for y in range(0, 128 - 64 + 1, 32):
                for x in range(0, 224 - 64 + 1, 32):
                    pid = patch_id(volume, bscan, y, x)
                    m = mask[y : y + 64, x : x + 64]
                    fraction = float((m > 0).mean())
                    label = int(fraction > 0)
                    counts = np.bincount(m.ravel(), minlength=5)[1:]
                    types[pid] = int(np.argmax(counts) + 1) if label else 0
                    common = dict(
                        patch_id=pid,
                        subject_id=subject,
                        volume_id=volume,
                        bscan=bscan,
                        y=y,
                        x=x,
                        label=label,
                        anomaly_fraction=fraction,
                        source=f"cohort/{volume}.npy",
                    )
                    patch_rows[split].append(
                        {
                            **common,
                            "split": split,
                            "pixels": encode_pixels(image[y : y + 64, x : x + 64]).ravel(),
                        }
                    )
                    residual = 100 + rng.normal(0, 12) + 12 * label + 300 * fraction
                    discrimination = 10 + rng.normal(0, 2) + 4 * label
                    score_rows[split].append(
                        {
                            **common,
                            "anomaly_score": 0.9 * residual + 0.1 * discrimination,
                            "residual_score": residual,
                            "discrimination_score": discrimination,
                            "p_d": float(1 / (1 + np.exp(discrimination - 10 - rng.normal(0, 2)))),
                            "ref_anomaly_score": 0.9 * residual + rng.normal(0, 10),
                            "ref_discrimination_score": float(rng.normal(1, 0.3) + 0.3 * label),
                            "residual_max": float(1 + label + rng.random()),
                            "residual_max_y": int(rng.integers(0, 64)),
                            "residual_max_x": int(rng.integers(0, 64)),
                            "z": rng.normal(0, 1, cfg.model.latent_dim).astype(np.float32),
                            "model_id": model_id,
                            "lambda": 0.1,
                            "steps": 30,
                            "z_lr": 0.05,
                            "mapping": "iterative",
                        }
                    )
    for split in ("val", "test"):
        patches = pa.Table.from_pylist(patch_rows[split])
        patches = patches.set_column(
            patches.schema.get_field_index("pixels"),
            "pixels",
            pa.array([p["pixels"] for p in patch_rows[split]], pa.list_(pa.uint8())),
        )
        (root / "patches" / f"split={split}").mkdir(parents=True)
        pq.write_table(patches, root / "patches" / f"split={split}" / "part-0.parquet")
        scores = pa.Table.from_pylist(score_rows[split])
        (root / "scores" / f"split={split}").mkdir(parents=True)
        half = scores.num_rows // 2  # two files per partition, as a real run writes
        pq.write_table(scores.slice(0, half), root / "scores" / f"split={split}" / "a.parquet")
        pq.write_table(scores.slice(half), root / "scores" / f"split={split}" / "b.parquet")
    return {
        "root": str(root),
        "patches": str(root / "patches"),
        "scores": str(root / "scores"),
        "model": str(root / "model"),
        "model_id": model_id,
        "types": types,
    }


@pytest.fixture(scope="session")
def table_at_scale(tmp_path_factory):
    """A synthetic score table of 2 x 10^5 rows in 16 files (two keys) and its pandas copy."""
    import pyarrow.dataset as ds

    from anogan_ray.analysis.synthetic import write_score_table

    folder = str(tmp_path_factory.mktemp("at_scale") / "scores")
    write_score_table(folder, 100_000, files=4, keys=2)
    frame = ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas()
    return folder, frame


# --- scoring (issue 5): synthetic OCT-like patches and a tiny GAN trained on them in-process ---


def synthetic_oct_patches(n: int, seed: int, anomalous: bool = False):
    """(n, 64, 64) float32 patches in [-1, 1]: tilted retinal layers with speckle noise.

    Anomalous patches add, half and half, a dark fluid pocket inside the layers or 4-7 bright
    hyperreflective foci, so the mean intensity alone does not tell them apart.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    bounds, levels = [0, 6, 14, 20, 30, 36], [0.6, -0.2, 0.3, -0.4, 0.8]
    out = np.empty((n, 64, 64), np.float32)
    for i in range(n):
        top, tilt = rng.uniform(8, 20), rng.uniform(-0.1, 0.1)
        depth = yy - (top + tilt * (xx - 32))
        image = np.full((64, 64), -0.8, np.float32)
        for a, b, level in zip(bounds[:-1], bounds[1:], levels):
            image[(depth >= a) & (depth < b)] = level
        image += rng.normal(0, 0.08, (64, 64)).astype(np.float32)
        if anomalous and rng.random() < 0.5:  # dark fluid pocket inside the retina
            cy, cx = top + rng.uniform(12, 24), rng.uniform(20, 44)
            ry, rx = rng.uniform(6, 9), rng.uniform(9, 14)
            image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = -0.9
        elif anomalous:  # bright hyperreflective foci
            for _ in range(rng.integers(4, 8)):
                cy, cx = top + rng.uniform(8, 28), rng.uniform(4, 60)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4, 9)] = 0.95
        out[i] = np.clip(image, -1, 1)
    return out


@pytest.fixture(scope="session")
def synthetic_patches():
    """The generator of synthetic healthy / anomalous patches (see :func:`synthetic_oct_patches`)."""
    return synthetic_oct_patches


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_config) -> str:
    """A `tiny` DCGAN trained in-process for a few hundred steps on healthy synthetic patches.

    Returns the model bundle's folder. A plain torch loop (no Ray) keeps it to seconds.
    """
    import torch
    import torch.nn.functional as F

    from anogan_ray.core.model import save_bundle
    from anogan_ray.core.networks import build_models, sample_latent

    torch.manual_seed(0)
    healthy = torch.from_numpy(synthetic_oct_patches(1024, seed=0))[:, None]  # (N, 1, 64, 64)
    cfg = tiny_config.model
    generator, discriminator = build_models(cfg, seed=0)
    opt_g = torch.optim.Adam(generator.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-3, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(0)
    for _ in range(150):
        real = healthy[torch.randint(0, len(healthy), (32,), generator=rng)]
        fake = generator(sample_latent(32, cfg, generator=rng))
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        opt_d.zero_grad()
        loss_d = (
            F.softplus(-discriminator(real)).mean()
            + F.softplus(discriminator(fake.detach())).mean()
        )
        loss_d.backward()
        opt_d.step()
        # (2) Update G network: maximize log(D(G(z)))
        opt_g.zero_grad()
        F.softplus(-discriminator(fake)).mean().backward()
        opt_g.step()
    url = str(tmp_path_factory.mktemp("tiny_bundle"))
    save_bundle(url, generator.eval(), discriminator.eval(), cfg, {"run": "conftest tiny_bundle"})
    return url


def _train_in_process(
    recipe,
    pixels,
    model_cfg,
    train_cfg,
    steps: int,
    frozen=None,
):
    """Train a recipe in this process, no Ray (the tests' quick models).

    Batches of ``train_cfg.batch_size`` are drawn at random (seeded by ``train_cfg.seed``)
    from ``pixels`` (N, 1, 64, 64) in [-1, 1]. The Ray Train harness is the product's way to
    train; this runs the recipe's own step function on one process. ``frozen`` gives the recipe's
    frozen modules (the exported G and D for the encoder).

    Returns:
        The trained modules (train mode) and the step metrics, one (k,) tensor per step.
    """
    import torch

    from anogan_ray.core.recipes import freeze

    modules = recipe.build(model_cfg, train_cfg.seed)
    freeze(recipe, modules, frozen or {})
    optimizers = recipe.optimizers(modules, train_cfg)
    rng = torch.Generator().manual_seed(train_cfg.seed)
    torch.manual_seed(train_cfg.seed)  # z draws inside the step
    history = []
    for _ in range(steps):
        real = pixels[torch.randint(0, len(pixels), (train_cfg.batch_size,), generator=rng)]
        history.append(recipe.step(modules, optimizers, real, model_cfg, train_cfg))
    return modules, history


@pytest.fixture(scope="session")
def train_recipe():
    """``(recipe, pixels, model_cfg, train_cfg, steps, frozen=None) -> (modules, step metrics)``:
    a recipe trained in-process (see :func:`_train_in_process`)."""
    return _train_in_process


# --- cluster tests (issue 8): a module that needs a Ray of its own (a multi-node Cluster) ---


@pytest.fixture(scope="module")
def without_session_ray():
    """Shut the session's local Ray down for this module (one Ray per driver process) and bring
    it back afterwards, so ``ray_local`` and the fixtures built on it stay valid."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_up:
        _start_local_ray()


@pytest.fixture(scope="session")
def loopback_cluster():
    """A context manager ``(head_node_args, [node_args, ...]) -> (cluster, nodes)``: a
    ``ray.cluster_utils.Cluster`` whose nodes all stay on 127.0.0.1, with this driver connected
    and every node up; shut down on exit. Use it with ``without_session_ray``."""
    import contextlib

    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    @contextlib.contextmanager
    def start(head_node_args: dict, node_args: list[dict]):
        with pytest.MonkeyPatch.context() as patch:
            # Keep every node on 127.0.0.1: Ray otherwise swaps loopback for the machine's address.
            patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
            patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            cluster = Cluster(initialize_head=True, head_node_args=head_node_args)
            try:
                nodes = [cluster.add_node(**args) for args in node_args]
                ray.init(address=cluster.address, log_to_driver=False)
                cluster.wait_for_nodes()
                yield cluster, nodes
            finally:
                ray.shutdown()
                cluster.shutdown()

    return start


@pytest.fixture(scope="session")
def write_patch_table():
    """A function ``(url, {split: patches}) -> patch ids`` writing (n, 64, 64) patch arrays in
    [-1, 1] as a patch table (DESIGN.md 3.2): hive-partitioned by split, one Parquet file per
    split, one volume per split with 8 patches per B-scan, every label 0; local or s3."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from anogan_ray import storage
    from anogan_ray.tables import encode_pixels, patch_id

    def write(url: str, patches_by_split: dict[str, np.ndarray]) -> list[str]:
        fs, root = storage.arrow_filesystem(url)
        ids: list[str] = []
        for split, patches in patches_by_split.items():
            n, volume = len(patches), f"{split}-vol"
            table = pa.table(
                {
                    "patch_id": [patch_id(volume, i // 8, 0, 32 * (i % 8)) for i in range(n)],
                    "subject_id": [f"{split}-subject"] * n,
                    "volume_id": [volume] * n,
                    "bscan": np.arange(n, dtype=np.int32) // 8,
                    "y": np.zeros(n, np.int32),
                    "x": 32 * (np.arange(n, dtype=np.int32) % 8),
                    "pixels": ArrowTensorArray.from_numpy(encode_pixels(patches)),
                    "label": np.zeros(n, np.int8),
                    "anomaly_fraction": np.zeros(n, np.float32),
                    "source": [f"synthetic://{volume}"] * n,
                }
            )
            path = f"{root}/split={split}/part-0.parquet"
            if not storage.is_remote(url):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path, filesystem=fs)
            ids += table["patch_id"].to_pylist()
        return ids

    return write


@pytest.fixture(scope="session")
def encoder_bundles(tmp_path_factory, tiny_bundle, tiny_config, synthetic_patches, train_recipe):
    """The tiny GAN bundle, and the same G and D with an encoder trained on healthy patches."""
    import dataclasses

    import torch

    from anogan_ray.core.model import load_bundle, save_bundle
    from anogan_ray.core.recipes import ENCODER

    plain = load_bundle(tiny_bundle)
    train = torch.from_numpy(synthetic_patches(512, seed=20))[:, None]
    train_cfg = dataclasses.replace(tiny_config.train, batch_size=32, lr_generator=1e-3, seed=0)
    frozen = {"generator": plain.generator, "discriminator": plain.discriminator}
    modules, history = train_recipe(
        ENCODER, train, tiny_config.model, train_cfg, steps=80, frozen=frozen
    )
    encoder = modules["encoder"].eval()
    url = str(tmp_path_factory.mktemp("with_encoder"))
    save_bundle(url, plain.generator, plain.discriminator, plain.model_config, encoder=encoder)
    return {"plain": tiny_bundle, "with_encoder": url, "history": torch.stack(history)}
