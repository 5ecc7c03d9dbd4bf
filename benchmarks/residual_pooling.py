"""How a residual map is pooled into a patch score: the whole-patch sum against local peaks.

Run by hand on a trained bundle and its patch table (what ``make demo`` leaves in ``demo-out``):
for every labelled val/test patch the residual maps of AnoGAN (x − G(z_Γ), the product's mapping),
the aCAE (x − Dec(E(x))) and PCA (x − x̂), each pooled several ways, optionally after dividing
each pixel by the mean |residual| that healthy training patches show at that reconstructed
intensity ("hetero"); the combined score adds the sum and the σ = 1 peak, each standardized by
its mean and spread over ``--train-patches`` healthy training patches; the multi-scale score is
the largest of the standardized sum and peaks at σ = 1, 2, 4 and 8 px. AUC over all patches,
small lesions (≤ 3 % of the patch) and large ones (> 5 %), JSON out.

    PYTHONPATH=. .venv/bin/python benchmarks/residual_pooling.py --run demo-out \\
        --steps 0,10,40 --out pooling.json

With ``--bundles`` (several bundle folders trained on the same patches, e.g. the
``bundle-*`` folders ``bench_quality.py`` leaves in its cache for several ``train.seed``) it also
scores the ensemble: each standardized statistic averaged over the bundles before pooling.

    PYTHONPATH=. .venv/bin/python benchmarks/residual_pooling.py --patches demo-out/preprocess \\
        --bundles CACHE/bundle-A,CACHE/bundle-B,CACHE/bundle-C --out ensemble.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from anogan_ray import storage
from anogan_ray.core.invert import encode, invert_modes
from anogan_ray.core.model import ModelBundle, load_bundle
from anogan_ray.tables import decode_pixels
from benchmarks.bench_quality import read_split_table

INTENSITY_BINS = 16


def residual_maps(bundle: ModelBundle, rows: dict, cfg: dict) -> dict[str, tuple]:
    """{model: (signed residual (N, 64, 64), reconstruction (N, 64, 64))}."""
    x = torch.from_numpy(decode_pixels(rows["pixels"])).unsqueeze(1)
    mapping = invert_modes(
        bundle, x, list(rows["patch_id"]), lambda_=cfg["lambda"], steps=cfg["steps"],
        z_lr=cfg["z_lr"], initial_z=encode(bundle, x), return_z=True,
    )["feature"]  # fmt: skip
    with torch.no_grad():
        generated = bundle.generator(torch.from_numpy(mapping.z)).numpy()[:, 0]
        decoded = bundle.baselines["acae"](x)[0].numpy()[:, 0]
    pca = bundle.baselines["pca"]
    flat = x.numpy().reshape(len(x), -1) - pca.mean
    projected = ((flat @ pca.components.T) @ pca.components + pca.mean).reshape(-1, 64, 64)
    pixels = x.numpy()[:, 0]
    return {
        "A": (pixels - generated, generated),
        "aCAE": (pixels - decoded, decoded),
        "PCA": (pixels - projected, projected),
    }


SCALES = (1, 2, 4, 8)  # σ of the peaks, px: from a few pixels to a quarter of the patch


def pooled(residual: np.ndarray) -> dict[str, np.ndarray]:
    """Patch statistics of signed residual maps (N, 64, 64)."""
    magnitude = np.abs(residual)
    ranked = np.sort(magnitude.reshape(len(residual), -1), 1)
    scores = {"sum": magnitude.sum((1, 2)), "top 1 %": ranked[:, -41:].mean(1)}
    for sigma in SCALES:
        smooth = np.stack([gaussian_filter(m, sigma) for m in magnitude])
        scores[f"peak σ={sigma}"] = smooth.max((1, 2))
    return scores


def standardized(residual: np.ndarray, healthy_residual: np.ndarray) -> dict[str, np.ndarray]:
    """Each statistic of :func:`pooled` minus its healthy training mean, over its spread there."""
    scores, reference = pooled(residual), pooled(healthy_residual)
    return {k: (scores[k] - reference[k].mean()) / reference[k].std() for k in scores}


def combined(z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The single statistics and the two combinations of standardized ones."""
    multi = np.max([z["sum"], *(z[f"peak σ={s}"] for s in SCALES)], axis=0)
    return {**z, "sum + peak σ=1 (standardized)": z["sum"] + z["peak σ=1"], "multi-scale": multi}


def heteroscedastic(maps: tuple, healthy: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Residuals divided by the healthy mean |residual| at each reconstructed intensity."""
    (residual, reconstructed), (healthy_residual, healthy_reconstructed) = maps, healthy
    edges = np.quantile(healthy_reconstructed, np.linspace(0, 1, INTENSITY_BINS + 1)[1:-1])
    healthy_bin = np.digitize(healthy_reconstructed, edges)
    scale = np.array(
        [np.abs(healthy_residual[healthy_bin == b]).mean() for b in range(INTENSITY_BINS)]
    )
    return (
        residual / scale[np.digitize(reconstructed, edges)],
        healthy_residual / scale[healthy_bin],
    )


def aucs(label: np.ndarray, fraction: np.ndarray, score: np.ndarray) -> dict[str, float]:
    small = (label == 0) | (fraction <= 0.03)
    large = (label == 0) | (fraction > 0.05)
    return {
        "all": round(roc_auc_score(label, score), 4),
        "small": round(roc_auc_score(label[small], score[small]), 4),
        "large": round(roc_auc_score(label[large], score[large]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo-out", help="a demo's out folder")
    parser.add_argument("--patches", help="patch table (default: RUN/preprocess)")
    parser.add_argument("--bundles", help="bundle folders, comma-separated (default: RUN/model)")
    parser.add_argument("--steps", default="10", help="Γ of encoder+iterative, comma-separated")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.1)
    parser.add_argument("--z-lr", type=float, default=0.05)
    parser.add_argument("--train-patches", type=int, default=400)
    parser.add_argument("--out", default="pooling.json")
    args = parser.parse_args()
    table = args.patches or storage.join(args.run, "preprocess")
    bundles = args.bundles.split(",") if args.bundles else [storage.join(args.run, "model")]
    labelled = read_split_table(table, ["val", "test"])
    labelled = {k: v[labelled["label"] >= 0] for k, v in labelled.items()}
    train = read_split_table(table, ["train"])
    pick = np.random.default_rng(0).choice(len(train["label"]), args.train_patches, replace=False)
    train = {k: v[pick] for k, v in train.items()}
    label, fraction = labelled["label"], labelled["anomaly_fraction"]
    result: dict = {"patches_table": table, "bundles": bundles, "patches": len(label)}
    result["anomalous"] = int(label.sum())

    def report(name: str, z: dict[str, np.ndarray]) -> None:
        rows = {pool: aucs(label, fraction, score) for pool, score in combined(z).items()}
        result[name] = rows
        for pool, auc in rows.items():
            print(f"{name:28s} {pool:30s} {auc}", flush=True)

    members: dict[str, list] = {}
    for index, url in enumerate(bundles):
        torch.manual_seed(0)
        bundle = load_bundle(url)
        for steps in map(int, args.steps.split(",")):
            cfg = {"steps": steps, "lambda": args.lambda_, "z_lr": args.z_lr}
            maps, healthy = residual_maps(bundle, labelled, cfg), residual_maps(bundle, train, cfg)
            for model in maps:
                variants = {
                    "raw": (maps[model][0], healthy[model][0]),
                    "hetero": heteroscedastic(maps[model], healthy[model]),
                }
                for variant, (residual, healthy_residual) in variants.items():
                    z = standardized(residual, healthy_residual)
                    name = f"Γ={steps} {model} {variant}"
                    report(f"{name} #{index}" if len(bundles) > 1 else name, z)
                    members.setdefault(name, []).append(z)
    if len(bundles) > 1:  # the ensemble: each standardized statistic averaged over the bundles
        for name, zs in members.items():
            report(f"{name} ensemble", {k: np.mean([z[k] for z in zs], 0) for k in zs[0]})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
