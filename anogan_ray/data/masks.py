"""Pixel annotations brought into the flattened, resampled frame the patches and maps live in.

Preprocessing moves a volume's mask with its image (:func:`anogan_ray.data.retina.preprocess_volume`):
OCT masks are resampled along x to the frame's width by nearest neighbour and every column is
shifted by the flattening's whole-pixel shift; image masks are enlarged like their image (nearest)
when the image is smaller than a patch. :func:`frame_masks` repeats exactly those steps from the
manifest row and the B-scans' geometry (the geometry table, or a map table's copy of it), so a
mask pixel lands on the same frame pixel as the image pixel it annotates; a patch's
``anomaly_fraction`` in the patch table equals its window's annotated share of the frame mask
(tests/test_maps.py checks every patch of a phantom).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from skimage.transform import resize

from anogan_ray.data import volumes
from anogan_ray.data.retina import enlarge_to_patch, flatten
from anogan_ray.data.volumes import VolumeError


def has_mask(record: Mapping[str, Any]) -> bool:
    """Whether a manifest row may have a mask: a ``mask_path``, or a format that carries its
    own annotation (vendor formats, data-set folders); plain image files carry none."""
    mask_path = record.get("mask_path")
    if isinstance(mask_path, str) and mask_path:
        return True
    return volumes.scan_format(str(record["path"])) not in ("npy", "tiff", "image")


def read_mask(record: Mapping[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A manifest row's mask volume (n, height, width) and which B-scans it annotates.

    The manifest's ``mask_path`` wins; otherwise a data set's own annotation (vendor formats,
    RETOUCH) read with the scan. ``(None, None)`` when the volume has no mask.

    Raises:
        VolumeError: the mask file is missing or unreadable (the message names it).
    """
    mask_path = record.get("mask_path")
    if isinstance(mask_path, str) and mask_path:
        try:
            return volumes.read_volume(mask_path), None
        except VolumeError as err:
            raise VolumeError(f"mask {mask_path}: {err}") from err
    if not has_mask(record):
        return None, None
    scan = volumes.read_scan(str(record["path"]))
    return scan.mask, scan.annotated_bscans


def frame_masks(
    record: Mapping[str, Any],
    geometry: Mapping[int, Mapping[str, Any]],
    patch_size: int = 64,
) -> dict[int, np.ndarray]:
    """The mask of each B-scan of ``geometry`` in the flattened, resampled frame.

    Args:
        record: the volume's manifest row (``path``, ``modality``, ``mask_path``).
        geometry: per B-scan index, its geometry row (``shift``: the frame's per-column shift,
            whose length is the frame's width).
        patch_size: the patch side preprocess used (images smaller than it were enlarged).

    Returns:
        ``{bscan: (frame height, frame width)}`` with the mask's values (0 = none), for the
        B-scans the mask annotates; empty when the volume has no mask.

    Raises:
        VolumeError: the mask cannot be read, or its B-scans do not match the geometry.
    """
    mask, annotated = read_mask(record)
    if mask is None:
        return {}
    where = record.get("mask_path") or record["path"]
    out: dict[int, np.ndarray] = {}
    if record["modality"] == "oct":
        widths = {len(g["shift"]) for g in geometry.values()}
        if len(widths) > 1:
            raise VolumeError(f"mask {where}: its B-scans' frames differ in width ({widths})")
        if not widths:
            return {}
        # exactly resample_x(..., nearest=True) for the width the image was resampled to
        (width,) = widths
        mask = resize(
            mask, (*mask.shape[:-1], width), order=0, mode="edge", anti_aliasing=False,
            preserve_range=True,
        ).astype(mask.dtype, copy=False)  # fmt: skip
    else:
        mask = enlarge_to_patch(mask, patch_size, nearest=True)[0]
    for bscan, row in geometry.items():
        if bscan >= len(mask):
            raise VolumeError(f"mask {where}: has {len(mask)} B-scan(s), no B-scan {bscan}")
        if annotated is not None and not annotated[bscan]:
            continue
        shift = np.asarray(row["shift"], np.int32)
        frame = flatten(mask[bscan], shift, fill=0) if record["modality"] == "oct" else mask[bscan]
        out[int(bscan)] = np.asarray(frame)
    return out
