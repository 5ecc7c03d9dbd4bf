"""A scoring job's commit: staged files -> score and rejects tables, each patch at most once.

A scoring job stages its output under ``out/_staging/<key>/<run>/`` (see
:mod:`anogan_ray.pipelines.score`): its driver gathers the scored blocks in a
:class:`StagedWriter`, which lands a file every ``rows_per_file`` rows or every ``flush_s``
seconds, whichever comes first. :func:`commit_staged` moves the complete files into
``out/scores`` and ``out/rejects``. It runs in Ray tasks beside the driver, at the start of a run
(a killed run's files) and at its end, and :func:`done_keys` gives a resumed run the ids already
done. Like :mod:`anogan_ray.pipelines.validate`, this module does not import PyTorch: the workers
that run it are kept idle afterwards and reused for reading and writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from anogan_ray import storage
from anogan_ray.pipelines.validate import REJECT_REASON
from anogan_ray.tables import KEY_COLUMNS, IdKeySet, ScoringKey, committed_id_keys, id_keys

log = logging.getLogger(__name__)


def done_keys(out: str, key: ScoringKey) -> np.ndarray:
    """The sorted id keys (:func:`~anogan_ray.tables.id_keys`) of the patches already scored or
    rejected under this scoring key."""
    parts = [
        committed_id_keys(storage.join(out, t), key.expression()) for t in ("scores", "rejects")
    ]
    return np.sort(np.concatenate(parts))


def _write_atomic(table: pa.Table, url: str, staging_dir: str) -> None:
    """Write one Parquet file so readers see all of it or nothing."""
    if storage.is_remote(url):  # an S3 object appears only when its upload completes
        fs, path = storage.arrow_filesystem(url)
        pq.write_table(table, path, filesystem=fs)
        return
    folder = storage.filesystem(staging_dir)[1]
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".commit-{uuid.uuid4().hex}")
    pq.write_table(table, tmp)
    os.makedirs(os.path.dirname(storage.filesystem(url)[1]), exist_ok=True)
    os.replace(tmp, storage.filesystem(url)[1])  # atomic rename on the same filesystem


class StagedWriter:
    """Scored blocks -> staged Parquet files, one every ``rows_per_file`` rows or every
    ``flush_s`` seconds (a side thread flushes rows that waited that long), so a killed job loses
    at most the rows of the last ``flush_s`` seconds and the batches in flight. Each file is
    written whole or not at all (:func:`_write_atomic`). Use it as a context manager: leaving
    the block flushes what is left.
    """

    def __init__(self, folder: str, rows_per_file: int, flush_s: float):
        self.folder, self.rows_per_file, self.flush_s = folder, rows_per_file, flush_s
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.oldest = 0.0  # when the oldest pending rows came
        self.files = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(
            target=self._flush_when_due, name="staged-flush", daemon=True
        )

    def __enter__(self) -> StagedWriter:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._timer.join()
        if exc[0] is None:
            self.flush()

    def add(self, block: pa.Table) -> None:
        """Stage a block of scored rows."""
        if block.num_rows == 0:
            return
        with self._lock:
            if not self.pending:
                self.oldest = time.monotonic()
            self.pending.append(block)
            self.rows += block.num_rows
            full = self.rows >= self.rows_per_file
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one staged file."""
        with self._lock:
            if not self.pending:
                return
            table = pa.concat_tables(self.pending, promote_options="default")
            self.pending, self.rows = [], 0
            target = storage.join(self.folder, f"{uuid.uuid4().hex}.parquet")
            _write_atomic(table, target, self.folder)
            self.files += 1

    def _flush_when_due(self) -> None:
        while not self._stop.wait(min(1.0, self.flush_s)):
            if self.pending and time.monotonic() - self.oldest >= self.flush_s:
                self.flush()


def staging_folder(out: str, key: ScoringKey) -> str:
    """The folder where runs of this scoring key stage their files."""
    return storage.join(out, "_staging", hashlib.sha1(str(key).encode()).hexdigest()[:16])


def commit_staged(out: str, key: ScoringKey, rows_per_file: int = 10_000) -> dict[str, int]:
    """Move this key's complete staged files into the score and rejects tables, each row at most
    once (a retried task may have staged a patch twice).

    Rows are gathered across staged files and written in files of about ``rows_per_file`` rows
    (rejects too, which come a few per batch), so a run adds at most one short file per table
    however it was cut into blocks or killed. Staged files are removed once all their rows are
    written; a commit killed before that is redone by the next one, whose de-duplication drops
    what was already written.

    Returns:
        Counts: ``scored`` and ``rejected`` rows committed, ``duplicates`` dropped and
        ``partial_files`` (half-written by a killed job) discarded.
    """
    counts = {"scored": 0, "rejected": 0, "duplicates": 0, "partial_files": 0}
    staging = staging_folder(out, key)
    staged = storage.list_files(staging, ".parquet")
    fs, _ = storage.arrow_filesystem(out)
    tables = {"scored": storage.join(out, "scores"), "rejected": storage.join(out, "rejects")}
    done: dict[str, IdKeySet] = {}  # per table: the keys of its rows under this scoring key
    pending: dict[str, list[pa.Table]] = {kind: [] for kind in tables}

    def write(kind: str) -> None:
        if pending[kind]:
            rows = pa.concat_tables(pending[kind], promote_options="default")
            target = storage.join(tables[kind], f"{uuid.uuid4().hex}.parquet")
            _write_atomic(rows, target, staging)
            pending[kind] = []

    for url in staged:
        path = storage.filesystem(url)[1]
        try:
            table = pq.read_table(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as err:  # no footer: the writer was killed
            log.warning("discarding partial file %s (%s)", url, err)
            counts["partial_files"] += 1
            storage.remove(url)
            continue
        for rows, kind in (
            (table.filter(pc.equal(table[REJECT_REASON], "")), "scored"),
            (table.filter(pc.not_equal(table[REJECT_REASON], "")), "rejected"),
        ):
            if rows.num_rows == 0:
                continue
            if kind not in done:
                done[kind] = IdKeySet(committed_id_keys(tables[kind], key.expression()))
            keys = id_keys(rows["patch_id"])
            first = np.zeros(len(keys), dtype=bool)  # a retried task may stage a row twice
            first[np.unique(keys, return_index=True)[1]] = True
            fresh = first & ~done[kind].contains(keys)
            counts["duplicates"] += rows.num_rows - int(fresh.sum())
            rows, keys = rows.filter(pa.array(fresh)), keys[fresh]
            if rows.num_rows == 0:
                continue
            if kind == "scored":
                rows = rows.drop_columns([REJECT_REASON])
            else:
                keep = ["patch_id", "split", "source", REJECT_REASON, *KEY_COLUMNS]
                rows = rows.select(keep).rename_columns(
                    [c if c != REJECT_REASON else "reason" for c in keep]
                )
            pending[kind].append(rows)
            done[kind].add(keys)
            counts[kind] += rows.num_rows
            if sum(t.num_rows for t in pending[kind]) >= rows_per_file:
                write(kind)
    for kind in tables:
        write(kind)
    for url in staged:  # every row is written now
        with contextlib.suppress(FileNotFoundError):
            storage.remove(url)
    with contextlib.suppress(FileNotFoundError):  # S3 "folders" vanish with their last object
        storage.remove(staging)  # one job per key at a time: nothing else in there
    if not storage.is_remote(out):  # the shared parent, once no key stages anything
        with contextlib.suppress(OSError):
            os.rmdir(storage.filesystem(storage.join(out, "_staging"))[1])
    return counts
