"""Cohort manifest -> patch table, with Ray Data (``anogan-ray preprocess``, ``jobs/preprocess.py``).

The unit of work is one volume: the manifest becomes a dataset with one row (and one block) per
volume, and :func:`anogan_ray.data.retina.preprocess_volume` turns each into patch rows (training mode
for split ``train``, the scoring grid for ``val`` / ``test``; see :mod:`anogan_ray.data.retina`).

Output layout of :func:`preprocess` under the stage folder ``out`` (local or ``s3://``):

* ``out/patches/split=<split>/*.parquet``: the patch table (DESIGN.md §3.2), Hive-partitioned by
  ``split``; files hold up to ``rows_per_file`` rows (and at least that many, or what is left,
  where the data allows). Read it back with :func:`anogan_ray.tables.read_patch_table`, which restores ``split``.
* ``out/rejects/rejects.parquet``: one row per volume that could not be used (``source``,
  ``volume_id``, ``reason``); always written, empty when nothing was rejected.
* ``out/geometry/<hash of volume_id>.parquet``: per B-scan, the x and y scales and the per-column
  flattening shift that map a patch back to the original B-scan, and the ILM / BM used (see
  :class:`anogan_ray.data.retina.BscanGeometry`); one file per volume, written by the task that
  preprocessed it, so the driver never holds the cohort's geometry (read the folder as one table).
* ``out/summary.json``: counts, rejects, timings; written last, so its presence marks a finished run.

Re-runs are idempotent: patch ids and random positions depend only on the inputs and
``cfg.seed``, so a re-run writes the same set of rows, never duplicates.

**A re-run never destroys good output.** The run writes everything into ``out/_staging/``
(``patches/``, ``rejects/``, ``geometry/`` and, last, ``summary.json``) and touches the stage
folder's own outputs only once the staging folder is complete; a run that fails or is killed
before that (a bad volume found late, a lost driver, a full disk) leaves the previous outputs
as they were, and the next run discards its staging folder. Publishing then removes
``out/summary.json``, replaces ``patches``, ``rejects`` and ``geometry`` one by one with their
staged versions (:func:`anogan_ray.storage.replace`) and finally moves ``summary.json`` in.
A publish that is cut short is finished by the next run before it stages anything: the staged
``summary.json`` marks a staging folder as complete, and it is removed only after everything
it vouches for is in place. So at every moment either the old outputs are complete in ``out/``
or the new ones are complete in ``out/_staging/``, and ``out/summary.json`` is present only
when ``out/`` holds one run's complete outputs.

Why this and not a versioned folder behind a pointer file (the other usual answer to "S3 has no
atomic rename"): every consumer reads ``out/patches`` as a plain folder of Parquet files
(``--patches DIR/patches``, DuckDB, pyarrow), and a pointer would make each of them resolve it,
or see every version at once. The price is the publish step itself: locally each table is
swapped by two renames (a reader sees the old or the new table whole), but on S3 a table is
deleted and then copied in object by object, so a reader *during* those seconds can find it
incomplete (never a mix of two runs' rows; rerun the reader). ``summary.json`` is absent for
that window, which is how a careful reader tells.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from anogan_ray import storage
from anogan_ray.config import PreprocessConfig
from anogan_ray.data.retina import STEPS, VolumePatches, preprocess_volume
from anogan_ray.data.volumes import SPLITS, VolumeError, read_manifest
from anogan_ray.pipelines.progress import logged_progress
from anogan_ray.ray_env import ensure_ray
from anogan_ray.tables import PATCH_COLUMNS, geometry_file

log = logging.getLogger(__name__)

REJECT_COLUMNS = ("source", "volume_id", "reason")
STAGING = "_staging"  # the folder inside the stage folder where a run writes its outputs
PUBLISHED = ("patches", "rejects", "geometry")  # moved from the staging folder when complete


def _volume_file(folder: str, volume_id: str, suffix: str) -> str:
    """A per-volume file named after the volume (a retried task rewrites the same file)."""
    return storage.join(folder, hashlib.sha1(volume_id.encode()).hexdigest() + suffix)


def _geometry_table(volume_id: str, geometry: list) -> pa.Table:
    """One volume's B-scan geometry as rows of the geometry table."""
    return pa.table(
        {
            "volume_id": pa.array([volume_id] * len(geometry), pa.string()),
            "bscan": pa.array([g.bscan for g in geometry], pa.int32()),
            "x_scale": pa.array([g.x_scale for g in geometry], pa.float64()),
            "y_scale": pa.array([g.y_scale for g in geometry], pa.float64()),
            "bm_row": pa.array([g.bm_row for g in geometry], pa.int32()),
            "shift": pa.array([g.shifts.tolist() for g in geometry], pa.list_(pa.int32())),
            "ilm": pa.array([g.ilm.round(2).tolist() for g in geometry], pa.list_(pa.float32())),
            "bm": pa.array([g.bm.round(2).tolist() for g in geometry], pa.list_(pa.float32())),
        }
    )


def _empty_columns(cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    size = cfg.patch_size
    return {
        "patch_id": np.array([], dtype=object),
        "subject_id": np.array([], dtype=object),
        "volume_id": np.array([], dtype=object),
        "bscan": np.array([], dtype=np.int32),
        "y": np.array([], dtype=np.int32),
        "x": np.array([], dtype=np.int32),
        "split": np.array([], dtype=object),
        "pixels": np.zeros((0, size, size), dtype=np.uint8),
        "label": np.array([], dtype=np.int8),
        "anomaly_fraction": np.array([], dtype=np.float32),
        "volume_label": np.array([], dtype=np.int8),
        "source": np.array([], dtype=object),
        "spacing_source": np.array([], dtype=object),
    }


def _volume_record(
    record: dict[str, Any], result: VolumePatches | None, reason: str | None
) -> dict:
    """What the driver needs to know about one volume (summary, rejects): small and fixed-size;
    the B-scan geometry goes to the geometry table from the worker."""
    summary: dict[str, Any] = {
        "volume_id": record["volume_id"],
        "source": record["path"],
        "split": record["split"],
        "reason": reason,
    }
    if result is not None:
        summary.update(
            bscans=result.bscans,
            patches=result.num_patches,
            timings=result.timings,
            spacing_x_um=result.spacing_x_um,
            spacing_source=result.spacing_source,
            segmentation=result.segmentation,
        )
    return summary


def _patches_of_volumes(
    batch: dict[str, np.ndarray],
    cfg: PreprocessConfig,
    staging: str,
    progress: ray.actor.ActorHandle,
) -> dict:
    """Ray Data UDF: a batch of manifest rows -> their patch rows.

    Each volume's outcome (patch count, timings, or its reject reason) is written to
    ``staging/_volumes`` as a small JSON file named after the volume, and its B-scan geometry to
    ``staging/geometry`` likewise, so a retried task rewrites the same files.
    """
    parts = []
    for index in range(len(batch["volume_id"])):
        record = {key: _plain(values[index]) for key, values in batch.items()}
        try:
            result = preprocess_volume(record, cfg)
            reason = None
        except VolumeError as exc:
            result, reason = None, str(exc)
        except Exception as exc:  # a bug or an exotic file must not stop the cohort
            log.exception("volume %s failed", record["volume_id"])
            result, reason = None, f"processing failed ({type(exc).__name__}: {exc})"
        volume_id = record["volume_id"]
        if result is not None:
            _write_table(
                geometry_file(storage.join(staging, "geometry"), volume_id),
                _geometry_table(volume_id, result.geometry),
            )
        storage.write_json(
            _volume_file(storage.join(staging, "_volumes"), volume_id, ".json"),
            _volume_record(record, result, reason),
        )
        progress.add.remote(1)
        if result is not None and result.num_patches:
            parts.append(result.columns)
    if not parts:
        return _empty_columns(cfg)
    return {name: np.concatenate([part[name] for part in parts]) for name in PATCH_COLUMNS}


def _plain(value: Any) -> Any:
    """numpy / pandas scalars -> Python values (None for missing)."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _write_table(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue())


def _finish_publishing(out: str) -> None:
    """Publish ``out``'s staging folder if it is complete (its ``summary.json`` is there), then
    remove it; an incomplete one is only removed. Repeatable at any point (see the module
    docstring)."""
    staging = storage.join(out, STAGING)
    marker = storage.join(staging, "summary.json")
    if storage.exists(marker):
        storage.remove(storage.join(out, "summary.json"))  # out/ is not one run's outputs now
        for name in PUBLISHED:
            staged = storage.join(staging, name)
            # locally a published table's staged folder is gone (renamed into out/); on S3 it
            # stays until the end, and a missing one means the run wrote nothing there
            if storage.is_remote(out) or storage.exists(staged):
                storage.replace(staged, storage.join(out, name))
        storage.replace(marker, storage.join(out, "summary.json"))
        storage.remove(marker)  # S3 keeps a copy's source: the marker goes before the rest
    storage.remove(staging)


def preprocess(manifest: str, out: str, cfg: PreprocessConfig) -> dict[str, Any]:
    """Preprocess a cohort: manifest -> patch table, rejects, geometry and ``summary.json``.

    Args:
        manifest: the cohort manifest (CSV or Parquet, local or ``s3://``; DESIGN.md §3.1).
        out: the stage folder (local or ``s3://``); see the module docstring for its layout.
        cfg: the preprocess configuration.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        anogan_ray.data.volumes.ManifestError: the manifest is unusable (before any volume is read).
    """
    started = time.perf_counter()
    frame = read_manifest(manifest)
    ensure_ray()

    _finish_publishing(out)  # a publish cut short is finished, an unfinished staging dropped
    staging = storage.join(out, STAGING)
    # one filesystem for the driver's many small operations (each new s3fs one costs a session)
    fs, root = storage.filesystem(staging)

    records = [
        {
            "subject_id": row["subject_id"],
            "volume_id": row["volume_id"],
            "path": row["path"],
            "modality": row["modality"],
            "split": row["split"],
            "spacing_x_um": None if math.isnan(row["spacing_x_um"]) else float(row["spacing_x_um"]),
            "mask_path": row["mask_path"] or "",
            "label": -1 if pd.isna(row["label"]) else int(row["label"]),  # -1: not labelled
        }
        for row in frame.to_dict("records")
    ]
    arrow_fs, arrow_path = storage.arrow_filesystem(storage.join(staging, "patches"))
    volumes = ray.data.from_items(records, override_num_blocks=max(1, len(records)))
    with logged_progress(len(records), log, verb="preprocessed", unit="volumes") as progress:
        patches = volumes.map_batches(
            _patches_of_volumes,
            batch_size=1,  # one volume per task: the unit of work and of failure
            batch_format="numpy",
            fn_kwargs={"cfg": cfg, "staging": staging, "progress": progress},
        )
        patches.write_parquet(
            arrow_path,
            filesystem=arrow_fs,
            partition_cols=["split"],
            min_rows_per_file=cfg.rows_per_file,
            max_rows_per_file=cfg.rows_per_file,
        )

    record_root = f"{root}/_volumes"  # the per-volume outcomes the tasks wrote
    record_files = sorted(fs.find(record_root)) if fs.exists(record_root) else []
    outcomes = [json.loads(data) for data in fs.cat(record_files).values()] if record_files else []
    outcomes.sort(key=lambda o: o["volume_id"])
    rejects = [o for o in outcomes if o["reason"] is not None]
    done = [o for o in outcomes if o["reason"] is None]
    missing = set(frame["volume_id"]) - {o["volume_id"] for o in outcomes}
    if missing:  # cannot happen unless a task died without Ray noticing
        raise RuntimeError(f"preprocess: no outcome recorded for volumes {sorted(missing)}")

    _write_table(
        storage.join(staging, "rejects", "rejects.parquet"),
        pa.table({c: pa.array([o[c] for o in rejects], pa.string()) for c in REJECT_COLUMNS}),
    )
    if record_files:
        fs.rm(record_root, recursive=True)
    for name in PUBLISHED:  # locally a folder for each, even an empty one (see _finish_publishing)
        storage.makedirs(storage.join(staging, name))

    elapsed = time.perf_counter() - started
    step_seconds = {step: round(sum(o["timings"][step] for o in done), 4) for step in STEPS}
    bscans = sum(o["bscans"] for o in done)
    summary = {
        "manifest": manifest,
        "out": out,
        "patches": storage.join(out, "patches"),
        "volumes": len(records),
        "volumes_read": len(done),
        "volumes_rejected": len(rejects),
        "rejects": [{c: o[c] for c in REJECT_COLUMNS} for o in rejects],
        "bscans": bscans,
        "patches_written": sum(o["patches"] for o in done),
        "patches_per_split": {
            split: sum(o["patches"] for o in done if o["split"] == split)
            for split in SPLITS
            if any(o["split"] == split for o in done)
        },
        # per OCT volume: the A-scan spacing and its source, the layers used for flattening and,
        # where the file has its own, their mean absolute row difference to ours
        "volume_geometry": [
            {
                "volume_id": o["volume_id"],
                "spacing_x_um": o["spacing_x_um"],
                "spacing_source": o["spacing_source"],
                **o["segmentation"],
            }
            for o in done
            if o["spacing_source"] != "none"
        ],
        "seconds": round(elapsed, 3),
        "step_seconds": step_seconds,
        "config": {key: getattr(cfg, key) for key in cfg.__dataclass_fields__},
    }
    storage.write_json(storage.join(staging, "summary.json"), summary)  # staging complete
    _finish_publishing(out)
    log.info(
        "preprocess: %d volumes read, %d rejected, %d patches in %.1fs",
        len(done),
        len(rejects),
        summary["patches_written"],
        elapsed,
    )
    return summary
