"""Patch-table batches made ready for the scoring actors: the requested splits, validated pixels.

This runs in Ray Data's reading tasks, beside the file reads, so it imports numpy, pyarrow and
the table contract only: importing PyTorch costs a worker ~190 MiB of its own memory and ~1 s of
CPU (measured by importing each module in a fresh process), and idle workers are kept and reused.

Malformed patches (pixels of the wrong size, NaN or infinite, outside 0..255) are not scored: they
keep zero pixels and a reason in :data:`REJECT_REASON`, and the job writes them to its rejects
table. A float ``pixels`` column is read on the same 0..255 scale as the contract's uint8 and
rounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from anogan_ray.tables import PATCH_COLUMNS, PATCH_SIZE, contains_sorted, id_keys

META_COLUMNS = tuple(c for c in PATCH_COLUMNS if c != "pixels")
_MISSING = {"label": -1, "volume_label": -1, "spacing_source": ""}  # columns older tables lack
REJECT_REASON = "reject_reason"  # internal column: "" for a scored row


def _validate(values: Any) -> tuple[np.ndarray | None, str]:
    """One stored ``pixels`` value -> (uint8 (64, 64), "") or (None, reason)."""
    try:
        array = np.asarray(values)
        if array.dtype == object:
            array = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as err:
        return None, f"pixels not numeric ({err})"
    if array.size != PATCH_SIZE * PATCH_SIZE:
        return None, f"pixels have {array.size} values of shape {array.shape}, expected 64 x 64"
    array = array.reshape(PATCH_SIZE, PATCH_SIZE)
    if array.dtype == np.uint8:
        return array, ""
    if not np.issubdtype(array.dtype, np.number):
        return None, f"pixels of type {array.dtype} are not numeric"
    if not np.all(np.isfinite(array)):
        return None, "pixels contain NaN or infinite values"
    if array.min() < 0 or array.max() > 255:
        return None, f"pixels outside 0..255 (min {array.min():g}, max {array.max():g})"
    return np.rint(array).astype(np.uint8), ""


def prepare_batch(batch: dict[str, np.ndarray], splits: list[str]) -> dict[str, np.ndarray]:
    """Keep the requested splits, validate pixels; rejects keep zero pixels and a reason.

    A tensor column (the contract's (n, 64, 64) uint8, or a numeric array of that shape) is
    checked with whole-array operations; only other layouts (lists, binary) go row by row.
    """
    keep = np.isin(batch["split"].astype(str), splits)
    n = int(keep.sum())
    out = {name: np.asarray(batch[name])[keep] for name in META_COLUMNS if name in batch}
    for name in META_COLUMNS:
        if name not in out:  # an optional column missing from this table
            out[name] = np.full(n, _MISSING.get(name, np.nan))
    column = batch["pixels"]
    if (
        isinstance(column, np.ndarray)
        and column.dtype != object
        and column.shape[1:] == (PATCH_SIZE, PATCH_SIZE)
    ):
        pixels, reasons = _validate_array(column[keep])
    else:
        pixels = np.zeros((n, PATCH_SIZE, PATCH_SIZE), dtype=np.uint8)
        reasons = np.full(n, "", dtype=object)
        for i, values in enumerate(np.asarray(column, dtype=object)[keep]):
            good, reason = _validate(values)
            if good is None:
                reasons[i] = reason
            else:
                pixels[i] = good
    out["pixels"] = pixels
    out[REJECT_REASON] = reasons.astype(str)
    return out


def _validate_array(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64, 64) numeric pixels -> (uint8 pixels, reasons); the reasons of
    :func:`_validate`, computed for the bad rows only."""
    reasons = np.full(len(array), "", dtype=object)
    if array.dtype == np.uint8:
        return array, reasons
    if not np.issubdtype(array.dtype, np.number):
        reasons[:] = f"pixels of type {array.dtype} are not numeric"
        return np.zeros(array.shape, np.uint8), reasons
    flat = array.reshape(len(array), -1)
    bad = ~np.isfinite(flat).all(1) | (flat.min(1, initial=0) < 0) | (flat.max(1, initial=0) > 255)
    for i in np.flatnonzero(bad):
        reasons[i] = _validate(array[i])[1]
    pixels = np.rint(np.where(bad[:, None, None], 0, array)).astype(np.uint8)
    return pixels, reasons


class PreparePatches:
    """Callable for ``map_batches(batch_format="pyarrow")``: an Arrow batch of the patch table ->
    the scoring actors' numpy batch (:func:`prepare_batch`), leaving out the patches already done.

    Args:
        splits: the splits to score.
        done: an object reference to the sorted id keys (:func:`~anogan_ray.tables.id_keys`) of
            the patches already scored or rejected under this scoring key (a resumed run), or
            None; the reading tasks share it zero-copy through the object store.
    """

    def __init__(self, splits: list[str], done: ray.ObjectRef | None = None):
        self.splits = list(splits)
        self.done = done

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        if self.done is not None:  # a resumed run: leave out what is already done
            done_already = contains_sorted(ray.get(self.done), id_keys(table["patch_id"]))
            table = table.filter(pa.array(~done_already))
        batch = {name: column_to_numpy(table[name]) for name in table.column_names}
        return prepare_batch(batch, self.splits)


def column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as numpy: tensor columns as (n, ...) arrays, lists as arrays of arrays."""
    column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType) and hasattr(column, "to_numpy_ndarray"):
        return column.to_numpy_ndarray()
    if isinstance(column.type, pa.ExtensionType):
        return column.to_numpy()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values = column.to_pylist()
        result = np.empty(len(values), dtype=object)
        result[:] = [np.asarray(v if v is not None else [], dtype=np.float64) for v in values]
        return result
    return column.to_numpy(zero_copy_only=False)
