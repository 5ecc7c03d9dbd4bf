"""The synthetic OCT cohort: masks say what was drawn, the same seed writes the same bytes."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os

import numpy as np
import pytest

from anogan_ray import storage
from anogan_ray.config import PhantomConfig, load_config
from anogan_ray.data import volumes
from anogan_ray.data.phantom import (
    LAYER_NAMES,
    MANIFEST_COLUMNS,
    PATHOLOGY_CODES,
    assign_splits,
    generate_volume,
    load_boundaries,
    render_bscan_overlay,
    write_cohort,
)


@pytest.fixture(scope="module")
def tiny_phantom() -> PhantomConfig:
    return load_config("tiny").phantom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_phantom) -> tuple[str, dict]:
    """The tiny cohort written once to a local folder: (folder, summary)."""
    out = str(tmp_path_factory.mktemp("cohort"))
    return out, write_cohort(tiny_phantom, out)


def _manifest(out: str) -> list[dict[str, str]]:
    text = storage.read_bytes(storage.join(out, "manifest.csv")).decode()
    return list(csv.DictReader(io.StringIO(text)))


def _npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)


def _file_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder`` but summary.json (which records the seconds)."""
    hashes = {}
    for url in storage.list_files(folder):
        name = os.path.relpath(url, folder)
        if name != "summary.json":
            hashes[name] = hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return hashes


def _rows_grid(volume: np.ndarray) -> np.ndarray:
    return np.arange(volume.shape[1])[None, :, None]  # broadcasts against (n, height, width)


# --- the manifest and the splits ------------------------------------------------------------


def test_manifest_has_the_contract_columns_and_subject_splits(cohort, tiny_phantom):
    out, summary = cohort
    rows = _manifest(out)
    with storage.open_file(storage.join(out, "manifest.csv"), "r") as f:
        assert tuple(f.readline().strip().split(",")) == MANIFEST_COLUMNS
    n_subjects = tiny_phantom.healthy_subjects + tiny_phantom.pathological_subjects
    assert len(rows) == n_subjects * tiny_phantom.volumes_per_subject
    assert len({r["volume_id"] for r in rows}) == len(rows)

    split_of_subject: dict[str, set[str]] = {}
    for r in rows:
        split_of_subject.setdefault(r["subject_id"], set()).add(r["split"])
        assert r["modality"] == "oct"
        assert float(r["spacing_x_um"]) == tiny_phantom.spacing_x_um
        assert not os.path.isabs(r["path"]) and not os.path.isabs(r["mask_path"])
        assert os.path.isfile(os.path.join(out, r["path"]))
        assert os.path.isfile(os.path.join(out, r["mask_path"]))
        assert os.path.isfile(os.path.join(out, "boundaries", f"{r['volume_id']}.npz"))
    assert all(len(s) == 1 for s in split_of_subject.values()), "a subject spans two splits"

    labels = {
        s: {int(r["label"]) for r in rows if r["split"] == s} for s in ("train", "val", "test")
    }
    assert labels == {"train": {0}, "val": {0}, "test": {0, 1}}
    assert summary["counts"]["volumes"]["test"] == {"healthy": 1, "pathological": 2}
    assert summary["volumes"] == len(rows)

    frame = volumes.read_manifest(storage.join(out, "manifest.csv"))
    assert list(frame["volume_id"]) == [r["volume_id"] for r in rows]
    assert all(os.path.isfile(p) for p in frame["path"])


@pytest.mark.parametrize(
    ("healthy", "pathological", "expected"),
    [
        (3, 2, {"train": 1, "val": 1, "test": 1}),  # tiny: every split non-empty
        (8, 4, {"train": 4, "val": 2, "test": 2}),  # demo
        (2, 4, {"train": 1, "val": 0, "test": 1}),  # too few healthy: train, then test first
        (1, 2, {"train": 1, "val": 0, "test": 0}),
    ],
)
def test_healthy_subjects_are_split_train_first_then_test_then_val(healthy, pathological, expected):
    cfg = PhantomConfig(healthy_subjects=healthy, pathological_subjects=pathological)
    subjects = assign_splits(cfg)
    counted = {s: sum(1 for _, label, sp in subjects if sp == s and label == 0) for s in expected}
    assert counted == expected
    assert all(split == "test" for _, label, split in subjects if label == 1)
    assert sum(label for _, label, _ in subjects) == pathological


# --- what is drawn is what the masks and boundaries say ------------------------------------


def test_fluid_is_dark_and_foci_bright_where_the_masks_say(cohort):
    out, _ = cohort
    pathological = [r for r in _manifest(out) if r["label"] == "1"]
    assert pathological
    for r in pathological:
        volume = _npy(os.path.join(out, r["path"])).astype(np.float64)
        mask = _npy(os.path.join(out, r["mask_path"]))
        bounds = load_boundaries(os.path.join(out, "boundaries", f"{r['volume_id']}.npz"))
        rows = _rows_grid(volume)
        retina = (rows >= bounds["ilm"][:, None, :]) & (rows < bounds["bm"][:, None, :])
        retina_mean = volume[retina & (mask == 0)].mean()
        for fluid in ("intraretinal_fluid", "subretinal_fluid"):
            assert volume[mask == PATHOLOGY_CODES[fluid]].mean() < 0.3 * retina_mean, fluid
        foci = mask == PATHOLOGY_CODES["foci"]
        assert volume[foci].mean() > 1.6 * retina_mean
        # and brighter than the few pixels right around each focus
        ring = np.zeros_like(foci)
        for b in range(len(mask)):
            grown = foci[b]
            for _ in range(3):
                grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
                grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            ring[b] = grown & ~foci[b] & (mask[b] == 0)
        assert volume[foci].mean() > volume[ring].mean() + 60


def test_healthy_masks_are_empty_and_each_requested_pathology_is_drawn(cohort):
    out, summary = cohort
    for r in _manifest(out):
        mask = _npy(os.path.join(out, r["mask_path"]))
        volume = _npy(os.path.join(out, r["path"]))
        assert mask.shape == volume.shape and mask.dtype == volume.dtype == np.uint8
        codes = set(np.unique(mask)) - {0}
        if r["label"] == "0":
            assert codes == set()
        else:
            assert codes == set(PATHOLOGY_CODES.values())
            lesion_bscans = mask.reshape(len(mask), -1).any(1)
            assert lesion_bscans.mean() > 0.5, "lesions should be in most B-scans"
    assert all(count > 0 for count in summary["pathology_pixels"].values())


def test_only_the_configured_pathologies_are_drawn():
    cfg = dataclasses.replace(
        load_config("tiny").phantom, bscans_per_volume=2, pathologies=["foci", "drusen"]
    )
    volume = generate_volume(cfg, subject_index=4, pathological=True)
    assert set(np.unique(volume.mask)) == {0, PATHOLOGY_CODES["foci"], PATHOLOGY_CODES["drusen"]}


def test_boundaries_lie_inside_the_image_in_order_and_lesions_where_anatomy_puts_them(cohort):
    out, _ = cohort
    for r in _manifest(out):
        volume = _npy(os.path.join(out, r["path"]))
        mask = _npy(os.path.join(out, r["mask_path"]))
        bounds = load_boundaries(os.path.join(out, "boundaries", f"{r['volume_id']}.npz"))
        n, height, width = volume.shape
        layers, ilm, bm = bounds["layers"], bounds["ilm"], bounds["bm"]
        assert layers.shape == (n, len(LAYER_NAMES) + 1, width) and layers.dtype == np.float32
        assert ilm.shape == bm.shape == (n, width)
        np.testing.assert_array_equal(layers[:, 0], ilm)
        np.testing.assert_array_equal(layers[:, -1], bm)
        assert ilm.min() >= 0 and bm.max() <= height - 1
        assert (np.diff(layers, axis=1) >= 0).all(), "interfaces out of order"
        assert (bm - ilm > 20).all()

        b, z, x = np.nonzero(mask)
        codes = mask[b, z, x]
        rpe_top, ez_os = layers[b, -2, x], layers[b, -3, x]
        drusen = codes == PATHOLOGY_CODES["drusen"]  # under the lifted RPE, above Bruch's
        assert ((z[drusen] >= rpe_top[drusen]) & (z[drusen] < bm[b, x][drusen])).all()
        srf = codes == PATHOLOGY_CODES["subretinal_fluid"]  # between photoreceptors and RPE
        assert ((z[srf] >= ez_os[srf]) & (z[srf] < rpe_top[srf])).all()
        inner = (codes == PATHOLOGY_CODES["intraretinal_fluid"]) | (
            codes == PATHOLOGY_CODES["foci"]
        )  # inside the neurosensory retina
        assert ((z[inner] > ilm[b, x][inner]) & (z[inner] < ez_os[inner])).all()


def test_the_smallest_frame_still_holds_ordered_boundaries():
    cfg = dataclasses.replace(
        load_config("tiny").phantom, height=128, width=64, pathology_burden=3.0
    )
    for subject in range(3):
        volume = generate_volume(cfg, subject_index=subject, pathological=True)
        assert volume.ilm.min() >= 0 and volume.bm.max() <= cfg.height - 1
        assert (np.diff(volume.layers, axis=1) >= 0).all()
        assert (volume.mask > 0).any()


def test_a_vessel_at_the_frame_edge_is_clipped_not_an_error():
    # subject 24 of a seed-1 demo cohort has a vessel centred beyond the last A-scan, whose
    # bounding box once came out with a negative width ("negative dimensions are not allowed")
    cfg = dataclasses.replace(load_config("demo").phantom, seed=1)
    volume = generate_volume(cfg, subject_index=24)
    assert volume.image.shape[:2] == (cfg.bscans_per_volume, cfg.height)
    assert not volume.mask.any()  # a healthy subject


@pytest.mark.parametrize(("height", "min_thickness"), [(256, 70), (496, 80)])
def test_healthy_retina_holds_a_64_pixel_patch(height, min_thickness):
    cfg = dataclasses.replace(load_config("tiny").phantom, height=height, bscans_per_volume=3)
    for subject in range(3):
        volume = generate_volume(cfg, subject_index=subject)
        thickness = volume.bm - volume.ilm
        # the outer B-scans miss the fovea: thick enough for patches centred in the retina
        assert np.median(thickness[[0, -1]], axis=1).min() >= min_thickness
        assert np.median(thickness[1]) < np.median(thickness[[0, -1]]), "no foveal pit"


# --- determinism and formats ----------------------------------------------------------------


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(cohort, tmp_path, tiny_phantom):
    out, _ = cohort
    again = str(tmp_path / "again")
    write_cohort(tiny_phantom, again)
    assert _file_hashes(again) == _file_hashes(out)

    other = str(tmp_path / "other")
    write_cohort(dataclasses.replace(tiny_phantom, seed=1), other)
    first, second = _file_hashes(out), _file_hashes(other)
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first if k.startswith("volumes/"))


def test_cohort_on_s3_matches_the_local_one(cohort, bucket, tiny_phantom):
    out, _ = cohort
    remote = f"{bucket}/cohort"
    summary = write_cohort(tiny_phantom, remote)
    assert storage.read_bytes(f"{remote}/manifest.csv") == storage.read_bytes(
        os.path.join(out, "manifest.csv")
    )
    for r in _manifest(remote):
        np.testing.assert_array_equal(
            _npy(storage.resolve(r["path"], remote)), _npy(os.path.join(out, r["path"]))
        )
    assert storage.read_json(f"{remote}/summary.json")["counts"] == summary["counts"]


def test_tiff_volumes_and_png_bscans_hold_the_same_pixels(cohort, tmp_path, tiny_phantom):
    import tifffile
    from PIL import Image

    out, _ = cohort
    tiff_cfg = dataclasses.replace(tiny_phantom, volume_format="tiff", write_png_bscans=True)
    tiff_out = str(tmp_path / "tiff")
    write_cohort(tiff_cfg, tiff_out)
    for local, r in zip(_manifest(out), _manifest(tiff_out)):
        assert r["path"] == f"volumes/{r['volume_id']}.tif"
        expected = _npy(os.path.join(out, local["path"]))
        np.testing.assert_array_equal(tifffile.imread(os.path.join(tiff_out, r["path"])), expected)
        np.testing.assert_array_equal(
            volumes.read_volume(os.path.join(tiff_out, r["path"])), expected
        )  # the preprocess stage's reader sees the same pages
        pngs = sorted(os.listdir(os.path.join(tiff_out, "bscans", r["volume_id"])))
        assert pngs == [f"{b:03d}.png" for b in range(len(expected))]
        for b, name in enumerate(pngs):
            with Image.open(os.path.join(tiff_out, "bscans", r["volume_id"], name)) as png:
                assert png.mode == "L"
                np.testing.assert_array_equal(np.asarray(png), expected[b])
    again = str(tmp_path / "tiff_again")
    write_cohort(tiff_cfg, again)
    assert _file_hashes(again) == _file_hashes(tiff_out)


# --- the overlay ----------------------------------------------------------------------------


def test_overlay_tints_only_masked_pixels():
    bscan = np.full((40, 50), 100, dtype=np.uint8)
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[10:20, 10:20] = PATHOLOGY_CODES["intraretinal_fluid"]
    mask[25:30, 30:35] = PATHOLOGY_CODES["foci"]
    rgb = render_bscan_overlay(bscan, mask)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert (rgb[mask == 0] == 100).all()
    assert (rgb[15, 15] != 100).any() and not (rgb[15, 15] == rgb[15, 15][0]).all()
    assert not np.array_equal(rgb[15, 15], rgb[27, 32])  # each pathology its own colour
    with pytest.raises(ValueError, match="same shape"):
        render_bscan_overlay(bscan, mask[:, :10])
