"""Per-volume OCT preprocessing (paper, section 3), in plain numpy / scipy.

The steps, in order, for a volume ``(n_bscans, height, width)``:

1. :func:`normalize_volume`: gray values to [-1, 1] by a robust per-volume min-max: the 0.5th and
   99.5th percentiles of all the volume's voxels map to -1 and 1, values beyond are clipped (a few
   saturated speckles or a dark frame border do not stretch the range). Modality ``image``:
   :func:`normalize_image` (8-bit frames keep their gray scale).
2. :func:`resample_x`: each B-scan resampled along x to ``target_spacing_um`` (22 µm) per column
   with scikit-image: anti-aliased linear interpolation for images, nearest neighbour for masks
   (labels stay labels).
3. :func:`segment_retina`: the inner limiting membrane (ILM, top) and Bruch's membrane (BM, bottom)
   in every A-scan (see its docstring for the method).
4. :func:`flatten`: every A-scan shifted by a whole number of pixels so that BM lies on one row
   (the same row for all B-scans of a volume); rows shifted in from outside the frame are -1.
   Integer shifts move masks exactly like images.
5. Patches (``patch_size`` square, top-left ``(y, x)`` in the flattened, resampled frame; the
   patch centre is ``(y + patch_size // 2, x + patch_size // 2)``):

   * training mode (split ``train``), :func:`sample_patch_positions`: ``patches_per_bscan`` distinct
     random positions per B-scan whose centre lies in the retina (ILM <= row <= BM in that
     column), from an RNG seeded by ``(seed, volume_id, bscan)``, so a re-run draws the same ones;
   * scoring mode (splits ``val`` and ``test``), :func:`grid_patch_positions`: a regular grid with
     ``grid_stride`` over all columns and over the retina's band, from ``retina_margin`` rows
     above the highest ILM to ``retina_margin`` rows below BM; the last row and column are snapped
     to the band's / frame's edge so nothing is left uncovered.

Modality ``image`` skips resampling, segmentation and flattening: the whole (gray) frame is the
"retina". A frame smaller than a patch (a 28 x 28 digit) is first enlarged, aspect kept, until
its shorter side is one patch (:func:`enlarge_to_patch`). :class:`BscanGeometry` maps a patch back
to the original B-scan: original column ``(x + 0.5) * x_scale - 0.5`` and original row
``(y - shift[x] + 0.5) * y_scale - 0.5`` (``y_scale`` is 1 except for enlarged images).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.transform import resize

from anogan_ray.config import PreprocessConfig
from anogan_ray.data import volumes
from anogan_ray.data.volumes import VolumeError
from anogan_ray.tables import LABEL_UNKNOWN, encode_pixels, patch_id

BACKGROUND = -1.0  # value of pixels shifted in from outside the frame (black)


# ---------------------------------------------------------------------------------------------
# 1. normalization and 2. resampling
# ---------------------------------------------------------------------------------------------


def normalize_volume(
    volume: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5
) -> np.ndarray:
    """Gray values to [-1, 1]: the ``low_pct`` / ``high_pct`` percentiles map to -1 / 1, clipped.

    Falls back to the min and max when the percentiles coincide (a mostly flat image).

    Raises:
        VolumeError: the volume is constant (no contrast to normalize).
    """
    values = np.asarray(volume, dtype=np.float32)
    sample = values.ravel()[:: max(1, values.size // 2_000_000)]  # percentiles of <= 2M voxels
    low, high = np.percentile(sample, [low_pct, high_pct])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise VolumeError("constant image")
    scaled = (values - low) * (2.0 / (high - low)) - 1.0
    return np.clip(scaled, -1.0, 1.0, out=scaled)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """Modality ``image``: an 8-bit frame keeps its gray scale (0 → -1, 255 → 1), so a defect's
    brightness stays a brightness instead of re-stretching the rest of its image (a per-image
    stretch lets a bright scratch covering 1 % of a photograph dim everything else); other bit
    depths and floats, whose range the file does not fix, as :func:`normalize_volume`."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(2 / 255) - 1
    return normalize_volume(image)


def resampled_width(width: int, spacing_x_um: float, target_spacing_um: float) -> int:
    """Columns after resampling ``width`` A-scans of ``spacing_x_um`` to ``target_spacing_um``."""
    return max(1, int(round(width * spacing_x_um / target_spacing_um)))


def resample_x(
    volume: np.ndarray, spacing_x_um: float, target_spacing_um: float, nearest: bool = False
) -> np.ndarray:
    """Resample along x (last axis) to ``target_spacing_um`` per column, with scikit-image.

    The new width is :func:`resampled_width` (whole columns), so the exact scale is
    ``x_scale = width / new_width`` original columns per new column (22 µm rounded to fill the
    frame). Column centres are kept aligned: new column ``j`` samples the original at
    ``(j + 0.5) * x_scale - 0.5``. Images are low-pass filtered first when the input is finer
    than the target (a Gaussian of sigma ``(x_scale - 1) / 2`` along x: speckle finer than 22 µm
    would otherwise alias into coarse false texture) and interpolated linearly; masks take the
    nearest original column, unfiltered, so labels stay labels.

    Args:
        volume: ``(..., width)``.
        spacing_x_um: the input's A-scan spacing.
        target_spacing_um: the wanted spacing (22 µm in the paper).
        nearest: nearest neighbour without filtering (masks) instead of anti-aliased linear
            interpolation (images).

    Returns:
        ``(..., new_width)``: the input's dtype for masks, at least float32 for images.
    """
    new_shape = (
        *volume.shape[:-1],
        resampled_width(volume.shape[-1], spacing_x_um, target_spacing_um),
    )
    if nearest:
        resampled = resize(
            volume, new_shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True
        )
        return resampled.astype(volume.dtype, copy=False)
    resampled = resize(
        volume, new_shape, order=1, mode="edge", anti_aliasing=True, preserve_range=True
    )
    return resampled.astype(np.result_type(volume.dtype, np.float32), copy=False)


def enlarge_to_patch(
    volume: np.ndarray, patch_size: int, nearest: bool = False
) -> tuple[np.ndarray, float, float]:
    """Enlarge ``(n, height, width)`` frames whose shorter side is below ``patch_size`` until it
    is one patch, aspect kept (bilinear for images, nearest for masks); larger frames unchanged.

    Returns:
        The frames and ``(y_scale, x_scale)``, original rows / columns per new row / column.
    """
    _, height, width = volume.shape
    if min(height, width) >= patch_size:
        return volume, 1.0, 1.0
    factor = patch_size / min(height, width)
    shape = (
        volume.shape[0],
        max(patch_size, int(round(height * factor))),
        max(patch_size, int(round(width * factor))),
    )
    enlarged = resize(
        volume,
        shape,
        order=0 if nearest else 1,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    ).astype(volume.dtype, copy=False)
    return enlarged, height / shape[1], width / shape[2]


# ---------------------------------------------------------------------------------------------
# 3. segmentation
# ---------------------------------------------------------------------------------------------


def _smooth_path(score: np.ndarray, max_jump: int, jump_penalty: float) -> np.ndarray:
    """The row path (one row per column) maximizing the summed ``score`` (rows x columns), with
    at most ``max_jump`` rows between neighbouring columns (dynamic programming)."""
    height, width = score.shape
    jumps = np.arange(-max_jump, max_jump + 1)
    penalty = (jump_penalty * np.abs(jumps))[:, None]  # (jumps, 1)
    padded = np.full(height + 2 * max_jump, -np.inf)
    window = np.lib.stride_tricks.sliding_window_view(padded, height)  # views of shifted totals
    came_from = np.zeros((height, width), dtype=np.int8)
    padded[max_jump : max_jump + height] = score[:, 0]
    rows = np.arange(height)
    for x in range(1, width):
        candidates = window[: 2 * max_jump + 1] - penalty  # (jumps, height): row y from y + jump
        choice = np.argmax(candidates, axis=0)
        came_from[:, x] = jumps[choice]
        padded[max_jump : max_jump + height] = candidates[choice, rows] + score[:, x]
    total = padded[max_jump : max_jump + height]
    path = np.zeros(width, dtype=np.intp)
    path[-1] = int(np.argmax(total))
    for x in range(width - 1, 0, -1):
        path[x - 1] = path[x] + came_from[path[x], x]
    return path


def _robust_bm(boundary: np.ndarray, window: int, tolerance: float, rounds: int = 4) -> np.ndarray:
    """Smooth a raw BM estimate: points more than ``tolerance`` from a running median are replaced
    by it (BM itself is smooth: drusen lift the RPE above it, shadows and choroidal vessels give
    spurious edges below it)."""
    estimate = boundary.astype(np.float64)
    for _ in range(rounds):
        trend = ndimage.median_filter(estimate, size=window, mode="nearest")
        estimate = np.where(np.abs(boundary - trend) > tolerance, trend, boundary)
    return estimate


def _edges(bscan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speckle-smoothed B-scan and its vertical gradient (dark -> bright positive)."""
    smooth = ndimage.gaussian_filter(bscan.astype(np.float32), sigma=(2.0, 3.0), mode="nearest")
    gradient = np.zeros_like(smooth)
    gradient[2:-2] = smooth[4:] - smooth[:-4]
    return smooth, gradient


def segment_bscan(bscan: np.ndarray, min_thickness: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """ILM and BM rows (float, one per column) in one normalized B-scan.

    Method (classical; speckle-robust by smoothing, shadow- and lesion-robust by continuity):

    * smooth with a Gaussian (2 px in z, 3 px in x) and take the vertical gradient;
    * ILM: in every column the first row from the top whose dark-to-bright gradient exceeds 25 %
      of the B-scan's strong-edge level, refined to the gradient peak, then a 9-column median
      filter and a Gaussian along x (fluid and cysts lie below the ILM, so they cannot pull it);
    * outer retina: the strongest dark-to-bright path below the ILM (dynamic programming, at most
      3 rows per column), then the brightest smooth band just below it; if a band about as bright
      lies 4 or more rows deeper, that one is the RPE (the first may be the ellipsoid zone);
    * BM: the strongest bright-to-dark edge (z-smoothing 1 px) within ``height / 12`` rows below
      the RPE path, then a robust running median over a quarter of the width (points over 3 px
      away are replaced: drusen lift the RPE above Bruch's membrane, vessel shadows and choroidal
      vessels give spurious edges) and a Gaussian along x.

    Returns:
        ``(ilm, bm)``, each ``(width,)`` float32 rows.
    """
    height, width = bscan.shape
    columns = np.arange(width)
    smooth, gradient = _edges(bscan)
    positive = np.maximum(gradient, 0.0)

    # ILM: first strong dark -> bright edge from the top
    strong = np.percentile(positive.max(axis=0), 75)
    if strong <= 0:
        raise VolumeError("no retina found (no dark-to-bright edge)")
    above = positive > 0.25 * strong
    above[-min_thickness:] = False
    has_edge = above.any(axis=0)
    if not has_edge.any():
        raise VolumeError("no retina found (no ILM edge)")
    first = np.argmax(above, axis=0)
    span = np.clip(first[None, :] + np.arange(6)[:, None], 0, height - 1)  # refine to the peak
    peak = span[np.argmax(np.take_along_axis(positive, span, axis=0), axis=0), columns]
    ilm_raw = np.interp(columns, columns[has_edge], peak[has_edge].astype(np.float64))
    ilm = ndimage.median_filter(ilm_raw, size=9, mode="nearest")
    ilm = ndimage.gaussian_filter1d(ilm, sigma=1.5, mode="nearest")

    # outer retina: the strongest smooth dark -> bright edge below the ILM (ONL -> EZ / OS -> RPE)
    rows = np.arange(height)[:, None]
    below_ilm = rows >= np.rint(ilm)[None, :] + 6
    outer = _smooth_path(np.where(below_ilm, positive, -1.0), max_jump=3, jump_penalty=0.02)

    # RPE: the brightest smooth band just below that edge (below subretinal fluid too)
    reach = max(20, int(0.5 * np.median(outer - ilm)))
    band = (rows >= outer[None, :] - 2) & (rows <= outer[None, :] + reach)
    bright = _smooth_path(np.where(band, smooth, -2.0), max_jump=2, jump_penalty=0.05)
    # that band may be the ellipsoid zone: take a band as bright lying 4+ rows deeper (the RPE)
    deeper = (rows >= bright[None, :] + 4) & (rows <= bright[None, :] + 16 + height // 32)
    lower = _smooth_path(np.where(deeper, smooth, -2.0), max_jump=2, jump_penalty=0.05)
    level = ndimage.gaussian_filter1d(smooth[bright, columns], sigma=5.0, mode="nearest")
    lower_level = ndimage.gaussian_filter1d(smooth[lower, columns], sigma=5.0, mode="nearest")
    rpe = np.where(lower_level >= level - 0.15, lower, bright)

    # BM: the strongest bright -> dark edge just below the RPE, ignoring drusen elevations
    # (on a finer-smoothed gradient, so the RPE's lower edge stays apart from the ellipsoid zone's)
    fine = ndimage.gaussian_filter(bscan.astype(np.float32), sigma=(1.0, 3.0), mode="nearest")
    fine_gradient = np.zeros_like(fine)
    fine_gradient[1:-1] = fine[2:] - fine[:-2]
    depth = max(16, height // 12)
    edge_rows = np.clip(rpe[None, :] + np.arange(depth)[:, None], 0, height - 1)  # (depth, width)
    edge = np.take_along_axis(fine_gradient, edge_rows, axis=0)
    bm_raw = edge_rows[np.argmin(edge, axis=0), columns].astype(np.float64)
    bm = _robust_bm(bm_raw, window=max(5, (width // 4) | 1), tolerance=3.0)
    bm = ndimage.gaussian_filter1d(bm, sigma=3.0, mode="nearest")
    ilm = np.minimum(ilm, bm - min_thickness)
    return ilm.astype(np.float32), bm.astype(np.float32)


def _neighbour_median(boundary: np.ndarray) -> np.ndarray:
    """Per B-scan, the median of its own and its two neighbours' boundary (ends repeated)."""
    padded = np.concatenate([boundary[:1], boundary, boundary[-1:]], axis=0)
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def _edge_strength(edges: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``edges[b, rows[b, x], x]`` for boundary rows ``(n_bscans, width)``."""
    index = np.clip(np.rint(rows).astype(np.intp), 0, edges.shape[1] - 1)
    return np.take_along_axis(edges, index[:, None, :], axis=1)[:, 0, :]


def _consistent_across_bscans(
    boundary: np.ndarray, edges: np.ndarray, tolerance: float
) -> np.ndarray:
    """Where a B-scan's boundary is more than ``tolerance`` rows from the median of its
    neighbourhood, take that median instead if the image has a stronger edge there."""
    if boundary.shape[0] < 3:
        return boundary
    neighbours = _neighbour_median(boundary)
    better = _edge_strength(edges, neighbours) > _edge_strength(edges, boundary)
    return np.where((np.abs(boundary - neighbours) > tolerance) & better, neighbours, boundary)


def segment_retina(volume: np.ndarray, min_thickness: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """ILM and BM rows in every A-scan of a normalized volume (see :func:`segment_bscan`).

    Across B-scans: where a boundary is more than 6 px from the median of itself and its two
    neighbouring B-scans, and the image has a stronger edge (dark-to-bright for the ILM,
    bright-to-dark for BM) at that median, the median is taken, then smoothed along x again. A
    B-scan that lost a boundary (a shadow, a lesion) is pulled back to its neighbours, while a
    real change between B-scans, like the foveal pit, is kept because its own edge is stronger.

    Returns:
        ``(ilm, bm)``, each ``(n_bscans, width)`` float32 rows.
    """
    ilm = np.empty(volume.shape[::2], dtype=np.float32)
    bm = np.empty_like(ilm)
    gradients = np.empty(volume.shape, dtype=np.float32)
    for index, bscan in enumerate(volume):
        ilm[index], bm[index] = segment_bscan(bscan, min_thickness=min_thickness)
        gradients[index] = _edges(bscan)[1]
    bm = _consistent_across_bscans(bm, -gradients, tolerance=6.0)
    ilm = _consistent_across_bscans(ilm, gradients, tolerance=6.0)
    bm = ndimage.gaussian_filter1d(bm, sigma=1.5, axis=1, mode="nearest")
    ilm = ndimage.gaussian_filter1d(ilm, sigma=1.0, axis=1, mode="nearest")
    ilm = np.minimum(ilm, bm - min_thickness)
    return ilm.astype(np.float32), bm.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 4. flattening
# ---------------------------------------------------------------------------------------------


def flat_bm_row(ilm: np.ndarray, bm: np.ndarray, height: int, margin: int) -> int:
    """The row BM is moved to: its median row, kept low enough that the thickest retina plus
    ``margin`` fits above it and high enough that ``margin`` rows fit below."""
    thickest = float(np.max(bm - ilm))
    row = int(round(float(np.median(bm))))
    return int(
        np.clip(row, min(height - 1, int(np.ceil(thickest)) + margin), max(0, height - 1 - margin))
    )


def flatten_shifts(bm: np.ndarray, bm_row: int) -> np.ndarray:
    """Whole-pixel shift per A-scan (``(..., width)`` int32) that moves BM to ``bm_row``."""
    return np.rint(bm_row - bm).astype(np.int32)


def flatten(image: np.ndarray, shifts: np.ndarray, fill: float = BACKGROUND) -> np.ndarray:
    """Shift every column of ``image`` (``(height, width)``) down by ``shifts`` (``(width,)``).

    ``flattened[y, x] = image[y - shifts[x], x]``; rows coming from outside the frame are ``fill``.
    """
    height, width = image.shape
    source = np.arange(height)[:, None] - shifts[None, :]
    valid = (source >= 0) & (source < height)
    flattened = image[np.clip(source, 0, height - 1), np.arange(width)[None, :]]
    return np.where(valid, flattened, np.asarray(fill, dtype=image.dtype))


# ---------------------------------------------------------------------------------------------
# 5. patch positions
# ---------------------------------------------------------------------------------------------


def _volume_seed(seed: int, volume_id: str, bscan: int) -> list[int]:
    return [seed, zlib.crc32(volume_id.encode()), bscan]


def sample_patch_positions(
    top: np.ndarray,
    bottom: np.ndarray,
    height: int,
    count: int,
    patch_size: int,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """Up to ``count`` distinct random top-left ``(y, x)`` whose centre lies in ``[top, bottom]``.

    Args:
        top, bottom: ``(width,)`` first and last retina row per column (inclusive).
        height: frame height; the patch stays inside the frame.
        count: patches wanted (fewer only if fewer distinct positions exist).
        patch_size: patch side.
        rng: the random source (seeded by the caller for reproducibility).
    """
    half = patch_size // 2
    width = top.shape[0]
    centre_columns = np.arange(half, width - patch_size + half + 1)
    low = np.maximum(np.ceil(top[centre_columns]).astype(int), half)
    high = np.minimum(np.floor(bottom[centre_columns]).astype(int), height - patch_size + half)
    usable = high >= low
    centre_columns, low, high = centre_columns[usable], low[usable], high[usable]
    if centre_columns.size == 0:
        return []
    available = int(np.sum(high - low + 1))
    wanted = min(count, available)
    chosen: set[tuple[int, int]] = set()
    positions: list[tuple[int, int]] = []
    while len(positions) < wanted:
        pick = int(rng.integers(centre_columns.size))
        centre_y = int(rng.integers(low[pick], high[pick] + 1))
        position = (centre_y - half, int(centre_columns[pick]) - half)
        if position not in chosen:
            chosen.add(position)
            positions.append(position)
    return positions


def _grid_axis(start: int, stop: int, stride: int, patch_size: int, size: int) -> list[int]:
    """Top-left offsets covering ``[start, stop]`` (inclusive) within ``[0, size)``."""
    start = int(np.clip(start, 0, size - patch_size))
    last = int(np.clip(stop - patch_size + 1, start, size - patch_size))
    offsets = list(range(start, last + 1, stride))
    if offsets[-1] != last:
        offsets.append(last)
    return offsets


def grid_patch_positions(
    band_top: int, band_bottom: int, height: int, width: int, stride: int, patch_size: int
) -> list[tuple[int, int]]:
    """A regular grid of top-left ``(y, x)`` covering rows ``[band_top, band_bottom]`` and all
    columns; the last row / column is snapped to the edge so every pixel is covered."""
    rows = _grid_axis(band_top, band_bottom, stride, patch_size, height)
    columns = _grid_axis(0, width - 1, stride, patch_size, width)
    return [(y, x) for y in rows for x in columns]


# ---------------------------------------------------------------------------------------------
# the whole per-volume step
# ---------------------------------------------------------------------------------------------


@dataclass
class BscanGeometry:
    """How a B-scan's flattened, resampled frame maps back to the original B-scan."""

    bscan: int
    x_scale: float  # original columns per resampled column
    bm_row: int  # the row BM was moved to (-1 for modality image)
    shifts: np.ndarray  # (width,) int32: unscaled row = flattened row - shifts[x]
    ilm: np.ndarray  # (width,) float32 ILM row in the resampled (unflattened) frame
    bm: np.ndarray  # (width,) float32 BM row in the resampled (unflattened) frame
    y_scale: float = 1.0  # original rows per row (an enlarged image's; OCT rows keep their size)


@dataclass
class VolumePatches:
    """The patches of one volume as numpy columns (the patch table's columns, DESIGN.md §3.2)."""

    columns: dict[str, np.ndarray]
    geometry: list[BscanGeometry]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    bscans: int = 0
    spacing_x_um: float | None = None  # the A-scan spacing used (None: not resampled)
    spacing_source: str = "none"  # file, manifest, or none
    segmentation: dict[str, Any] = field(default_factory=dict)  # used; differences to the file's

    @property
    def num_patches(self) -> int:
        return int(self.columns["patch_id"].shape[0])


STEPS = ("read", "normalize", "resample", "segment", "flatten", "patch")


def _volume_label(label: Any, mask: np.ndarray | None, annotated_bscans: np.ndarray | None) -> int:
    """The volume's (image's) label: the manifest's (None / NA / -1: none), else any annotated
    pixel of the mask (a mask that covers only some B-scans and shows nothing there: unknown).

    Raises:
        VolumeError: the manifest's label contradicts the mask.
    """
    annotated = None if mask is None else int(np.count_nonzero(mask))
    if annotated == 0 and annotated_bscans is not None and not annotated_bscans.all():
        annotated = None  # healthy where annotated says nothing about the other B-scans
    if label is None or pd.isna(label) or int(label) == LABEL_UNKNOWN:
        return LABEL_UNKNOWN if annotated is None else int(annotated > 0)
    label = int(label)
    if annotated is not None and label != int(annotated > 0):
        raise VolumeError(
            f"label {label} contradicts the mask, which annotates {annotated} pixel(s)"
        )
    return label


def _spacing(given: Any, scan: volumes.Scan, path: str) -> tuple[float, str]:
    """The A-scan spacing (µm) and where it came from: the file's, else the manifest's.

    Raises:
        VolumeError: neither states one, or they differ by more than 1 %.
    """
    manifest = None
    if given is not None and np.isfinite(float(given)) and float(given) > 0:
        manifest = float(given)
    stated = scan.spacing_x_um
    if stated is not None and manifest is not None and abs(manifest - stated) > 0.01 * stated:
        raise VolumeError(
            f"spacing_x_um {manifest:g} µm in the manifest disagrees with {stated:g} µm stated by "
            f"the file {path} (more than 1 %)"
        )
    if stated is not None:
        return stated, "file"
    if manifest is not None:
        return manifest, "manifest"
    raise VolumeError("missing spacing_x_um for an OCT volume (the file does not state it)")


def _file_boundary(rows: np.ndarray, width: int, x_scale: float) -> np.ndarray:
    """A file's layer (n, original width; NaN where not segmented) on the resampled columns
    (n, width), interpolated along x; all-NaN B-scans stay NaN."""
    columns = (np.arange(width) + 0.5) * x_scale - 0.5
    out = np.full((rows.shape[0], width), np.nan, np.float32)
    for index, row in enumerate(rows):
        known = np.flatnonzero(np.isfinite(row))
        if known.size >= 2:
            out[index] = np.interp(columns, known, row[known])
    return out


def _layers(
    scan: volumes.Scan, image: np.ndarray, x_scale: float, mode: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """ILM and BM (n, width) in the resampled frame, and how they were chosen.

    ``own`` segments the image; ``file`` takes the file's layers (ILM and BM from the device or
    the data set), ``auto`` the file's when it has both. Our own segmentation always runs, and
    where the file has layers the mean absolute row difference between the two is reported
    (B-scans the file leaves unsegmented take ours).

    Raises:
        VolumeError: ``file`` asked for and the file has no ILM / BM layers.
    """
    ilm, bm = segment_retina(image)
    has_file = "ilm" in scan.layers and "bm" in scan.layers
    if mode == "file" and not has_file:
        raise VolumeError("preprocess.segmentation=file, but the file has no ILM / BM layers")
    info: dict[str, Any] = {"used": "own"}
    if not has_file:
        return ilm, bm, info
    width = image.shape[-1]
    file_ilm = _file_boundary(np.asarray(scan.layers["ilm"], np.float32), width, x_scale)
    file_bm = _file_boundary(np.asarray(scan.layers["bm"], np.float32), width, x_scale)
    for name, ours, theirs in (("ilm", ilm, file_ilm), ("bm", bm, file_bm)):
        known = np.isfinite(theirs)
        info[f"{name}_mean_abs_difference_px"] = (
            round(float(np.abs(theirs[known] - ours[known]).mean()), 3) if known.any() else None
        )
    if mode == "own":
        return ilm, bm, info
    info["used"] = "file"
    height = image.shape[1]
    file_ilm = np.clip(np.where(np.isfinite(file_ilm), file_ilm, ilm), 0, height - 1)
    file_bm = np.clip(np.where(np.isfinite(file_bm), file_bm, bm), 0, height - 1)
    return file_ilm.astype(np.float32), np.maximum(file_bm, file_ilm).astype(np.float32), info


def preprocess_volume(record: dict[str, Any], cfg: PreprocessConfig) -> VolumePatches:
    """Read one manifest row's volume (and mask) and turn it into patch-table columns.

    Args:
        record: a row of :func:`anogan_ray.data.volumes.read_manifest` as a dict.
        cfg: the preprocess configuration.

    Raises:
        VolumeError: with the reject reason (missing / unreadable file, wrong dimensions, constant
            image, NaNs, missing spacing for OCT, mask shape differing from the image, ...).
    """
    timings = dict.fromkeys(STEPS, 0.0)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] += now - clock
        clock = now

    size = cfg.patch_size
    volume_id = str(record["volume_id"])
    is_oct = record["modality"] == "oct"
    scan = volumes.read_scan(str(record["path"]))
    raw = scan.image
    volumes.check_image_values(raw)
    spacing, spacing_source = None, "none"
    if is_oct:
        spacing, spacing_source = _spacing(record.get("spacing_x_um"), scan, str(record["path"]))
    mask, annotated_bscans = scan.mask, scan.annotated_bscans
    if record.get("mask_path"):  # the manifest's mask wins over a data set's
        try:
            mask = volumes.read_volume(str(record["mask_path"]))
        except VolumeError as exc:
            raise VolumeError(f"mask: {exc}") from exc
        annotated_bscans = None
    if mask is not None and mask.shape != raw.shape:
        raise VolumeError(
            f"mask shape {tuple(mask.shape)} differs from image shape {tuple(raw.shape)}"
        )
    volume_label = _volume_label(record.get("label"), mask, annotated_bscans)
    lap("read")

    image = normalize_volume(raw) if is_oct else normalize_image(raw)
    lap("normalize")

    x_scale = y_scale = 1.0
    if is_oct:
        width = image.shape[-1]
        image = resample_x(image, spacing, cfg.target_spacing_um)
        x_scale = width / image.shape[-1]
        if mask is not None:
            mask = resample_x(mask, spacing, cfg.target_spacing_um, nearest=True)
    else:
        image, y_scale, x_scale = enlarge_to_patch(image, size)
        if mask is not None:
            mask = enlarge_to_patch(mask, size, nearest=True)[0]
    n_bscans, height, width = image.shape
    if height < size or width < size:
        raise VolumeError(
            f"wrong dimensions: B-scan {height} x {width} (after resampling) is smaller than the "
            f"{size} x {size} patch"
        )
    lap("resample")

    segmentation: dict[str, Any] = {}
    if is_oct:
        ilm, bm, segmentation = _layers(scan, image, x_scale, cfg.segmentation)
        bm_row = flat_bm_row(ilm, bm, height, cfg.retina_margin)
        shifts = flatten_shifts(bm, bm_row)
    else:
        ilm = np.zeros((n_bscans, width), np.float32)
        bm = np.full((n_bscans, width), height - 1, np.float32)
        bm_row, shifts = -1, np.zeros((n_bscans, width), np.int32)
    lap("segment")

    training = record["split"] == "train"
    out: dict[str, list] = {
        name: [] for name in ("pixels", "bscan", "y", "x", "label", "anomaly_fraction")
    }
    geometry = []
    for index in range(n_bscans):
        flat_image = flatten(image[index], shifts[index]) if is_oct else image[index]
        flat_mask = None
        if mask is not None and (annotated_bscans is None or annotated_bscans[index]):
            flat_mask = flatten(mask[index], shifts[index], fill=0) if is_oct else mask[index]
        top = ilm[index] + shifts[index]
        bottom = bm[index] + shifts[index]
        lap("flatten")
        if training:
            rng = np.random.default_rng(_volume_seed(cfg.seed, volume_id, index))
            positions = sample_patch_positions(
                top, bottom, height, cfg.patches_per_bscan, size, rng
            )
        elif is_oct:
            band_top = int(np.floor(top.min())) - cfg.retina_margin
            band_bottom = int(np.ceil(bottom.max())) + cfg.retina_margin
            positions = grid_patch_positions(
                band_top, band_bottom, height, width, cfg.grid_stride, size
            )
        else:
            positions = grid_patch_positions(0, height - 1, height, width, cfg.grid_stride, size)
        for y, x in positions:
            out["pixels"].append(encode_pixels(flat_image[y : y + size, x : x + size]))
            out["bscan"].append(index)
            out["y"].append(y)
            out["x"].append(x)
            if flat_mask is None and volume_label == 0:  # a healthy image: healthy patches
                out["label"].append(0)
                out["anomaly_fraction"].append(0.0)
            elif flat_mask is None:  # pathological somewhere, unlabelled, or B-scan not annotated
                out["label"].append(LABEL_UNKNOWN)
                out["anomaly_fraction"].append(np.nan)
            else:
                annotated = flat_mask[y : y + size, x : x + size] != 0
                out["label"].append(int(annotated.any()))
                out["anomaly_fraction"].append(float(annotated.mean()))
        geometry.append(
            BscanGeometry(index, x_scale, bm_row, shifts[index], ilm[index], bm[index], y_scale)
        )
        lap("patch")

    count = len(out["y"])
    columns = {
        "patch_id": np.array(
            [patch_id(volume_id, b, y, x) for b, y, x in zip(out["bscan"], out["y"], out["x"])],
            dtype=object,
        ),
        "subject_id": np.array([str(record["subject_id"])] * count, dtype=object),
        "volume_id": np.array([volume_id] * count, dtype=object),
        "bscan": np.asarray(out["bscan"], dtype=np.int32),
        "y": np.asarray(out["y"], dtype=np.int32),
        "x": np.asarray(out["x"], dtype=np.int32),
        "split": np.array([str(record["split"])] * count, dtype=object),
        "pixels": np.stack(out["pixels"]) if count else np.zeros((0, size, size), np.uint8),
        "label": np.asarray(out["label"], dtype=np.int8),
        "anomaly_fraction": np.asarray(out["anomaly_fraction"], dtype=np.float32),
        "volume_label": np.full(count, volume_label, dtype=np.int8),
        "source": np.array([str(record["path"])] * count, dtype=object),
        "spacing_source": np.array([spacing_source] * count, dtype=object),
    }
    return VolumePatches(
        columns=columns,
        geometry=geometry,
        timings=timings,
        bscans=n_bscans,
        spacing_x_um=spacing,
        spacing_source=spacing_source,
        segmentation=segmentation,
    )
