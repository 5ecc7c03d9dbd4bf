"""`anogan-ray manifest`: a folder of scans (vendor files written by the tests, a class-folder
image set, a bucket) becomes a manifest that preprocess accepts, with what was skipped and why."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anogan_ray import storage
from anogan_ray.cli import main
from anogan_ray.config import PhantomConfig
from anogan_ray.data import phantom, volumes
from anogan_ray.data.manifest import COLUMNS, build_manifest, format_report
from tests.test_vendor import write_dicom, write_heyex_vol, write_retouch


@pytest.fixture(scope="module")
def volume():
    """One small phantom volume (3 B-scans, 128 x 192)."""
    return phantom.generate_volume(
        PhantomConfig(bscans_per_volume=3, height=128, width=192, seed=3), 0
    )


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def vendor_folder(tmp_path, volume):
    """A folder mixing formats, with masks, an unreadable file, a truncated one and a note."""
    root = tmp_path / "cohort"
    root.mkdir()
    write_heyex_vol(str(root / "p01.vol"), volume)
    write_dicom(str(root / "p02.dcm"), volume)
    write_retouch(str(root / "TRAIN001"), volume)
    np.save(root / "p03.npy", volume.image)
    np.save(root / "p03_mask.npy", volume.mask)
    (root / "volumes").mkdir()
    (root / "masks").mkdir()
    np.save(root / "volumes" / "p04.npy", volume.image)  # the phantom's volumes/ + masks/
    np.save(root / "masks" / "p04.npy", volume.mask)
    np.save(root / "masks" / "orphan.npy", volume.mask)
    (root / "broken.vol").write_bytes(b"\x00" * 100)
    (root / "truncated.npy").write_bytes(_npy_bytes(volume.image)[:300])
    (root / "notes.txt").write_text("exported 2020-01-01\n")
    return root


def test_a_folder_of_vendor_files_becomes_a_manifest_preprocess_accepts(vendor_folder):
    out = vendor_folder / "manifest.csv"
    report = build_manifest(str(vendor_folder), str(out))

    frame = volumes.read_manifest(str(out))  # preprocess's reader accepts it
    with open(out) as f:
        assert f.readline().strip() == ",".join(COLUMNS)  # DESIGN.md §3.1's order
    rows = frame.set_index("volume_id")
    assert sorted(rows.index) == ["TRAIN001", "p01", "p02", "p03", "volumes__p04"]
    assert report["formats"] == {"dicom": 1, "heyex-vol": 1, "npy": 2, "retouch": 1}
    # spacing from the files that state it, none for .npy
    for volume_id in ("p01", "p02", "TRAIN001"):
        assert rows.loc[volume_id, "spacing_x_um"] == pytest.approx(11.5)
    assert np.isnan(rows.loc["p03", "spacing_x_um"])
    assert report["spacing"] == {"file": 3, "given": 0, "missing": 2}
    assert any("2 oct volume(s) without spacing_x_um" in w for w in report["warnings"])
    # paths relative to the manifest's folder; the RETOUCH case is its folder
    raw = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("volume_id")
    assert raw.loc["p01", "path"] == "p01.vol" and raw.loc["TRAIN001", "path"] == "TRAIN001"
    assert raw.loc["p03", "mask_path"] == "p03_mask.npy"
    assert raw.loc["volumes__p04", "mask_path"] == "masks/p04.npy"
    assert rows.loc["p03", "mask_path"] == str(vendor_folder / "p03_mask.npy")
    assert raw.loc["p01", "mask_path"] == "" and report["masks"] == 2
    assert set(frame["modality"]) == {"oct"} and frame["label"].isna().all()

    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == {"broken.vol", "truncated.npy", "masks/orphan.npy"}
    assert skipped["broken.vol"].startswith("not readable as a HEYEX VOL file")
    assert skipped["truncated.npy"].startswith("unreadable or truncated file")
    assert "belongs to no scan" in skipped["masks/orphan.npy"]
    assert report["ignored"] == {".txt": 1}  # RETOUCH's .raw / reference files belong to it

    text = format_report(report)
    assert "broken.vol: not readable as a HEYEX VOL file" in text
    assert "formats: dicom=1, heyex-vol=1, npy=2, retouch=1" in text

    # a spacing given for the files that state none; the files' own spacing stays
    report = build_manifest(str(vendor_folder), str(out), spacing_x_um=12.0)
    rows = volumes.read_manifest(str(out)).set_index("volume_id")
    assert rows.loc["p03", "spacing_x_um"] == 12.0
    assert rows.loc["p01", "spacing_x_um"] == pytest.approx(11.5)
    assert report["spacing"] == {"file": 3, "given": 2, "missing": 0}
    assert any("3 file(s) state a spacing more than 1 %" in w for w in report["warnings"])


def _write_class_folders(root) -> None:
    """Kermany's OCT2017 layout: split folders, class folders, CLASS-<patient>-<image>.jpeg."""
    rng = np.random.default_rng(0)
    images = [("train", "NORMAL", s, k) for s in range(11, 21) for k in (1, 2)]
    images += [("train", "DME", s, 1) for s in (12, 21, 22, 23)]  # 12 also has NORMAL images
    images += [("train", "CNV", s, k) for s in (24, 25, 26) for k in (1, 2, 3)]
    images += [("test", "NORMAL", 30, 1), ("test", "CNV", 31, 1), ("train", "DRUSEN", 40, 1)]
    for split, label, subject, k in images:
        path = root / "OCT2017" / split / label / f"{label}-{subject}-{k}.jpeg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(path)


KERMANY = dict(
    pattern=r"(?P<subject>\d+)-\d+\.jpeg$",
    label_from_folder={"NORMAL": 0, "DME": 1, "CNV": 1},
    modality="image",
)


def test_class_folders_give_labels_and_subject_splits_with_healthy_train(tmp_path):
    _write_class_folders(tmp_path)
    out = tmp_path / "a.csv"
    report = build_manifest(str(tmp_path / "OCT2017"), str(out), **KERMANY)
    frame = volumes.read_manifest(str(out))

    assert len(frame) == 20 + 4 + 9 + 2 and report["labels"] == {"0": 21, "1": 14}
    by_folder = frame.assign(folder=frame["path"].str.split("/").str[-2])
    assert (by_folder.groupby("folder")["label"].agg(set).to_dict()
            == {"NORMAL": {0}, "DME": {1}, "CNV": {1}})  # fmt: skip
    assert set(frame.loc[frame["path"].str.contains("NORMAL-12-"), "subject_id"]) == {"12"}
    assert (frame.groupby("subject_id")["split"].nunique() == 1).all()  # one split per subject
    sick = set(frame.loc[frame["label"] == 1, "subject_id"])
    assert "12" in sick and not sick & set(frame.loc[frame["split"] == "train", "subject_id"])
    assert report["subjects_per_split"]["train"] > 0
    assert {s["path"]: s["reason"] for s in report["skipped"]} == {
        "train/DRUSEN/DRUSEN-40-1.jpeg": "under no folder named NORMAL, DME, CNV"
    }
    assert set(frame["modality"]) == {"image"} and report["warnings"] == []

    # the same seed and files give the same manifest, another seed another split
    build_manifest(str(tmp_path / "OCT2017"), str(tmp_path / "b.csv"), **KERMANY)
    assert (tmp_path / "b.csv").read_bytes() == out.read_bytes()
    build_manifest(str(tmp_path / "OCT2017"), str(tmp_path / "c.csv"), seed=1, **KERMANY)
    other = volumes.read_manifest(str(tmp_path / "c.csv"))
    assert other["volume_id"].tolist() == frame["volume_id"].tolist()
    assert other["split"].tolist() != frame["split"].tolist()
    assert not set(other.loc[other["label"] == 1, "subject_id"]) & set(
        other.loc[other["split"] == "train", "subject_id"]
    )


def test_split_folders_decide_only_when_asked(tmp_path):
    _write_class_folders(tmp_path)
    out = tmp_path / "m.parquet"
    report = build_manifest(str(tmp_path / "OCT2017"), str(out), split_from_folder=True, **KERMANY)
    frame = volumes.read_manifest(str(out))
    split_of = dict(zip(frame["path"].str.split("/").str[-1], frame["split"]))
    assert split_of["NORMAL-30-1.jpeg"] == "test" and split_of["CNV-31-1.jpeg"] == "test"
    assert split_of["NORMAL-11-1.jpeg"] == "train"
    # label-1 subjects of the train folder go to val, subject 12's NORMAL images with them
    assert split_of["DME-21-1.jpeg"] == "val" and split_of["NORMAL-12-1.jpeg"] == "val"
    assert any("went to val" in w for w in report["warnings"])


def test_bscan_folders_make_one_volume_per_leaf_folder(tmp_path, volume):
    for name in ("eye1", "eye2"):
        for index, bscan in enumerate(volume.image):
            path = tmp_path / "scans" / name / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(bscan).save(path)
    out = str(tmp_path / "m.csv")
    assert build_manifest(str(tmp_path / "scans"), out)["volumes"] == 6  # one row per image
    report = build_manifest(str(tmp_path / "scans"), out, bscan_folders=True, spacing_x_um=11.5)
    frame = volumes.read_manifest(out)
    assert report["formats"] == {"bscan-folder": 2}
    assert frame["volume_id"].tolist() == ["eye1", "eye2"]
    assert volumes.read_scan(frame["path"][0]).image.shape == volume.image.shape


def test_cli_prints_the_report_and_fails_cleanly_on_an_empty_folder(
    vendor_folder, tmp_path, capsys
):
    out = str(tmp_path / "out" / "manifest.csv")
    assert main(["manifest", "--from", str(vendor_folder), "--out", out, "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 5 volume(s) of 5 subject(s) from {vendor_folder}" in printed
    assert "truncated.npy: unreadable or truncated file" in printed
    assert str(vendor_folder / "p01.vol") in pd.read_csv(out)["path"].tolist()  # outside: absolute

    assert main(["manifest", "--from", str(vendor_folder), "--out", out, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["formats"]["retouch"] == 1 and "skipped: 3" in captured.err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    assert main(["manifest", "--from", str(tmp_path / "empty"), "--out", out]) == 2
    assert (
        f"{tmp_path / 'empty'}: no usable scan found (ignored: .txt=1)" in capsys.readouterr().err
    )
    assert main(["manifest", "--from", str(tmp_path), "--out", out, "--split", "train=2"]) == 2
    assert "sum to 1" in capsys.readouterr().err


def test_a_folder_on_s3_gives_s3_paths(bucket, volume):
    storage.write_bytes(f"{bucket}/cohort/a/eye.npy", _npy_bytes(volume.image))
    storage.write_bytes(f"{bucket}/cohort/a/eye_mask.npy", _npy_bytes(volume.mask))
    storage.write_bytes(f"{bucket}/cohort/b/eye.npy", _npy_bytes(volume.image))
    out = f"{bucket}/manifest.csv"
    report = build_manifest(f"{bucket}/cohort", out, spacing_x_um=11.5)
    frame = volumes.read_manifest(out)
    assert frame["path"].tolist() == [f"{bucket}/cohort/a/eye.npy", f"{bucket}/cohort/b/eye.npy"]
    assert frame["volume_id"].tolist() == ["a__eye", "b__eye"]
    assert frame["mask_path"][0] == f"{bucket}/cohort/a/eye_mask.npy"
    assert pd.isna(frame["mask_path"][1])
    assert report["spacing"] == {"file": 0, "given": 2, "missing": 0}
