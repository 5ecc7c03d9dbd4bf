"""Image sets the project was not built on: photographs with pasted defects, one-class digits.

Run by hand. Writes each set as a folder of PNGs (``train/normal``, ``val|test/normal|defect``),
then runs the product's flow on it as a user would: ``manifest --modality image
--split-from-folder --label-from-folder normal=0,defect=1`` → preprocess → train → score →
evaluate per image (image score = max of its patch scores; AUC is threshold-free). Every score of
the paper's Table 1 and PCA come from the same run on the same images. JSON out.

Sets (all grayscale, built from data shipped with scikit-image / scikit-learn, no download):

* ``brick``, ``grass``, ``gravel``: 96 x 96 crops of scikit-image's 512 x 512 photographs; train
  crops from the top 300 rows, val/test crops from the rows below (no overlap); a defect image
  has one pasted defect (chosen at random: a disc of another photograph's pixels, a scratch
  line, or a brighter / darker smooth blob; 5-14 px), and its mask beside it (``X_mask.png``,
  which ``manifest`` takes as the image's ``mask_path``).
* ``digits``: scikit-learn's 8 x 8 digits (enlarged to one 64 x 64 patch by preprocess); the
  normal class is ``--digit``, defects are the other nine classes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_images.py --sets brick,grass,gravel,digits \\
        --config demo --work /tmp/images --out images.json

``--level pixel`` also scores with z, writes the map table and evaluates each method's maps
against the defect masks (pixel AUROC, AUPRO, defect detection; the photo sets only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anogan_ray import storage
from anogan_ray.config import load_config

PHOTOS = ("brick", "grass", "gravel")
CROP = 96
TRAIN_ROWS = 300  # train crops from rows [0, 300), val/test crops from [300, 512)
COUNTS = {"train": 60, "val": 10, "test": 40}  # per class (train: normal only)
STEPS = 420  # the demo's G updates; small sets get the epochs that give about as many


def _save(folder: Path, name: str, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{name}.png")


def _paste_defect(
    crop: np.ndarray, other: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One defect at a random place: a disc of ``other``, a scratch, or a smooth blob; the image
    and the defect's mask (the disc, the line, the blob where it changes the gray value by at
    least 18 of 255)."""
    out = crop.astype(np.float32)
    size = crop.shape[0]
    radius = rng.uniform(5, 14)
    cy, cx = rng.uniform(radius, size - radius, 2)
    yy, xx = np.mgrid[:size, :size]
    kind = rng.integers(3)
    if kind == 0:  # a disc of another photograph
        oy, ox = rng.integers(0, other.shape[0] - size, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        out[disc] = other[oy : oy + size, ox : ox + size][disc]
        mask = disc
    elif kind == 1:  # a scratch: a line 2-3 px wide, brighter or darker
        angle = rng.uniform(0, np.pi)
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        line = (distance <= rng.uniform(1.0, 1.5)) & (along <= 2 * radius)
        out[line] = 235.0 if rng.random() < 0.5 else 20.0
        mask = line
    else:  # a smooth brighter or darker blob
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius / 2) ** 2))
        out += (1 if rng.random() < 0.5 else -1) * 90.0 * blob
        mask = 90.0 * blob >= 18.0
    return out, mask


def write_photo_set(name: str, root: Path, seed: int) -> None:
    import skimage.data

    photo = getattr(skimage.data, name)().astype(np.float32)
    other = skimage.data.camera().astype(np.float32) if name != "camera" else photo
    rng = np.random.default_rng(seed)
    for split, count in COUNTS.items():
        rows = (0, TRAIN_ROWS) if split == "train" else (TRAIN_ROWS, photo.shape[0])
        for label in ("normal",) if split == "train" else ("normal", "defect"):
            for i in range(count):
                y = rng.integers(rows[0], rows[1] - CROP + 1)
                x = rng.integers(0, photo.shape[1] - CROP + 1)
                crop = photo[y : y + CROP, x : x + CROP]
                stem = f"{name}_{split}_{label}_{i:03d}"
                if label == "defect":  # with its mask beside it (X_mask.png: the manifest's)
                    crop, mask = _paste_defect(crop, other, rng)
                    _save(root / split / label, f"{stem}_mask", 255 * mask.astype(np.uint8))
                _save(root / split / label, stem, crop)


def write_digit_set(root: Path, digit: int, seed: int) -> int:
    """Returns the number of training images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images * (255.0 / 16.0)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(data.target == digit))
    others = rng.permutation(np.flatnonzero(data.target != digit))
    n_val, n_test = 10, (normal.size - 10) // 5
    parts = {
        ("train", "normal"): normal[n_val + n_test :],
        ("val", "normal"): normal[:n_val],
        ("test", "normal"): normal[n_val : n_val + n_test],
        ("val", "defect"): others[:n_val],
        ("test", "defect"): others[n_val : n_val + n_test],
    }
    for (split, label), indices in parts.items():
        for i in indices:
            _save(root / split / label, f"digit_{data.target[i]}_{i:04d}", images[i])
    return int(parts[("train", "normal")].size)


def run_set(name: str, work: Path, args: argparse.Namespace) -> dict:
    from anogan_ray.core import metrics
    from anogan_ray.data.manifest import build_manifest
    from anogan_ray.pipelines.preprocess import preprocess
    from anogan_ray.pipelines.score import score
    from anogan_ray.pipelines.train import train

    root = work / name
    images = root / "images"
    overrides = list(args.overrides)
    if args.level == "pixel":  # the A map needs each patch's final z
        overrides.append("score.save_z=true")
    if name == "digits":
        n_train = write_digit_set(images, args.digit, args.seed)
    else:
        write_photo_set(name, images, args.seed)
        n_train = None
    cfg = load_config(args.config, overrides)
    if n_train is not None:  # one patch per image: as many G updates as the demo's training
        epochs = math.ceil(STEPS * cfg.train.batch_size / n_train)
        cfg = load_config(args.config, [f"train.epochs={epochs}", *overrides])
    timings = {}
    started = time.perf_counter()
    manifest = str(root / "manifest.csv")
    build_manifest(
        str(images), manifest, modality="image", split_from_folder=True,
        label_from_folder={"normal": 0, "defect": 1},
    )  # fmt: skip
    out = {stage: str(root / stage) for stage in ("preprocess", "model", "score")}
    prep = preprocess(manifest, out["preprocess"], cfg.preprocess)
    timings["preprocess"] = time.perf_counter() - started
    patches = storage.join(out["preprocess"], "patches")
    train(patches, out["model"], cfg)
    timings["train"] = time.perf_counter() - started - sum(timings.values())
    score(patches, out["model"], out["score"], cfg.score)
    timings["score"] = time.perf_counter() - started - sum(timings.values())
    scores = storage.join(out["score"], "scores")
    result = {
        "set": name,
        "images": prep["volumes"],
        "rejected": prep["volumes_rejected"],
        "patches_per_split": prep["patches_per_split"],
        "epochs": cfg.train.epochs,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    for aggregate in ("max", "mean"):
        table = metrics.evaluate(scores, level="volume", split="test", aggregate=aggregate)
        result[f"auc_{aggregate}"] = {k: round(v["auc"], 4) for k, v in table["scores"].items()}
        result["test_images"] = table["n"]
        result["test_defect_images"] = table["n_anomalous"]
    if args.level == "pixel" and name != "digits":  # digits have no defect masks
        result["pixel"] = pixel_level(patches, out["model"], out["score"], manifest, cfg)
    print(json.dumps(result), flush=True)
    return result


def pixel_level(patches: str, model: str, out: str, manifest: str, cfg) -> dict:
    """Maps of the run (the product's pass) against the defect masks: pixel AUROC, AUPRO and
    defect detection on test, thresholds at the 99th percentile of the val normal pixels; as
    stored, smoothed, and standardized on val's normal pixels then smoothed."""
    from anogan_ray.analysis.pixels import evaluate_pixels, format_pixel_table
    from anogan_ray.pipelines.maps import write_maps
    from anogan_ray.pipelines.score import scoring_key

    model_id = storage.read_json(storage.join(model, "bundle.json"))["model_id"]
    key = scoring_key(model_id, cfg.score)
    if cfg.score.mapping == "encoder":
        key = scoring_key(model_id, dataclasses.replace(cfg.score, steps=0))
    maps = write_maps(patches, model, out, key, cfg.score)
    result = {"maps_bytes_per_patch": maps["bytes_per_patch"]}
    settings = {  # as stored; the post-processings of docs/maps.md, for every method alike
        "raw": {},
        "smooth_2": {"smooth_sigma": 2.0},
        "standardize_smooth_2": {"standardize": True, "smooth_sigma": 2.0},
    }
    for name, options in settings.items():
        table = evaluate_pixels(storage.join(out, "maps"), manifest, key=key, **options)
        print(format_pixel_table(table), flush=True)
        result[name] = {
            method: {k: row[k] for k in ("auroc", "aupro", "detection_rate", "healthy_fpr")}
            for method, row in table["methods"].items()
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join((*PHOTOS, "digits")))
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--digit", type=int, default=0, help="the normal class of digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--level",
        choices=["image", "pixel"],
        default="image",
        help="pixel: also the maps' pixel AUROC / AUPRO against the defect masks",
    )
    parser.add_argument("--work", required=True, help="a fresh folder for the sets and runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from anogan_ray.ray_env import ensure_ray

    ensure_ray()
    work = Path(args.work)
    results = [run_set(name, work, args) for name in args.sets.split(",")]
    Path(args.out).write_text(
        json.dumps(
            {"config": args.config, "overrides": args.overrides, "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
