"""The file contracts between stages (DESIGN.md §3): the one place that knows them.

- The patch table: one row per 64 x 64 patch, ``pixels`` stored as uint8 (a Ray Data tensor column
  of shape (64, 64)) that the models see decoded to float32 in [-1, 1] (the pixel codec below).
- The score table: the patch table's columns but ``pixels``, plus scores, keyed by
  (``patch_id``, scoring key); a table may hold several scoring keys (models, λ, Γ, z's rate,
  mappings), and every reader selects exactly one (:func:`select_key`).
- The geometry table (preprocess, ``geometry/``): per B-scan, how its flattened, resampled frame
  maps back to the original (:data:`GEOMETRY_COLUMNS`, one file per volume: :func:`read_geometry`).
- The map table (score with ``score.save_maps``, ``maps/``; DESIGN.md §3.4a, docs/maps.md): one
  row per scored B-scan, method (A, aCAE, PCA) and scoring key, the residual |x − x̂| stitched
  onto the frame as float16 and the stitched x̂ as uint8, with the map's place in the frame
  (``top``, ``left``, ``height``, ``width``) and the frame-to-original mapping (``x_scale``,
  ``y_scale``, ``shift``) (:data:`MAP_COLUMNS`, :func:`decode_map`, :func:`read_maps`); exactly
  once per scoring key, like the score table.
- One reader per table: :func:`read_patch_table` (Ray Data, for the pipelines; its rows are
  counted by :func:`count_patches`), :func:`open_dataset` (pyarrow, for analysis; :func:`connect`
  registers it with DuckDB, which is how evaluate, query and report read a score table of any
  size), :func:`read_scores` (one key's rows in pandas: small tables and selected rows only),
  :func:`read_maps` (one key's map rows, a few volumes at a time).

Importing this module does not import Ray (the torch core uses the patch ids and the codec).
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from anogan_ray import storage

if TYPE_CHECKING:
    import duckdb
    import ray.data

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
    "anomaly_fraction",  # float32, share of annotated pixels (NaN when unknown)
    "volume_label",  # int8: the volume's (image's) label, -1 unknown, 0 healthy, 1 pathological
    "source",  # str, the input URL
    "spacing_source",  # str: where the A-scan spacing came from: file, manifest, or none (images)
)

LABEL_UNKNOWN = -1
# DuckDB's working memory per connection (aggregation, sorting, temporary tables); beyond it
# DuckDB spills to a folder under the system's temporary folder, so a query on a table of any
# size fits in this (plus Python's own share).
DUCKDB_MEMORY = "1GB"

# The scoring key: a score row is unique per (patch_id, *KEY_COLUMNS).
KEY_COLUMNS = ("model_id", "lambda", "steps", "z_lr", "mapping")


class TableError(ValueError):
    """A table that cannot be read as asked: no files, unreadable files, an ambiguous key."""


def patch_id(volume_id: str, bscan: int, y: int, x: int) -> str:
    """The patch's id: the same volume, B-scan and position always give the same id."""
    return f"{volume_id}/b{bscan:04d}/y{y:04d}x{x:04d}"


def patch_seed(pid: str) -> int:
    """A 63-bit seed derived from a patch id (seeds z, so a patch scores the same everywhere)."""
    return int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# The pixel codec
# ---------------------------------------------------------------------------------------------


def encode_pixels(image: np.ndarray) -> np.ndarray:
    """Float image in [-1, 1] -> uint8 for storage."""
    return np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_pixels(pixels: np.ndarray) -> np.ndarray:
    """Stored uint8 pixels -> float32 in [-1, 1]; same shape."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0


def pixels_from_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A patch table's ``pixels`` column read with pyarrow -> uint8 array (N, 64, 64).

    Accepts Ray's tensor extension type (registered or read as its storage), (large/fixed-size)
    lists of uint8 and 4096-byte binary values.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        flat = np.frombuffer(b"".join(array.to_pylist()), dtype=np.uint8)
    elif pa.types.is_fixed_size_binary(array.type):
        width = array.type.byte_width
        flat = np.frombuffer(array.buffers()[1], np.uint8)[
            array.offset * width : (array.offset + len(array)) * width
        ]
    else:
        while (
            pa.types.is_list(array.type)
            or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)
        ):
            array = array.flatten()
        flat = array.to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
    return flat.reshape(-1, PATCH_SIZE, PATCH_SIZE)


# ---------------------------------------------------------------------------------------------
# Reading tables
# ---------------------------------------------------------------------------------------------


def as_list(urls: str | Sequence[str]) -> list[str]:
    """One table location or several -> a list."""
    return [urls] if isinstance(urls, str) else list(urls)


def _hive_keys(base: str, file_url: str) -> list[str]:
    """``key`` of every ``key=value`` folder between ``base`` and the file."""
    relative = file_url[len(base) :].strip("/").split("/")[:-1]
    return [part.split("=", 1)[0] for part in relative if "=" in part]


def patch_table_url(url: str) -> str:
    """The ``patches`` folder of a preprocess stage folder (or ``url`` itself)."""
    inner = storage.join(url, "patches")
    return inner if storage.exists(inner) else url


def read_patch_table(url: str, splits: Sequence[str] | None = None) -> ray.data.Dataset:
    """The patch table written by ``preprocess`` as a Ray dataset, with the ``split`` column.

    Args:
        url: the preprocess stage folder, or its ``patches`` folder.
        splits: keep only these splits (``None``: all).

    Returns:
        A dataset with the columns of :data:`PATCH_COLUMNS`; ``pixels`` is a ``(64, 64)`` uint8
        tensor column.

    Raises:
        TableError: no Parquet files (of ``splits``) there, before Ray is started.
    """
    import ray
    from ray.data.datasource.partitioning import Partitioning

    from anogan_ray.ray_env import ensure_ray

    url = patch_table_url(url)
    files = _patch_table_files(url, splits)
    if not files:
        raise TableError(_no_patch_files(url, splits))
    ensure_ray()
    fs, path = storage.arrow_filesystem(url)
    paths = [storage.arrow_filesystem(f)[1] for f in files]
    dataset = ray.data.read_parquet(
        paths, filesystem=fs, partitioning=Partitioning("hive", base_dir=path, filesystem=fs)
    )
    present = set(dataset.schema().names)  # volume_label is absent from older tables
    return dataset.select_columns([c for c in PATCH_COLUMNS if c in present])


def count_patches(
    url: str, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None
) -> int:
    """The number of patches in the patch table (of ``splits``; 0 without files), from the
    Parquet footers alone, which are checked on the way (see :func:`check_patch_table`)."""
    url = patch_table_url(url)
    files = _patch_table_files(url, splits)
    return _checked_row_count(url, files, columns) if files else 0


def check_patch_table(
    url: str, splits: Sequence[str] | None = None, columns: Sequence[str] | None = None
) -> int:
    """Check that ``url`` holds a patch table with files of ``splits``; the number of patches.

    A stage calls it on its driver before any Ray work, so a wrong folder is one error naming
    the table and what is wrong, not a traceback from a worker. Reads the Parquet footers only.

    Args:
        columns: the columns the stage reads (default: every column a patch table always has).

    Raises:
        TableError: no Parquet files (of ``splits``), a file that cannot be read, or a file
            without one of ``columns`` (DESIGN.md §3.2).
    """
    url = patch_table_url(url)
    files = _patch_table_files(url, splits)
    if not files:
        raise TableError(_no_patch_files(url, splits))
    return _checked_row_count(url, files, columns)


def _no_patch_files(url: str, splits: Sequence[str] | None) -> str:
    of_splits = f" of split {', '.join(splits)}" if splits else ""
    return (
        f"patch table {url}: no Parquet files{of_splits} there; expected the output folder of "
        "`anogan-ray preprocess` (hive-partitioned by split)"
    )


# Columns every patch table file holds: `split` may be its folder's name instead, and tables
# written before volume_label and spacing_source existed lack those two.
REQUIRED_PATCH_COLUMNS = tuple(
    c for c in PATCH_COLUMNS if c not in ("split", "volume_label", "spacing_source")
)


def _checked_row_count(url: str, files: list[str], columns: Sequence[str] | None) -> int:
    """The rows of a patch table's ``files``, each footer checked for ``columns``."""
    required = REQUIRED_PATCH_COLUMNS if columns is None else columns
    fs, _ = storage.arrow_filesystem(url)
    rows = 0
    for file in files:
        try:
            metadata = pq.read_metadata(storage.arrow_filesystem(file)[1], filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise TableError(f"patch table {url}: cannot read {file} ({err})") from err
        names = metadata.schema.to_arrow_schema().names
        missing = [c for c in required if c not in names]
        if missing:
            raise TableError(
                f"patch table {url}: {file} has no column {', '.join(missing)}; expected a "
                "patch table written by `anogan-ray preprocess`"
            )
        rows += metadata.num_rows
    return rows


def _patch_table_files(url: str, splits: Sequence[str] | None) -> list[str]:
    """The Parquet files of the patch table folder ``url`` that hold ``splits`` (None: all)."""
    # one listing call of our own (Ray's file discovery is slow on s3fs)
    files = storage.list_files(url, ".parquet")
    if splits is not None:
        wanted = {f"split={split}" for split in splits}
        files = [f for f in files if any(part in wanted for part in f.split("/"))]
    return files


def open_dataset(urls: str | Sequence[str], what: str = "score table") -> ds.Dataset:
    """Open one or more Parquet folders (local or s3, hive-partitioned or not) as one dataset.

    Columns are united by name (a column missing from some files reads as null); a partition key
    (``split=test``) that the files do not already hold becomes a string column.

    Raises:
        TableError: a location holds no Parquet files, or a file cannot be read.
    """
    children = []
    for url in as_list(urls):
        url = url.rstrip("/")
        files = storage.list_files(url, ".parquet")
        if not files:
            raise TableError(
                f"{what} {url}: no Parquet files there; expected the output folder of "
                f"`anogan-ray {'preprocess' if what == 'patch table' else 'score'}`"
            )
        fs, base = storage.arrow_filesystem(url)
        paths = [storage.filesystem(f)[1] for f in files]
        try:
            schemas = [pq.read_schema(p, filesystem=fs) for p in paths]
        except (OSError, pa.ArrowInvalid) as err:
            raise TableError(f"{what} {url}: cannot read a Parquet file ({err})") from err
        names = set().union(*(s.names for s in schemas))
        keys = {k for p in paths for k in _hive_keys(base, p) if k not in names}
        partition_schema = pa.schema([(k, pa.string()) for k in sorted(keys)])
        try:
            schema = pa.unify_schemas([*schemas, partition_schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise TableError(f"{what} {url}: files disagree on column types ({err})") from err
        children.append(
            ds.dataset(
                paths,
                schema=schema,
                format="parquet",
                filesystem=fs,
                partitioning=ds.partitioning(partition_schema, flavor="hive") if keys else None,
                partition_base_dir=base,
            )
        )
    if len(children) == 1:
        return children[0]
    try:
        schema = pa.unify_schemas([c.schema for c in children], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise TableError(f"{what}s {', '.join(urls)}: columns disagree on type ({err})") from err
    return ds.dataset([c.replace_schema(schema) for c in children], schema=schema)


def _committed_dataset(url: str) -> ds.Dataset | None:
    """A table the score stage commits to as a pyarrow dataset; None when it has no files yet."""
    files = storage.list_files(url, ".parquet")
    if not files:
        return None
    fs, _ = storage.arrow_filesystem(url)
    return ds.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


def count_committed(url: str, where: ds.Expression | None) -> int:
    """The number of rows of a committed table that ``where`` keeps, without reading them whole."""
    dataset = _committed_dataset(url)
    return 0 if dataset is None else dataset.count_rows(filter=where)


def committed_id_keys(url: str, where: ds.Expression | None) -> np.ndarray:
    """:func:`id_keys` of the ``patch_id`` of a committed table's rows that ``where`` keeps
    (unsorted); read batch by batch, so only the keys (16 bytes a row) are held."""
    dataset = _committed_dataset(url)
    parts = [np.empty(0, ID_KEY)]
    if dataset is not None:
        for batch in dataset.to_batches(columns=["patch_id"], filter=where):
            parts.append(id_keys(batch.column(0)))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# Id keys: fixed-width digests of patch ids, for set operations on millions of ids
# ---------------------------------------------------------------------------------------------

ID_KEY = "S16"  # numpy dtype of an id key: a 128-bit BLAKE2b digest of the patch id


def id_keys(ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """128-bit digests of patch ids as a numpy ``S16`` array (unsorted, one per id).

    Sets of done ids are held and compared as these keys (16 bytes each, sortable, searched with
    ``np.searchsorted``) instead of Python sets of strings (~100 bytes each). Two different ids
    share a key with probability ~n² / 2^129: about 10^-25 for 10^7 ids.
    """
    values = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    digest = b"".join(
        hashlib.blake2b(str(value).encode(), digest_size=16).digest() for value in values
    )
    return np.frombuffer(digest, dtype=ID_KEY)


class IdKeySet:
    """A growing set of id keys: sorted chunks, merged when there are many.

    Membership of a batch of b keys costs O(b log n); adding keeps at most ``max_chunks``
    chunks, so a set filled file by file (commit) is re-sorted only every few files.
    """

    def __init__(self, keys: np.ndarray | None = None, max_chunks: int = 8):
        self.chunks = [np.sort(keys)] if keys is not None and len(keys) else []
        self.max_chunks = max_chunks

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A boolean array: which of ``keys`` are in the set."""
        found = np.zeros(len(keys), dtype=bool)
        for chunk in self.chunks:
            found |= contains_sorted(chunk, keys)
        return found

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            self.chunks.append(np.sort(keys))
        if len(self.chunks) > self.max_chunks:
            self.chunks = [np.sort(np.concatenate(self.chunks))]


def contains_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` occur in the sorted array ``sorted_keys``; a boolean array."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[where] == keys


# ---------------------------------------------------------------------------------------------
# The scoring key: which model and setting a score row belongs to
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringKey:
    """Model and mapping setting of a score row; a table may hold rows of several keys.

    Its text form (``str(key)``, printed by ``score`` and ``query --keys``) is
    ``model_id=<id>,lambda=0.1,steps=500,z_lr=0.01,mapping=iterative``; any subset of these
    fields selects the keys that match it.
    """

    model_id: str
    lambda_: float
    steps: int
    z_lr: float
    mapping: str

    def __str__(self) -> str:
        return ",".join(f"{column}={value}" for column, value in self.row().items())

    def row(self) -> dict[str, Any]:
        """Column name -> value, in :data:`KEY_COLUMNS` order."""
        values = (self.model_id, self.lambda_, self.steps, self.z_lr, self.mapping)
        return dict(zip(KEY_COLUMNS, values, strict=True))

    def expression(self) -> ds.Expression:
        """A pyarrow filter that keeps this key's rows."""
        terms = [ds.field(column) == value for column, value in self.row().items()]
        return functools.reduce(operator.and_, terms)


def parse_key(text: str) -> dict[str, Any]:
    """``"lambda=0.1,mapping=encoder"`` -> ``{"lambda": 0.1, "mapping": "encoder"}`` (typed)."""
    types = {"model_id": str, "lambda": float, "steps": int, "z_lr": float, "mapping": str}
    wanted: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        column, sep, value = part.partition("=")
        if not sep or column not in types:
            raise TableError(
                f"scoring key {text!r}: {part!r} is not <field>=<value> with a field of "
                f"{', '.join(KEY_COLUMNS)}"
            )
        try:
            wanted[column] = types[column](value)
        except ValueError as err:
            raise TableError(f"scoring key {text!r}: {column} {value!r} ({err})") from err
    return wanted


def scoring_keys(dataset: ds.Dataset) -> list[ScoringKey]:
    """The distinct scoring keys of a score (or rejects) table, sorted."""
    missing = [c for c in KEY_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise TableError(f"not a score table: missing key column(s) {', '.join(missing)}")
    # batch by batch, few read ahead: a 10^7-row table's key columns would take ~0.5 GB at once
    keys = set()
    scanner = dataset.scanner(columns=list(KEY_COLUMNS), batch_readahead=2, fragment_readahead=1)
    for batch in scanner.to_batches():
        distinct = pa.Table.from_batches([batch]).group_by(list(KEY_COLUMNS)).aggregate([])
        keys.update(ScoringKey(*(row[c] for c in KEY_COLUMNS)) for row in distinct.to_pylist())
    return sorted(keys, key=str)


def select_key(
    dataset: ds.Dataset, wanted: str | dict[str, Any] | None = None, where: str = "score table"
) -> ScoringKey:
    """The one scoring key of ``dataset`` that matches ``wanted`` (a key text or its fields).

    Raises:
        TableError: no key matches, or several do (the message lists the keys present).
    """
    fields = parse_key(wanted) if isinstance(wanted, str) else dict(wanted or {})
    fields = {c: v for c, v in fields.items() if v is not None}
    keys = scoring_keys(dataset)
    matching = [k for k in keys if all(k.row()[c] == v for c, v in fields.items())]
    if len(matching) == 1:
        return matching[0]
    listing = "\n  ".join(str(k) for k in keys) or "(none: the table is empty)"
    asked = ",".join(f"{c}={v}" for c, v in fields.items()) or "no key"
    problem = "no scoring key matches" if not matching else "several scoring keys match"
    raise TableError(
        f"{where}: {problem} {asked}; choose one with --key (or --lambda, --steps, --z-lr, "
        f"--mapping, --model-id; `evaluate --compare` shows them all side by side). Keys "
        f"present:\n  {listing}"
    )


def connect(
    urls: str | Sequence[str], key: str | dict | None = None
) -> tuple[duckdb.DuckDBPyConnection, ScoringKey | None]:
    """A DuckDB connection with the score table(s) registered as the view ``scores``, and the key.

    The pyarrow dataset of :func:`open_dataset` is registered as it is, so the same code reads
    local and ``s3://`` tables (DuckDB's httpfs is not needed) and DuckDB pushes filters and
    column selection down into the Parquet scan, streaming the files: a query holds its result
    and its aggregation state in memory (at most :data:`DUCKDB_MEMORY`, then it spills to
    disk), never the table. With ``key`` the view holds the rows
    of the one scoring key that ``key`` selects (an error lists the keys present when it selects
    none or several), returned next to the connection; without it, every row (and None).
    """
    import duckdb

    dataset = open_dataset(urls)
    spill = os.path.join(tempfile.gettempdir(), f"anogan-ray-duckdb-{uuid.uuid4().hex[:12]}")
    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY, "temp_directory": spill})
    if key is None:
        con.register("scores", dataset)
        return con, None
    chosen = select_key(dataset, key, f"score table {', '.join(as_list(urls))}")
    con.register("all_scores", dataset)
    con.execute(f"CREATE VIEW scores AS SELECT * FROM all_scores WHERE {key_condition(chosen)}")
    return con, chosen


def key_condition(key: ScoringKey) -> str:
    """A SQL condition selecting ``key``'s rows (values from the table itself, quoted)."""

    def literal(value: object) -> str:
        return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else repr(value)

    return " AND ".join(f'"{c}" = {literal(v)}' for c, v in key.row().items())


def sql_number(expression: str) -> str:
    """A numeric SQL expression with NaN read as NULL.

    DuckDB orders NaN above every number and its MAX / AVG return NaN when one is present;
    pandas and numpy skip NaN. Read through this, a NaN score is left out of aggregates and
    sorts last, as it does in pandas.
    """
    return f"(CASE WHEN isnan({expression}) THEN NULL ELSE {expression} END)"


def read_scores(
    urls: str | Sequence[str],
    key: str | dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    where: ds.Expression | None = None,
) -> tuple[pd.DataFrame, ScoringKey]:
    """One scoring key's rows of score table(s) as a DataFrame, and that key.

    Args:
        urls: score table folder(s), local or s3.
        key: which key (see :func:`select_key`); may be left out when the table holds one.
        columns: columns to read (default: all but ``z``); missing ones are left out.
        splits: keep only these splits.
        where: and only the rows this filter keeps.
    """
    dataset = open_dataset(urls)
    chosen = select_key(dataset, key, f"score table {', '.join(as_list(urls))}")
    names = dataset.schema.names
    wanted = [c for c in (columns or [c for c in names if c != "z"]) if c in names]
    keep = chosen.expression()
    if splits is not None:
        keep = keep & ds.field("split").isin(list(splits))
    if where is not None:
        keep = keep & where
    frame = dataset.to_table(columns=wanted, filter=keep).to_pandas()
    return frame, chosen


# ---------------------------------------------------------------------------------------------
# The geometry table (written by preprocess) and the map table (written by the map pass)
# ---------------------------------------------------------------------------------------------

# Columns of the geometry table, one row per B-scan, one file per volume
# (``<preprocess stage>/geometry/<sha1 of volume_id>.parquet``, :func:`geometry_file`).
GEOMETRY_COLUMNS = (
    "volume_id",  # str
    "bscan",  # int32
    "x_scale",  # float64, original columns per frame column
    "y_scale",  # float64, original rows per frame row (1 except for enlarged images)
    "bm_row",  # int32, the row BM was moved to (-1 for modality image)
    "shift",  # list<int32> (frame width,): original row = frame row - shift[x] (before y_scale)
    "ilm",  # list<float32>: ILM row per column in the resampled, unflattened frame
    "bm",  # list<float32>: BM row likewise
)

# The map table: one row per scored B-scan, method and scoring key (see docs/maps.md and
# DESIGN.md §3.4a). ``residual`` holds the stitched map |x − x̂| as little-endian float16 and
# ``reconstruction`` the stitched x̂ as uint8 (the pixel codec), each ``height`` x ``width``
# values, row-major, covering frame rows [top, top + height) and columns [left, left + width)
# of the flattened frame; the residual is NaN where no scored patch covers a pixel.
MAP_COLUMNS = (
    "volume_id",  # str
    "subject_id",  # str
    "bscan",  # int32
    "split",  # str
    "method",  # str: A (|x - G(z_Γ)|), aCAE (|x - Dec(E(x))|) or PCA (|x - x̂|)
    "combine",  # str: how overlapping patches' residuals were combined (mean or max)
    "top",  # int32: frame row of the map's first row
    "left",  # int32: frame column of the map's first column
    "height",  # int32
    "width",  # int32
    "residual",  # binary: float16 little-endian, height * width values (decode_map)
    "reconstruction",  # binary: the stitched reconstruction x̂ (mean of the patches'), uint8
    # row-major through the pixel codec (clipped to [-1, 1]; decode_reconstruction)
    "patches",  # int32: patches stitched into the map
    "frame_width",  # int32: columns of the flattened frame (-1 when the geometry is unknown)
    "x_scale",  # float64: original columns per frame column (NaN when unknown)
    "y_scale",  # float64: original rows per frame row (NaN when unknown)
    "shift",  # list<int32> (frame_width,) or null: original row = (row - shift[col]) * y_scale
    *KEY_COLUMNS,
)
MAP_DTYPE = np.dtype("<f2")  # stored value type of a map


def geometry_url(patches: str) -> str:
    """The geometry table folder of a preprocess stage, given the stage folder or its
    ``patches`` folder (which may not exist: a patch table written by other means)."""
    if storage.exists(storage.join(patches, "patches")):
        return storage.join(patches, "geometry")
    return storage.join(storage.parent(patches), "geometry")


def geometry_file(folder: str, volume_id: str) -> str:
    """The one file of the geometry table that holds ``volume_id``'s B-scans."""
    return storage.join(folder, hashlib.sha1(volume_id.encode()).hexdigest() + ".parquet")


def read_geometry(folder: str, volume_id: str) -> dict[int, dict[str, Any]] | None:
    """One volume's rows of the geometry table, by B-scan; None when the volume has no file.

    Raises:
        TableError: the file exists but is not a geometry table.
    """
    url = geometry_file(folder, volume_id)
    if not storage.exists(url):
        return None
    fs, path = storage.arrow_filesystem(url)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise TableError(f"geometry table file {url}: cannot be read ({err})") from err
    missing = [c for c in ("volume_id", "bscan", "x_scale", "shift") if c not in table.schema.names]
    if missing:
        raise TableError(f"geometry table file {url}: missing column(s) {', '.join(missing)}")
    return {int(row["bscan"]): row for row in table.to_pylist() if row["volume_id"] == volume_id}


def encode_map(values: np.ndarray) -> bytes:
    """A float map -> the bytes of the ``residual`` column (float16, row-major)."""
    return np.ascontiguousarray(values, dtype=MAP_DTYPE).tobytes()


def decode_map(data: bytes, height: int, width: int) -> np.ndarray:
    """The ``residual`` column's bytes -> a float32 (height, width) map (NaN where uncovered).

    Raises:
        TableError: the bytes do not hold height x width float16 values.
    """
    if len(data) != height * width * MAP_DTYPE.itemsize:
        raise TableError(f"map of {len(data)} bytes cannot hold {height} x {width} float16 values")
    return np.frombuffer(data, MAP_DTYPE).astype(np.float32).reshape(height, width)


def encode_reconstruction(values: np.ndarray) -> bytes:
    """A stitched reconstruction in [-1, 1] -> the ``reconstruction`` column's bytes (uint8 by
    the pixel codec; NaN where uncovered is stored as -1)."""
    return encode_pixels(np.nan_to_num(values, nan=-1.0)).tobytes()


def decode_reconstruction(data: bytes, height: int, width: int) -> np.ndarray:
    """The ``reconstruction`` column's bytes -> float32 (height, width) in [-1, 1].

    Raises:
        TableError: the bytes do not hold height x width values.
    """
    if len(data) != height * width:
        raise TableError(f"reconstruction of {len(data)} bytes cannot hold {height} x {width}")
    return decode_pixels(np.frombuffer(data, np.uint8).reshape(height, width))


def map_schema() -> pa.Schema:
    """The Arrow schema of a map table file."""
    types = {
        "bscan": pa.int32(), "top": pa.int32(), "left": pa.int32(), "height": pa.int32(),
        "width": pa.int32(), "patches": pa.int32(), "frame_width": pa.int32(),
        "x_scale": pa.float64(), "y_scale": pa.float64(), "shift": pa.list_(pa.int32()),
        "residual": pa.binary(), "reconstruction": pa.binary(), "lambda": pa.float64(),
        "steps": pa.int32(), "z_lr": pa.float64(),
    }  # fmt: skip
    return pa.schema([(c, types.get(c, pa.string())) for c in MAP_COLUMNS])


def map_table_url(url: str) -> str:
    """The ``maps`` folder of a score stage folder (or ``url`` itself)."""
    inner = storage.join(url, "maps")
    return inner if storage.exists(inner) else url


def read_maps(
    urls: str | Sequence[str],
    key: str | dict[str, Any] | ScoringKey | None = None,
    where: ds.Expression | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[pa.Table, ScoringKey]:
    """One scoring key's rows of map table(s) (those ``where`` keeps), and that key.

    Read a large table in parts (``where`` on ``volume_id``): a B-scan's map of one method is
    ~100 KB decoded.
    """
    urls = [map_table_url(u) for u in as_list(urls)]
    dataset = open_dataset(urls, what="map table")
    if isinstance(key, ScoringKey):
        chosen = key
    else:
        chosen = select_key(dataset, key, f"map table {', '.join(urls)}")
    keep = chosen.expression() if where is None else chosen.expression() & where
    names = dataset.schema.names
    wanted = [c for c in (columns or names) if c in names]
    return dataset.to_table(columns=wanted, filter=keep), chosen
