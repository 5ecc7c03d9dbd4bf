"""Queries over score tables with DuckDB (``anogan-ray query``).

A score table (DESIGN.md §3.4) is a folder of Parquet files, possibly hive-partitioned
(``split=test/...``), on local disk or ``s3://``. Each folder is opened as a pyarrow dataset
through :mod:`anogan_ray.storage` and registered with DuckDB as the view ``scores``
(:func:`anogan_ray.tables.connect`), so the same code reads local and remote tables (DuckDB's
own httpfs is not needed) and DuckDB pushes filters and column selection down into the Parquet
scan. Several folders are read as one table, their columns united by name. Top-k and aggregates
stream the table (memory holds k rows or one row per volume); ``sql`` returns whatever the query
selects.

A table may hold several scoring keys (models, λ, Γ, z's rate, mappings): top-k and aggregates
read exactly one (:func:`anogan_ray.tables.select_key`; ``keys`` lists them), ``sql`` sees every
row.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Sequence

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from anogan_ray import storage
from anogan_ray.tables import KEY_COLUMNS, ScoringKey, TableError, as_list, connect, sql_number

# The scores a user ranks or aggregates by; p_d is D's "real" probability (low = anomalous).
SCORE_COLUMNS = (
    "anomaly_score",  # A(x), eq. (6)
    "residual_score",  # R(x)
    "discrimination_score",  # D(x)
    "p_d",  # D's output probability for x
    "ref_anomaly_score",  # GAN_R (Yeh et al. reference discrimination loss)
    "ref_discrimination_score",  # D^(x)
    "acae_score",  # the aCAE baseline's reconstruction residual
    "pca_score",  # the PCA baseline's reconstruction residual
)
LEVELS = ("volume", "subject")
FORMATS = ("table", "csv", "parquet", "json")


def keys(scores: str | Sequence[str]) -> pa.Table:
    """The scoring keys a score table holds, with their row counts (``query --keys``)."""
    urls = as_list(scores)
    group = ", ".join(f'"{c}"' for c in KEY_COLUMNS)
    table = _run(connect(urls)[0], f"SELECT {group}, COUNT(*) AS patches FROM scores "
                 f"GROUP BY {group} ORDER BY {group}", [], urls)  # fmt: skip
    names = [str(ScoringKey(*row.values())) for row in table.select(KEY_COLUMNS).to_pylist()]
    return table.append_column("key", pa.array(names, pa.string()))


def columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The columns of the ``scores`` view."""
    return [row[0] for row in con.execute("DESCRIBE scores").fetchall()]


def _check_columns(con: duckdb.DuckDBPyConnection, wanted: Sequence[str], urls: Sequence[str]):
    available = columns(con)
    for name in wanted:
        if name not in available:
            raise TableError(
                f"column {name!r} is not in score table {', '.join(urls)}; "
                f"available: {', '.join(available)}"
            )


def _run(con: duckdb.DuckDBPyConnection, sql: str, params: list, urls: Sequence[str]) -> pa.Table:
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    except duckdb.Error as err:
        raise TableError(f"query over {', '.join(urls)} failed: {err}\nSQL: {sql}") from err


def _filters(subject: str | None, volume: str | None, split: str | None) -> tuple[str, list]:
    clauses, params = [], []
    for column, value in (("subject_id", subject), ("volume_id", volume), ("split", split)):
        if value is not None:
            clauses.append(f'"{column}" = ?')
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def top_k(
    scores: str | Sequence[str],
    k: int = 20,
    score: str = "anomaly_score",
    subject: str | None = None,
    volume: str | None = None,
    split: str | None = None,
    key: str | dict | None = None,
) -> pa.Table:
    """The ``k`` most anomalous patches, most anomalous first (ties broken by ``patch_id``; NaN
    scores last).

    Args:
        scores: score table folder(s), local or s3.
        k: how many patches.
        score: the column to rank by; for ``p_d`` the lowest probability ranks first.
        subject, volume, split: keep only rows with these values.
        key: the scoring key (text or fields, see :func:`anogan_ray.tables.select_key`); may be
            left out when the table holds one.
    """
    urls = as_list(scores)
    con, _ = connect(urls, key or {})
    _check_columns(con, [score], urls)
    where, params = _filters(subject, volume, split)
    order = "ASC" if score == "p_d" else "DESC"
    shown = ", ".join(f'"{c}"' for c in columns(con) if c != "z")  # z is long and unreadable
    value = sql_number(f'"{score}"')
    sql = (
        f"SELECT {shown} FROM scores{where} "
        f"ORDER BY {value} {order} NULLS LAST, patch_id LIMIT {int(k)}"
    )
    return _run(con, sql, params, urls)


def aggregate(
    scores: str | Sequence[str],
    level: str = "volume",
    threshold: float | None = None,
    score: str = "anomaly_score",
    split: str | None = None,
    key: str | dict | None = None,
) -> pa.Table:
    """Per-volume or per-subject summary of patch scores, most anomalous first.

    Columns: ``subject_id`` (``volume_id``), ``model_id``, ``patches``, ``max_score`` and
    ``mean_score`` (of the patches' non-NaN scores), ``above_threshold`` and
    ``share_above_threshold`` (null without a threshold; a patch is above when its score is
    greater than the threshold), ``anomalous_patches`` and ``labelled_patches`` (from the
    annotation labels); one scoring key's rows (``key``, as in :func:`top_k`).
    """
    if level not in LEVELS:
        raise TableError(f"level {level!r}: choose one of {', '.join(LEVELS)}")
    urls = as_list(scores)
    con, _ = connect(urls, key or {})
    _check_columns(con, [score], urls)
    keys = ["subject_id", "volume_id"] if level == "volume" else ["subject_id"]
    where, params = _filters(None, None, split)
    if threshold is None:
        above, share = "CAST(NULL AS BIGINT)", "CAST(NULL AS DOUBLE)"
    else:
        above = f'SUM(CASE WHEN "{score}" > ? THEN 1 ELSE 0 END)'
        share = f'AVG(CASE WHEN "{score}" > ? THEN 1.0 ELSE 0.0 END)'
        params = [float(threshold), float(threshold), *params]
    group = ", ".join(keys + ["model_id"])
    value = sql_number(f'"{score}"')
    sql = f"""
        SELECT {group},
               COUNT(*) AS patches,
               MAX({value}) AS max_score,
               AVG({value}) AS mean_score,
               {above} AS above_threshold,
               {share} AS share_above_threshold,
               SUM(CASE WHEN label = 1 THEN 1 ELSE 0 END) AS anomalous_patches,
               SUM(CASE WHEN label >= 0 THEN 1 ELSE 0 END) AS labelled_patches
        FROM scores{where}
        GROUP BY {group}
        ORDER BY max_score DESC NULLS LAST, {group}
    """
    return _run(con, sql, params, urls)


def sql(scores: str | Sequence[str], query: str) -> pa.Table:
    """Run any SQL against the view ``scores`` (e.g. ``SELECT split, COUNT(*) FROM scores
    GROUP BY split``)."""
    urls = as_list(scores)
    return _run(connect(urls)[0], query, [], urls)


def format_table(table: pa.Table, max_rows: int = 50) -> str:
    """A plain-text table for the terminal (floats to 4 significant digits)."""
    names = table.column_names
    rows = table.slice(0, max_rows).to_pylist()

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        if isinstance(value, (list, bytes)):
            return f"[{len(value)}]"
        return "" if value is None else str(value)

    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows ({table.num_rows} in all)")
    return "\n".join(lines)


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def write_result(table: pa.Table, url: str | None = None, fmt: str | None = None) -> None:
    """Write a query result to a file (local or s3) or, without ``url``, print it.

    Args:
        table: the result.
        url: output file; without it the result goes to the terminal.
        fmt: ``table``, ``csv``, ``parquet`` or ``json``; by default from ``url``'s suffix
            (``table`` on the terminal).
    """
    if fmt is None:
        suffix = url.rsplit(".", 1)[-1].lower() if url and "." in url else ""
        fmt = {"csv": "csv", "parquet": "parquet", "pq": "parquet", "json": "json"}.get(
            suffix, "table"
        )
    if fmt not in FORMATS:
        raise TableError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "table":
        text = format_table(table, max_rows=table.num_rows if url else 50) + "\n"
    elif fmt == "json":
        records = [{k: _json_safe(v) for k, v in r.items()} for r in table.to_pylist()]
        text = json.dumps(records, indent=1, default=str) + "\n"
    elif fmt == "csv":
        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        text = buffer.getvalue().decode()
    else:
        if url is None:
            raise TableError("format parquet needs an output file (--out result.parquet)")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(url, buffer.getvalue())
        return
    if url is None:
        sys.stdout.write(text)
    else:
        storage.write_bytes(url, text.encode())
