"""Score table + patch table -> the map table: every scored B-scan's residual maps (Ray tasks).

For one scoring key, :func:`write_maps` draws each method's residual map of every B-scan the
key scored (:mod:`anogan_ray.core.maps`: A's |x − G(z_Γ)| from the stored final z, the aCAE's and
PCA's reconstructions) and writes them to ``out/maps/`` (the map table, DESIGN.md §3.4a;
layout in :data:`anogan_ray.tables.MAP_COLUMNS` and docs/maps.md)::

    out/scores/       the score table it reads (with z: score.save_z)
    out/maps/*.parquet the map table: one row per B-scan, method and scoring key
    out/_staging_maps/<key>/ files being written now (never read as part of the table)

Exactly once, resumable. The unit of work is a group of at most ``bscans_per_task`` B-scans
(whole volumes where they fit), and each group's maps, every method of every B-scan, go into one
file that appears whole or not at all (written aside, then renamed; on S3 an object appears
when its upload completes). Its name is a hash of the key and the group's B-scans, so a retried
task rewrites the same file instead of adding one. A run first lists the B-scans the key has
maps of and draws only the others: a killed run loses at most its unfinished groups, and the
next run completes exactly those. One run per scoring key at a time (as for the score table).

Memory: the driver holds the list of B-scan ids; each task reads only its group's score rows
(pyarrow filters on ``volume_id``) and patch pixels, and at most ``2 x CPUs`` tasks are in
flight. Ray runs the tasks; the maps themselves are plain numpy and torch. The driver logs how
many B-scans are done, the rate and the time left every 15 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from anogan_ray import storage, tables
from anogan_ray.config import ScoreConfig
from anogan_ray.pipelines.progress import PROGRESS_EVERY_S, rate_line
from anogan_ray.ray_env import ensure_ray
from anogan_ray.tables import ScoringKey, TableError

log = logging.getLogger(__name__)

MAPS = "maps"
STAGING = "_staging_maps"
BSCANS_PER_TASK = 32  # B-scans per task and per file (~3 MB a file for 3 methods of 256 columns)


# ---------------------------------------------------------------------------------------------
# What is there and what is left
# ---------------------------------------------------------------------------------------------


def _bscans(
    url: str, key: ScoringKey, splits: Sequence[str] | None, what: str
) -> set[tuple[str, int]]:
    """(volume_id, bscan) of the rows of ``key`` (in ``splits``) of a score or map table."""
    if not storage.list_files(url, ".parquet"):
        return set()
    dataset = tables.open_dataset(url, what=what)
    keep = key.expression()
    if splits is not None:
        keep = keep & pads.field("split").isin(list(splits))
    found: set[tuple[str, int]] = set()
    for batch in dataset.to_batches(columns=["volume_id", "bscan"], filter=keep):
        distinct = pa.Table.from_batches([batch]).group_by(["volume_id", "bscan"]).aggregate([])
        found.update(zip(distinct["volume_id"].to_pylist(), distinct["bscan"].to_pylist()))
    return found


def _groups(pending: list[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    """Sorted B-scans cut into groups of at most ``size``; a volume is split only when it
    alone holds more than ``size`` B-scans."""
    by_volume: dict[str, list[tuple[str, int]]] = {}
    for item in sorted(pending):
        by_volume.setdefault(item[0], []).append(item)
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    for items in by_volume.values():
        for start in range(0, len(items), size):
            part = items[start : start + size]
            if current and len(current) + len(part) > size:
                groups.append(current)
                current = []
            current = current + part
    if current:
        groups.append(current)
    return groups


def _group_file(out: str, key: ScoringKey, group: list[tuple[str, int]]) -> str:
    """The map table file of a group: named by the key and the group's B-scans."""
    digest = hashlib.sha1(str(key).encode())
    for volume_id, bscan in group:
        digest.update(f"\0{volume_id}\0{bscan}".encode())
    return storage.join(out, MAPS, f"{digest.hexdigest()[:24]}.parquet")


def _staging(out: str, key: ScoringKey) -> str:
    """Where runs of this key write files before renaming them into the map table."""
    return storage.join(out, STAGING, hashlib.sha1(str(key).encode()).hexdigest()[:16])


def _write_whole(table: pa.Table, url: str, staging_url: str) -> int:
    """Write one Parquet file so readers see all of it or nothing; returns its size in bytes."""
    if storage.is_remote(url):  # an S3 object appears only when its upload completes
        fs, path = storage.arrow_filesystem(url)
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return int(fs.get_file_info(path).size)
    staging = storage.filesystem(staging_url)[1]
    os.makedirs(staging, exist_ok=True)
    tmp = os.path.join(staging, f"{uuid.uuid4().hex}.parquet")
    pq.write_table(table, tmp, compression="zstd")
    target = storage.filesystem(url)[1]
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(tmp, target)  # atomic on one filesystem
    return os.path.getsize(target)


# ---------------------------------------------------------------------------------------------
# One group of B-scans (a Ray task)
# ---------------------------------------------------------------------------------------------


def _score_rows(out: str, key: ScoringKey, volume_ids: list[str]) -> pa.Table:
    dataset = tables.open_dataset(storage.join(out, "scores"))
    columns = ["patch_id", "volume_id", "subject_id", "bscan", "y", "x", "split", "z"]
    where = key.expression() & pads.field("volume_id").isin(volume_ids)
    return dataset.to_table(columns=columns, filter=where)


def _patch_pixels(patches: str, patch_ids: list[str], volume_ids: list[str]) -> np.ndarray:
    """uint8 pixels (N, 64, 64) in the order of ``patch_ids``."""
    url = tables.patch_table_url(patches)
    dataset = tables.open_dataset(url, what="patch table")
    table = dataset.to_table(
        columns=["patch_id", "pixels"], filter=pads.field("volume_id").isin(volume_ids)
    )
    position = {pid: i for i, pid in enumerate(table["patch_id"].to_pylist())}
    missing = [pid for pid in patch_ids if pid not in position]
    if missing:
        raise TableError(
            f"patch table {url}: {len(missing)} scored patch(es) not found, e.g. {missing[0]} "
            "(was the score table written from another patch table?)"
        )
    pixels = tables.pixels_from_column(table["pixels"])
    return pixels[[position[pid] for pid in patch_ids]]


def write_group(
    patches: str,
    model: str,
    out: str,
    key: ScoringKey,
    group: list[tuple[str, int]],
    combine: str = "mean",
) -> dict[str, int]:
    """Draw and write the maps of one group of B-scans (every method the bundle has).

    Returns:
        ``{"bscans", "maps", "patches", "bytes"}`` written.
    """
    import torch

    from anogan_ray.core.maps import available_methods, reconstructions, stitch
    from anogan_ray.core.model import load_bundle

    bundle = load_bundle(model)
    methods = available_methods(bundle)
    volume_ids = sorted({v for v, _ in group})
    wanted = set(group)
    rows = _score_rows(out, key, volume_ids)
    keep = [
        (v, b) in wanted
        for v, b in zip(rows["volume_id"].to_pylist(), rows["bscan"].to_pylist(), strict=True)
    ]
    rows = rows.filter(pa.array(keep, pa.bool_())).to_pandas()
    if rows["z"].isna().any():
        raise TableError(
            f"score table {storage.join(out, 'scores')}: {int(rows['z'].isna().sum())} patch(es) "
            f"of key {key} have no stored z (score them with score.save_z=true)"
        )
    pixels = _patch_pixels(patches, list(rows["patch_id"]), volume_ids)
    geometry_folder = tables.geometry_url(patches)
    geometries: dict[str, dict | None] = {
        v: tables.read_geometry(geometry_folder, v) for v in volume_ids
    }
    records = []
    for (volume_id, bscan), part in rows.groupby(["volume_id", "bscan"], sort=True):
        index = part.index.to_numpy()
        x = torch.from_numpy(tables.decode_pixels(pixels[index]))[:, None]  # (n, 1, 64, 64)
        z = np.stack(part["z"].to_numpy()).astype(np.float32)  # (n, nz)
        rebuilt = reconstructions(bundle, x, z, methods)  # {method: (n, 64, 64)}
        geometry = (geometries[volume_id] or {}).get(int(bscan))
        ys, xs = part["y"].to_numpy(), part["x"].to_numpy()
        for method in methods:
            residual = np.abs(x[:, 0].numpy() - rebuilt[method])
            stitched = stitch(residual, ys, xs, combine)
            reconstruction = stitch(rebuilt[method], ys, xs, "mean")
            height, width = stitched.values.shape
            records.append(
                {
                    "volume_id": volume_id,
                    "subject_id": part["subject_id"].iloc[0],
                    "bscan": int(bscan),
                    "split": part["split"].iloc[0],
                    "method": method,
                    "combine": combine,
                    "top": stitched.top,
                    "left": stitched.left,
                    "height": height,
                    "width": width,
                    "residual": tables.encode_map(stitched.values),
                    "reconstruction": tables.encode_reconstruction(reconstruction.values),
                    "patches": stitched.patches,
                    "frame_width": -1 if geometry is None else len(geometry["shift"]),
                    "x_scale": np.nan if geometry is None else float(geometry["x_scale"]),
                    "y_scale": np.nan if geometry is None else float(geometry.get("y_scale", 1)),
                    "shift": None if geometry is None else list(geometry["shift"]),
                    **key.row(),
                }
            )
    table = pa.Table.from_pylist(records, schema=tables.map_schema())
    target = _group_file(out, key, group)
    size = _write_whole(table, target, _staging(out, key)) if records else 0
    return {
        "bscans": len(records) // max(1, len(methods)),
        "maps": len(records),
        "patches": len(rows),
        "bytes": size,
    }


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def write_maps(
    patches: str,
    model: str,
    out: str,
    key: ScoringKey,
    cfg: ScoreConfig,
    *,
    combine: str = "mean",
    bscans_per_task: int = BSCANS_PER_TASK,
) -> dict[str, Any]:
    """Write the map table of one scoring key: every B-scan of ``cfg.splits`` that the key scored
    and that has no maps yet (see the module docstring).

    Args:
        patches: the patch table (its folder or the preprocess stage folder); its stage's
            ``geometry/`` folder, when present, gives each map its frame-to-original mapping.
        model: the model bundle that scored the rows (its id must be ``key.model_id``).
        out: the score stage folder: reads ``out/scores`` (with ``z``), writes ``out/maps``.
        key: the scoring key whose rows are mapped.
        cfg: the scoring settings (``splits``).
        combine: how overlapping patches combine, ``mean`` or ``max`` (core/maps.py).
        bscans_per_task: B-scans per Ray task and per file.

    Returns:
        A summary: B-scans and maps written and already there, patches read, bytes written,
        bytes and seconds per patch.

    Raises:
        TableError: no score rows of ``key``, or they hold no ``z``.
        ValueError: the bundle is not the key's model.
    """
    from anogan_ray.core.maps import COMBINES

    started = time.perf_counter()
    if combine not in COMBINES:
        raise ValueError(f"combine {combine!r}: expected one of {', '.join(COMBINES)}")
    bundle_id = storage.read_json(storage.join(model, "bundle.json"))["model_id"]
    if bundle_id != key.model_id:
        raise ValueError(
            f"model bundle {model} is model_id {bundle_id}, but key {key} was scored by "
            f"{key.model_id}: give the bundle that scored it"
        )
    scores = storage.join(out, "scores")
    if not storage.list_files(scores, ".parquet"):
        raise TableError(f"score table {scores}: no Parquet files; run `anogan-ray score` first")
    if "z" not in tables.open_dataset(scores).schema.names:
        raise TableError(
            f"score table {scores}: no z column; the A map needs each patch's final latent "
            "(score with score.save_z=true)"
        )
    ensure_ray()
    maps = storage.join(out, MAPS)
    storage.remove(_staging(out, key))  # a killed run's half-written files
    scored = _bscans(scores, key, cfg.splits, "score table")
    done = _bscans(maps, key, None, "map table")
    pending = sorted(scored - done)
    groups = _groups(pending, bscans_per_task)
    log.info(
        "maps of key %s: %d B-scans to draw in %d task(s), %d already drawn",
        key, len(pending), len(groups), len(scored & done),
    )  # fmt: skip
    task = ray.remote(write_group).options(num_cpus=1)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    totals = {"bscans": 0, "maps": 0, "patches": 0, "bytes": 0}
    in_flight: list[ray.ObjectRef] = []
    drawing = time.perf_counter()
    last_line = drawing

    def collect(wanted: int) -> None:
        """Wait for ``wanted`` tasks to finish, add their counts; a progress line now and then."""
        nonlocal in_flight, totals, last_line
        ready, in_flight = ray.wait(in_flight, num_returns=wanted)
        for counts in ray.get(ready):
            totals = {k: totals[k] + counts[k] for k in totals}
        now = time.perf_counter()
        if now - last_line >= PROGRESS_EVERY_S and in_flight:
            rate = totals["bscans"] / (now - drawing)
            log.info(rate_line(totals["bscans"], len(pending), rate, "drew the maps of", "B-scans"))
            last_line = now

    for group in groups:
        if len(in_flight) >= limit:
            collect(1)
        in_flight.append(task.remote(patches, model, out, key, group, combine))
    while in_flight:
        collect(1)
    storage.remove(_staging(out, key))
    if not storage.is_remote(out):  # the shared parent, once no key stages anything
        with contextlib.suppress(OSError):
            os.rmdir(storage.filesystem(storage.join(out, STAGING))[1])
    seconds = time.perf_counter() - started
    summary = {
        "maps": maps,
        "key": str(key),
        "combine": combine,
        "bscans_written": totals["bscans"],
        "maps_written": totals["maps"],
        "bscans_already_drawn": len(scored & done),
        "patches_read": totals["patches"],
        "bytes_written": totals["bytes"],
        "bytes_per_patch": round(totals["bytes"] / totals["patches"], 1)
        if totals["patches"]
        else None,
        "seconds": round(seconds, 3),
        "ms_per_patch": round(1000 * seconds / totals["patches"], 3) if totals["patches"] else None,
    }
    log.info(
        "maps: %d B-scans (%d maps, %.1f MB) in %.1f s", totals["bscans"], totals["maps"],
        totals["bytes"] / 1e6, seconds,
    )  # fmt: skip
    return summary
