"""Readers for the cohort's input formats and validation of the cohort manifest.

Formats (by file suffix):

* ``.npy``: a 3-D volume ``(n_bscans, height, width)`` or one 2-D image ``(height, width)``;
* ``.tif`` / ``.tiff``: a multi-page volume (one page per B-scan) or one 2-D image, gray or RGB;
* ``.png``, ``.jpg`` / ``.jpeg``: one 2-D image, 8 or 16 bit, gray or color;
* vendor formats and public data-set layouts (HEYEX, DICOM, Duke, RETOUCH, Topcon, Zeiss, B-scan
  folders), read through the field's libraries: see :mod:`anogan_ray.data.vendor`.

Every reader returns a 3-D array ``(n_bscans, height, width)`` in the file's own numeric type; a
2-D image is one B-scan, and color is converted to gray (ITU-R BT.601 luma weights). A file that
cannot be used raises :class:`VolumeError` whose message is the reject reason; the preprocess
stage records it in its rejects table and goes on with the other volumes. A manifest that cannot be
used raises :class:`ManifestError` naming the row and column, before any volume is read.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from anogan_ray import storage
from anogan_ray.data import vendor
from anogan_ray.data.scan import Scan, VolumeError

MODALITIES = ("oct", "image")
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("subject_id", "volume_id", "path", "modality", "split")
OPTIONAL_COLUMNS = ("spacing_x_um", "label", "mask_path")
VOLUME_SUFFIXES = (".npy", ".tif", ".tiff", ".png", ".jpg", ".jpeg")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # BT.601 RGB -> gray


class ManifestError(ValueError):
    """The manifest itself is unusable (fails fast, naming the row and column)."""


def _is_blank(value: object) -> bool:
    """None, NaN, pandas NA or an empty / whitespace string."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return str(value).strip() == ""


def read_manifest(url: str) -> pd.DataFrame:
    """Read and validate a cohort manifest (CSV or Parquet; DESIGN.md §3.1).

    Relative ``path`` and ``mask_path`` values are resolved against the manifest's folder; the
    optional columns ``spacing_x_um``, ``label`` and ``mask_path`` are added (empty) when absent.

    Args:
        url: local path or ``s3://`` URL of ``*.csv`` or ``*.parquet``.

    Returns:
        One row per volume, columns ``REQUIRED_COLUMNS + OPTIONAL_COLUMNS`` (plus any extra ones);
        ``spacing_x_um`` float (NaN when missing), ``label`` nullable Int64, ``mask_path`` str or
        None.

    Raises:
        ManifestError: missing file or column, an empty required value, a duplicate ``volume_id``,
            an unknown ``modality`` or ``split``, a non-numeric spacing or a label other than 0/1.
            Rows are numbered from 1, not counting the CSV header.
    """
    if not storage.exists(url):
        raise ManifestError(f"manifest {url}: file not found")
    data = storage.read_bytes(url)
    try:
        if url.lower().endswith(".parquet"):
            frame = pd.read_parquet(io.BytesIO(data))
        else:
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for malformed files
        raise ManifestError(f"manifest {url}: cannot be parsed ({exc})") from exc

    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"manifest {url}: missing column {missing[0]!r} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(map(str, frame.columns))})"
        )
    if len(frame) == 0:
        raise ManifestError(f"manifest {url}: no rows")
    frame = frame.reset_index(drop=True).copy()
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = None

    def fail(row: int, column: str, problem: str) -> ManifestError:
        return ManifestError(f"manifest {url}: row {row + 1}, column {column!r}: {problem}")

    for row, record in enumerate(frame.to_dict("records")):
        for column in REQUIRED_COLUMNS:
            if _is_blank(record[column]):
                raise fail(row, column, "empty value")
        if record["modality"] not in MODALITIES:
            raise fail(
                row,
                "modality",
                f"{record['modality']!r} unknown; use one of {', '.join(MODALITIES)}",
            )
        if record["split"] not in SPLITS:
            raise fail(row, "split", f"{record['split']!r} unknown; use one of {', '.join(SPLITS)}")
        if not _is_blank(record["spacing_x_um"]):
            try:
                spacing = float(record["spacing_x_um"])
            except (TypeError, ValueError):
                spacing = float("nan")
            if not np.isfinite(spacing) or spacing <= 0:
                raise fail(
                    row, "spacing_x_um", f"{record['spacing_x_um']!r} is not a positive number"
                )
        if not _is_blank(record["label"]) and str(record["label"]).strip() not in (
            "0",
            "1",
            "0.0",
            "1.0",
        ):
            raise fail(row, "label", f"{record['label']!r} is not 0 or 1")

    duplicated = frame["volume_id"].astype(str).duplicated(keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        volume_id = frame.loc[row, "volume_id"]
        first = int(
            np.flatnonzero((frame["volume_id"].astype(str) == str(volume_id)).to_numpy())[0]
        )
        raise fail(row, "volume_id", f"duplicate {volume_id!r} (first in row {first + 1})")

    base = storage.parent(url)
    for column in REQUIRED_COLUMNS:
        frame[column] = frame[column].astype(str)
    frame["path"] = [storage.resolve(p, base) for p in frame["path"]]
    frame["mask_path"] = pd.Series(  # object: blanks stay None (a str column would make NaN)
        [None if _is_blank(p) else storage.resolve(str(p), base) for p in frame["mask_path"]],
        dtype=object,
        index=frame.index,
    )
    frame["spacing_x_um"] = [
        float("nan") if _is_blank(s) else float(s) for s in frame["spacing_x_um"]
    ]
    frame["label"] = pd.array(
        [None if _is_blank(v) else int(float(v)) for v in frame["label"]], dtype="Int64"
    )
    return frame


def _to_gray(array: np.ndarray, channel_axis: int) -> np.ndarray:
    array = np.moveaxis(array, channel_axis, -1)[..., :3]  # drop alpha
    gray = array.astype(np.float64) @ _LUMA
    if np.issubdtype(array.dtype, np.integer):
        return np.rint(gray).astype(array.dtype)
    return gray.astype(np.float32)


def _read_tiff(data: bytes) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
        color = tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    if color and "S" in axes and array.shape[axes.index("S")] in (3, 4):
        array = _to_gray(array, axes.index("S"))
    return array


def _read_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            image = image.convert("RGB")
            return _to_gray(np.asarray(image), -1)
        return np.asarray(image)


def read_volume(url: str) -> np.ndarray:
    """Read a volume or 2-D image as ``(n_bscans, height, width)`` (file's numeric type).

    The plain formats only (``.npy``, TIFF, PNG, JPEG): masks, and the images of
    :func:`read_scan`.

    Raises:
        VolumeError: the file is missing, unreadable or truncated, of an unknown format, or not
            2-D / 3-D after color conversion.
    """
    suffix = os.path.splitext(url.lower())[1]
    if suffix not in VOLUME_SUFFIXES:
        raise VolumeError(
            f"unsupported format {suffix or '(none)'!r}; use one of {', '.join(VOLUME_SUFFIXES)}"
        )
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as exc:
        raise VolumeError("missing file") from exc
    except OSError as exc:
        raise VolumeError(f"unreadable file ({exc})") from exc
    try:
        if suffix == ".npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            array = _read_tiff(data)
        else:
            array = _read_image(data)
    except Exception as exc:  # every decoder has its own error types for corrupt data
        raise VolumeError(f"unreadable or truncated file ({type(exc).__name__}: {exc})") from exc
    return _checked_dimensions(np.asarray(array))


def _checked_dimensions(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "uif" and array.dtype != bool:
        raise VolumeError(f"wrong data type {array.dtype} (expected numbers)")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise VolumeError(
            f"wrong dimensions {tuple(array.shape)} (expected (height, width) or (n_bscans, height, width))"
        )
    if min(array.shape) == 0:
        raise VolumeError(f"wrong dimensions {tuple(array.shape)} (empty)")
    return array


def scan_format(url: str) -> str | None:
    """The format :func:`read_scan` reads ``url`` as, from its suffix (or, for a folder, its
    contents); ``None`` when it is not a supported scan."""
    suffix = os.path.splitext(url.lower().rstrip("/"))[1]
    if suffix in VOLUME_SUFFIXES:
        return {".npy": "npy", ".tif": "tiff", ".tiff": "tiff"}.get(suffix, "image")
    if suffix in vendor.VENDOR_SUFFIXES:
        return vendor.VENDOR_SUFFIXES[suffix]
    if not suffix:
        return vendor.folder_format(url)
    return None


def read_scan(url: str) -> Scan:
    """Read any supported scan: the plain formats of :func:`read_volume`, the vendor formats and
    data-set layouts of :mod:`anogan_ray.data.vendor` (by suffix), or a folder holding one volume
    (RETOUCH, B-scan images).

    Raises:
        VolumeError: the reject reason (unsupported or lying format, unreadable file, a missing
            optional package, wrong dimensions).
    """
    fmt = scan_format(url)
    if fmt is None:
        suffixes = (*VOLUME_SUFFIXES, *vendor.VENDOR_SUFFIXES)
        suffix = os.path.splitext(url.lower().rstrip("/"))[1]
        what = f"format {suffix!r}" if suffix else "folder (no oct.mhd, not only B-scan images)"
        raise VolumeError(
            f"unsupported {what}; use one of {', '.join(suffixes)}, a RETOUCH folder or a "
            "folder of B-scan images"
        )
    if fmt in ("npy", "tiff", "image"):
        return Scan(image=read_volume(url), format=fmt)
    scan = vendor.read_vendor(url, fmt)
    scan.image = _checked_dimensions(np.asarray(scan.image))
    return scan


def check_image_values(volume: np.ndarray) -> None:
    """Reject volumes with NaN / infinite values or no contrast at all.

    Raises:
        VolumeError: with reason ``contains NaN``, ``contains infinite values`` or ``constant
            image``.
    """
    if volume.dtype.kind == "f":
        if np.isnan(volume).any():
            raise VolumeError("contains NaN")
        if np.isinf(volume).any():
            raise VolumeError("contains infinite values")
    if volume.size == 0 or volume.min() == volume.max():
        raise VolumeError("constant image")
