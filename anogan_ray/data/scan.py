"""What every scan reader returns and raises: :class:`Scan` and :class:`VolumeError`.

The plain formats (:mod:`anogan_ray.data.volumes`) and the vendor formats
(:mod:`anogan_ray.data.vendor`) both build on these two; they live here, below both readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class VolumeError(ValueError):
    """One volume or image cannot be used; the message is the reject reason."""


@dataclass
class Scan:
    """One volume as read from its file: the image and what the file knows beyond it."""

    image: np.ndarray  # (n_bscans, height, width), the file's numeric type
    format: str  # "npy", "tiff", "image", or a vendor format such as "heyex-vol", "dicom"
    spacing_x_um: float | None = None  # A-scan spacing the file states
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # "ilm"/"bm": (n, width) rows
    mask: np.ndarray | None = None  # (n, height, width) lesion mask from the data set
    annotated_bscans: np.ndarray | None = None  # (n,) bool: B-scans the mask covers (None: all)
