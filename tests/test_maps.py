"""Anomaly maps: stitching onto the flattened frame, the map table (exactly once), pixel metrics."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anogan_ray import storage, tables
from anogan_ray.analysis.pixels import evaluate_pixels
from anogan_ray.config import ScoreConfig
from anogan_ray.core import metrics
from anogan_ray.core.maps import reconstructions, residual_maps, stitch
from anogan_ray.data import phantom, retina
from anogan_ray.data.masks import frame_masks
from anogan_ray.data.volumes import read_manifest
from anogan_ray.pipelines import maps as maps_pass
from anogan_ray.pipelines.maps import write_maps
from anogan_ray.pipelines.preprocess import preprocess
from anogan_ray.pipelines.score import score, scoring_key

LESION_VALUE = 128  # the painted lesion's gray value (uint8): mid-range, so percentiles keep


def _paint_lesion(volume: phantom.PhantomVolume, bscan: int) -> tuple[np.ndarray, np.ndarray]:
    """The volume with a 7 x 11 px square of LESION_VALUE in the middle of the ONL of one B-scan
    (away from the ILM and BM that flattening follows), and its mask."""
    image, mask = volume.image.copy(), np.zeros_like(volume.image)
    column = image.shape[2] // 3
    onl_top, onl_bottom = volume.layers[bscan, 5, column], volume.layers[bscan, 6, column]
    row = int(round((onl_top + onl_bottom) / 2))
    image[bscan, row - 3 : row + 4, column - 5 : column + 6] = LESION_VALUE
    mask[bscan, row - 3 : row + 4, column - 5 : column + 6] = 1
    return image, mask


@pytest.fixture(scope="module")
def cohort(ray_local, tmp_path_factory, tiny_config):
    """The tiny phantom plus a healthy test volume's twin with one painted lesion, preprocessed."""
    root = tmp_path_factory.mktemp("maps")
    folder = str(root / "cohort")
    phantom.write_cohort(tiny_config.phantom, folder)
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    healthy = next(r for r in rows if r["split"] == "test" and r["label"] == "0")
    index = int(healthy["subject_id"][1:])
    volume = phantom.generate_volume(tiny_config.phantom, index, 0, pathological=False)
    assert np.array_equal(volume.image, np.load(os.path.join(folder, healthy["path"])))
    image, mask = _paint_lesion(volume, bscan=1)
    np.save(os.path.join(folder, "volumes", "twin.npy"), image)
    np.save(os.path.join(folder, "masks", "twin.npy"), mask)
    twin = {**healthy, "subject_id": "twin", "volume_id": "twin", "path": "volumes/twin.npy"}
    rows.append({**twin, "label": "1", "mask_path": "masks/twin.npy"})
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stage = str(root / "preprocess")
    preprocess(manifest, stage, tiny_config.preprocess)
    return {
        "root": root,
        "manifest": manifest,
        "preprocess": stage,
        "patches": os.path.join(stage, "patches"),
        "twin_of": healthy["volume_id"],
        "cfg": tiny_config,
    }


def _patch_rows(stage: str, volume_id: str) -> tuple[dict, np.ndarray]:
    dataset = tables.open_dataset(tables.patch_table_url(stage), what="patch table")
    table = dataset.to_table(filter=pads.field("volume_id") == volume_id)
    pixels = tables.pixels_from_column(table["pixels"])
    return table.drop(["pixels"]).to_pydict(), pixels


def _frame_image(record: dict, geometry: dict, cfg) -> dict[int, np.ndarray]:
    """The flattened, resampled frame of each B-scan, computed from the volume file directly."""
    image = retina.normalize_volume(np.load(record["path"]))
    image = retina.resample_x(image, record["spacing_x_um"], cfg.preprocess.target_spacing_um)
    return {b: retina.flatten(image[b], np.asarray(g["shift"])) for b, g in geometry.items()}


# ---------------------------------------------------------------------------------------------
# Stitching and the frame
# ---------------------------------------------------------------------------------------------


def test_stitch_averages_or_takes_the_max_where_patches_overlap():
    patches = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]).astype(np.float32)
    mean = stitch(patches, [10, 10], [0, 2], "mean")
    assert (mean.top, mean.left, mean.values.shape, mean.patches) == (10, 0, (4, 6), 2)
    assert np.array_equal(mean.values[0], [1, 1, 2, 2, 3, 3])
    maximum = stitch(patches, [10, 10], [0, 2], "max")
    assert np.array_equal(maximum.values[0], [1, 1, 3, 3, 3, 3])
    apart = stitch(patches, [0, 4], [0, 4])  # a gap no patch covers stays NaN
    assert np.isnan(apart.values[0, 4:]).all() and np.isnan(apart.values[4:, :4]).all()


def test_masks_and_patches_share_the_flattened_frame_pixel_for_pixel(cohort):
    """Every patch's annotated share equals its window of the frame mask, and the patches
    stitched back are the volume normalized, resampled and flattened independently."""
    records = {r["volume_id"]: r for r in read_manifest(cohort["manifest"]).to_dict("records")}
    geometry_folder = tables.geometry_url(cohort["patches"])
    checked = 0
    for volume_id, record in records.items():
        if record["split"] == "train":
            continue
        geometry = tables.read_geometry(geometry_folder, volume_id)
        masks = frame_masks(record, geometry)
        frames = _frame_image(record, geometry, cohort["cfg"])
        rows, pixels = _patch_rows(cohort["preprocess"], volume_id)
        for b in geometry:
            mine = np.asarray(rows["bscan"]) == b
            ys, xs = np.asarray(rows["y"])[mine], np.asarray(rows["x"])[mine]
            stitched = stitch(pixels[mine].astype(np.float32), ys, xs)
            region = frames[b][stitched.top : stitched.top + stitched.values.shape[0]]
            assert np.array_equal(stitched.values, tables.encode_pixels(region))
            fractions = np.asarray(rows["anomaly_fraction"])[mine]
            for y, x, fraction in zip(ys, xs, fractions, strict=True):
                window = masks[b][y : y + 64, x : x + 64] != 0
                assert np.float32(window.mean()) == fraction
                checked += 1
    assert checked > 100


def test_a_painted_lesions_residual_lands_on_its_mask(cohort):
    """The twin differs from its healthy original only by a painted square: their patches'
    difference, stitched, is nonzero where the frame mask is and within the resampling's reach
    around it, and centred on it (no pixel offset through resampling and flattening)."""
    geometry_folder = tables.geometry_url(cohort["patches"])
    original = tables.read_geometry(geometry_folder, cohort["twin_of"])
    twin = tables.read_geometry(geometry_folder, "twin")
    for b in twin:  # the lesion did not move the segmentation: the same frame
        assert twin[b]["shift"] == original[b]["shift"]
    record = next(
        r for r in read_manifest(cohort["manifest"]).to_dict("records") if r["volume_id"] == "twin"
    )
    mask = frame_masks(record, twin)[1]
    rows, lesion_pixels = _patch_rows(cohort["preprocess"], "twin")
    rows_h, healthy_pixels = _patch_rows(cohort["preprocess"], cohort["twin_of"])
    assert [p.split("/", 1)[1] for p in rows["patch_id"]] == [
        p.split("/", 1)[1] for p in rows_h["patch_id"]
    ]
    mine = np.asarray(rows["bscan"]) == 1
    residual = np.abs(
        tables.decode_pixels(lesion_pixels[mine]) - tables.decode_pixels(healthy_pixels[mine])
    )
    stitched = stitch(residual, np.asarray(rows["y"])[mine], np.asarray(rows["x"])[mine])
    frame = np.zeros_like(mask, dtype=np.float32)
    frame[stitched.top : stitched.top + stitched.values.shape[0]] = stitched.values
    lesion = mask != 0
    assert lesion.sum() > 0 and (frame[lesion] > 0.1).all()  # every lesion pixel lights up
    reach = ndimage.binary_dilation(lesion, np.ones((1, 5), bool))  # linear resampling in x
    assert (frame[~reach] == 0).all()  # nothing lights up elsewhere
    centre = np.array(ndimage.center_of_mass(lesion))
    assert np.abs(np.array(ndimage.center_of_mass(frame)) - centre).max() < 0.5
    for b in (0, 2):  # the other B-scans are identical
        other = np.asarray(rows["bscan"]) == b
        assert np.array_equal(lesion_pixels[other], healthy_pixels[other])


# ---------------------------------------------------------------------------------------------
# The map table
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_with_baselines(tmp_path_factory, tiny_bundle, synthetic_patches):
    """The tiny GAN with a PCA fitted on healthy synthetic patches and an untrained aCAE."""
    from anogan_ray.core.baselines import PCABaseline, build_acae
    from anogan_ray.core.model import load_bundle, save_bundle

    plain = load_bundle(tiny_bundle)
    pca = PCABaseline.fit(synthetic_patches(256, seed=3), num_components=8)
    acae, _ = build_acae(plain.model_config, seed=0)
    url = str(tmp_path_factory.mktemp("with_baselines"))
    save_bundle(
        url, plain.generator, plain.discriminator, plain.model_config,
        baselines={"acae": acae.eval(), "pca": pca},
    )  # fmt: skip
    return url


@pytest.fixture(scope="module")
def scored(cohort, bundle_with_baselines, tmp_path_factory):
    """The cohort's val/test patches scored with z kept, and their maps."""
    out = str(tmp_path_factory.mktemp("scored") / "score")
    cfg = ScoreConfig(steps=3, z_lr=0.05, batch_size=64, save_z=True)
    summary = score(cohort["patches"], bundle_with_baselines, out, cfg)
    key = scoring_key(summary["model_id"], dataclasses.replace(cfg))
    maps = write_maps(cohort["patches"], bundle_with_baselines, out, key, cfg)
    return {"out": out, "key": key, "cfg": cfg, "summary": maps}


def test_maps_hold_each_methods_residual_of_every_scored_bscan(
    cohort, scored, bundle_with_baselines
):
    from anogan_ray.core.model import load_bundle

    table, _ = tables.read_maps(scored["out"], scored["key"])
    assert table.schema.names == list(tables.MAP_COLUMNS)
    maps = table.to_pylist()
    scores, _ = tables.read_scores(storage.join(scored["out"], "scores"), scored["key"].row())
    bscans = set(zip(scores["volume_id"], scores["bscan"]))
    assert {(m["volume_id"], m["bscan"], m["method"]) for m in maps} == {
        (v, b, method) for v, b in bscans for method in ("A", "aCAE", "PCA")
    }
    assert len(maps) == 3 * len(bscans) == scored["summary"]["maps_written"]
    # one B-scan recomputed from the patches: the stored map is the stitched |x - x̂|, and the A
    # residual of each patch sums to the R(x) the scorer ranked it by
    bundle = load_bundle(bundle_with_baselines)
    volume_id, bscan = sorted(bscans)[0]
    rows, pixels = _patch_rows(cohort["preprocess"], volume_id)
    mine = np.asarray(rows["bscan"]) == bscan
    ids = list(np.asarray(rows["patch_id"])[mine])
    scored_rows = scores.set_index("patch_id").loc[ids]
    full, _ = tables.read_scores(
        storage.join(scored["out"], "scores"), scored["key"].row(), columns=["patch_id", "z"]
    )
    z = np.stack(full.set_index("patch_id").loc[ids, "z"].to_numpy())
    x = torch.from_numpy(tables.decode_pixels(pixels[mine]))[:, None]
    rebuilt = reconstructions(bundle, x, z)
    residual = residual_maps(bundle, x, z)
    np.testing.assert_allclose(residual["A"].sum((1, 2)), scored_rows["residual_score"], rtol=1e-4)
    np.testing.assert_allclose(residual["PCA"].sum((1, 2)), scored_rows["pca_score"], rtol=1e-4)
    geometry = tables.read_geometry(tables.geometry_url(cohort["patches"]), volume_id)[bscan]
    for m in maps:
        if (m["volume_id"], m["bscan"]) != (volume_id, bscan):
            continue
        ys, xs = np.asarray(rows["y"])[mine], np.asarray(rows["x"])[mine]
        expected = stitch(residual[m["method"]], ys, xs)
        stored = tables.decode_map(m["residual"], m["height"], m["width"])
        assert (m["top"], m["left"]) == (expected.top, expected.left)
        np.testing.assert_allclose(stored, expected.values, rtol=1e-3, atol=1e-4)  # float16
        drawn = tables.decode_reconstruction(m["reconstruction"], m["height"], m["width"])
        expected = stitch(np.clip(rebuilt[m["method"]], -1, 1), ys, xs)
        np.testing.assert_allclose(drawn, expected.values, atol=0.5 / 127.5 + 1e-6)  # uint8
        assert m["shift"] == geometry["shift"] and m["frame_width"] == len(geometry["shift"])
        assert m["x_scale"] == geometry["x_scale"] and m["combine"] == "mean"


def test_a_rerun_draws_nothing_and_another_key_stays_apart(cohort, scored, bundle_with_baselines):
    again = write_maps(
        cohort["patches"], bundle_with_baselines, scored["out"], scored["key"], scored["cfg"]
    )
    assert again["bscans_written"] == 0
    assert again["bscans_already_drawn"] == scored["summary"]["bscans_written"]
    with pytest.raises(ValueError, match="no z column|scored by"):
        other = dataclasses.replace(scored["key"], model_id="someone-else")
        write_maps(cohort["patches"], bundle_with_baselines, scored["out"], other, scored["cfg"])


def test_maps_without_stored_z_are_refused_with_the_reason(cohort, bundle_with_baselines, tmp_path):
    out = str(tmp_path / "score")
    cfg = ScoreConfig(steps=1, z_lr=0.05, batch_size=64, splits=["val"])
    summary = score(cohort["patches"], bundle_with_baselines, out, cfg)
    key = scoring_key(summary["model_id"], cfg)
    with pytest.raises(tables.TableError, match="save_z"):
        write_maps(cohort["patches"], bundle_with_baselines, out, key, cfg)


def test_killed_map_pass_resumes_and_writes_every_map_exactly_once(
    ray_local, tmp_path, tiny_bundle, write_patch_table, synthetic_patches, caplog, monkeypatch
):
    patches = str(tmp_path / "patches")
    n = 8 * 120  # 120 B-scans of 8 patches
    write_patch_table(patches, {"test": synthetic_patches(n, seed=40)})
    out = str(tmp_path / "score")
    cfg = ScoreConfig(steps=1, z_lr=0.05, batch_size=64, save_z=True, splits=["test"])
    summary = score(patches, tiny_bundle, out, cfg)
    key = scoring_key(summary["model_id"], cfg)
    code = (
        "from anogan_ray.config import ScoreConfig; from anogan_ray.tables import ScoringKey; "
        "from anogan_ray.pipelines.maps import write_maps; "
        f"write_maps({patches!r}, {tiny_bundle!r}, {out!r}, ScoringKey(*{tuple(key.row().values())!r}), "
        f"ScoreConfig(splits=['test']), bscans_per_task=2)"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    maps = tmp_path / "score" / "maps"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if len(list(maps.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert job.poll() is None, "the map pass finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # a real kill, mid-run
    job.wait()
    written = len(list(maps.glob("*.parquet")))
    assert 3 <= written < 60

    monkeypatch.setattr(maps_pass, "PROGRESS_EVERY_S", 0.2)
    caplog.set_level(logging.INFO, logger="anogan_ray")
    resumed = write_maps(patches, tiny_bundle, out, key, cfg, bscans_per_task=2)
    table, _ = tables.read_maps(out, key, columns=["volume_id", "bscan", "method"])
    ids = list(zip(*(table[c].to_pylist() for c in ("volume_id", "bscan", "method"))))
    assert len(ids) == len(set(ids)) == 120  # every B-scan's map (A only: no baselines), once
    assert 0 < resumed["bscans_written"] < 120
    assert resumed["bscans_already_drawn"] + resumed["bscans_written"] == 120
    assert not (tmp_path / "score" / "_staging_maps").exists()
    # progress: "drew the maps of 40 / 97 B-scans (41.2 %), 6.1 B-scans/s, about 9 s left"
    left = resumed["bscans_written"]
    pattern = re.compile(rf"drew the maps of (\d+) / {left} B-scans .*B-scans/s, about .+ left")
    counts = [int(m.group(1)) for r in caplog.records if (m := pattern.fullmatch(r.getMessage()))]
    assert counts and counts == sorted(counts) and counts[-1] < left


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------


def _brute_aupro(maps: list[np.ndarray], lesions: list[np.ndarray], max_fpr: float = 0.3):
    """MVTec AD's AUPRO written out: FPR and PRO (the mean over connected lesion regions of
    each map of the share of the region's pixels scoring >= t) at every distinct score t, then
    trapezoids up to ``max_fpr`` (interpolated there), divided by ``max_fpr``."""
    regions = []
    for values, lesion in zip(maps, lesions, strict=True):
        labels, count = ndimage.label(lesion, structure=np.ones((3, 3)))
        regions += [values[labels == k] for k in range(1, count + 1)]
    healthy = np.concatenate([v[~les] for v, les in zip(maps, lesions, strict=True)])
    fpr, pro = [0.0], [0.0]
    for t in np.unique(np.concatenate([v.ravel() for v in maps]))[::-1]:
        fpr.append(float(np.mean(healthy >= t)))
        pro.append(float(np.mean([np.mean(region >= t) for region in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    i = int(np.argmax(fpr > max_fpr))  # the first point beyond max_fpr
    at = pro[i - 1] + (pro[i] - pro[i - 1]) * (max_fpr - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
    xs, ys = np.append(fpr[:i], max_fpr), np.append(pro[:i], at)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / max_fpr)


def test_pixel_auroc_and_aupro_equal_a_brute_force_computation():
    rng = np.random.default_rng(0)
    maps, masks = [], []
    for _ in range(3):
        mask = np.zeros((30, 40), np.uint8)
        mask[3:8, 4:12] = 1
        mask[15 + rng.integers(0, 5) : 22, 30:33] = 3
        mask[26:28, 1:3] = 1
        values = rng.random((30, 40)) + 0.6 * (mask > 0) * rng.random((30, 40))
        maps.append(values.astype(np.float16).astype(np.float32))  # the table's precision
        masks.append(mask)
    counts = metrics.PixelCounts(threshold=0.9)
    for values, mask in zip(maps, masks, strict=True):
        counts.add(values, mask, {1: "fluid", 3: "foci"})
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_lesion = np.concatenate([m.ravel() != 0 for m in masks])
    assert counts.auroc() == pytest.approx(roc_auc_score(flat_lesion, flat_scores), abs=1e-12)
    lesions = [m != 0 for m in masks]
    assert counts.aupro() == pytest.approx(_brute_aupro(maps, lesions), abs=1e-12)
    # regions of a type, and the detection rate at the threshold
    foci = [(m == 3) for m in masks]
    overlaps = [np.mean(v[f] > 0.9) for v, f in zip(maps, foci, strict=True)]
    summary = counts.summary("foci")
    assert summary["regions"] == 3
    assert summary["regions_detected"] == sum(o >= 0.3 for o in overlaps)
    # a healthy percentile as numpy's inverted CDF on the healthy pixels
    healthy = flat_scores[~flat_lesion]
    assert counts.healthy_percentile(95) == np.percentile(healthy, 95, method="inverted_cdf")


def test_pixel_evaluation_of_the_map_table_equals_all_pixels_at_once(cohort, scored, tmp_path):
    """evaluate --level pixel streams the maps and counts them in histograms; the result is the
    AUROC of every annotated pixel held at once, and the CLI prints and writes it."""
    from anogan_ray.cli import main

    result = evaluate_pixels(
        scored["out"], cohort["manifest"], key=scored["key"], splits=["val", "test"]
    )
    assert set(result["methods"]) == {"A", "aCAE", "PCA"}
    assert result["bscans"] == 5 * 3 and result["bscans_without_annotation"] == 0
    records = {r["volume_id"]: r for r in read_manifest(cohort["manifest"]).to_dict("records")}
    table, _ = tables.read_maps(scored["out"], scored["key"])
    for method, row in result["methods"].items():
        values, lesion = [], []
        for m in table.to_pylist():
            if m["method"] != method:
                continue
            frame = frame_masks(records[m["volume_id"]], {m["bscan"]: m})[m["bscan"]]
            region = frame[m["top"] : m["top"] + m["height"], m["left"] : m["left"] + m["width"]]
            values.append(tables.decode_map(m["residual"], m["height"], m["width"]).ravel())
            lesion.append(region.ravel() != 0)
        values, lesion = np.concatenate(values), np.concatenate(lesion)
        assert row["auroc"] == pytest.approx(roc_auc_score(lesion, values), abs=1e-12)
        assert row["pixels"] == lesion.sum() and row["healthy_pixels"] == (~lesion).sum()
        assert 0 <= row["aupro"] <= 1 and 0 <= row["detection_rate"] <= 1
        assert row["healthy_fpr"] <= 0.05  # calibrated at the 99th percentile of val's pixels
    processed = evaluate_pixels(
        scored["out"], cohort["manifest"], key=scored["key"], splits=["test"],
        standardize=True, smooth_sigma=2.0,
    )  # fmt: skip
    assert processed["standardize"] and set(processed["methods"]) == set(result["methods"])
    assert all(0 <= row["auroc"] <= 1 for row in processed["methods"].values())
    by_type = result["methods"]["A"]["by_type"]
    assert {"intraretinal_fluid", "drusen"} <= set(by_type) | {"foci", "subretinal_fluid"}
    assert all(name in phantom.PATHOLOGY_CODES for name in by_type)

    path = tmp_path / "pixel.json"
    code = main(
        ["evaluate", "--scores", storage.join(scored["out"], "scores"), "--level", "pixel",
         "--manifest", cohort["manifest"], "--split", "val,test", "--json", str(path)]
    )  # fmt: skip
    assert code == 0
    written = json.loads(path.read_text())
    assert written["methods"]["PCA"]["auroc"] == pytest.approx(result["methods"]["PCA"]["auroc"])
    assert main(["evaluate", "--scores", storage.join(scored["out"], "scores"), "--level",
                 "pixel"]) == 2  # fmt: skip


def test_report_shows_where_with_every_methods_maps(
    cohort, scored, bundle_with_baselines, tmp_path
):
    from PIL import Image

    from anogan_ray.analysis.report import report

    result = report(
        storage.join(scored["out"], "scores"), str(tmp_path / "report"), patches=cohort["patches"],
        model=bundle_with_baselines, manifest=cohort["manifest"], bscans=2, top_k=2, volumes=1,
        embed_patches=40, marker_patches=20, clusters=2,
    )  # fmt: skip
    where = [name for name in result["images"] if name.startswith("where_")]
    assert len(where) == 2
    for name in where:
        with Image.open(result["images"][name]) as image:  # A, aCAE, PCA side by side
            assert image.size[0] > image.size[1]
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_healthy_standardization_scores_a_residual_by_its_gray_values_noise():
    """Bright tissue is noisier: after standardization a dark pixel's moderate residual ranks
    above a bright pixel's ordinary one, and healthy pixels get standard scores."""
    from anogan_ray.core.maps import HealthyNoise

    rng = np.random.default_rng(1)

    def healthy_bscan() -> tuple[np.ndarray, np.ndarray]:
        """Bands of 12 rows of one gray value each; residual noise growing with brightness."""
        gray = np.repeat(rng.uniform(-1, 1, 40), 12)[:, None] * np.ones((1, 200))
        return np.abs(rng.normal(0, 0.02 + 0.2 * (gray + 1) / 2)), gray

    noise = HealthyNoise()
    for _ in range(20):
        noise.add(*healthy_bscan())
    noise.fit()
    residual, gray = healthy_bscan()
    inside = (np.arange(480) % 12 > 2) & (np.arange(480) % 12 < 9)  # away from band edges
    scores = noise.standardize(residual, gray)[inside]
    assert abs(scores.mean()) < 0.05 and abs(scores.std() - 1) < 0.1
    dark, bright = np.full((40, 40), -0.9), np.full((40, 40), 0.9)
    lesion, ordinary = np.full((40, 40), 0.15), np.full((40, 40), 0.2)
    assert noise.standardize(lesion, dark)[20, 20] > noise.standardize(ordinary, bright)[20, 20]
