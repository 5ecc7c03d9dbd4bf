"""The patch table contract (DESIGN.md §3.2), shared by preprocess, train and score.

One row per 64 x 64 patch. ``pixels`` is stored as uint8 (a Ray Data tensor column of shape
(64, 64)); the models see it decoded to float32 in [-1, 1].
"""

from __future__ import annotations

import hashlib

import numpy as np

PATCH_SIZE = 64

# Columns of the patch table, in order. `pixels` is the only column the score table drops.
PATCH_COLUMNS = (
    "patch_id",  # str, deterministic: volume_id/bscan/y/x
    "subject_id",  # str
    "volume_id",  # str
    "bscan",  # int32, B-scan index in the volume (0 for a single 2-D image)
    "y",  # int32, top-left row in the flattened, resampled frame
    "x",  # int32, top-left column in the flattened, resampled frame
    "split",  # str: train / val / test
    "pixels",  # uint8 [64, 64]
    "label",  # int8: -1 unknown, 0 healthy, 1 any annotated pixel in the patch
    "anomaly_fraction",  # float32, share of annotated pixels (NaN when there is no mask)
    "source",  # str, the input URL
)

LABEL_UNKNOWN = -1


def patch_id(volume_id: str, bscan: int, y: int, x: int) -> str:
    """The patch's id: the same volume, B-scan and position always give the same id."""
    return f"{volume_id}/b{bscan:04d}/y{y:04d}x{x:04d}"


def patch_seed(pid: str) -> int:
    """A 63-bit seed derived from a patch id (seeds z, so a patch scores the same everywhere)."""
    return int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "little") & (2**63 - 1)


def encode_pixels(image: np.ndarray) -> np.ndarray:
    """Float image in [-1, 1] -> uint8 for storage."""
    return np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_pixels(pixels: np.ndarray) -> np.ndarray:
    """Stored uint8 pixels -> float32 in [-1, 1]; same shape."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0
