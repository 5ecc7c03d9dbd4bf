"""Anomaly maps: each method's per-pixel residual, stitched back onto the B-scan (torch + numpy).

The paper localizes an anomaly with the residual image |x − G(z_Γ)| of a patch (METHOD.md §4, its
Fig. 3). The scoring grid covers a B-scan's retina with 64 x 64 patches at stride 32
(:func:`anogan_ray.data.retina.grid_patch_positions`), so every pixel lies in up to four patches;
:func:`stitch` puts the patches' residuals back at their top-left ``(y, x)`` in the flattened,
resampled frame and combines the overlaps:

* ``mean`` (default): the average of the covering patches' residuals at that pixel;
* ``max``: the largest of them.

Measured on the demo's val+test (docs/maps.md §4): with the healthy standardization and
smoothing, the mean is ahead for A and PCA on pixel AUROC and AUPRO and for the aCAE on AUPRO
(the max gives the aCAE a higher AUROC); on the raw residuals the two are within 0.01 for A and
PCA. A patch whose reconstruction failed as a whole lights up its whole window under the max,
healthy overlaps with its neighbours included; the mean halves that.

The three methods' residuals (:data:`METHODS`), each |x − x̂| of its own reconstruction x̂:

* ``A``: x̂ = G(z_Γ), the stored final latent of the scoring run, one forward pass of G in fp32
  (so Σ of a patch's map is its R(x) up to rounding);
* ``aCAE``: x̂ = Dec(E(x)) of the bundle's adversarial autoencoder;
* ``PCA``: x̂ = the projection of x onto the bundle's principal components.

Every forward pass runs in batches of exactly :func:`~anogan_ray.core.invert.mapping_rows` rows
(:func:`~anogan_ray.core.invert.in_fixed_rows`), so a patch's map is bit-identical whatever
B-scan group it is computed in.

Optional residual post-processing that evaluation applies to every method alike (measured in
docs/maps.md): :class:`HealthyNoise` (standard scores against the healthy residual of pixels
whose reconstruction has the same gray value and edge strength) and :func:`postprocess`
(smoothing at a scale tied to the patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anogan_ray.core.invert import in_fixed_rows
from anogan_ray.core.model import ModelBundle

METHODS = ("A", "aCAE", "PCA")  # map names, as the score table's short names (metrics.SCORES)
COMBINES = ("mean", "max")


def available_methods(bundle: ModelBundle) -> list[str]:
    """The methods whose maps this bundle can draw: A always, the baselines it holds."""
    return ["A", *(m for m in ("aCAE", "PCA") if m.lower() in bundle.baselines)]


@torch.no_grad()
def reconstructions(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    z: np.ndarray | None,
    methods: Sequence[str] = METHODS,
) -> dict[str, np.ndarray]:
    """Each method's reconstruction x̂ of a batch of patches, in fp32.

    Args:
        bundle: the model bundle that scored the patches.
        pixels: (B, 1, 64, 64) patches in [-1, 1].
        z: (B, nz) the final latents z_Γ of the scoring run (needed for ``A``).
        methods: names from :data:`METHODS`.

    Returns:
        ``{method: (B, 64, 64) float32}``.

    Raises:
        ValueError: an unknown method, ``A`` without z, or a baseline the bundle lacks.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"map method(s) {unknown}: expected some of {', '.join(METHODS)}")
    x = pixels.to(torch.float32)
    out: dict[str, np.ndarray] = {}
    if "A" in methods:
        if z is None:
            raise ValueError("the A map needs the final latents z (score with score.save_z=true)")
        generator = bundle.generator
        device = next(generator.parameters()).device
        latent = torch.as_tensor(np.asarray(z, np.float32))  # (B, nz)
        out["A"] = in_fixed_rows(generator, latent, device)[:, 0].float().cpu().numpy()
    missing = [m for m in ("aCAE", "PCA") if m in methods and m.lower() not in bundle.baselines]
    if missing:
        raise ValueError(f"this model bundle has no {missing[0]} baseline (train.baselines=true)")
    if "aCAE" in methods:
        autoencoder = bundle.baselines["acae"]
        device = next(autoencoder.parameters()).device
        decoded = in_fixed_rows(lambda b: autoencoder(b)[0], x, device)  # (B, 1, 64, 64)
        out["aCAE"] = decoded[:, 0].cpu().numpy()
    if "PCA" in methods:
        pca = bundle.baselines["pca"]
        flat = x.reshape(len(x), -1).cpu().numpy() - pca.mean  # (B, 4096)
        projected = (flat @ pca.components.T) @ pca.components
        out["PCA"] = (projected + pca.mean).reshape(x.shape[0], *x.shape[2:])
    return {m: np.asarray(out[m], np.float32) for m in methods}


def residual_maps(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    z: np.ndarray | None,
    methods: Sequence[str] = METHODS,
) -> dict[str, np.ndarray]:
    """|x − x̂| per pixel for each method (see :func:`reconstructions`): ``{method: (B, 64, 64)}``."""
    x = pixels.to(torch.float32)[:, 0].cpu().numpy()  # (B, 64, 64)
    return {m: np.abs(x - r) for m, r in reconstructions(bundle, pixels, z, methods).items()}


@dataclass
class Stitched:
    """Patch values put back onto the frame: ``values`` covers frame rows [top, top + height)
    and columns [left, left + width); NaN where no patch covers a pixel."""

    values: np.ndarray  # (height, width) float32
    top: int
    left: int
    patches: int  # patches stitched


def stitch(
    patch_values: np.ndarray,
    ys: Sequence[int] | np.ndarray,
    xs: Sequence[int] | np.ndarray,
    combine: str = "mean",
) -> Stitched:
    """Put patches (N, P, P) back at their top-left ``(ys, xs)`` and combine overlaps.

    Args:
        patch_values: per-pixel values of each patch (a residual, a reconstruction, pixels).
        ys, xs: top-left row and column of each patch in the flattened frame.
        combine: ``mean`` or ``max`` of the patches covering a pixel.

    Returns:
        The bounding box of the patches as a :class:`Stitched`.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine {combine!r}: expected one of {', '.join(COMBINES)}")
    values = np.asarray(patch_values, np.float32)
    ys, xs = np.asarray(ys, np.int64), np.asarray(xs, np.int64)
    if values.ndim != 3 or values.shape[1] != values.shape[2] or len(ys) != len(values):
        raise ValueError(
            f"stitch: patch values of shape {values.shape} with {len(ys)} positions: expected "
            "(N, P, P) and one position per patch"
        )
    if len(values) == 0:
        return Stitched(np.zeros((0, 0), np.float32), 0, 0, 0)
    size = values.shape[1]
    top, left = int(ys.min()), int(xs.min())
    height, width = int(ys.max()) - top + size, int(xs.max()) - left + size
    if combine == "mean":
        total = np.zeros((height, width), np.float64)
        count = np.zeros((height, width), np.int32)
        for patch, y, x in zip(values, ys - top, xs - left, strict=True):
            total[y : y + size, x : x + size] += patch
            count[y : y + size, x : x + size] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    else:
        out = np.full((height, width), -np.inf, np.float32)
        for patch, y, x in zip(values, ys - top, xs - left, strict=True):
            window = out[y : y + size, x : x + size]
            np.maximum(window, patch, out=window)
        out[np.isneginf(out)] = np.nan
    return Stitched(out, top, left, len(values))


FINE_BINS = 64  # fine bins per feature (gray value; edge strength on a log scale)
VALUE_GROUPS = 16  # equal-count groups of the reconstructed gray value that HealthyNoise fits
EDGE_GROUPS = 8  # ... and of the reconstruction's edge strength
MIN_CELL = 30  # healthy pixels a (value, edge) cell needs; fewer: the value group's statistics
_EDGE_RANGE = (0.005, 8.0)  # edge strengths (Sobel of [-1, 1] images) the log bins resolve


class HealthyNoise:
    """How large a healthy pixel's residual is, given what the model reconstructed there: the
    optional "healthy standardization" of residual maps, the same for every method.

    A residual |x − x̂| mixes what the model cannot explain with what it never reproduces
    exactly even on healthy tissue, and that depends on the reconstruction: OCT speckle is
    multiplicative (bright layers scatter more), and where x̂ has an edge (a layer boundary, a
    texture's contrast) a fraction of a pixel's misplacement makes a large residual. So each
    pixel is described by two features of the stitched reconstruction, its gray value and its
    edge strength (the gradient magnitude of x̂ smoothed by a Gaussian of 1 px), and
    fitted on healthy pixels (:meth:`add`) this keeps, per cell of fine bins of the two, the
    count, sum and sum of squares of the residual (fixed memory). :meth:`fit` merges the fine
    bins into :data:`VALUE_GROUPS` x :data:`EDGE_GROUPS` groups of about equal counts along each
    feature and takes each group's mean and standard deviation (a group with fewer than
    :data:`MIN_CELL` pixels takes its gray value's). :meth:`standardize` turns a map into
    standard scores (residual − mean) / sd of each pixel's group: a residual counts by how
    unusual it is for healthy tissue that reconstructs alike. Nothing in it knows lesion shapes
    or kinds.
    """

    def __init__(self) -> None:
        shape = (FINE_BINS, FINE_BINS)
        self.count = np.zeros(shape, np.int64)
        self.total = np.zeros(shape, np.float64)
        self.squares = np.zeros(shape, np.float64)
        self.value_edges: np.ndarray | None = None  # first fine bin of each next group
        self.edge_edges: np.ndarray | None = None
        self.mean: np.ndarray | None = None  # (value group, edge group)
        self.sd: np.ndarray | None = None

    @staticmethod
    def _features(reconstruction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fine bins of (gray value, edge strength) of every pixel of a stitched x̂."""
        from scipy import ndimage

        filled = np.nan_to_num(np.asarray(reconstruction, np.float64), nan=-1.0)
        value = np.clip((filled + 1.0) / 2.0 * FINE_BINS, 0, FINE_BINS - 1).astype(np.int64)
        smooth = ndimage.gaussian_filter(filled, 1.0, mode="nearest")
        edge = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
        low, high = _EDGE_RANGE
        scaled = np.log1p(edge / low) / np.log1p(high / low) * FINE_BINS
        return value, np.clip(scaled, 0, FINE_BINS - 1).astype(np.int64)

    def add(self, residual: np.ndarray, reconstruction: np.ndarray) -> None:
        """Count the healthy pixels of one map (NaN residuals are left out)."""
        value, edge = self._features(reconstruction)
        keep = np.isfinite(residual)
        cells = (value * FINE_BINS + edge)[keep]
        values = np.asarray(residual[keep], np.float64)
        size = FINE_BINS * FINE_BINS
        self.count += np.bincount(cells, minlength=size).reshape(self.count.shape)
        self.total += np.bincount(cells, values, minlength=size).reshape(self.count.shape)
        self.squares += np.bincount(cells, values * values, minlength=size).reshape(
            self.count.shape
        )

    @staticmethod
    def _group_edges(counts: np.ndarray, groups: int) -> np.ndarray:
        """Fine-bin boundaries cutting ``counts`` into ``groups`` parts of about equal sums: the
        first fine bin of every group but the first."""
        cumulative = np.cumsum(counts)
        cuts = np.searchsorted(cumulative, np.arange(1, groups) * cumulative[-1] / groups) + 1
        return np.unique(np.clip(cuts, 1, FINE_BINS - 1))

    def fit(self) -> HealthyNoise:
        """Group the fine bins (equal counts along each feature); each group's mean and sd."""
        if self.count.sum() == 0:
            raise ValueError("no healthy pixels to fit the healthy residual's spread on")
        self.value_edges = self._group_edges(self.count.sum(1), VALUE_GROUPS)
        self.edge_edges = self._group_edges(self.count.sum(0), EDGE_GROUPS)
        v = np.searchsorted(self.value_edges, np.arange(FINE_BINS), "right")
        e = np.searchsorted(self.edge_edges, np.arange(FINE_BINS), "right")
        shape = (len(self.value_edges) + 1, len(self.edge_edges) + 1)
        sums = []
        for fine in (self.count, self.total, self.squares):
            grouped = np.zeros(shape)
            np.add.at(grouped, (v[:, None], e[None, :]), fine)
            sums.append(grouped)
        count, total, squares = sums
        # a thin cell takes its gray value's statistics (all edge strengths together)
        row_count, row_total = count.sum(1, keepdims=True), total.sum(1, keepdims=True)
        row_squares = squares.sum(1, keepdims=True)
        thin = count < MIN_CELL
        count = np.where(thin, row_count, count)
        total = np.where(thin, row_total, total)
        squares = np.where(thin, row_squares, squares)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            variance = np.maximum(squares / count - mean**2, 0.0)
        known = np.isfinite(mean)
        if not known.all():  # a gray value no healthy pixel had: the overall statistics
            overall = self.total.sum() / self.count.sum()
            overall_var = max(self.squares.sum() / self.count.sum() - overall**2, 0.0)
            mean = np.where(known, mean, overall)
            variance = np.where(known, variance, overall_var)
        self.mean = mean
        floor = 1e-3 * max(float(np.sqrt(variance.max())), 1e-6)
        self.sd = np.maximum(np.sqrt(variance), floor)
        return self

    def standardize(self, residual: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """Standard scores of a map against the healthy residual of pixels reconstructed alike."""
        if self.mean is None or self.sd is None:
            raise ValueError("HealthyNoise.standardize before fit")
        value, edge = self._features(reconstruction)
        v = np.searchsorted(self.value_edges, value, "right")
        e = np.searchsorted(self.edge_edges, edge, "right")
        return ((residual - self.mean[v, e]) / self.sd[v, e]).astype(np.float32)


def postprocess(values: np.ndarray, smooth_sigma: float = 0.0) -> np.ndarray:
    """Optional residual post-processing, the same for every method.

    ``smooth_sigma`` > 0: a Gaussian of that many pixels, normalized over the covered pixels (NaN
    stays NaN and does not leak into its neighbours). 0 returns the map unchanged.
    """
    if smooth_sigma <= 0:
        return values
    from scipy import ndimage

    covered = np.isfinite(values)
    filled = np.where(covered, values, 0.0).astype(np.float64)
    weight = ndimage.gaussian_filter(covered.astype(np.float64), smooth_sigma, mode="constant")
    blurred = ndimage.gaussian_filter(filled, smooth_sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = blurred / weight
    return np.where(covered, out, np.nan).astype(np.float32)
