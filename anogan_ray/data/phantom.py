"""Synthetic SD-OCT cohort: B-scans that look like a Spectralis volume, with pixel-level masks.

We have no real OCT data, so this deterministic generator is the test and demo data. A cohort is
written in the manifest format of DESIGN.md §3.1 (:func:`write_cohort`)::

    manifest.csv                   subject_id, volume_id, path, modality, spacing_x_um, split,
                                   label, mask_path (paths relative to the manifest's folder)
    volumes/<volume_id>.npy        uint8 (n_bscans, height, width)  (.tif when volume_format=tiff)
    masks/<volume_id>.npy          uint8, same shape; PATHOLOGY_CODES per pixel, 0 = none
    boundaries/<volume_id>.npz     ilm, bm (n_bscans, width) and layers (n_bscans, 11, width)
    bscans/<volume_id>/<b:03d>.png one 8-bit PNG per B-scan (only with write_png_bscans)
    summary.json                   counts per split and label, pathology pixels, seconds

The anatomy, top to bottom: dark vitreous; the retina, 10 layers of distinct reflectivity
(:data:`LAYER_NAMES`) between the inner limiting membrane (ILM) and Bruch's membrane (BM), curved
and tilted per subject, with a foveal pit in the central B-scans; a textured choroid; dark sclera.
Retinal vessels cast shadows, and multiplicative speckle covers everything.

Boundary rows are continuous: a boundary at row ``y`` means pixels whose centre ``z >= y`` lie
below it. ``bm`` is Bruch's membrane, which drusen and subretinal fluid never lift (so flattening
on ``bm`` keeps lesions visible); the RPE above it is lifted. Hence ``layers[:, -2]``, the top of
the RPE, rises over drusen, and the last layer (RPE top to BM) is the RPE-drusen complex. Subretinal
fluid lies between the lifted photoreceptor outer segments and the RPE, inside the interval
``layers[:, -3]`` (EZ/OS) to ``layers[:, -2]`` (RPE top). Intraretinal cysts and foci sit inside
the nuclear layers, which swell around cysts; the interfaces there are the drawn, swollen ones.

Randomness comes from one generator per volume, seeded by ``(seed, subject, volume)``, so a seed
always writes the same bytes (``summary.json`` apart, which records the seconds taken).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anogan_ray import storage
from anogan_ray.config import PhantomConfig

PATHOLOGY_CODES = {
    "intraretinal_fluid": 1,  # dark rounded cysts in the nuclear layers
    "subretinal_fluid": 2,  # dark dome between the photoreceptors and the RPE
    "foci": 3,  # small hyperreflective dots
    "drusen": 4,  # material under an elevated RPE
}

# Overlay colours (RGB) of the pathologies, shared with the report stage.
PATHOLOGY_COLORS = {
    "intraretinal_fluid": (0, 190, 255),
    "subretinal_fluid": (255, 205, 0),
    "foci": (255, 40, 200),
    "drusen": (60, 230, 60),
}

LAYER_NAMES = (
    "NFL",  # nerve fibre layer (bright)
    "GCL",  # ganglion cell layer
    "IPL",  # inner plexiform layer
    "INL",  # inner nuclear layer (dark)
    "OPL",  # outer plexiform layer
    "ONL",  # outer nuclear layer (dark, thickest)
    "IS",  # photoreceptor inner segments, external limiting membrane at the top
    "EZ",  # ellipsoid zone (bright)
    "OS",  # outer segments and interdigitation zone
    "RPE",  # retinal pigment epithelium (bright), plus drusen when present
)

MANIFEST_COLUMNS = (
    "subject_id",
    "volume_id",
    "path",
    "modality",
    "spacing_x_um",
    "split",
    "label",
    "mask_path",
)

# Share of the retinal thickness per layer away from the fovea (about 330 µm in all).
_LAYER_FRACTIONS = np.array([0.09, 0.14, 0.11, 0.11, 0.09, 0.23, 0.07, 0.04, 0.07, 0.05])
# Display brightness (0-255, before speckle) of each layer, like a Spectralis B-scan.
_LAYER_BRIGHTNESS = np.array([185, 100, 138, 60, 122, 46, 68, 205, 98, 218], dtype=np.float32)
_VITREOUS = 5.0
_FLUID = 7.0  # intraretinal and subretinal fluid: optically empty, dark as the vitreous
_DRUSEN_MATERIAL = 112.0
_FOCI = 250.0
_CHOROID = 132.0
_SCLERA = 42.0
_INNER_LAYERS = 5  # NFL..OPL thin out in the foveal pit
_DEFAULT_HEIGHT = 496
_DEFAULT_SPACING_UM = 11.5


@dataclass
class PhantomVolume:
    """One generated volume.

    Attributes:
        image: uint8 (n_bscans, height, width) B-scans.
        mask: uint8, same shape; :data:`PATHOLOGY_CODES` per pixel, 0 where there is none.
        layers: float32 (n_bscans, 11, width) rows of the interfaces between the layers of
            :data:`LAYER_NAMES`, top (ILM) to bottom (Bruch's membrane).
    """

    image: np.ndarray
    mask: np.ndarray
    layers: np.ndarray

    @property
    def ilm(self) -> np.ndarray:
        """Row of the inner limiting membrane, (n_bscans, width)."""
        return self.layers[:, 0]

    @property
    def bm(self) -> np.ndarray:
        """Row of Bruch's membrane (never lifted by lesions), (n_bscans, width)."""
        return self.layers[:, -1]


@dataclass
class _Geometry:
    """Sizes of one cohort in pixels, derived from the config."""

    height: int
    width: int
    thickness: float  # healthy retina away from the fovea, pixels
    axial_scale: float  # axial lesion sizes relative to the default 496-row frame
    lateral_scale: float  # lateral lesion sizes relative to 11.5 µm A-scan spacing
    size_factor: float  # lesion size multiplier from the pathology burden
    top_margin: float  # rows kept free above the ILM for lifted lesions


def _geometry(cfg: PhantomConfig) -> _Geometry:
    # ~100 px at 496 rows, and not under 84 so a 64-px patch fits inside the retina (unless
    # the frame is too short for that)
    thickness = min(max(84.0, 0.2 * cfg.height), 0.45 * cfg.height)
    axial_scale = thickness / (0.2 * _DEFAULT_HEIGHT)
    size_factor = float(np.clip(cfg.pathology_burden, 0.5, 2.0) ** 0.25)
    max_lift = (30 + 15 + 16) * axial_scale * size_factor  # SRF + drusen + cyst swelling
    return _Geometry(
        height=cfg.height,
        width=cfg.width,
        thickness=thickness,
        axial_scale=axial_scale,
        lateral_scale=_DEFAULT_SPACING_UM / cfg.spacing_x_um,
        size_factor=size_factor,
        top_margin=0.04 * cfg.height + max_lift,
    )


def _smooth_wiggle(rng: np.random.Generator, u: np.ndarray, n_terms: int = 3) -> np.ndarray:
    """A smooth random curve over ``u`` in [-1, 1], roughly unit amplitude."""
    freq = rng.uniform(0.4, 2.5, size=(n_terms, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n_terms, 1))
    amp = rng.uniform(0.3, 1.0, size=(n_terms, 1))
    return (amp * np.sin(np.pi * freq * u[None, :] + phase)).sum(0) / amp.sum()


def _bump(x: np.ndarray, center: float, half_width: float, power: float) -> np.ndarray:
    """A dome of height 1 at ``center``, 0 beyond ``half_width``."""
    return np.clip(1.0 - ((x - center) / half_width) ** 2, 0.0, 1.0) ** power


# ---------------------------------------------------------------------------------------------
# Anatomy: healthy layer interfaces of a whole volume
# ---------------------------------------------------------------------------------------------


def _healthy_interfaces(
    cfg: PhantomConfig, geo: _Geometry, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Healthy interfaces (n_bscans, 11, width), choroid thickness (n_bscans, width), and the
    fovea and vessel layout the rest of the drawing needs."""
    n, width = cfg.bscans_per_volume, cfg.width
    cols = np.arange(width, dtype=np.float64)
    u = (cols - (width - 1) / 2) / ((width - 1) / 2)  # lateral position in [-1, 1]
    x_mm = (cols - (width - 1) / 2) * cfg.spacing_x_um / 1000
    scan_mm = width * cfg.spacing_x_um / 1000  # a square scan: B-scans cover as much in y
    y_mm = (np.arange(n) - (n - 1) / 2) * (scan_mm / n)
    v = y_mm / (scan_mm / 2)  # B-scan position in [-1, 1]

    # the subject's eye: fovea position, retinal thickness, layer proportions, nasal side
    fovea_x = rng.normal(0, 0.04) * scan_mm / 2
    fovea_y = rng.normal(0, 0.15) * scan_mm / n
    thickness = geo.thickness * float(np.clip(rng.normal(1.0, 0.04), 0.93, 1.08))
    fractions = _LAYER_FRACTIONS * np.clip(rng.normal(1, 0.06, size=10), 0.85, 1.15)
    fractions /= fractions.sum()
    nasal_side = rng.choice([-1.0, 1.0])  # right or left eye
    pit_depth = rng.uniform(0.85, 0.95)
    pit_sigma_mm = rng.uniform(0.35, 0.5)

    # fovea weight per B-scan and column: 1 at the centre of the pit
    pit = np.exp(
        -((x_mm[None, :] - fovea_x) ** 2 + (y_mm[:, None] - fovea_y) ** 2) / (2 * pit_sigma_mm**2)
    )  # (n, width)

    thick = np.empty((n, 10, width))
    for k in range(10):
        wiggle = _smooth_wiggle(rng, u)[None, :] + 0.3 * np.sin(v[:, None] * 2.0 + k)
        thick[:, k] = thickness * fractions[k] * (1 + 0.05 * wiggle)
    # the nerve fibre layer thickens towards the optic disc (nasal) and vanishes at the fovea
    thick[:, 0] *= 0.55 + 0.9 / (1 + np.exp(-(x_mm[None, :] - fovea_x) * nasal_side * 2.0))
    thick[:, :_INNER_LAYERS] *= (1 - pit_depth * pit)[:, None, :]
    thick[:, 5] *= 1 + 0.3 * pit  # ONL (Henle fibres) thickens under the pit
    thick[:, 7:9] *= (1 + 0.15 * pit)[:, None, :]  # cone outer segments lengthen
    thick = np.maximum(thick, 0.25)

    # the eye's curvature and tilt place Bruch's membrane; rows grow downwards
    edge_rise = rng.uniform(0.02, 0.09) * geo.height
    tilt = rng.uniform(-0.05, 0.05) * geo.height
    y_rise = rng.uniform(0.0, 0.03) * geo.height
    shape = -edge_rise * u[None, :] ** 2 + tilt * u[None, :] - y_rise * v[:, None] ** 2
    shape = shape + 1.2 * geo.axial_scale * _smooth_wiggle(rng, u)[None, :]
    choroid = thickness * rng.uniform(0.55, 0.8) * (1 - 0.25 * u[None, :] ** 2 + 0.1 * pit)
    choroid = np.broadcast_to(choroid, (n, width))
    total = thick.sum(1)  # retinal thickness (n, width)
    bottom_margin = 0.03 * geo.height
    for _ in range(20):  # flatten the shape until the retina fits the frame
        lowest = geo.top_margin - (shape - total).min()
        highest = geo.height - bottom_margin - (shape + choroid).max()
        if highest >= lowest:
            break
        shape = shape * 0.8
    slack = max(0.0, highest - lowest)
    offset = lowest + rng.uniform(0.0, min(slack, 0.08 * geo.height))
    bm = np.minimum(shape + offset, geo.height - 2.0)

    interfaces = np.empty((n, 11, width))
    interfaces[:, 10] = bm
    interfaces[:, :10] = bm[:, None, :] - np.cumsum(thick[:, ::-1], axis=1)[:, ::-1]

    layout = {
        "x_mm": x_mm,
        "y_mm": y_mm,
        "fovea_col": (fovea_x * 1000 / cfg.spacing_x_um) + (width - 1) / 2,
        "fovea_x": fovea_x,
        "fovea_y": fovea_y,
        "vessels": _vessel_layout(cfg, rng),
    }
    return interfaces, np.array(choroid), layout


def _vessel_layout(cfg: PhantomConfig, rng: np.random.Generator) -> list[tuple[float, ...]]:
    """Retinal vessels crossing the volume: (column at the centre B-scan, drift per B-scan,
    diameter in µm, shadow strength)."""
    vessels = []
    for _ in range(int(rng.integers(3, 8))):
        vessels.append(
            (
                rng.uniform(0.02, 0.98) * cfg.width,
                rng.normal(0, 0.08) * cfg.width / max(cfg.bscans_per_volume, 1),
                rng.uniform(50, 150),
                rng.uniform(0.3, 0.6),
            )
        )
    return vessels


# ---------------------------------------------------------------------------------------------
# Pathology: lesions per B-scan
# ---------------------------------------------------------------------------------------------


def _lesion_plan(cfg: PhantomConfig, rng: np.random.Generator) -> list[list[str]]:
    """Lesion types per B-scan: 1-3 each (times the burden), every requested type at least once."""
    n = cfg.bscans_per_volume
    counts = [max(1, round(int(rng.integers(1, 4)) * cfg.pathology_burden)) for _ in range(n)]
    types = list(cfg.pathologies)
    while sum(counts) < len(types):
        counts[int(rng.integers(0, n))] += 1
    slots = list(rng.permutation(types)) + list(rng.choice(types, size=sum(counts) - len(types)))
    order = rng.permutation(len(slots))
    slots = [str(slots[i]) for i in order]
    plan, start = [], 0
    for c in counts:
        plan.append(slots[start : start + c])
        start += c
    return plan


def _deform(
    kinds: Sequence[str],
    interfaces: np.ndarray,
    geo: _Geometry,
    fovea_col: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """Apply the lesions that move layers: subretinal fluid and drusen lift, cysts swell.

    Returns:
        the deformed interfaces (11, width), the subretinal fluid height and the drusen
        elevation per column (width,), and the centre and half width (columns) of each swollen
        region, where the cysts go.
    """
    width = interfaces.shape[-1]
    cols = np.arange(width, dtype=np.float64)
    sf, ax, lat = geo.size_factor, geo.axial_scale, geo.lateral_scale
    srf = np.zeros(width)
    drusen = np.zeros(width)
    swell = np.zeros(width)
    cyst_clusters = []
    for kind in kinds:
        if kind == "subretinal_fluid":
            half = min(rng.uniform(25, 65) * lat * sf, 0.3 * width)
            centre = np.clip(fovea_col + rng.normal(0, 0.12 * width), half + 2, width - half - 2)
            height = min(rng.uniform(10, 30) * ax * sf, 0.3 * 2 * half)  # wide, shallow domes
            srf = np.maximum(srf, height * _bump(cols, centre, half, 0.6))
        elif kind == "drusen":
            half = min(rng.uniform(15, 40) * lat * sf, 0.2 * width)
            centre = rng.uniform(half + 2, width - half - 2)
            drusen = np.maximum(drusen, rng.uniform(5, 15) * ax * sf * _bump(cols, centre, half, 1))
        elif kind == "intraretinal_fluid":
            half = min(rng.uniform(20, 45) * lat * sf, 0.3 * width)
            centre = np.clip(fovea_col + rng.normal(0, 0.2 * width), half + 2, width - half - 2)
            swell = np.maximum(swell, rng.uniform(8, 16) * ax * sf * _bump(cols, centre, half, 1))
            cyst_clusters.append((float(centre), float(half)))
    out = interfaces.copy()
    out[:10] -= drusen  # the RPE and everything above it rises over drusen
    out[:9] -= srf  # the neurosensory retina rises over subretinal fluid
    out[:4] -= swell  # the inner retina rises over swollen nuclear layers
    out[4] -= swell / 2
    return out, srf, drusen, cyst_clusters


def _ellipse_mask(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radii: tuple[float, float],
    rng: np.random.Generator | None = None,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """A (slightly irregular when ``rng`` is given) filled ellipse, in its bounding box."""
    zc, xc = centre
    rz, rx = radii
    z0, z1 = max(int(zc - rz - 1), 0), min(int(zc + rz + 2), shape[0])
    x0, x1 = max(int(xc - rx - 1), 0), min(int(xc + rx + 2), shape[1])
    z1, x1 = max(z1, z0), max(x1, x0)  # an ellipse outside the image: an empty box
    zz, xx = np.mgrid[z0:z1, x0:x1]
    dz, dx = (zz - zc) / rz, (xx - xc) / rx
    limit = 1.0
    if rng is not None:
        angle = np.arctan2(dz, dx)
        a2, a3 = rng.uniform(0, 0.12, size=2)
        p2, p3 = rng.uniform(0, 2 * np.pi, size=2)
        limit = 1.0 + a2 * np.cos(2 * angle + p2) + a3 * np.cos(3 * angle + p3)
    return (slice(z0, z1), slice(x0, x1)), dz**2 + dx**2 <= limit**2


def _draw_cysts(
    refl: np.ndarray,
    mask: np.ndarray,
    interfaces: np.ndarray,
    cluster: tuple[float, float],
    geo: _Geometry,
    rng: np.random.Generator,
) -> None:
    """A cluster of 2-5 dark cysts in the swollen nuclear layers (IPL top to ELM)."""
    centre_col, half = cluster
    width = refl.shape[1]
    sf, ax, lat = geo.size_factor, geo.axial_scale, geo.lateral_scale
    n_cysts = max(1, round(int(rng.integers(2, 6)) * sf))
    for _ in range(n_cysts):
        radius = rng.uniform(5, 20) * sf
        rz = radius * ax * rng.uniform(0.8, 1.15)
        rx = radius * lat * rng.uniform(0.8, 1.4)
        xc = float(np.clip(centre_col + rng.uniform(-0.6, 0.6) * half, rx + 1, width - rx - 2))
        span = slice(max(int(xc - rx), 0), min(int(xc + rx) + 1, width))
        top = interfaces[2, span].max() + 1.5  # top of the IPL
        bottom = interfaces[6, span].min() - 1.5  # the external limiting membrane
        rz = min(rz, (bottom - top) / 2)
        if rz < 2:
            continue
        zc = rng.uniform(top + rz, bottom - rz) if bottom - top > 2 * rz else (top + bottom) / 2
        box, inside = _ellipse_mask(refl.shape, (zc, xc), (rz, rx), rng)
        refl[box][inside] = _FLUID
        mask[box][inside] = PATHOLOGY_CODES["intraretinal_fluid"]


def _draw_foci(
    refl: np.ndarray,
    mask: np.ndarray,
    interfaces: np.ndarray,
    geo: _Geometry,
    rng: np.random.Generator,
) -> None:
    """A cluster of 2-6 hyperreflective dots (2-4 px radius) in the inner and outer retina."""
    width = refl.shape[1]
    centre = rng.uniform(0.1, 0.9) * width
    for _ in range(int(rng.integers(2, 7))):
        radius = rng.uniform(2, 4) * np.sqrt(geo.size_factor)
        xc = float(np.clip(centre + rng.normal(0, 15 * geo.lateral_scale), radius + 1, width - 3))
        col = int(round(xc))
        top = interfaces[2, col] + radius + 1  # IPL to ONL, where foci are seen
        bottom = interfaces[6, col] - radius - 1
        zc = rng.uniform(top, bottom) if bottom > top else (top + bottom) / 2
        box, inside = _ellipse_mask(refl.shape, (zc, xc), (radius, radius))
        refl[box][inside] = _FOCI
        mask[box][inside] = PATHOLOGY_CODES["foci"]


# ---------------------------------------------------------------------------------------------
# Rendering one B-scan
# ---------------------------------------------------------------------------------------------


def _render_bscan(
    interfaces: np.ndarray,
    srf: np.ndarray,
    drusen: np.ndarray,
    rpe_thickness: np.ndarray,
    choroid: np.ndarray,
    brightness: np.ndarray,
    vessels: list[tuple[float, float, float]],
    geo: _Geometry,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free reflectivity (height, width) float32 and the SRF/drusen mask of one B-scan."""
    height, width = geo.height, geo.width
    z = np.arange(height, dtype=np.float32)[:, None] + 0.5  # bottom edge of each pixel row

    rpe_top = interfaces[9]
    bm = interfaces[10]
    csi = bm + choroid  # choroid-sclera interface
    # tops of the drawn bands, in order, and what fills each band
    tops = [
        *interfaces[:9],  # NFL .. OS
        rpe_top - srf,  # subretinal fluid under the lifted outer segments
        rpe_top,  # RPE
        np.minimum(rpe_top + rpe_thickness, bm),  # drusen material under the lifted RPE
        bm,  # choroid
        csi,  # sclera
    ]
    depth_below_csi = np.maximum(z - csi[None, :], 0)
    fills: list = [*brightness[:9], _FLUID, brightness[9], _DRUSEN_MATERIAL]
    fills.append(_choroid_texture(height, width, bm, choroid, rng))
    fills.append(8.0 + _SCLERA * np.exp(-depth_below_csi / (0.07 * height)))

    refl = np.full((height, width), _VITREOUS, dtype=np.float32)
    previous: float | np.ndarray = _VITREOUS
    for top, fill in zip(tops, fills):
        # rows r0..r1 straddle the band's top; rows below r1 lie wholly inside or under it
        r0 = int(np.clip(np.floor(top.min()) - 1, 0, height))
        r1 = int(np.clip(np.ceil(top.max()) + 1, r0, height))
        step = fill - previous
        below = np.clip(z[r0:r1] - top[None, :].astype(np.float32), 0.0, 1.0)  # pixel share
        refl[r0:r1] += (step[r0:r1] if np.ndim(step) else step) * below
        refl[r1:] += step[r1:] if np.ndim(step) else step
        previous = fill
    # the external limiting membrane: a thin bright line at the top of the inner segments
    refl += 40.0 * np.exp(-0.5 * ((z - 0.5 - interfaces[6][None, :] - 0.8) / 0.7) ** 2)

    zc = z - 0.5  # pixel centres
    mask = np.zeros((height, width), dtype=np.uint8)
    in_srf = (zc >= tops[9][None, :]) & (zc < rpe_top[None, :]) & (srf >= 0.5)[None, :]
    mask[in_srf] = PATHOLOGY_CODES["subretinal_fluid"]
    in_drusen = (zc >= tops[11][None, :]) & (zc < bm[None, :]) & (drusen >= 0.5)[None, :]
    mask[in_drusen] = PATHOLOGY_CODES["drusen"]

    # retinal vessels: a bright spot in the ganglion cell layer, drawn before lesions
    axial_um = 3.0 / geo.axial_scale  # ~3 µm per row at 496 rows
    for col, diameter_um, _ in vessels:
        rx = 0.5 * diameter_um / (_DEFAULT_SPACING_UM / geo.lateral_scale)
        c = int(np.clip(round(col), 0, width - 1))
        rz = min(0.5 * diameter_um / axial_um, 0.35 * (interfaces[3, c] - interfaces[0, c]))
        if rz < 1.0:
            continue
        zc_v = interfaces[1, c] + 0.3 * rz
        box, inside = _ellipse_mask((height, width), (zc_v, col), (rz, max(rx, 1.0)))
        refl[box][inside] = np.maximum(refl[box][inside], 165.0)
    return refl, mask


def _choroid_texture(
    height: int, width: int, bm: np.ndarray, choroid: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Choroid brightness: dark vessel lumens, small near Bruch's membrane, large deeper down.

    Only the rows that hold choroid are textured; the rest is never seen.
    """
    texture = np.full((height, width), _CHOROID, dtype=np.float32)
    r0 = int(np.clip(np.floor(bm.min()) - 2, 0, height))
    r1 = int(np.clip(np.ceil((bm + choroid).max()) + 2, r0, height))
    if r1 == r0:
        return texture
    band = (r1 - r0, width)
    fine = ndimage.gaussian_filter(rng.standard_normal(band, dtype=np.float32), (1.5, 3))
    coarse = ndimage.gaussian_filter(rng.standard_normal(band, dtype=np.float32), (4, 7))
    fine /= fine.std() + 1e-6
    coarse /= coarse.std() + 1e-6
    z = np.arange(r0, r1, dtype=np.float32)[:, None]
    depth = np.clip((z - bm[None, :]) / np.maximum(choroid[None, :], 1.0), 0.0, 1.0)
    noise = (1 - depth) * fine + depth * coarse
    lumen = 1.0 / (1.0 + np.exp(-(-noise - 0.3) * 4.0))
    choriocapillaris = np.exp(-depth / 0.08)  # bright thin band right under Bruch's membrane
    texture[r0:r1] = _CHOROID * (1.0 - 0.7 * lumen * (1 - choriocapillaris)) * (1 - 0.25 * depth)
    return texture


def _vessel_shadows(
    refl: np.ndarray,
    interfaces: np.ndarray,
    vessels: list[tuple[float, float, float]],
    geo: _Geometry,
) -> None:
    """Darken everything under each vessel (light absorbed by blood), in place."""
    height, width = refl.shape
    cols = np.arange(width, dtype=np.float32)
    z = np.arange(height, dtype=np.float32)[:, None]
    for col, diameter_um, strength in vessels:
        half = 0.5 * diameter_um / (_DEFAULT_SPACING_UM / geo.lateral_scale)
        c = int(np.clip(round(col), 0, width - 1))
        profile = np.clip((half + 0.75 - np.abs(cols - col)) / 1.5, 0.0, 1.0)  # soft edges
        hit = np.flatnonzero(profile)
        if hit.size == 0:
            continue
        span = slice(hit[0], hit[-1] + 1)
        start = interfaces[2, c]  # the shadow begins under the vessel, in the IPL
        below = np.clip(z - start, 0.0, 1.0)
        refl[:, span] *= 1.0 - strength * below * profile[None, span]


def _speckle(shape: tuple[int, int], looks: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative speckle with mean 1: gamma noise of shape ``looks``, grains ~2 x ~1 px."""
    gamma = rng.standard_gamma(looks, size=shape, dtype=np.float32) / np.float32(looks)
    return ndimage.gaussian_filter(gamma, (0.8, 0.45))


def generate_volume(
    cfg: PhantomConfig, subject_index: int, volume_index: int = 0, pathological: bool = False
) -> PhantomVolume:
    """Generate one volume of the cohort (deterministic in ``cfg.seed`` and the indices).

    Args:
        cfg: sizes, spacing, pathologies and burden.
        subject_index: the subject's position in the cohort; seeds its anatomy.
        volume_index: the subject's volume (eye or visit).
        pathological: draw 1-3 lesions (times ``cfg.pathology_burden``) in every B-scan, each
            type of ``cfg.pathologies`` at least once in the volume.

    Returns:
        The B-scans, the pathology mask and the true layer interfaces.
    """
    geo = _geometry(cfg)
    anatomy_seq, lesion_seq, noise_seq = np.random.SeedSequence(
        [cfg.seed, subject_index, volume_index]
    ).spawn(3)
    anatomy_rng = np.random.default_rng(anatomy_seq)
    lesion_rng = np.random.default_rng(lesion_seq)
    noise_rng = np.random.default_rng(noise_seq)

    healthy, choroid, layout = _healthy_interfaces(cfg, geo, anatomy_rng)
    brightness = _LAYER_BRIGHTNESS * np.clip(anatomy_rng.normal(1, 0.05, size=10), 0.9, 1.1)
    gain = float(np.clip(anatomy_rng.normal(1.0, 0.05), 0.9, 1.1))
    plan = _lesion_plan(cfg, lesion_rng) if pathological else [[]] * cfg.bscans_per_volume

    n, height, width = cfg.bscans_per_volume, cfg.height, cfg.width
    image = np.empty((n, height, width), dtype=np.uint8)
    mask = np.empty((n, height, width), dtype=np.uint8)
    layers = np.empty((n, 11, width), dtype=np.float32)
    x_mm, y_mm = layout["x_mm"], layout["y_mm"]
    rows = np.arange(height, dtype=np.float32)[:, None]
    for b in range(n):
        interfaces, srf, drusen, cyst_clusters = _deform(
            plan[b], healthy[b], geo, layout["fovea_col"], lesion_rng
        )
        # only frames too short for the retina clip it; what is drawn is what is saved
        interfaces = np.clip(interfaces, 0.0, height - 1.0).astype(np.float32).astype(np.float64)
        vessels = []
        for col0, drift, diameter_um, strength in layout["vessels"]:
            col = col0 + drift * (b - (n - 1) / 2)
            near = np.interp(col, np.arange(width), x_mm) - layout["fovea_x"]
            if np.hypot(near, y_mm[b] - layout["fovea_y"]) < 0.3:
                continue  # the foveal avascular zone has no vessels
            vessels.append((col, diameter_um, strength))
        rpe_thickness = healthy[b, 10] - healthy[b, 9]
        refl, bscan_mask = _render_bscan(
            interfaces, srf, drusen, rpe_thickness, choroid[b], brightness, vessels, geo, noise_rng
        )
        for cluster in cyst_clusters:
            _draw_cysts(refl, bscan_mask, interfaces, cluster, geo, lesion_rng)
        for _ in range(plan[b].count("foci")):
            _draw_foci(refl, bscan_mask, interfaces, geo, lesion_rng)

        refl = ndimage.gaussian_filter(refl, (0.7, 0.5))  # the optics' point spread
        _vessel_shadows(refl, interfaces, vessels, geo)
        # signal falls off with depth, and a little from A-scan to A-scan
        depth = np.maximum(rows - interfaces[0][None, :].astype(np.float32), 0)
        refl *= np.exp(-depth / np.float32(5.0 * geo.thickness))
        refl *= gain * (1 + 0.04 * _smooth_wiggle(noise_rng, np.linspace(-1, 1, width)))[None, :]
        noisy = refl * _speckle((height, width), cfg.speckle_looks, noise_rng)
        # the detector's noise floor: Rayleigh, scale 2.5
        noisy += 2.5 * np.sqrt(2 * noise_rng.standard_exponential((height, width), np.float32))
        image[b] = np.clip(noisy, 0, 255).astype(np.uint8)
        mask[b] = bscan_mask
        layers[b] = interfaces
    return PhantomVolume(image=image, mask=mask, layers=layers)


# ---------------------------------------------------------------------------------------------
# The cohort on disk
# ---------------------------------------------------------------------------------------------


def assign_splits(cfg: PhantomConfig) -> list[tuple[str, int, str]]:
    """``(subject_id, label, split)`` for every subject of the cohort.

    Healthy subjects go to ``train``; about ``val_fraction`` of them (at least one) to ``val``;
    one healthy subject per two pathological ones (at least one) is held out to ``test`` with all
    pathological subjects. With too few healthy subjects ``train`` keeps at least one, then
    ``test`` gets one, then ``val``: 1 healthy subject is train only, 2 are train + test.
    """
    n_healthy, n_path = cfg.healthy_subjects, cfg.pathological_subjects
    want_test = max(1, round(n_path / 2))
    want_val = max(1, round(cfg.val_fraction * n_healthy)) if cfg.val_fraction > 0 else 0
    n_test = min(want_test, max(0, n_healthy - 1))
    n_val = min(want_val, max(0, n_healthy - 1 - n_test))
    order = np.random.default_rng([cfg.seed, 7919]).permutation(n_healthy)
    healthy_split = {}
    for rank, index in enumerate(order):
        healthy_split[int(index)] = (
            "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        )
    subjects = [(f"S{i:03d}", 0, healthy_split[i]) for i in range(n_healthy)]
    subjects += [(f"S{n_healthy + i:03d}", 1, "test") for i in range(n_path)]
    return subjects


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Like ``np.savez`` but byte-identical on every run (fixed zip timestamps)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, _npy_bytes(array))
    return buffer.getvalue()


def _tiff_bytes(volume: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume, photometric="minisblack", metadata=None)
    return buffer.getvalue()


def _png_bytes(bscan: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(bscan)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_boundaries(url: str) -> dict[str, np.ndarray]:
    """Read ``boundaries/<volume_id>.npz``: ``ilm``, ``bm`` and ``layers`` as float32 arrays."""
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def write_cohort(cfg: PhantomConfig, out: str) -> dict:
    """Generate the cohort of ``cfg`` and write it under ``out`` (a local path or ``s3://``).

    Args:
        cfg: the cohort's size, image format, pathologies, split shares and seed.
        out: folder that receives ``manifest.csv``, ``volumes/``, ``masks/``, ``boundaries/``,
            optional ``bscans/`` PNGs and ``summary.json``.

    Returns:
        The summary written to ``summary.json``: volumes and subjects per split and label,
        pathology pixel counts, B-scans with lesions, seconds taken.
    """
    started = time.perf_counter()
    volume_ext = "tif" if cfg.volume_format == "tiff" else "npy"
    rows = []
    pathology_pixels = dict.fromkeys(PATHOLOGY_CODES, 0)
    bscans_with_lesions = 0
    counts: dict[str, dict[str, dict[str, int]]] = {
        unit: {s: {"healthy": 0, "pathological": 0} for s in ("train", "val", "test")}
        for unit in ("subjects", "volumes")
    }
    for subject_index, (subject_id, label, split) in enumerate(assign_splits(cfg)):
        kind = "pathological" if label else "healthy"
        counts["subjects"][split][kind] += 1
        for volume_index in range(cfg.volumes_per_subject):
            volume_id = f"{subject_id}_V{volume_index}"
            volume = generate_volume(cfg, subject_index, volume_index, pathological=bool(label))
            volume_path = f"volumes/{volume_id}.{volume_ext}"
            mask_path = f"masks/{volume_id}.npy"
            if volume_ext == "tif":
                storage.write_bytes(storage.join(out, volume_path), _tiff_bytes(volume.image))
            else:
                storage.write_bytes(storage.join(out, volume_path), _npy_bytes(volume.image))
            storage.write_bytes(storage.join(out, mask_path), _npy_bytes(volume.mask))
            boundaries = {"ilm": volume.ilm, "bm": volume.bm, "layers": volume.layers}
            storage.write_bytes(
                storage.join(out, "boundaries", f"{volume_id}.npz"), _npz_bytes(boundaries)
            )
            if cfg.write_png_bscans:
                for b, bscan in enumerate(volume.image):
                    url = storage.join(out, "bscans", volume_id, f"{b:03d}.png")
                    storage.write_bytes(url, _png_bytes(bscan))
            for name, code in PATHOLOGY_CODES.items():
                pathology_pixels[name] += int(np.count_nonzero(volume.mask == code))
            bscans_with_lesions += int(
                np.count_nonzero(volume.mask.reshape(len(volume.mask), -1).any(1))
            )
            counts["volumes"][split][kind] += 1
            rows.append(
                {
                    "subject_id": subject_id,
                    "volume_id": volume_id,
                    "path": volume_path,
                    "modality": "oct",
                    "spacing_x_um": cfg.spacing_x_um,
                    "split": split,
                    "label": label,
                    "mask_path": mask_path,
                }
            )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(out, "manifest.csv"), text.getvalue().encode())
    summary = {
        "stage": "phantom",
        "out": out,
        "manifest": storage.join(out, "manifest.csv"),
        "volumes": len(rows),
        "bscans": len(rows) * cfg.bscans_per_volume,
        "bscans_with_lesions": bscans_with_lesions,
        "counts": counts,
        "pathology_pixels": pathology_pixels,
        "config": dataclasses.asdict(cfg),
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def render_bscan_overlay(bscan: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A grayscale B-scan with each pathology of ``mask`` tinted in its colour and outlined.

    Args:
        bscan: (height, width) uint8 or float image (floats are scaled from their range).
        mask: (height, width) integer codes of :data:`PATHOLOGY_CODES`; 0 = none.
        alpha: opacity of the tint inside a lesion (its outline is opaque).

    Returns:
        (height, width, 3) uint8 RGB.
    """
    bscan = np.asarray(bscan)
    mask = np.asarray(mask)
    if bscan.ndim != 2 or bscan.shape != mask.shape:
        raise ValueError(
            f"render_bscan_overlay: expected a 2-D B-scan and a mask of the same shape, got "
            f"{bscan.shape} and {mask.shape}"
        )
    if bscan.dtype != np.uint8:
        low, high = float(bscan.min()), float(bscan.max())
        bscan = ((bscan - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
    rgb = np.repeat(bscan[..., None], 3, axis=2).astype(np.float32)
    for name, code in PATHOLOGY_CODES.items():
        region = mask == code
        if not region.any():
            continue
        colour = np.array(PATHOLOGY_COLORS[name], dtype=np.float32)
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        outline = region & ~ndimage.binary_erosion(region)
        rgb[outline] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)
