"""Fast mapping benchmark: AUC, FLOPs and patches/s of each mapping and Γ on one trained bundle.

In-process (no Ray), on the labelled val/test patches of a patch table, with a bundle that has an
encoder (``anogan-ray train`` with ``train.encoder=true``, as ``make demo`` leaves in
``demo-out/model``). FLOPs per patch are counted by PyTorch's FlopCounterMode on one patch, so
the ratios between mappings are exact; patches/s is wall time on this machine.

    .venv/bin/python benchmarks/bench_mapping.py --patches demo-out/preprocess \
        --model demo-out/model --gammas 0,10,50,100,500 --max-patches 400 --out mapping.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow.dataset as pads
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.flop_counter import FlopCounterMode

from anogan_ray import storage
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import load_bundle
from anogan_ray.tables import decode_pixels


def labelled_patches(patches: str, max_patches: int, seed: int = 0):
    """(pixels (N, 1, 64, 64), ids, labels) of the labelled val/test patches, a seeded sample."""
    if storage.exists(storage.join(patches, "patches")):
        patches = storage.join(patches, "patches")
    fs, root = storage.arrow_filesystem(patches)
    table = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["patch_id", "pixels", "label", "split"]
    )
    labels = table["label"].to_numpy(zero_copy_only=False).astype(int)
    split = table["split"].to_numpy(zero_copy_only=False).astype(str)
    keep = np.flatnonzero((labels >= 0) & np.isin(split, ["val", "test"]))
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(keep, size=min(max_patches, len(keep)), replace=False))
    pixels = np.stack([np.asarray(table["pixels"][int(i)].as_py(), np.uint8) for i in keep])
    pixels = torch.from_numpy(decode_pixels(pixels.reshape(-1, 64, 64)))[:, None]
    ids = [str(table["patch_id"][int(i)]) for i in keep]
    return pixels, ids, labels[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", required=True, help="patch table or preprocess stage folder")
    parser.add_argument("--model", required=True, help="model bundle with an encoder")
    parser.add_argument("--gammas", default="0,10,50,100,500", help="Γ values (comma-separated)")
    parser.add_argument("--max-patches", type=int, default=400, help="labelled patches scored")
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.1)
    parser.add_argument("--z-lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_mapping.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    pixels, ids, labels = labelled_patches(args.patches, args.max_patches)
    gammas = [int(g) for g in args.gammas.split(",")]
    runs = [("encoder", 0)] + [
        (mapping, g) for g in gammas for mapping in ("iterative", "encoder+iterative") if g > 0
    ]
    common = dict(lambda_=args.lambda_, z_lr=args.z_lr)
    rows = []
    for mapping, gamma in runs:
        with FlopCounterMode(display=False) as counter:  # one patch: FLOPs per patch
            score_patches(bundle, pixels[:1], ids[:1], steps=gamma, mapping=mapping, **common)
        started = time.perf_counter()
        scores: dict[str, list] = {"anomaly_score": [], "residual_score": [], "pca_score": []}
        for i in range(0, len(ids), args.batch_size):
            batch = score_patches(
                bundle,
                pixels[i : i + args.batch_size],
                ids[i : i + args.batch_size],
                steps=gamma,
                mapping=mapping,
                **common,
            )
            for name in scores:
                scores[name].append(batch[name])
        seconds = time.perf_counter() - started
        row = {
            "mapping": mapping,
            "steps": gamma,
            "gflop_per_patch": counter.get_total_flops() / 1e9,
            "patches_per_s": len(ids) / seconds,
            "auc_A": float(roc_auc_score(labels, np.concatenate(scores["anomaly_score"]))),
            "auc_R": float(roc_auc_score(labels, np.concatenate(scores["residual_score"]))),
        }
        pca = np.concatenate(scores["pca_score"])
        if np.isfinite(pca).all():
            row["auc_PCA_same_patches"] = float(roc_auc_score(labels, pca))
        rows.append(row)
        print(json.dumps(row), flush=True)
    longest = max((r for r in rows if r["mapping"] == "iterative"), key=lambda r: r["steps"])
    for row in rows:
        row["flops_vs_iterative_longest"] = row["gflop_per_patch"] / longest["gflop_per_patch"]
    result = {
        "model_id": bundle.model_id,
        "patches": len(ids),
        "anomalous": int(labels.sum()),
        "lambda": args.lambda_,
        "z_lr": args.z_lr,
        "threads": args.threads,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
