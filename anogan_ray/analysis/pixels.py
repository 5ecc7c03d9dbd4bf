"""Pixel-level evaluation of the map table against the cohort's masks (``evaluate --level pixel``).

For one scoring key and each method's maps (A, aCAE, PCA), on the B-scans whose pixels are
annotated (a mask, or a volume labelled healthy: every pixel healthy):

* pixel AUROC and AUPRO (MVTec AD: per-region overlap integrated up to a false-positive rate of
  0.3, divided by 0.3), over all lesions and per lesion type;
* the lesion-level detection rate: the share of connected lesion regions with at least 30 % of
  their pixels above the method's healthy-calibrated threshold (the ``percentile`` of the healthy
  pixels of ``calibration_split``), with that threshold's pixel false-positive rate.

Two optional post-processings apply to every method alike: ``standardize`` (standard scores
against the healthy residual at each pixel's reconstructed gray value, fitted on the healthy pixels
of ``calibration_split``: :class:`anogan_ray.core.maps.HealthyNoise`) and ``smooth_sigma`` (a
Gaussian, :func:`anogan_ray.core.maps.postprocess`), in that order.

Masks are brought into the flattened frame exactly as preprocess moved them
(:func:`anogan_ray.data.masks.frame_masks`, with the geometry each map row carries). Lesion types
are the mask's values; a phantom cohort's manifest folder names them
(:data:`anogan_ray.data.phantom.PATHOLOGY_CODES`), other cohorts show ``value <k>``.

Memory: the map table is read a few volumes at a time and every method's pixels are counted in
fixed 2^16-bin histograms (:class:`anogan_ray.core.metrics.PixelCounts`), so 10^4 B-scans take
the same memory as ten; the metrics are exact for the float16 maps the table stores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.dataset as pads

from anogan_ray import storage, tables
from anogan_ray.core.maps import HealthyNoise, postprocess
from anogan_ray.core.metrics import AUPRO_MAX_FPR, REGION_OVERLAP, MetricsError, PixelCounts
from anogan_ray.tables import ScoringKey, TableError

log = logging.getLogger(__name__)

VOLUMES_PER_READ = 8  # volumes whose maps are read at once


def lesion_type_names(manifest: str) -> dict[int, str]:
    """Mask value -> lesion type name: the phantom's codes when the manifest's folder holds a
    phantom cohort, else empty (types then show as ``value <k>``)."""
    summary = storage.join(storage.parent(manifest), "summary.json")
    if storage.exists(summary) and storage.read_json(summary).get("stage") == "phantom":
        from anogan_ray.data.phantom import PATHOLOGY_CODES

        return {code: name for name, code in PATHOLOGY_CODES.items()}
    return {}


def _volumes(maps: list[str], key: ScoringKey, splits: Sequence[str]) -> list[str]:
    """The volume ids with maps of ``key`` in ``splits``, sorted."""
    dataset = tables.open_dataset(maps, what="map table")
    keep = key.expression() & pads.field("split").isin(list(splits))
    found: set[str] = set()
    for batch in dataset.to_batches(columns=["volume_id"], filter=keep):
        found.update(batch.column(0).unique().to_pylist())
    return sorted(found)


def _bscan_maps(
    maps: list[str],
    key: ScoringKey,
    volume_ids: list[str],
    splits: Sequence[str],
    methods: Sequence[str] | None,
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Per volume of ``volume_ids``: its map rows (the ``residual`` still encoded)."""
    where = pads.field("volume_id").isin(volume_ids) & pads.field("split").isin(list(splits))
    if methods is not None:
        where = where & pads.field("method").isin(list(methods))
    table, _ = tables.read_maps(maps, key, where)
    rows = table.to_pylist()
    by_volume: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, int, str]] = set()
    for row in rows:  # one map per B-scan and method (the table is written exactly once)
        ident = (row["volume_id"], row["bscan"], row["method"])
        if ident not in seen:
            seen.add(ident)
            by_volume.setdefault(row["volume_id"], []).append(row)
    yield from sorted(by_volume.items())


def _annotations(
    record: dict[str, Any], rows: list[dict[str, Any]], where: str
) -> dict[int, np.ndarray | None]:
    """Per B-scan of ``rows``: its mask in the frame, None for a healthy volume without one
    (every pixel healthy); B-scans without annotation are left out."""
    from anogan_ray.data.masks import frame_masks, has_mask

    geometry = {int(row["bscan"]): {"shift": row["shift"]} for row in rows}
    if any(g["shift"] is None for g in geometry.values()):
        if has_mask(record):
            raise TableError(
                f"map table {where}: the maps of volume {record['volume_id']} carry no "
                "geometry (their patch table had no geometry/ folder), so its mask cannot be "
                "brought into the frame"
            )
        geometry = {}
    masks: dict[int, np.ndarray | None] = dict(frame_masks(record, geometry))
    label = record.get("label")
    if not masks and label is not None and not _missing(label) and int(label) == 0:
        masks = dict.fromkeys(geometry)
    return masks


def _missing(value: Any) -> bool:
    try:
        return bool(value is None or math.isnan(float(value)))
    except (TypeError, ValueError):
        return value is None


def _crop(mask: np.ndarray | None, row: dict[str, Any], where: str) -> np.ndarray:
    """The part of a frame mask under a map (zeros for a healthy volume without a mask)."""
    top, left, height, width = row["top"], row["left"], row["height"], row["width"]
    if mask is None:
        return np.zeros((height, width), np.uint8)
    if top + height > mask.shape[0] or left + width > mask.shape[1]:
        raise TableError(
            f"map table {where}: the map of {row['volume_id']} B-scan {row['bscan']} covers rows "
            f"{top}..{top + height - 1}, columns {left}..{left + width - 1}, beyond its mask's "
            f"frame {mask.shape} (was the cohort preprocessed with other settings?)"
        )
    return mask[top : top + height, left : left + width]


def _annotated_maps(
    maps: list[str],
    key: ScoringKey,
    records: dict[str, dict[str, Any]],
    splits: Sequence[str],
    methods: Sequence[str],
    manifest: str,
    seen: dict[str, int] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(method, residual, reconstruction, mask) of every annotated map of ``splits``, a few
    volumes read at a time; ``seen`` counts the B-scans with and without annotation."""
    where = ", ".join(maps)
    volume_ids = _volumes(maps, key, splits)
    unknown = [v for v in volume_ids if v not in records]
    if unknown:
        raise TableError(
            f"manifest {manifest}: has no row for volume {unknown[0]!r} of map table {where} "
            f"({len(unknown)} such volume(s)); give the manifest the cohort was preprocessed from"
        )
    seen = {} if seen is None else seen
    for start in range(0, len(volume_ids), VOLUMES_PER_READ):
        group = volume_ids[start : start + VOLUMES_PER_READ]
        for volume_id, rows in _bscan_maps(maps, key, group, splits, methods):
            masks = _annotations(records[volume_id], rows, where)
            bscans = {int(r["bscan"]) for r in rows}
            seen["bscans"] = seen.get("bscans", 0) + len(bscans & set(masks))
            seen["bscans_without_annotation"] = seen.get("bscans_without_annotation", 0) + len(
                bscans - set(masks)
            )
            for row in rows:
                if int(row["bscan"]) not in masks:
                    continue
                shape = (row["height"], row["width"])
                residual = tables.decode_map(row["residual"], *shape)
                reconstruction = tables.decode_reconstruction(row["reconstruction"], *shape)
                mask = _crop(masks[int(row["bscan"])], row, where)
                yield row["method"], residual, reconstruction, mask


def evaluate_pixels(
    maps: str | Sequence[str],
    manifest: str,
    key: str | dict | ScoringKey | None = None,
    splits: Sequence[str] = ("test",),
    calibration_split: str = "val",
    percentile: float = 99.0,
    smooth_sigma: float = 0.0,
    standardize: bool = False,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pixel AUROC, AUPRO and lesion detection of each method's maps (see the module docstring).

    Args:
        maps: map table folder(s) (``out/maps`` of a score stage, or the stage folder).
        manifest: the cohort manifest (masks, labels, modality).
        key: which scoring key's maps, when the table holds several.
        splits: the splits evaluated.
        calibration_split: the split whose healthy pixels set each method's threshold.
        percentile: of those healthy pixels' scores, in (0, 100).
        smooth_sigma: residual post-processing for every method (core.maps.postprocess): a
            Gaussian of this many pixels; 0 evaluates the maps as stored.
        standardize: before smoothing, turn every method's maps into standard scores against
            its healthy residual at each pixel's reconstructed gray value, fitted on the healthy
            pixels of ``calibration_split`` (core.maps.HealthyNoise).
        methods: the methods to evaluate (default: every method in the table).

    Returns:
        ``{"level": "pixel", "key", "splits", "calibration_split", "percentile", "smooth_sigma",
        "bscans", "bscans_without_annotation", "lesion_types", "methods": {method: {"auroc",
        "aupro", "threshold", "healthy_fpr", "detection_rate", "regions", "regions_detected",
        "pixels", "pixel_recall", "by_type": {type: the same}}}}``.

    Raises:
        MetricsError: no annotated B-scans, or no healthy pixels to calibrate on.
    """
    from anogan_ray.data.volumes import read_manifest

    if not 0 < percentile < 100:
        raise MetricsError(f"percentile {percentile!r}: must be in (0, 100)")
    urls = [tables.map_table_url(u) for u in tables.as_list(maps)]
    dataset = tables.open_dataset(urls, what="map table")
    chosen = key if isinstance(key, ScoringKey) else tables.select_key(
        dataset, key, f"map table {', '.join(urls)}"
    )  # fmt: skip
    present = sorted(set(dataset.to_table(columns=["method"]).column(0).unique().to_pylist()))
    wanted = [m for m in (methods or present) if m in present]
    if not wanted:
        raise MetricsError(f"map table {', '.join(urls)}: no maps of method(s) {methods}")
    frame = read_manifest(manifest)
    records = {str(r["volume_id"]): r for r in frame.to_dict("records")}
    names = lesion_type_names(manifest)
    common = dict(maps=urls, key=chosen, records=records, methods=wanted, manifest=manifest)
    calibrating = [calibration_split]

    # 1. optionally, each method's healthy residual by reconstructed gray value
    noise: dict[str, HealthyNoise] = {}
    if standardize:
        noise = {m: HealthyNoise() for m in wanted}
        for method, residual, reconstruction, mask in _annotated_maps(splits=calibrating, **common):
            noise[method].add(np.where(mask == 0, residual, np.nan), reconstruction)
        noise = {m: n.fit() for m, n in noise.items()}

    def scores(method: str, residual: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        if method in noise:
            residual = noise[method].standardize(residual, reconstruction)
        return postprocess(residual, smooth_sigma)

    # 2. the thresholds: a percentile of the healthy pixels of the calibration split
    calibration = {m: PixelCounts() for m in wanted}
    for method, residual, reconstruction, mask in _annotated_maps(splits=calibrating, **common):
        healthy = np.where(mask == 0, scores(method, residual, reconstruction), np.nan)
        calibration[method].add(healthy, mask)
    thresholds: dict[str, float | None] = {}
    for method, counted in calibration.items():
        thresholds[method] = (
            counted.healthy_percentile(percentile) if counted.negative.sum() else None
        )

    # 3. the evaluated splits
    counts = {m: PixelCounts(thresholds[m]) for m in wanted}
    seen = {"bscans": 0, "bscans_without_annotation": 0}
    for method, residual, reconstruction, mask in _annotated_maps(
        splits=list(splits), seen=seen, **common
    ):
        counts[method].add(scores(method, residual, reconstruction), mask, names)
    if seen["bscans"] == 0:
        raise MetricsError(
            f"map table {', '.join(urls)}: no B-scan of split(s) {', '.join(splits)} is "
            f"annotated (a mask in manifest {manifest}, or a volume labelled 0)"
        )
    results: dict[str, Any] = {}
    for method, method_counts in counts.items():
        row = method_counts.summary()
        threshold = thresholds[method]
        row["threshold"] = threshold
        row["healthy_fpr"] = None if threshold is None else method_counts.share_above(threshold)
        row["healthy_pixels"] = int(method_counts.negative.sum())
        typed = [g for g in method_counts.groups if g != "all"]
        row["by_type"] = {  # with one type only, it is "all" again
            name: method_counts.summary(name) for name in sorted(typed) if len(typed) > 1
        }
        results[method] = row
    return {
        "level": "pixel",
        "key": str(chosen),
        "model_id": chosen.model_id,
        "splits": list(splits),
        "calibration_split": calibration_split,
        "percentile": float(percentile),
        "smooth_sigma": float(smooth_sigma),
        "standardize": standardize,
        "combine": _combine(urls, chosen),
        "aupro_max_fpr": AUPRO_MAX_FPR,
        "region_overlap": REGION_OVERLAP,
        **seen,
        "lesion_types": {str(k): v for k, v in names.items()},
        "exactness": "exact for the float16 maps the table stores (one histogram bin per "
        "float16 value); ties count one half",
        "methods": results,
    }


def _combine(urls: list[str], key: ScoringKey) -> str:
    table, _ = tables.read_maps(urls, key, columns=["combine"])
    return ",".join(sorted(set(table.column(0).to_pylist())))


def format_pixel_table(result: dict[str, Any]) -> str:
    """The pixel-level table for the terminal: one row per method, then per lesion type."""
    lines = [
        f"pixel level, split(s) {', '.join(result['splits'])}: {result['bscans']} annotated "
        f"B-scans ({result['bscans_without_annotation']} without annotation left out); "
        f"thresholds: {result['percentile']:g}th percentile of healthy "
        f"{result['calibration_split']!r} pixels; maps combined by {result['combine']}"
        + (", standardized on healthy pixels" if result["standardize"] else "")
        + (f", smoothed (sigma {result['smooth_sigma']:g} px)" if result["smooth_sigma"] else ""),
        f"{'method':<8}{'AUROC':>8}{'AUPRO':>8}{'regions':>9}{'detected':>10}{'healthy FPR':>13}"
        f"{'threshold':>11}",
    ]
    lines.append("-" * len(lines[-1]))
    for method, row in result["methods"].items():
        threshold = row.get("threshold")
        lines.append(
            f"{method:<8}{row['auroc']:>8.4f}{row['aupro']:>8.4f}{row['regions']:>9}"
            f"{row.get('detection_rate', math.nan):>10.3f}"
            f"{row['healthy_fpr'] if row['healthy_fpr'] is not None else math.nan:>13.4f}"
            + (f"{threshold:>11.4g}" if threshold is not None else f"{'-':>11}")
        )
    types = sorted({t for row in result["methods"].values() for t in row["by_type"]})
    if types:
        lines.append("by lesion type (AUROC / AUPRO / detected):")
        for name in types:
            parts = []
            for method, row in result["methods"].items():
                typed = row["by_type"].get(name)
                if typed:
                    parts.append(
                        f"{method} {typed['auroc']:.3f} / {typed['aupro']:.3f} / "
                        f"{typed.get('detection_rate', math.nan):.2f}"
                    )
            lines.append(f"  {name:<20}" + "   ".join(parts))
    return "\n".join(lines)


def format_pixel_comparison(results: dict[str, dict[str, Any]]) -> str:
    """Several pixel-level evaluations of the same maps side by side (the demo's: the maps as
    stored and post-processed), one row per method, then the last one's rows per lesion type."""
    first, last = next(iter(results.values())), list(results.values())[-1]
    lines = [
        f"pixel level, split(s) {', '.join(first['splits'])}: {first['bscans']} annotated "
        f"B-scans; detected: lesion regions with >= 30 % of their pixels above the "
        f"{first['percentile']:g}th percentile of healthy {first['calibration_split']!r} pixels"
    ]
    header = f"{'method':<8}" + "".join(f"{name:>28}" for name in results)
    lines += [header, f"{'':<8}" + f"{'AUROC  AUPRO  detected':>28}" * len(results)]
    lines.append("-" * len(header))
    for method in first["methods"]:
        cells = []
        for result in results.values():
            row = result["methods"].get(method)
            cells.append(
                f"{row['auroc']:>13.4f}{row['aupro']:>7.4f}"
                f"{row.get('detection_rate', math.nan):>8.2f}"
                if row
                else f"{'-':>28}"
            )
        lines.append(f"{method:<8}" + "".join(cells))
    types = sorted({t for row in last["methods"].values() for t in row["by_type"]})
    if types:
        lines.append(f"by lesion type, {list(results)[-1]} (AUROC / AUPRO / detected):")
        for name in types:
            parts = [
                f"{method} {typed['auroc']:.3f} / {typed['aupro']:.3f} / "
                f"{typed.get('detection_rate', math.nan):.2f}"
                for method, row in last["methods"].items()
                if (typed := row["by_type"].get(name))
            ]
            lines.append(f"  {name:<20}" + "   ".join(parts))
    return "\n".join(lines)
