"""Vendor OCT formats and public data-set layouts, read through the field's libraries.

Each reader returns a :class:`Scan`: the image, and what the file knows beyond it (the A-scan
spacing, the device's layer segmentation, a data set's lesion mask). The parsing is done by
eyepy (HEYEX VOL/E2E/XML, the Duke AMD set, RETOUCH, B-scan folders), pydicom (DICOM
ophthalmic tomography), scipy (the Duke DME set's ``.mat``) and, with the ``topcon-zeiss`` extra,
oct-converter (Topcon FDA/FDS, Zeiss IMG); none of it is hand-written here.

============================  =====================  ==========================================
format (``path``)             extra                  what comes with the image
============================  =====================  ==========================================
HEYEX ``.vol`` ``.e2e``       ``vendor``             spacing; ILM and BM from the device
HEYEX ``.xml`` (+ images)     ``vendor``             spacing; ILM and BM when exported
Duke ``.mat`` (AMD, DME)      ``vendor``             spacing; ILM, BM; DME: fluid masks
RETOUCH folder (``oct.mhd``)  ``vendor``             spacing; IRF+SRF+PED mask (reference.mhd)
DICOM ``.dcm``                ``vendor``             spacing (PixelSpacing)
folder of B-scan images       ``vendor``             nothing (give spacing_x_um)
Topcon ``.fda`` ``.fds``      ``topcon-zeiss``       spacing when the file has it
Zeiss ``.img``                ``topcon-zeiss``       nothing (give spacing_x_um)
============================  =====================  ==========================================
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator

import numpy as np

from anogan_ray import storage
from anogan_ray.data.scan import Scan, VolumeError

# suffix -> format; folders are RETOUCH (with oct.mhd) or B-scan folders
VENDOR_SUFFIXES = {
    ".vol": "heyex-vol",
    ".e2e": "heyex-e2e",
    ".xml": "heyex-xml",
    ".mat": "duke-mat",
    ".mhd": "retouch",
    ".dcm": "dicom",
    ".fda": "topcon-fda",
    ".fds": "topcon-fds",
    ".img": "zeiss-img",
}
FORMAT_NAMES = {
    "heyex-vol": "a HEYEX VOL file",
    "heyex-e2e": "a HEYEX E2E file",
    "heyex-xml": "a HEYEX XML export",
    "duke-mat": "a Duke data-set .mat file",
    "retouch": "a RETOUCH volume (oct.mhd)",
    "dicom": "a DICOM file",
    "topcon-fda": "a Topcon FDA file",
    "topcon-fds": "a Topcon FDS file",
    "zeiss-img": "a Zeiss IMG file",
    "bscan-folder": "a folder of B-scan images",
}
EXTRAS = {"topcon-fda": "topcon-zeiss", "topcon-fds": "topcon-zeiss", "zeiss-img": "topcon-zeiss"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# What a file's first bytes say it is: to name the real content when an extension lies.
_SIGNATURES = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (0, b"\x93NUMPY", "a NumPy .npy array"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x89HDF", "an HDF5 file"),
    (0, b"MATLAB 5.0", "a MATLAB 5 .mat file"),
    (0, b"HSF-OCT", "a HEYEX VOL file"),
    (0, b"CMDb", "a HEYEX E2E file"),
    (128, b"DICM", "a DICOM file"),
)
# The signature each format must have, where the format has one.
_EXPECTED = {"dicom": "a DICOM file", "duke-mat": "a MATLAB 5 .mat file"}


def content_kind(head: bytes) -> str | None:
    """What the first bytes of a file say it is (``None``: no known signature)."""
    for offset, magic, kind in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def check_content(head: bytes, fmt: str, suffix: str) -> None:
    """Reject a file whose content is plainly another format than its extension says.

    Raises:
        VolumeError: e.g. ``content is a PNG image, not a HEYEX VOL file as the extension .vol
            says``.
    """
    kind = content_kind(head)
    expected = _EXPECTED.get(fmt)
    if kind is None and expected is None:
        return
    if kind == (expected or FORMAT_NAMES[fmt]):
        return
    if kind is None and fmt == "dicom" and head[:4] in (b"\x08\x00\x05\x00", b"\x08\x00\x00\x00"):
        return  # a DICOM data set without the 128-byte preamble
    raise VolumeError(
        f"content is {kind or 'not recognised'}, not {FORMAT_NAMES[fmt]} as the extension "
        f"{suffix} says"
    )


def folder_format(url: str) -> str | None:
    """``retouch`` or ``bscan-folder`` for a folder that holds one volume, else ``None``."""
    names = [posixpath.basename(f) for f in storage.list_files(url)]
    if "oct.mhd" in names:
        return "retouch"
    if names and all(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
        return "bscan-folder"
    return None


@contextlib.contextmanager
def _local(url: str, whole_folder: bool) -> Iterator[str]:
    """A local path for ``url``: itself, or a download of it (and of its folder's files when the
    format keeps parts in several files) into a temporary folder."""
    if not storage.is_remote(url):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="anogan-scan-") as tmp:
        if not whole_folder:
            local = os.path.join(tmp, posixpath.basename(url))
            storage.write_bytes(local, storage.read_bytes(url))
            yield local
            return
        # the folder itself, or the folder of a file whose siblings it needs (.xml, oct.mhd)
        folder = posixpath.dirname(url) if posixpath.splitext(url)[1] else url.rstrip("/")
        for remote in storage.list_files(folder):
            local = os.path.join(tmp, posixpath.relpath(remote, folder))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            storage.write_bytes(local, storage.read_bytes(remote))
        yield os.path.join(tmp, posixpath.relpath(url.rstrip("/"), folder))


def _spacing_um(scale_x: float, unit: str) -> float | None:
    """eyepy's ``scale_x`` as µm (None when the file gives none or only pixels)."""
    factor = {"mm": 1000.0, "µm": 1.0, "um": 1.0}.get(str(unit).strip().lower())
    if factor is None or not np.isfinite(scale_x) or scale_x <= 0:
        return None
    return float(scale_x) * factor


def _eye_layers(volume, names: dict[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    """ILM and BM height maps (n, width) from an eyepy volume; first name present wins."""
    layers = {}
    for ours, candidates in names.items():
        for name in candidates:
            if name in volume.layers:
                data = np.asarray(volume.layers[name].data, dtype=np.float32)
                if np.isfinite(data).any():
                    layers[ours] = data
                    break
    return layers


_HEYEX_LAYERS = {"ilm": ("ILM",), "bm": ("BM",)}


def _from_eyepy(volume, fmt: str, layer_names=_HEYEX_LAYERS) -> Scan:
    return Scan(
        image=np.asarray(volume.data),
        format=fmt,
        spacing_x_um=_spacing_um(volume.scale_x, volume.scale_unit),
        layers=_eye_layers(volume, layer_names),
    )


def _read_heyex(path: str, fmt: str) -> Scan:
    import eyepy

    reader = {
        "heyex-vol": eyepy.import_heyex_vol,
        "heyex-e2e": eyepy.import_heyex_e2e,
        "heyex-xml": eyepy.import_heyex_xml,
    }[fmt]
    return _from_eyepy(reader(path), fmt)


def _read_duke(path: str) -> Scan:
    """The Duke AMD set (``images``, ``layerMaps``; through eyepy) or the Duke DME set
    (``images``, ``manualLayers1``, ``manualFluid1``; read with scipy because eyepy 0.21's DME
    importer copies the whole fluid map once per B-scan). In the DME set only some B-scans have
    fluid annotations; the others are NaN, and their patches stay unlabelled."""
    import scipy.io

    names = {name for name, _, _ in scipy.io.whosmat(path)}
    if "layerMaps" in names:
        import eyepy

        return _from_eyepy(
            eyepy.import_duke_mat(path), "duke-mat", {"ilm": ("ILM",), "bm": ("BM",)}
        )
    if not {"images", "manualLayers1", "manualFluid1"} <= names:
        raise VolumeError(
            f"a .mat file without the Duke data sets' variables (found: {', '.join(sorted(names))}"
            "; expected images with layerMaps (AMD) or manualLayers1 and manualFluid1 (DME))"
        )
    loaded = scipy.io.loadmat(path, variable_names=["images", "manualLayers1", "manualFluid1"])
    image = np.moveaxis(loaded["images"], -1, 0)  # (h, w, n) -> (n, h, w)
    layers = np.moveaxis(loaded["manualLayers1"].astype(np.float32), -1, 1)  # (8, n, w)
    fluid = np.moveaxis(loaded["manualFluid1"].astype(np.float32), -1, 0)  # (n, h, w)
    annotated = np.isfinite(fluid).any(axis=(1, 2))
    return Scan(
        image=image,
        format="duke-mat",
        spacing_x_um=11.33,  # the DME set's mean A-scan spacing (Chiu et al. 2015; eyepy's value)
        layers={"ilm": layers[0], "bm": layers[7]},
        mask=(np.nan_to_num(fluid) > 0).astype(np.uint8),
        annotated_bscans=annotated,
    )


def _read_retouch(path: str) -> Scan:
    import eyepy

    folder = os.path.dirname(path) if path.lower().endswith(".mhd") else path
    volume = eyepy.import_retouch(folder)
    scan = _from_eyepy(volume, "retouch")
    maps = [np.asarray(volume.volume_maps[n].data) for n in ("IRF", "SRF", "PED")
            if n in volume.volume_maps]  # fmt: skip
    if maps:
        scan.mask = np.any(maps, axis=0).astype(np.uint8)
    return scan


def _read_dicom(path: str) -> Scan:
    import pydicom

    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise VolumeError("a DICOM file without pixel data")
    image = dataset.pixel_array
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) == 1 and image.ndim == 2:
        image = image[None]
    spacing = getattr(dataset, "PixelSpacing", None)
    if spacing is None:  # multi-frame objects keep it in the shared functional groups
        with contextlib.suppress(AttributeError, IndexError):
            spacing = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            spacing = spacing.PixelSpacing
    # PixelSpacing is (row spacing, column spacing) in mm; the A-scans are the columns
    spacing_x = float(spacing[1]) * 1000.0 if spacing is not None else None
    return Scan(image=np.asarray(image), format="dicom", spacing_x_um=spacing_x)


def _read_oct_converter(path: str, fmt: str) -> Scan:
    try:
        import oct_converter.readers as readers
    except ImportError as exc:
        raise VolumeError(
            f"{FORMAT_NAMES[fmt]} needs the optional package oct-converter: "
            "pip install 'anogan-ray[topcon-zeiss]'"
        ) from exc
    if fmt == "zeiss-img":
        volume = readers.IMG(path).read_oct_volume()
    elif fmt == "topcon-fda":
        volume = readers.FDA(path).read_oct_volume()
    else:
        volume = readers.FDS(path).read_oct_volume()
    spacing = getattr(volume, "pixel_spacing", None)  # (x, y, z) mm when the file states it
    spacing_x = float(spacing[0]) * 1000.0 if spacing else None
    return Scan(image=np.asarray(volume.volume), format=fmt, spacing_x_um=spacing_x)


def _read_bscan_folder(path: str) -> Scan:
    import eyepy

    return _from_eyepy(eyepy.import_bscan_folder(path), "bscan-folder")


def read_vendor(url: str, fmt: str) -> Scan:
    """Read a vendor file or data-set folder (``fmt`` from :data:`VENDOR_SUFFIXES` or
    :func:`folder_format`).

    Raises:
        VolumeError: the file is missing, of another format than its name says, or its library
            cannot read it; the message names the format and the library's complaint.
    """
    if fmt not in ("retouch", "bscan-folder", "heyex-xml"):
        try:
            with storage.open_file(url, "rb") as f:
                head = f.read(256)
        except FileNotFoundError as exc:
            raise VolumeError("missing file") from exc
        check_content(head, fmt, posixpath.splitext(url.lower())[1])
    whole_folder = fmt in ("retouch", "bscan-folder", "heyex-xml")
    try:
        with _local(url, whole_folder) as path:
            if fmt.startswith("heyex"):
                scan = _read_heyex(path, fmt)
            elif fmt == "duke-mat":
                scan = _read_duke(path)
            elif fmt == "retouch":
                scan = _read_retouch(path)
            elif fmt == "dicom":
                scan = _read_dicom(path)
            elif fmt == "bscan-folder":
                scan = _read_bscan_folder(path)
            else:
                scan = _read_oct_converter(path, fmt)
    except VolumeError:
        raise
    except ImportError as exc:
        raise VolumeError(
            f"reading {FORMAT_NAMES[fmt]} needs the optional package {exc.name or exc}: "
            f"pip install 'anogan-ray[{EXTRAS.get(fmt, 'vendor')}]'"
        ) from exc
    except Exception as exc:  # every library has its own error types for foreign data
        raise VolumeError(
            f"not readable as {FORMAT_NAMES[fmt]} ({type(exc).__name__}: {exc})"
        ) from exc
    if scan.image.ndim == 2:
        scan.image = scan.image[None]
    return scan
