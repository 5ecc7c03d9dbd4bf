"""A synthetic score table of any size, for measuring and testing the analysis layer at scale.

The rows look like a scored cohort (DESIGN.md §3.4) without a model: one volume per subject,
500 grid patches per volume (5 B-scans x 4 rows x 25 columns), a fifth of the subjects in
``val`` (healthy) and the rest in ``test``, where 40 % of the subjects are pathological and a
fifth of their patches annotated (annotated share uniform in (0, 0.3]); 1 % of the patches carry
no label. Scores grow with the label and the annotated share plus noise, so AUCs lie between 0.6
and 0.95; ``discrimination_score`` and ``p_d`` are rounded, so they hold many ties; ``acae_score``
is all NaN (a bundle without that baseline). Written volume by volume in chunks, so memory stays
flat whatever ``rows`` is.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from anogan_ray.tables import patch_id

PATCHES_PER_VOLUME = 500  # 5 B-scans x 4 rows x 25 columns of 64 x 64 patches, stride 32
VAL_EVERY = 5  # every fifth subject is a healthy validation subject


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bscan, y, x = np.meshgrid(np.arange(5), np.arange(4) * 32, np.arange(25) * 32, indexing="ij")
    return bscan.ravel(), y.ravel(), x.ravel()


def _volume_rows(subjects: np.ndarray, seed: int, key: int) -> pa.Table:
    """The score rows of the volumes of ``subjects`` under key number ``key``: the labels depend
    on the subjects and ``seed`` only, the scores' noise on the key too (shifted by 2 per key)."""
    rng = np.random.default_rng([seed, int(subjects[0])])
    bscan, y, x = _grid()
    per = PATCHES_PER_VOLUME
    subject = np.repeat(subjects, per)
    n = subject.size
    pathological = (subject % VAL_EVERY != 0) & (subject * 2654435761 % 5 < 2)
    label = np.where(pathological & (rng.random(n) < 0.2), 1, 0).astype(np.int8)
    fraction = np.where(label == 1, rng.uniform(0.001, 0.3, n), 0.0)
    unknown = rng.random(n) < 0.01
    label[unknown] = -1
    fraction[unknown] = np.nan
    rng, shift = np.random.default_rng([seed, int(subjects[0]), key]), 2.0 * key
    known = np.where(label == 1, 1.0, 0.0)
    residual = 100 + rng.normal(0, 12, n) + 6 * known + 80 * np.nan_to_num(fraction) + shift
    discrimination = np.round(10 + rng.normal(0, 2, n) + 4 * known, 1)
    p_d = np.round(1 / (1 + np.exp(discrimination - 10 - rng.normal(0, 2, n))), 3)
    names = [f"s{s:07d}" for s in subjects]
    volumes = [f"{s}_od" for s in names]
    ids = [patch_id(v, int(b), int(r), int(c)) for v in volumes for b, r, c in zip(bscan, y, x)]
    return pa.table(
        {
            "patch_id": pa.array(ids, pa.string()),
            "subject_id": pa.array(np.repeat(names, per), pa.string()),
            "volume_id": pa.array(np.repeat(volumes, per), pa.string()),
            "bscan": np.tile(bscan, len(subjects)).astype(np.int32),
            "y": np.tile(y, len(subjects)).astype(np.int32),
            "x": np.tile(x, len(subjects)).astype(np.int32),
            "label": label,
            "anomaly_fraction": fraction.astype(np.float32),
            "volume_label": pathological.astype(np.int8),
            "source": pa.array(np.repeat([f"synthetic/{v}.npy" for v in volumes], per)),
            "anomaly_score": 0.9 * residual + 0.1 * discrimination,
            "residual_score": residual,
            "discrimination_score": discrimination,
            "p_d": p_d.astype(np.float32),
            "ref_anomaly_score": 0.9 * residual + rng.normal(0, 10, n),
            "ref_discrimination_score": rng.normal(1, 0.3, n) + 0.3 * known,
            "acae_score": np.full(n, np.nan),
            "pca_score": residual + rng.normal(0, 15, n),
        }
    )


def write_score_table(
    folder: str, rows: int, files: int = 8, keys: int = 1, seed: int = 0
) -> dict[str, int]:
    """Write about ``rows`` score rows (whole volumes; per key) under ``folder`` (local),
    hive-partitioned by split, ``files`` files per split.

    With ``keys`` > 1 every patch is scored under that many keys (``lambda`` 0.1, 0.2, ...; the
    scores of each further key shifted up by 2), as a λ sweep writes them.

    Returns:
        ``{"rows", "volumes", "files"}`` written.
    """
    volumes = max(VAL_EVERY, round(rows / PATCHES_PER_VOLUME))
    subjects = np.arange(volumes)
    written = 0
    chunks = np.array_split(subjects, files)
    for k in range(keys):
        for i, chunk in enumerate(chunks):
            table = _volume_rows(chunk, seed, k)
            n = table.num_rows
            table = table.append_column("model_id", pa.array(["synthetic000000"] * n))
            table = table.append_column("lambda", pa.array(np.full(n, round(0.1 * (k + 1), 1))))
            table = table.append_column("steps", pa.array(np.full(n, 30, np.int64)))
            table = table.append_column("z_lr", pa.array(np.full(n, 0.05)))
            table = table.append_column("mapping", pa.array(["iterative"] * n))
            val = np.repeat(chunk % VAL_EVERY == 0, PATCHES_PER_VOLUME)
            for split, keep in (("val", val), ("test", ~val)):
                part = os.path.join(folder, f"split={split}")
                os.makedirs(part, exist_ok=True)
                pq.write_table(table.filter(pa.array(keep)), f"{part}/key{k}-part{i:03d}.parquet")
            written += n
    return {"rows": written, "volumes": volumes, "files": 2 * files * keys}
