"""Quality benchmark: train a configuration, score the labelled val/test patches, report AUCs.

Run by hand (not a test) to compare training settings one change at a time on the same patch
table. In one process, no Ray: the train split is read with pyarrow and each model is trained
with the product's recipes (:mod:`anogan_ray.core.recipes`: the same step functions, modules and
optimizers the Ray Train harness runs) in seeded shuffled epochs of ``train.batch_size``
patches, exported as ``anogan-ray train`` exports (final BatchNorm statistics over a sample of
training patches), written and re-read as a model bundle, and scored with the product's
:func:`anogan_ray.core.invert.score_patches` (every Table 1 column on the same patches). The order of
the training batches differs from the harness's (Ray's shuffle), so a model is not bit-identical
to one ``anogan-ray train`` would give: compare settings with this script, not against a demo run.

The patch table is what ``anogan-ray phantom`` + ``anogan-ray preprocess`` write (``make demo``
leaves one in ``demo-out/preprocess``; ``--prepare`` writes one with the config's phantom and
preprocess sections). Written to ``--out`` (a JSON) and next to it: the learning curve as a PNG
and a cache of trained models by configuration (``models.cache/``, or ``--cache``), so a change
that only affects scoring (λ, Γ, the mapping) reuses the trained GAN and E, and variants of the
GAN reuse the aCAE trained with the same settings.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quality.py --patches demo-out/preprocess \\
        --config demo --set model.d_norm=spectral --eval-patches 0 --out quality/spectral.json

The learning curve scores ``--curve-patches`` patches every ``--curve-every`` GAN steps with the
``--curve-mapping`` (default: ``iterative``, ``--curve-steps`` steps from the patch id's seed;
``encoder+iterative`` trains an encoder for every point, as long as the final one).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from anogan_ray import storage
from anogan_ray.config import Config, load_config
from anogan_ray.core import metrics
from anogan_ray.core.baselines import AdversarialAutoencoder, PCABaseline
from anogan_ray.core.export import exported_models, exported_module
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import ModelBundle, load_bundle, save_bundle
from anogan_ray.core.networks import Encoder, sample_latent
from anogan_ray.core.recipes import (
    ACAE,
    ENCODER,
    GAN,
    Recipe,
    freeze,
    patch_features,
    sliced_wasserstein,
)
from anogan_ray.pipelines.train import recipe_config
from anogan_ray.tables import decode_pixels

log = logging.getLogger("bench_quality")
PCA_SAMPLES = 20_000  # as anogan-ray train: PCA is fitted on at most this many training patches
QUALITY_SAMPLES = 512  # real and generated patches of the sliced Wasserstein distance
PIXELS = 64 * 64


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_split_table(patches: str, splits: list[str]) -> dict[str, np.ndarray]:
    """Columns of the patch table's rows in ``splits``: pixels (N, 64, 64) uint8 and labels."""
    if storage.exists(storage.join(patches, "patches")):
        patches = storage.join(patches, "patches")
    fs, root = storage.arrow_filesystem(patches)
    dataset = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=["patch_id", "pixels", "label", "anomaly_fraction", "split"],
        filter=pads.field("split").isin(splits),
    )
    table = table.sort_by("patch_id")  # the same rows in the same order whatever the files
    pixels = table["pixels"].combine_chunks()  # a list array, or Ray's tensor extension of one
    if isinstance(pixels, pa.ExtensionArray):
        pixels = pixels.storage
    values = np.asarray(pixels.flatten())
    return {
        "patch_id": np.asarray(table["patch_id"].to_pylist()),
        "pixels": values.astype(np.uint8).reshape(len(table), 64, 64),
        "label": table["label"].to_numpy(zero_copy_only=False).astype(int),
        "anomaly_fraction": table["anomaly_fraction"].to_numpy(zero_copy_only=False),
        "split": np.asarray(table["split"].to_pylist()),
    }


def sample_rows(rows: dict[str, np.ndarray], count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded sample of ``count`` labelled rows (all of them when ``count`` is 0)."""
    keep = np.flatnonzero(rows["label"] >= 0)
    if count and count < len(keep):
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=count, replace=False))
    return {name: column[keep] for name, column in rows.items()}


def prepare(out: str, cfg: Config) -> str:
    """Write the phantom cohort and its patch table under ``out`` (as ``anogan-ray demo``)."""
    from anogan_ray.data.phantom import write_cohort
    from anogan_ray.pipelines.preprocess import preprocess
    from anogan_ray.ray_env import ensure_ray

    write_cohort(cfg.phantom, storage.join(out, "cohort"))
    ensure_ray()
    preprocess(
        storage.join(out, "cohort", "manifest.csv"), storage.join(out, "preprocess"), cfg.preprocess
    )
    return storage.join(out, "preprocess")


# ---------------------------------------------------------------------------------------------
# Training: the product's recipes, in this process
# ---------------------------------------------------------------------------------------------


def train_recipe(
    recipe: Recipe,
    train_pixels: np.ndarray,
    cfg: Config,
    frozen: dict[str, torch.nn.Module] | None = None,
    every: int = 0,
    on_checkpoint: Any = None,
) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """Train ``recipe`` for ``train.epochs`` (or the encoder's epochs) over ``train_pixels``.

    Each epoch visits the patches in a seeded random order in full batches (as the harness:
    ``N // batch_size`` steps per epoch); z is drawn from torch's global generator seeded as the
    harness's first worker. ``on_checkpoint(step, modules)`` runs every ``every`` steps and at
    the end; its time is not counted as training time, and the global RNG is restored after it,
    so the trained models are the same with or without a learning curve.
    """
    cfg = recipe_config(cfg, recipe)
    model_cfg, train_cfg = cfg.model, cfg.train
    modules = recipe.build(model_cfg, train_cfg.seed)
    freeze(recipe, modules, frozen or {})
    optimizers = recipe.optimizers(modules, train_cfg)
    torch.manual_seed(train_cfg.seed * 1000)
    steps_per_epoch = len(train_pixels) // train_cfg.batch_size
    total_steps = steps_per_epoch * train_cfg.epochs
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)
    history: list[torch.Tensor] = []
    step, seconds_in_checkpoints = 0, 0.0
    started = time.perf_counter()
    for epoch in range(train_cfg.epochs):
        seed = (train_cfg.seed * 1_000_003 + epoch * 1009) % 2**32
        order = np.random.default_rng(seed).permutation(len(train_pixels))
        for batch in range(steps_per_epoch):
            if step >= total_steps:
                break
            rows = order[batch * train_cfg.batch_size : (batch + 1) * train_cfg.batch_size]
            real = torch.from_numpy(decode_pixels(train_pixels[rows])).unsqueeze(1)
            history.append(recipe.step(modules, optimizers, real, model_cfg, train_cfg))
            step += 1
            if on_checkpoint is not None and ((every and step % every == 0) or step == total_steps):
                t0 = time.perf_counter()
                rng_state = torch.get_rng_state()  # building the curve's models draws from it
                on_checkpoint(step, modules, history)
                torch.set_rng_state(rng_state)  # training goes on as without the curve
                seconds_in_checkpoints += time.perf_counter() - t0
    stacked = torch.stack(history).numpy() if history else np.zeros((0, len(recipe.metric_names)))
    last_epoch = stacked[-steps_per_epoch:].mean(0) if len(stacked) else stacked.mean(0)
    summary = {
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "minutes": (time.perf_counter() - started - seconds_in_checkpoints) / 60,
        "last_epoch_metrics": dict(zip(recipe.metric_names, map(float, last_epoch))),
    }
    return modules, summary


def states(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: copy.deepcopy(module.state_dict()) for name, module in modules.items()}


def config_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_encoder(
    cfg: Config, train_pixels: np.ndarray, generator: Any, discriminator: Any, bn_pixels: Any
) -> tuple[Encoder, dict[str, Any]]:
    modules, summary = train_recipe(
        ENCODER,
        train_pixels,
        cfg,
        frozen={"generator": generator, "discriminator": discriminator},
    )
    encoder = exported_module(Encoder, {"encoder": modules["encoder"].state_dict()}, cfg, bn_pixels)
    return encoder, summary


# ---------------------------------------------------------------------------------------------
# Scoring and AUCs
# ---------------------------------------------------------------------------------------------


def score_rows(
    model: Any, rows: dict[str, np.ndarray], score_cfg: Any, mapping: str, steps: int
) -> dict[str, np.ndarray]:
    """Every score column for ``rows`` with the product's :func:`score_patches`."""
    pixels = torch.from_numpy(decode_pixels(rows["pixels"])).unsqueeze(1)  # (N, 1, 64, 64)
    ids = [str(pid) for pid in rows["patch_id"]]
    parts = []
    for start in range(0, len(ids), score_cfg.batch_size):
        end = start + score_cfg.batch_size
        parts.append(
            score_patches(
                model,
                pixels[start:end],
                ids[start:end],
                lambda_=score_cfg.lambda_,
                steps=steps,
                z_lr=score_cfg.z_lr,
                reference_score=score_cfg.reference_score,
                mapping=mapping,
            )
        )
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def aucs(columns: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Patch AUC of every computed Table 1 score, and by lesion size."""
    labels = rows["label"]
    out: dict[str, Any] = {"auc": {}, "auc_by_lesion_size": {}}
    for name, column in metrics.SCORES.items():
        values = columns.get(column)
        if values is None or not np.isfinite(values).all():
            continue
        oriented = metrics.oriented(values, column)
        out["auc"][name] = metrics.paper_table(oriented, labels)["auc"]
        out["auc_by_lesion_size"][name] = metrics.auc_by_lesion_size(
            oriented, labels, rows["anomaly_fraction"]
        )
    healthy = labels == 0
    out["healthy_residual_per_pixel"] = {
        name: float(np.mean(columns[column][healthy]) / PIXELS)
        for name, column in (("R", "residual_score"), ("aCAE", "acae_score"), ("PCA", "pca_score"))
        if np.isfinite(columns[column]).all()
    }
    return out


def plot_curve(curve: list[dict[str, Any]], path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    steps = [point["step"] for point in curve]
    for name, style in (("A", "o-"), ("R", "s--"), ("PCA", "k:")):
        if all(name in point["auc"] for point in curve):
            ax.plot(steps, [point["auc"][name] for point in curve], style, label=name)
    ax.set_xlabel("GAN training steps")
    ax.set_ylabel("patch AUC")
    ax.set_title(textwrap.fill(title, 90), fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", help="patch table or preprocess stage folder")
    parser.add_argument("--prepare", metavar="DIR", help="write the phantom and patch table here")
    parser.add_argument("--config", default="demo", help="preset or YAML file (default demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--eval-patches", type=int, default=0, help="val/test patches (0: all)")
    parser.add_argument("--mapping", help="score.mapping of the final scores (default: config)")
    parser.add_argument("--steps", type=int, help="Γ of the final scores (default: score.steps)")
    parser.add_argument("--curve-every", type=int, default=0, help="GAN steps between points")
    parser.add_argument("--curve-patches", type=int, default=400)
    parser.add_argument("--curve-mapping", default="iterative")
    parser.add_argument("--curve-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-acae", action="store_true", help="skip the aCAE baseline")
    parser.add_argument("--cache", help="trained models by config (default: next to --out)")
    parser.add_argument(
        "--encoder-set",
        action="append",
        default=[],
        help="an override for the training of E and the aCAE only (e.g. to train them as the "
        "baseline's when the GAN's optimizer or epochs change)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    side_cfg = load_config(args.config, args.overrides + args.encoder_set)  # E and the aCAE
    started = time.perf_counter()
    patches = args.patches or prepare(args.prepare, cfg)
    cache = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "models.cache")
    mapping = args.mapping or cfg.score.mapping
    score_steps = cfg.score.steps if args.steps is None else args.steps

    train_rows = read_split_table(patches, ["train"])
    train_pixels = train_rows["pixels"]
    eval_rows = sample_rows(read_split_table(patches, cfg.score.splits), args.eval_patches)
    curve_rows = sample_rows(eval_rows, args.curve_patches, seed=1)
    data_key = config_key(list(train_rows["patch_id"]))
    shuffled = train_pixels[np.random.default_rng(cfg.train.seed).permutation(len(train_pixels))]
    batch = cfg.train.batch_size
    bn_pixels = shuffled[: max(1, cfg.train.batchnorm_samples // batch) * batch]
    bn_pixels = bn_pixels[: len(bn_pixels) // batch * batch]  # as batchnorm_pixels
    pca = PCABaseline.fit(
        decode_pixels(shuffled[:PCA_SAMPLES]), cfg.train.pca_components, seed=cfg.train.seed
    )
    reference = decode_pixels(shuffled[: 2 * QUALITY_SAMPLES])
    features_real = patch_features(reference[:QUALITY_SAMPLES])
    log.info(
        "%d train patches, %d eval (%d anomalous), %d curve",
        len(train_pixels),
        len(eval_rows["label"]),
        eval_rows["label"].sum(),
        len(curve_rows["label"]),
    )

    # --- the GAN, with its learning curve ---
    curve: list[dict[str, Any]] = []
    curve_cfg = dataclasses.replace(cfg.score, reference_score=False)
    latent = sample_latent(QUALITY_SAMPLES, cfg.model, torch.Generator().manual_seed(0))
    steps_per_epoch = len(train_pixels) // batch

    def checkpoint(step: int, modules: dict[str, torch.nn.Module], history: list) -> None:
        generator, discriminator = exported_models(states(modules), cfg, bn_pixels)
        point: dict[str, Any] = {"step": step}
        recent = torch.stack(history[-steps_per_epoch:]).mean(0).tolist()
        point["train_metrics"] = dict(zip(GAN.metric_names, recent))
        with torch.no_grad():
            samples = generator(latent).numpy()
        point["sliced_wasserstein"] = sliced_wasserstein(features_real, patch_features(samples))
        encoder = None
        if args.curve_mapping != "iterative":
            encoder, _ = train_encoder(side_cfg, train_pixels, generator, discriminator, bn_pixels)
        model = in_memory_bundle(generator, discriminator, cfg, encoder, {"pca": pca})
        columns = score_rows(model, curve_rows, curve_cfg, args.curve_mapping, args.curve_steps)
        point.update(aucs(columns, curve_rows))
        curve.append(point)
        log.info(
            "curve step %d: A %.3f R %.3f PCA %.3f swd %.3f %s",
            step,
            point["auc"]["A"],
            point["auc"]["R"],
            point["auc"]["PCA"],
            point["sliced_wasserstein"],
            {k: round(v, 3) for k, v in point["train_metrics"].items()},
        )

    gan_key = config_key("gan", cfg.to_dict()["model"], cfg.to_dict()["train"], data_key)
    gan_file = os.path.join(cache, f"{gan_key}.pt")
    if os.path.exists(gan_file) and not args.curve_every:
        saved = torch.load(gan_file, weights_only=False)
        gan_state, gan_summary = saved["state"], saved["summary"]
        log.info("GAN from cache %s", gan_file)
    else:
        modules, gan_summary = train_recipe(
            GAN,
            train_pixels,
            cfg,
            every=args.curve_every,
            on_checkpoint=checkpoint if args.curve_every else None,
        )
        gan_state = states(modules)
        os.makedirs(cache, exist_ok=True)
        torch.save({"state": gan_state, "summary": gan_summary}, gan_file)
    log.info("GAN: %s", gan_summary)
    generator, discriminator = exported_models(gan_state, cfg, bn_pixels)

    # --- the encoder E (on the exported G and D) and the aCAE baseline ---
    encoder = None
    encoder_summary = None
    if mapping != "iterative":
        encoder_key = config_key("encoder", gan_key, side_cfg.to_dict()["train"])
        encoder_file = os.path.join(cache, f"{encoder_key}.pt")
        if os.path.exists(encoder_file):
            saved = torch.load(encoder_file, weights_only=False)
            encoder = Encoder(cfg.model)
            encoder.load_state_dict(saved["state"])
            encoder.eval()
            encoder_summary = saved["summary"]
        else:
            encoder, encoder_summary = train_encoder(
                side_cfg, train_pixels, generator, discriminator, bn_pixels
            )
            torch.save({"state": encoder.state_dict(), "summary": encoder_summary}, encoder_file)
        log.info("encoder: %s", encoder_summary)
    baselines: dict[str, Any] = {"pca": pca}
    acae_summary = None
    if not args.no_acae:
        acae_cfg = config_key(
            "acae",
            {k: v for k, v in side_cfg.to_dict()["model"].items() if k != "d_norm"},
            {
                k: v
                for k, v in side_cfg.to_dict()["train"].items()
                if k not in ("objective", "n_critic", "gradient_penalty")
            },
            data_key,
        )
        acae_file = os.path.join(cache, f"{acae_cfg}.pt")
        if os.path.exists(acae_file):
            saved = torch.load(acae_file, weights_only=False)
        else:
            modules, summary = train_recipe(ACAE, train_pixels, side_cfg)
            saved = {"state": modules["autoencoder"].state_dict(), "summary": summary}
            torch.save(saved, acae_file)
        acae_summary = saved["summary"]
        baselines["acae"] = exported_module(
            AdversarialAutoencoder, {"autoencoder": saved["state"]}, side_cfg, bn_pixels
        )
        log.info("aCAE: %s", acae_summary)

    # --- the product's bundle, written and read back, then scored ---
    bundle_url = os.path.join(cache, f"bundle-{gan_key}")
    save_bundle(
        bundle_url,
        generator,
        discriminator,
        cfg.model,
        {"bench": "bench_quality"},
        baselines=baselines,
        encoder=encoder,
    )
    bundle = load_bundle(bundle_url)
    t0 = time.perf_counter()
    columns = score_rows(bundle, eval_rows, cfg.score, mapping, score_steps)
    score_minutes = (time.perf_counter() - t0) / 60
    result = aucs(columns, eval_rows)
    log.info("AUC %s", {k: round(v, 4) for k, v in result["auc"].items()})

    minutes = gan_summary["minutes"] + (encoder_summary or {}).get("minutes", 0.0)
    record = {
        "command": " ".join(["benchmarks/bench_quality.py", *sys.argv[1:]]),
        "overrides": args.overrides,
        "encoder_overrides": args.encoder_set,
        "config": cfg.to_dict(),
        "patches": patches,
        "threads": args.threads,
        "train_patches": len(train_pixels),
        "eval_patches": int(len(eval_rows["label"])),
        "eval_anomalous": int(eval_rows["label"].sum()),
        "score": {
            "mapping": mapping,
            "steps": score_steps,
            "lambda": cfg.score.lambda_,
            "z_lr": cfg.score.z_lr,
            "minutes": score_minutes,
        },
        "train_minutes_gan_and_encoder": minutes,
        "train": {"gan": gan_summary, "encoder": encoder_summary, "acae": acae_summary},
        **result,
        "learning_curve": {
            "mapping": args.curve_mapping,
            "steps": args.curve_steps,
            "patches": int(len(curve_rows["label"])),
            "points": curve,
        },
        "wall_minutes": (time.perf_counter() - started) / 60,
    }
    if curve:
        png = f"{os.path.splitext(args.out)[0]}_curve.png"
        title = " ".join(args.overrides) or args.config
        record["learning_curve"]["png"] = plot_curve(curve, png, title)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2, default=float)
    print(json.dumps({"auc": result["auc"], "minutes": minutes}, default=float))


def in_memory_bundle(
    generator: Any, discriminator: Any, cfg: Config, encoder: Any, baselines: dict[str, Any]
) -> ModelBundle:
    """A bundle of exported models, frozen as :func:`load_bundle` leaves them (the curve's)."""
    for module in (generator, discriminator, encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    return ModelBundle(generator, discriminator, cfg.model, {}, "curve", baselines, encoder)


if __name__ == "__main__":
    main()
