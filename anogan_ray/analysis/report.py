"""Pictures of a scored cohort, as PNGs with an ``index.html`` (``anogan-ray report``).

Each picture is drawn when its inputs are given and listed as skipped (with the reason) in the
index otherwise:

==================  ==================================================  ====================
picture             shows                                               needs
==================  ==================================================  ====================
``roc.png``         ROC curves of A, GAN_R, P_D, the aCAE and PCA (the  scores with labels
                    paper's Table 1) and of R, D, D^ (Fig. 4 a, b)
``histograms.png``  R and D for normal vs anomalous patches (Fig. 4     scores with labels
                    c, d)
``enface_*.png``    per volume: max patch score over B-scan index x     scores
                    lateral position, and the most anomalous B-scan
                    with its score heat map (the B-scan is reassembled   + patches
                    from the grid patches: flattened, resampled frame)
``top_k.png``       the most anomalous patches: input, G(z), residual   scores, patches,
                    overlay, annotation (Fig. 3)                        model (+ z or invert)
``where_*.png``     the most anomalous B-scans: per method (A, aCAE,    scores with z,
                    PCA) the B-scan, its stitched reconstruction and    patches, model
                    the residual over it, the mask outlined (Fig. 3)    (+ manifest)
``tsne.png``        t-SNE of D's last-convolution features, normal vs   scores, patches, model
                    anomalous (Fig. 2 b)
``markers.png``     marker discovery: k-means clusters of the most      scores, patches, model
                    anomalous patches on their residual maps (stored z)
                    or else D's features; exemplars per cluster
                    (``markers.parquet`` lists the clusters)
==================  ==================================================  ====================

The score table is never loaded whole (it may hold 10^7 patches): DuckDB computes the ROC curves
(:func:`anogan_ray.core.metrics.evaluate`), the histograms (exact bin counts), the most anomalous
volumes and patches (:mod:`anogan_ray.analysis.query`) and the t-SNE's stratified sample (rows
ordered by a seeded hash of ``patch_id``, so the same seed draws the same patches); only the rows
of the mapped volumes and of the chosen patches come into pandas.
"""

from __future__ import annotations

import html
import io
import logging
from collections.abc import Sequence
from typing import Any

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from anogan_ray import storage  # noqa: E402
from anogan_ray.analysis import query  # noqa: E402
from anogan_ray.core import metrics  # noqa: E402
from anogan_ray.tables import (  # noqa: E402
    PATCH_SIZE,
    TableError,
    connect,
    decode_pixels,
    open_dataset,
    pixels_from_column,
    read_scores,
    scoring_keys,
)

log = logging.getLogger(__name__)

# Fig. 4 a (every row of the paper's Table 1, and PCA) and b (A's parts)
_ROC_PANELS = (("A", "GAN_R", "P_D", "aCAE", "PCA"), ("R", "D", "D_ref"))
_LABEL_NAMES = {1: "anomalous", 0: "normal", -1: "unknown"}


# ---------------------------------------------------------------------------------------------
# Reading pixels and running the model
# ---------------------------------------------------------------------------------------------


def read_patches(
    patches: str, filter_expression: ds.Expression, columns: Sequence[str] = ()
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of the patch table matching ``filter_expression``: (metadata, uint8 pixels)."""
    dataset = open_dataset(patches, what="patch table")
    if "pixels" not in dataset.schema.names:
        raise TableError(f"patch table {patches}: no `pixels` column")
    wanted = ["patch_id", *columns, "pixels"]
    table = dataset.to_table(columns=wanted, filter=filter_expression)
    return table.drop(["pixels"]).to_pandas(), pixels_from_column(table.column("pixels"))


def _pixels_for(patches: str, patch_ids: Sequence[str]) -> np.ndarray:
    """uint8 pixels (N, 64, 64) in the order of ``patch_ids`` (which must all exist)."""
    meta, pixels = read_patches(patches, ds.field("patch_id").isin(list(patch_ids)))
    position = {pid: i for i, pid in enumerate(meta["patch_id"])}
    missing = [pid for pid in patch_ids if pid not in position]
    if missing:
        raise TableError(
            f"patch table {patches}: {len(missing)} scored patch(es) not found, e.g. {missing[0]}"
        )
    return pixels[[position[pid] for pid in patch_ids]]


def discriminator_features(bundle: Any, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """D's last-convolution features f(x), flattened: (N, 8c * 4 * 4)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(decode_pixels(pixels[start : start + batch_size]))[:, None]
            out.append(bundle.discriminator.features(x).flatten(1).numpy())  # (B, 8c*16)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _reconstruct(bundle: Any, z: np.ndarray) -> np.ndarray:
    """G(z) in [-1, 1], (N, 64, 64)."""
    import torch

    with torch.inference_mode():
        return bundle.generator(torch.as_tensor(np.asarray(z, np.float32)))[:, 0].numpy()


def _latents(scores: str | Sequence[str], key: str, patch_ids: Sequence[str]) -> np.ndarray | None:
    """The stored final z of each patch under ``key``, or None when the table has no ``z``."""
    if "z" not in open_dataset(scores).schema.names:
        return None
    found, _ = read_scores(
        scores, key, columns=["patch_id", "z"], where=ds.field("patch_id").isin(list(patch_ids))
    )
    by_id = dict(zip(found["patch_id"], found["z"]))
    if any(by_id.get(pid) is None for pid in patch_ids):
        return None
    return np.stack([np.asarray(by_id[pid], np.float32) for pid in patch_ids])


# ---------------------------------------------------------------------------------------------
# Marker discovery
# ---------------------------------------------------------------------------------------------


def residual_features(residual: np.ndarray, level: float = 0.25) -> np.ndarray:
    """Shift-invariant descriptors of signed residual maps x - G(z), (N, 64, 64) -> (N, 6).

    The maps are smoothed (Gaussian, sigma 1 px) and split into bright (> ``level``) and dark
    (< -``level``) residue; per patch: the area share of each, the log number of connected
    regions of each (dots vs blobs), and the summed residue of each per pixel. Dark fluid,
    bright foci and lifted RPE differ in these.
    """
    from scipy import ndimage

    out = np.zeros((len(residual), 6), np.float64)
    for i, r in enumerate(np.asarray(residual, np.float32)):
        r = ndimage.gaussian_filter(r, 1.0)
        bright, dark = r > level, r < -level
        out[i] = (
            bright.mean(),
            dark.mean(),
            np.log1p(ndimage.label(bright)[1]),
            np.log1p(ndimage.label(dark)[1]),
            r[bright].sum() / r.size,
            -r[dark].sum() / r.size,
        )
    return out


def cluster_markers(
    features: np.ndarray, n_clusters: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """k-means on standardized, PCA-reduced features: (cluster per row, distance to its centre)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n_clusters = max(1, min(n_clusters, len(features)))
    scaled = StandardScaler().fit_transform(np.asarray(features, np.float64))
    components = min(20, scaled.shape[0], scaled.shape[1])
    reduced = PCA(n_components=components, random_state=seed).fit_transform(scaled)
    kmeans = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(reduced)
    distance = np.linalg.norm(reduced - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    return kmeans.labels_.astype(np.int64), distance


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _save(fig: plt.Figure, url: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buffer.getvalue())
    return url


def _roc_figure(evaluation: dict[str, Any]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    titles = ("(a) anomaly scores and baselines (Table 1)", "(b) score parts")
    for ax, names, title in zip(axes, _ROC_PANELS, titles):
        for name in names:
            row = evaluation["scores"].get(name)
            if row is None:
                continue
            label = f"{name} ({row['column']}), AUC {row['auc']:.3f}"
            ax.plot(row["roc"]["fpr"], row["roc"]["tpr"], lw=2, label=label)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"ROC, {evaluation['level']} level, split {evaluation['split']}")
    return fig


_HISTOGRAM_COLUMNS = ("residual_score", "discrimination_score")  # Fig. 4 c, d


def _histograms(
    con: duckdb.DuckDBPyConnection, split: str, bins: int = 40
) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    """Per column of :data:`_HISTOGRAM_COLUMNS`: (bin edges, {label: counts}) of the labelled,
    finite scores of ``split``, counted by DuckDB (the edges are numpy's for the same data)."""
    result = {}
    for column in _HISTOGRAM_COLUMNS:
        kept = f'split = $split AND label IN (0, 1) AND isfinite("{column}")'
        low, high = con.execute(
            f'SELECT MIN("{column}"), MAX("{column}") FROM scores WHERE {kept}', {"split": split}
        ).fetchone()
        if low is None:  # no finite labelled score: empty bins
            low, high = 0.0, 1.0
        edges = np.histogram_bin_edges(np.array([low, high], np.float64), bins=bins)
        # np.histogram's own binning: a guess from the scale, then one step down or up where
        # rounding put a value on the wrong side of an edge (edges[i] <= v < edges[i + 1])
        norm = bins / (float(edges[-1]) - float(edges[0]))
        counted = con.execute(
            f"""WITH guessed AS (
                    SELECT label, "{column}" AS v,
                           LEAST(CAST(floor(("{column}" - $first) * $norm) AS BIGINT), $last) AS i
                    FROM scores WHERE {kept}),
                down AS (SELECT label, v, i - CAST(v < $edges[i + 1] AS BIGINT) AS i FROM guessed)
                SELECT label, i + CAST(v >= $edges[i + 2] AND i != $last AS BIGINT), COUNT(*)
                FROM down GROUP BY ALL""",
            {
                "first": float(edges[0]),
                "norm": norm,
                "last": bins - 1,
                "edges": edges.tolist(),
                "split": split,
            },
        ).fetchall()
        counts = {0: np.zeros(bins), 1: np.zeros(bins)}
        for label, index, n in counted:
            counts[int(label)][int(index)] = n
        result[column] = (edges, counts)
    return result


def _histogram_figure(histograms: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, title in zip(axes, _HISTOGRAM_COLUMNS, ("(c) residual score R", "(d) D")):
        edges, counts = histograms[column]
        for label, color in ((0, "tab:blue"), (1, "tab:red")):
            n = int(counts[label].sum())
            if n:  # the bins' counts as weights: the same bars as ax.hist of the scores
                ax.hist(edges[:-1], edges, weights=counts[label], alpha=0.6, density=True,
                        color=color)  # fmt: skip
            ax.plot([], [], color=color, lw=6, label=f"{_LABEL_NAMES[label]} (n={n})")
        ax.set(xlabel=column, ylabel="density", title=title)
        ax.legend(fontsize=8)
    return fig


def _quality_figure(record: dict[str, Any]) -> plt.Figure:
    """Training's generative-quality figure per epoch, with the real-vs-real floor."""
    epochs = sorted(record["epochs"], key=int)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(e) for e in epochs], [record["epochs"][e]["sliced_wasserstein"] for e in epochs],
            marker="o", label="G's samples vs real patches")  # fmt: skip
    ax.axhline(record["real_vs_real"], color="grey", ls="--", label="real vs real (the floor)")
    ax.set(xlabel="epoch", ylabel="sliced Wasserstein-1", title="generative quality in training")
    ax.legend(fontsize=8)
    return fig


def _enface(volume: pd.DataFrame, score: str = "anomaly_score") -> np.ndarray:
    """Max patch score over (B-scan index, lateral column); NaN where no patch covers."""
    width = int(volume["x"].max()) + PATCH_SIZE
    grid = np.full((int(volume["bscan"].max()) + 1, width), np.nan)
    for bscan, x, value in zip(volume["bscan"], volume["x"], volume[score]):
        span = grid[int(bscan), int(x) : int(x) + PATCH_SIZE]
        np.fmax(span, value, out=span)
    return grid


def _bscan_mosaic(meta: pd.DataFrame, pixels: np.ndarray, scores: dict[str, float]):
    """Reassemble a B-scan from its patches: (image in [-1, 1], max-score map, NaN uncovered)."""
    height = int(meta["y"].max()) + PATCH_SIZE
    width = int(meta["x"].max()) + PATCH_SIZE
    image = np.full((height, width), np.nan, np.float32)
    heat = np.full((height, width), np.nan)
    for pid, y, x, patch in zip(meta["patch_id"], meta["y"], meta["x"], pixels):
        y, x = int(y), int(x)
        image[y : y + PATCH_SIZE, x : x + PATCH_SIZE] = decode_pixels(patch)
        if pid in scores:
            window = heat[y : y + PATCH_SIZE, x : x + PATCH_SIZE]
            np.fmax(window, scores[pid], out=window)
    return image, heat


def _volume_figure(
    volume_id: str, volume: pd.DataFrame, patches: str | None, threshold: float | None
) -> plt.Figure:
    grid = _enface(volume)
    worst = volume.loc[volume["anomaly_score"].idxmax()]
    panels = 2 if patches else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    vmin, vmax = np.nanmin(volume["anomaly_score"]), np.nanmax(volume["anomaly_score"])
    ax = axes[0, 0]
    shown = ax.imshow(
        grid, aspect="auto", cmap="inferno", vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set(
        xlabel="lateral position (columns, flattened 22 µm frame)",
        ylabel="B-scan index",
        title=f"{volume_id}: en-face max A",
    )
    ax.yaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(shown, ax=ax, label="anomaly score A")
    if patches:
        bscan = int(worst["bscan"])
        rows = volume[volume["bscan"] == bscan]
        meta, pixels = read_patches(
            patches,
            (ds.field("volume_id") == volume_id) & (ds.field("bscan") == bscan),
            columns=["y", "x"],
        )
        meta_scored = meta[meta["patch_id"].isin(rows["patch_id"])]
        pixels = pixels[meta["patch_id"].isin(rows["patch_id"]).to_numpy()]
        image, heat = _bscan_mosaic(
            meta_scored, pixels, dict(zip(rows["patch_id"], rows["anomaly_score"]))
        )
        ax = axes[0, 1]
        ax.imshow(np.nan_to_num(image, nan=-1.0), cmap="gray", vmin=-1, vmax=1)
        shown = ax.imshow(
            np.ma.masked_invalid(heat), cmap="inferno", alpha=0.45, vmin=vmin, vmax=vmax
        )
        if threshold is not None:
            ax.contour(
                np.nan_to_num(heat, nan=-np.inf) > threshold,
                levels=[0.5],
                colors="cyan",
                linewidths=1,
            )
        ax.set(
            title=f"B-scan {bscan} (most anomalous): max A per pixel"
            + ("\ncyan: above the threshold" if threshold is not None else "")
        )
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, label="anomaly score A")
    return fig


def _top_k_figure(rows: pd.DataFrame, pixels: np.ndarray, generated: np.ndarray) -> plt.Figure:
    inputs = decode_pixels(pixels)
    residual = np.abs(inputs - generated)
    k = len(rows)
    fig, axes = plt.subplots(k, 4, figsize=(8, 2.1 * k), squeeze=False)
    titles = ("input x", "G(z)", "residual |x - G(z)|", "annotation")
    rmax = float(residual.max()) or 1.0
    for i, (_, row) in enumerate(rows.iterrows()):
        axes[i, 0].imshow(inputs[i], cmap="gray", vmin=-1, vmax=1)
        axes[i, 1].imshow(generated[i], cmap="gray", vmin=-1, vmax=1)
        axes[i, 2].imshow(inputs[i], cmap="gray", vmin=-1, vmax=1)
        axes[i, 2].imshow(residual[i], cmap="hot", alpha=0.6, vmin=0, vmax=rmax)
        fraction = row.get("anomaly_fraction", np.nan)
        axes[i, 3].text(
            0.02,
            0.5,
            f"{row['patch_id']}\nA = {row['anomaly_score']:.4g}\n"
            f"label: {_LABEL_NAMES.get(int(row['label']), '?')}\n"
            + (f"annotated share: {fraction:.2f}" if np.isfinite(fraction) else "no annotation"),
            fontsize=7,
            va="center",
            transform=axes[i, 3].transAxes,
        )
        for j in range(4):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
    fig.suptitle("Most anomalous patches (Fig. 3)")
    return fig


def _outline(ax: plt.Axes, mask: np.ndarray | None) -> None:
    if mask is not None and mask.any():
        ax.contour(mask != 0, levels=[0.5], colors="cyan", linewidths=0.8)


def _where_figure(
    title: str,
    image: np.ndarray,
    reconstructions: dict[str, np.ndarray],
    residuals: dict[str, np.ndarray],
    mask: np.ndarray | None,
    scales: dict[str, float],
) -> plt.Figure:
    """One B-scan (flattened frame), the methods side by side: the top row holds the B-scan and
    each method's stitched reconstruction, the bottom row the annotation and each method's
    residual over the B-scan (the paper's Fig. 3), the annotation outlined in cyan."""
    names = {"A": "G(z_Γ)", "aCAE": "Dec(E(x))", "PCA": "PCA x̂"}
    columns = 1 + len(residuals)
    aspect = image.shape[0] / max(image.shape[1], 1)
    fig, axes = plt.subplots(2, columns, figsize=(4 * columns, 0.6 + 8 * aspect), squeeze=False)
    shown_image = np.nan_to_num(image, nan=-1)
    axes[0, 0].imshow(shown_image, cmap="gray", vmin=-1, vmax=1)
    axes[0, 0].set_title("B-scan x", fontsize=9)
    axes[1, 0].imshow(shown_image, cmap="gray", vmin=-1, vmax=1)
    if mask is not None:
        axes[1, 0].imshow(np.ma.masked_equal(mask, 0), cmap="cool", alpha=0.6)
    axes[1, 0].set_title("annotation" if mask is not None else "no annotation", fontsize=9)
    for j, method in enumerate(residuals, start=1):
        axes[0, j].imshow(
            np.nan_to_num(reconstructions[method], nan=-1), cmap="gray", vmin=-1, vmax=1
        )
        axes[0, j].set_title(f"{method}: stitched {names.get(method, 'x̂')}", fontsize=9)
        axes[1, j].imshow(shown_image, cmap="gray", vmin=-1, vmax=1)
        scale = scales[method]
        shown = axes[1, j].imshow(  # the largest third of the scale, over the B-scan
            np.ma.masked_less(np.nan_to_num(residuals[method]), scale / 3), cmap="hot",
            alpha=0.75, vmin=0, vmax=scale,
        )  # fmt: skip
        _outline(axes[1, j], mask)
        fig.colorbar(shown, ax=axes[1, j], fraction=0.03, pad=0.01, orientation="horizontal")
        axes[1, j].set_title(f"{method}: residual |x − x̂|", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig


def _where(
    con: duckdb.DuckDBPyConnection,
    scores: str | Sequence[str],
    key: str,
    patches: str,
    bundle: Any,
    manifest: str | None,
    split: str,
    count: int,
) -> list[tuple[str, plt.Figure]]:
    """Figures of the ``count`` B-scans of ``split`` with the highest patch A: each method's
    stitched reconstruction and residual (core.maps, as the map table holds them)."""
    import torch

    from anogan_ray.core.maps import available_methods, reconstructions, stitch
    from anogan_ray.data.masks import frame_masks
    from anogan_ray.data.volumes import read_manifest
    from anogan_ray.tables import geometry_url, read_geometry

    worst = con.execute(
        "SELECT volume_id, bscan, MAX(anomaly_score) AS a FROM scores WHERE split = ? "
        "AND isfinite(anomaly_score) GROUP BY 1, 2 ORDER BY a DESC, 1, 2 LIMIT ?",
        [split, count],
    ).fetchall()
    records = {}
    if manifest:
        records = {str(r["volume_id"]): r for r in read_manifest(manifest).to_dict("records")}
    methods = available_methods(bundle)
    drawn = []
    for volume_id, bscan, top in worst:
        meta, pixels = read_patches(
            patches,
            (ds.field("volume_id") == volume_id) & (ds.field("bscan") == bscan),
            columns=["y", "x"],
        )
        z = _latents(scores, key, list(meta["patch_id"]))
        if z is None:
            return []
        x = decode_pixels(pixels)  # (n, 64, 64)
        rebuilt = reconstructions(bundle, torch.from_numpy(x)[:, None], z, methods)
        ys, xs = meta["y"].to_numpy(), meta["x"].to_numpy()
        image = stitch(x, ys, xs)
        region = (slice(image.top, image.top + image.values.shape[0]),
                  slice(image.left, image.left + image.values.shape[1]))  # fmt: skip
        recon = {m: stitch(r, ys, xs).values for m, r in rebuilt.items()}
        residual = {m: stitch(np.abs(x - r), ys, xs).values for m, r in rebuilt.items()}
        mask = None
        geometry = read_geometry(geometry_url(patches), volume_id)
        if volume_id in records and geometry is not None:
            masks = frame_masks(records[volume_id], {bscan: geometry[bscan]})
            mask = masks[bscan][region] if bscan in masks else None
        scales = {m: float(np.nanpercentile(r, 99.9)) or 1.0 for m, r in residual.items()}
        title = f"{volume_id}, B-scan {bscan}: max patch A {top:.4g}"
        name = "where_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in volume_id)
        drawn.append(
            (f"{name}_b{bscan}", _where_figure(title, image.values, recon, residual, mask, scales))
        )
    return drawn


def _tsne_figure(embedding: np.ndarray, labels: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, color in ((0, "tab:blue"), (1, "tab:red"), (-1, "tab:gray")):
        chosen = labels == label
        if chosen.any():
            ax.scatter(
                *embedding[chosen].T,
                s=9,
                alpha=0.7,
                color=color,
                label=f"{_LABEL_NAMES[label]} (n={int(chosen.sum())})",
            )
    ax.set(title="t-SNE of D's last-convolution features (Fig. 2 b)", xticks=[], yticks=[])
    ax.legend(fontsize=8)
    return fig


def _marker_figure(
    clusters: np.ndarray, distance: np.ndarray, pixels: np.ndarray, per_cluster: int = 8
) -> plt.Figure:
    ids = np.unique(clusters)
    fig, axes = plt.subplots(
        len(ids), per_cluster, figsize=(1.3 * per_cluster, 1.45 * len(ids)), squeeze=False
    )
    for r, cluster in enumerate(ids):
        members = np.flatnonzero(clusters == cluster)
        members = members[np.argsort(distance[members])][:per_cluster]  # closest to the centre
        for c in range(per_cluster):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(members):
                ax.imshow(pixels[members[c]], cmap="gray", vmin=0, vmax=255)
            else:
                ax.set_axis_off()
        axes[r, 0].set_ylabel(
            f"cluster {cluster}\n(n={int((clusters == cluster).sum())})", fontsize=8
        )
    fig.suptitle("Candidate markers: clusters of the most anomalous patches (exemplars)")
    return fig


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _stratified(con: duckdb.DuckDBPyConnection, split: str, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` patches of ``split`` (``patch_id``, ``label``), half of them anomalous where
    there are enough; each class's first rows in the order of md5(seed, patch_id), a stable
    pseudo-random order, so a seed always draws the same patches (DuckDB keeps only the top n)."""
    anomalous, others = con.execute(
        "SELECT COUNT(*) FILTER (WHERE label = 1), COUNT(*) FILTER (WHERE label IS DISTINCT "
        "FROM 1) FROM scores WHERE split = ?",
        [split],
    ).fetchone()
    take_anomalous = min(anomalous, n // 2)
    take_others = min(others, n - take_anomalous)
    take_anomalous = min(anomalous, n - take_others)
    draw = (
        "SELECT patch_id, label FROM scores WHERE split = ? AND label {} "
        "ORDER BY md5(? || patch_id) LIMIT ?"
    )
    sample = con.execute(
        f"({draw.format('= 1')}) UNION ALL ({draw.format('IS DISTINCT FROM 1')})",
        [split, f"{seed}/", take_anomalous, split, f"{seed}/", take_others],
    ).df()
    return sample.sort_values("patch_id", ignore_index=True)


def report(
    scores: str | Sequence[str],
    out: str,
    patches: str | None = None,
    model: str | None = None,
    threshold: float | str | None = None,
    split: str = "test",
    key: str | dict | None = None,
    top_k: int = 8,
    volumes: int = 3,
    embed_patches: int = 600,
    marker_patches: int = 150,
    clusters: int = 4,
    seed: int = 0,
    manifest: str | None = None,
    bscans: int = 3,
) -> dict[str, Any]:
    """Draw the report of a score table into ``out`` (PNGs, ``markers.parquet``, ``index.html``).

    Args:
        scores: score table folder(s), local or s3.
        out: report folder.
        patches: the patch table (pixels); pictures that need pixels are skipped without it.
        model: the model bundle (G and D); pictures that need the model are skipped without it.
            Its ``threshold.json``, if any, is used when ``threshold`` is not given.
        threshold: the patch-level A threshold: a number, a ``threshold.json`` / bundle folder,
            or None (the model's stored one, else calibrated on ``val`` now).
        split: the split to picture.
        key: which scoring key's rows, when the table holds several (``tables.select_key``).
        top_k: patches in the top-k picture.
        volumes: most anomalous volumes to map.
        embed_patches: patches in the t-SNE (stratified, half anomalous where possible).
        marker_patches: most anomalous patches clustered for marker discovery.
        clusters: k-means clusters.
        seed: seed of sampling, t-SNE and k-means.
        manifest: the cohort manifest: its masks are outlined on the B-scans of ``where_*``.
        bscans: most anomalous B-scans in the ``where_*`` figures (needs stored z).

    Returns:
        ``{"out", "index", "images": {name: url}, "skipped": {name: reason}, "auc": {...},
        "markers": url or None}``.
    """
    con, chosen_key = connect(scores, key or {})
    key = str(chosen_key)
    counts = con.execute(
        "SELECT COUNT(*), COUNT(DISTINCT volume_id), COUNT(*) FILTER (WHERE label = 1), "
        "COUNT(*) FILTER (WHERE label = 0) FROM scores WHERE split = ?",
        [split],
    ).fetchone()
    n_patches, n_volumes, n_anomalous, n_normal = counts
    if n_patches == 0:
        raise metrics.MetricsError(f"score table {scores}: no rows in split {split!r}")
    if model:
        bundle_id = storage.read_json(storage.join(model, "bundle.json"))["model_id"]
        if bundle_id != chosen_key.model_id:
            raise ValueError(
                f"model bundle {model} is model_id {bundle_id}, but the rows of key {key} were "
                f"scored by {chosen_key.model_id}: give the bundle that scored them"
            )
    storage.makedirs(out)
    images: dict[str, str] = {}
    skipped: dict[str, str] = {}
    captions: dict[str, str] = {}
    if threshold is None and model and storage.exists(storage.join(model, metrics.THRESHOLD_FILE)):
        threshold = model

    # ROC curves and histograms (labels only)
    evaluation = None
    try:
        evaluation = metrics.evaluate(scores, threshold, "patch", split, key)
        images["roc"] = _save(_roc_figure(evaluation), storage.join(out, "roc.png"))
        captions["roc"] = "ROC curves of the scores at patch level (paper Fig. 4 a, b)."
    except metrics.MetricsError as err:
        skipped["roc"] = str(err)
    if n_anomalous and n_normal and set(_HISTOGRAM_COLUMNS) <= set(query.columns(con)):
        images["histograms"] = _save(
            _histogram_figure(_histograms(con, split)), storage.join(out, "histograms.png")
        )
        captions["histograms"] = (
            "Residual and discrimination scores, normal vs anomalous (Fig. 4 c, d)."
        )
    else:
        skipped["histograms"] = f"split {split!r} has no labelled normal and anomalous patches"
    patch_threshold = None
    if evaluation is not None:
        patch_threshold = evaluation["scores"].get("A", {}).get("threshold")
    elif isinstance(threshold, (int, float)):
        patch_threshold = float(threshold)

    # Where in the eye: per-volume en-face maps and B-scan heat maps
    worst_volumes = query.aggregate(scores, "volume", split=split, key=key)["volume_id"]
    for volume_id in worst_volumes.to_pylist()[:volumes]:
        name = "volume_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in volume_id)
        rows = con.execute(
            "SELECT patch_id, bscan, y, x, anomaly_score FROM scores "
            "WHERE split = ? AND volume_id = ?",
            [split, volume_id],
        ).df()
        fig = _volume_figure(volume_id, rows, patches, patch_threshold)
        images[name] = _save(fig, storage.join(out, f"{name}.png"))
        captions[name] = (
            f"Volume {volume_id}: en-face map (B-scan index x lateral position) of the max patch "
            "score"
            + (
                ", and its most anomalous B-scan reassembled from the grid patches (flattened, "
                "resampled frame) under the score heat map."
                if patches
                else "."
            )
        )
    if not patches:
        skipped["bscan heat maps"] = "no patch table given (--patches)"

    # Pictures that need pixels and the model
    bundle = None
    if patches and model:
        from anogan_ray.core.model import load_bundle

        bundle = load_bundle(model)
    need = "needs the patch table (--patches) and the model bundle (--model)"
    from anogan_ray.core.model import QUALITY_FILE

    quality = storage.join(model, QUALITY_FILE) if model else None
    if quality and storage.exists(quality):
        images["quality"] = _save(
            _quality_figure(storage.read_json(quality)), storage.join(out, "quality.png")
        )
        captions["quality"] = (
            "Generative quality per training epoch: sliced Wasserstein distance between G's "
            "samples and real training patches on fixed features (lower is better; the dashed "
            "line is two real samples, what a perfect G would reach)."
        )
    else:
        skipped["quality"] = "needs a model bundle (--model) written by `train`"
    from anogan_ray.core.objectives import SWEEP_FILE

    sweep_url = storage.join(model, SWEEP_FILE) if model else None
    sweep = storage.read_json(sweep_url) if sweep_url and storage.exists(sweep_url) else None
    ranked = pd.DataFrame()
    if bundle is not None:  # the most anomalous patches, for top-k and markers
        ranked = query.top_k(scores, max(top_k, marker_patches), split=split, key=key).to_pandas()

    if bundle is None:
        skipped["top_k"] = need
    else:
        top = ranked.head(top_k)
        z = _latents(scores, key, list(top["patch_id"]))
        if z is None:
            skipped["top_k"] = "the score table has no stored z (score.save_z=true) to draw G(z)"
        else:
            pixels = _pixels_for(patches, list(top["patch_id"]))
            images["top_k"] = _save(
                _top_k_figure(top, pixels, _reconstruct(bundle, z)), storage.join(out, "top_k.png")
            )
            captions["top_k"] = (
                f"The {len(top)} most anomalous patches: input, G(z), residual (Fig. 3)."
            )

    if bundle is None:
        skipped["where"] = need
    else:
        figures = _where(con, scores, key, patches, bundle, manifest, split, bscans)
        if not figures:
            skipped["where"] = "the score table has no stored z (score.save_z=true) to draw G(z)"
        for name, fig in figures:
            images[name] = _save(fig, storage.join(out, f"{name}.png"))
            captions[name] = (
                "Where, as the paper's Fig. 3 shows it: the B-scan (flattened, resampled frame), "
                "each method's reconstruction stitched from its grid patches (overlaps averaged) "
                "and its residual |x − x̂| over the B-scan"
                + (", the annotation outlined in cyan." if manifest else ".")
            )

    if bundle is None:
        skipped["tsne"] = need
    else:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        sample = _stratified(con, split, embed_patches, seed)
        features = discriminator_features(bundle, _pixels_for(patches, list(sample["patch_id"])))
        reduced = PCA(n_components=min(30, *features.shape), random_state=seed).fit_transform(
            features
        )
        perplexity = float(max(2, min(30, (len(sample) - 1) // 3)))
        embedding = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            reduced
        )
        images["tsne"] = _save(
            _tsne_figure(embedding, sample["label"].to_numpy()), storage.join(out, "tsne.png")
        )
        captions["tsne"] = f"t-SNE of D's features of {len(sample)} patches (Fig. 2 b)."

    markers_url = None
    if bundle is None:
        skipped["markers"] = need
    else:
        top = ranked.head(marker_patches)
        pixels = _pixels_for(patches, list(top["patch_id"]))
        z = _latents(scores, key, list(top["patch_id"]))
        if z is not None:  # residual maps x - G(z): what the model could not explain
            basis = "signed residual maps x - G(z) (residual_features)"
            features = residual_features(decode_pixels(pixels) - _reconstruct(bundle, z))
        else:
            basis = "D's last-convolution features (no stored z for residual maps)"
            features = discriminator_features(bundle, pixels)
        assignment, distance = cluster_markers(features, clusters, seed)
        markers = pa.table(
            {
                "patch_id": top["patch_id"].to_numpy(),
                "volume_id": top["volume_id"].to_numpy(),
                "anomaly_score": top["anomaly_score"].to_numpy(),
                "label": top["label"].to_numpy(),
                "cluster": assignment,
                "distance_to_centre": distance,
            }
        )
        buffer = io.BytesIO()
        pq.write_table(markers, buffer)
        markers_url = storage.join(out, "markers.parquet")
        storage.write_bytes(markers_url, buffer.getvalue())
        images["markers"] = _save(
            _marker_figure(assignment, distance, pixels), storage.join(out, "markers.png")
        )
        captions["markers"] = (
            f"Marker discovery: the {len(top)} most anomalous patches clustered (k-means, "
            f"k={clusters}) on {basis}; each row shows the patches closest "
            "to a cluster centre. Cluster of every patch: markers.parquet."
        )

    auc = {} if evaluation is None else {k: v["auc"] for k, v in evaluation["scores"].items()}
    index = storage.join(out, "index.html")
    keys = metrics.compare(scores, split) if len(scoring_keys(open_dataset(scores))) > 1 else []
    counted = f"{n_patches} patches in {n_volumes} volumes"
    page = _index_html(
        chosen_key.model_id, split, counted, images, captions, skipped, auc, keys, sweep
    )
    storage.write_bytes(index, page.encode())
    summary = {
        "out": out,
        "index": index,
        "images": images,
        "skipped": skipped,
        "auc": auc,
        "markers": markers_url,
        "keys": keys,
        "sweep": sweep,  # the leaderboard and agreement of the sweep that chose this model
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary


def _index_html(
    model_id: str,
    split: str,
    counted: str,
    images: dict[str, str],
    captions: dict[str, str],
    skipped: dict[str, str],
    auc: dict[str, float],
    keys: list[dict[str, Any]],
    sweep: dict[str, Any] | None = None,
) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>anogan-ray report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%;"
        "border:1px solid #ccc}figure{margin:1.5em 0}td,th{padding:2px 10px}</style></head><body>",
        "<h1>anogan-ray report</h1>",
        f"<p>model_id {esc(model_id)}; split {esc(split)}: {esc(counted)}.</p>",
    ]
    if auc:
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in auc.items())
        parts.append(f"<table><tr><th>score</th><th>patch AUC</th></tr>{rows}</table>")
    if keys:  # the table holds several scoring keys: all of them side by side
        names = [n for n in metrics.SCORES if any(n in row for row in keys)]
        head = "".join(f"<th>{esc(c)}</th>" for c in ("mapping", "steps", "λ", "z_lr", "model"))
        head += "".join(f"<th>AUC {esc(n)}</th>" for n in names)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{esc(str(row[c]))}</td>" for c in ("mapping", "steps", "lambda", "z_lr")
            )
            + f"<td>{esc(row['model_id'][:8])}</td>"
            + "".join(f"<td>{row.get(n, float('nan')):.4f}</td>" for n in names)
            + "</tr>"
            for row in keys
        )
        parts.append(
            f"<h2>Every scoring key of the table, split {esc(split)}</h2>"
            f"<table><tr>{head}</tr>{body}</table>"
        )
    if sweep:
        parts.append(_sweep_html(sweep))
    for name, url in images.items():
        file_name = url.rstrip("/").rsplit("/", 1)[-1]
        parts.append(
            f"<figure><img src='{esc(file_name)}' alt='{esc(name)}'>"
            f"<figcaption>{esc(captions.get(name, name))}</figcaption></figure>"
        )
    if skipped:
        parts.append("<h2>Skipped</h2><ul>")
        parts += [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in skipped.items()]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _sweep_html(sweep: dict[str, Any]) -> str:
    """The leaderboard of the sweep that chose this model (``tune``'s ``sweep.json``): every
    objective side by side, and where ``val`` was labelled how well each label-free one agreed."""
    esc = html.escape

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else esc(str(value))

    board = sweep.get("leaderboard") or []
    columns = list(board[0]) if board else []
    parts = [
        f"<h2>The sweep that chose this model: {sweep['trials']} trials, ranked by "
        f"{esc(sweep['objective'])} ({esc(sweep.get('objective_description', ''))})</h2>",
        "<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>",
        *("<tr>" + "".join(f"<td>{cell(row[c])}</td>" for c in columns) + "</tr>" for row in board),
        "</table>",
    ]
    agreement = sweep.get("agreement")
    if agreement:
        parts.append(
            "<p>How each label-free objective ranked these trials against the labelled val AUC "
            f"(best {agreement['best_val_auc']:.4f}): Spearman over the trials' last epochs with "
            "a bootstrap 95 % interval, and the regret (best labelled AUC minus that of the "
            "trial the objective ranks first).</p><table><tr><th>objective</th><th>Spearman</th>"
            "<th>95 % interval</th><th>regret</th><th>picks</th></tr>"
        )
        for name, row in agreement["objectives"].items():
            low, high = row["spearman_ci95"]
            interval = "" if low is None else f"[{low:.2f}, {high:.2f}]"
            parts.append(
                f"<tr><td>{esc(name)}</td><td>{cell(row['spearman'])}</td><td>{interval}</td>"
                f"<td>{cell(row['regret'])}</td><td>{cell(row['picked_trial'])}</td></tr>"
            )
        parts.append("</table>")
    return "\n".join(parts)
