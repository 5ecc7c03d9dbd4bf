"""Cohort -> patch table with Ray Data: S3 round trip, bad input, re-runs, file sizes."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anogan_ray import storage
from anogan_ray.config import PreprocessConfig
from anogan_ray.data import phantom
from anogan_ray.data.volumes import ManifestError
from anogan_ray.pipelines.preprocess import preprocess
from anogan_ray.tables import PATCH_COLUMNS, read_patch_table


def _table(url: str, splits: list[str] | None = None) -> pd.DataFrame:
    return read_patch_table(url, splits).drop_columns(["pixels"]).to_pandas()


def _rejects(out: str) -> pd.DataFrame:
    return pq.read_table(
        io.BytesIO(storage.read_bytes(storage.join(out, "rejects", "rejects.parquet")))
    ).to_pandas()


@pytest.fixture(scope="module")
def local_cohort(tmp_path_factory, tiny_config) -> str:
    folder = str(tmp_path_factory.mktemp("cohort"))
    phantom.write_cohort(tiny_config.phantom, folder)
    return folder


def test_cohort_from_s3_to_s3(ray_local, bucket, tiny_config):
    cohort = f"{bucket}/cohort"
    small = dataclasses.replace(
        tiny_config.phantom, healthy_subjects=2, pathological_subjects=1, bscans_per_volume=2
    )  # moto is slow: a train, a healthy test and a pathological test volume
    phantom.write_cohort(small, cohort)
    out = f"{bucket}/stage/preprocess"
    summary = preprocess(f"{cohort}/manifest.csv", out, tiny_config.preprocess)

    manifest = pd.read_csv(io.BytesIO(storage.read_bytes(f"{cohort}/manifest.csv")))
    assert summary["volumes_read"] == len(manifest) and summary["volumes_rejected"] == 0
    table = read_patch_table(out).to_pandas()
    assert len(table) == summary["patches_written"] > 0
    assert table["pixels"].iloc[0].shape == (64, 64)
    assert table["pixels"].iloc[0].dtype == np.uint8
    assert table["patch_id"].is_unique
    assert set(table["volume_id"]) == set(manifest["volume_id"])
    assert list(table.columns) == list(PATCH_COLUMNS)
    # each volume's rows carry its split; training volumes got K patches per B-scan
    splits = dict(zip(manifest["volume_id"], manifest["split"]))
    assert (table["split"] == table["volume_id"].map(splits)).all()
    per_volume = table[table["split"] == "train"].groupby("volume_id").size()
    k, bscans = tiny_config.preprocess.patches_per_bscan, small.bscans_per_volume
    assert (per_volume == k * bscans).all()
    # the pathological test volumes have anomalous patches, the healthy ones none
    labels = dict(zip(manifest["volume_id"], manifest["label"]))
    test = table[table["split"] == "test"]
    anomalous = test.groupby("volume_id")["label"].max()
    assert sorted(anomalous.tolist()) == [0, 1]
    assert all(anomalous[v] == labels[v] for v in anomalous.index)
    assert storage.read_json(f"{out}/summary.json")["patches_written"] == len(table)


def test_bad_inputs_are_rejected_and_the_rest_is_written(
    ray_local, local_cohort, tmp_path, tiny_config
):
    manifest = pd.read_csv(f"{local_cohort}/manifest.csv")
    corrupt, wrong_mask, *good = manifest["volume_id"].tolist()
    folder = tmp_path / "inputs"
    folder.mkdir()
    rows = manifest.copy()
    rows["path"] = [f"{local_cohort}/{p}" for p in rows["path"]]
    rows["mask_path"] = [f"{local_cohort}/{p}" for p in rows["mask_path"]]
    # a truncated volume, a mask of the wrong shape, and a file that is not there
    data = storage.read_bytes(rows.loc[0, "path"])
    (folder / "corrupt.npy").write_bytes(data[: len(data) // 2])
    rows.loc[0, "path"] = str(folder / "corrupt.npy")
    np.save(folder / "small_mask.npy", np.zeros((1, 10, 10), np.uint8))
    rows.loc[1, "mask_path"] = str(folder / "small_mask.npy")
    extra = [
        dict(rows.iloc[2], volume_id="missing", path=str(folder / "missing.npy")),
        dict(rows.iloc[2], volume_id="no_spacing", spacing_x_um=None),
    ]
    np.save(folder / "nan.npy", np.full((2, 80, 80), np.nan, np.float32))
    extra.append(dict(rows.iloc[2], volume_id="nan", path=str(folder / "nan.npy"), mask_path=None))
    np.save(folder / "flat.npy", np.full((2, 80, 80), 9, np.uint8))
    extra.append(
        dict(rows.iloc[2], volume_id="flat", path=str(folder / "flat.npy"), mask_path=None)
    )
    rows = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
    rows.to_csv(folder / "manifest.csv", index=False)

    out = str(tmp_path / "out")
    summary = preprocess(str(folder / "manifest.csv"), out, tiny_config.preprocess)

    reasons = dict(zip(_rejects(out)["volume_id"], _rejects(out)["reason"]))
    assert set(reasons) == {corrupt, wrong_mask, "missing", "no_spacing", "nan", "flat"}
    assert "truncated" in reasons[corrupt]
    assert "mask shape (1, 10, 10) differs" in reasons[wrong_mask]
    assert reasons["missing"] == "missing file"
    assert "spacing" in reasons["no_spacing"]
    assert reasons["nan"] == "contains NaN"
    assert reasons["flat"] == "constant image"
    assert summary["volumes_rejected"] == 6 and summary["volumes_read"] == len(good)
    assert {r["volume_id"] for r in summary["rejects"]} == set(reasons)
    table = _table(out)
    assert set(table["volume_id"]) == set(good)
    assert len(table) == summary["patches_written"]


def test_rerun_writes_the_same_patch_ids(ray_local, local_cohort, tmp_path, tiny_config):
    out = str(tmp_path / "out")
    cfg = dataclasses.replace(tiny_config.preprocess, rows_per_file=40)
    first = preprocess(f"{local_cohort}/manifest.csv", out, cfg)
    first_ids = _table(out)["patch_id"].tolist()
    second = preprocess(f"{local_cohort}/manifest.csv", out, cfg)
    second_ids = _table(out)["patch_id"].tolist()
    assert sorted(first_ids) == sorted(second_ids)  # the same rows, and no duplicates
    assert len(set(second_ids)) == len(second_ids) == second["patches_written"]
    assert first["patches_per_split"] == second["patches_per_split"]
    # reading some splits gives exactly their rows, with the split column
    scored = _table(out, ["val", "test"])
    assert set(scored["split"]) == {"val", "test"}
    assert len(scored) == second["patches_per_split"]["val"] + second["patches_per_split"]["test"]
    # files hold up to rows_per_file rows, and not one small file per volume
    for split, count in second["patches_per_split"].items():
        files = storage.list_files(f"{out}/patches/split={split}", ".parquet")
        rows = [pq.read_metadata(f).num_rows for f in files]
        assert max(rows) <= 40 and sum(rows) == count
        assert len(files) == -(-count // 40)


def test_bad_manifest_fails_before_any_work(tmp_path, tiny_config):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "subject_id,volume_id,path,modality,spacing_x_um,split\n"
        "s1,v1,a.npy,oct,11.5,train\n"
        "s2,v1,b.npy,oct,11.5,test\n"
    )
    with pytest.raises(ManifestError, match="row 2, column 'volume_id'"):
        preprocess(str(manifest), str(tmp_path / "out"), tiny_config.preprocess)
    assert not (tmp_path / "out").exists()


def test_image_level_labels_flow_from_the_manifest(ray_local, tmp_path):
    """No masks, one label per image (or none): 0 -> healthy patches; 1 -> the volume is
    pathological, its patches unknown; blank -> unknown everywhere."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = []
    for name, label in (("healthy", "0"), ("sick", "1"), ("unlabelled", "")):
        Image.fromarray((rng.random((96, 96)) * 255).astype(np.uint8)).save(
            tmp_path / f"{name}.png"
        )
        rows.append(f"s-{name},{name},{name}.png,image,test,{label}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,volume_id,path,modality,split,label\n" + "\n".join(rows) + "\n")
    preprocess(str(manifest), str(tmp_path / "out"), PreprocessConfig(grid_stride=32))
    table = _table(str(tmp_path / "out"))
    by_volume = table.groupby("volume_id").agg(
        label=("label", "unique"), volume=("volume_label", "unique")
    )
    assert [list(v) for v in by_volume.loc["healthy"]] == [[0], [0]]
    assert [list(v) for v in by_volume.loc["sick"]] == [[-1], [1]]
    assert [list(v) for v in by_volume.loc["unlabelled"]] == [[-1], [-1]]


# --- re-runs never destroy good output (issue 16): staged, then published ---------------------


def _geometry(out: str) -> pa.Table:
    """The geometry table: one file per volume, read as one table."""
    fs, path = storage.arrow_filesystem(storage.join(out, "geometry"))
    return pq.read_table(path, filesystem=fs)


def _outputs(out: str) -> tuple[list[str], dict, bytes, bytes]:
    """(sorted patch ids, summary, rejects bytes, geometry bytes) of a stage folder."""
    return (
        sorted(_table(out)["patch_id"]),
        storage.read_json(storage.join(out, "summary.json")),
        storage.read_bytes(storage.join(out, "rejects", "rejects.parquet")),
        _geometry(out).to_pandas().sort_values(["volume_id", "bscan"]).to_json().encode(),
    )


def _failing_late(monkeypatch) -> None:
    """Make preprocess fail after its patch table is written: the rejects write hits a full disk."""
    import anogan_ray.pipelines.preprocess as stage

    write = stage._write_table

    def write_or_fail(url: str, table) -> None:
        if "rejects" in url:
            raise OSError(28, "No space left on device", url)
        write(url, table)

    monkeypatch.setattr(stage, "_write_table", write_or_fail)


@pytest.fixture(params=["local", "s3"])
def stage_folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "preprocess")
    return f"{request.getfixturevalue('bucket')}/preprocess"


def test_a_rerun_that_fails_late_leaves_the_previous_outputs(
    ray_local, local_cohort, stage_folder, tiny_config, monkeypatch
):
    manifest, out = f"{local_cohort}/manifest.csv", stage_folder
    preprocess(manifest, out, tiny_config.preprocess)
    before = _outputs(out)
    other = dataclasses.replace(tiny_config.preprocess, patches_per_bscan=5, grid_stride=48)

    _failing_late(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        preprocess(manifest, out, other)
    assert _outputs(out) == before  # the same rows, summary, rejects and geometry
    assert storage.exists(storage.join(out, "_staging", "patches"))  # it got that far

    monkeypatch.undo()
    summary = preprocess(manifest, out, other)  # the next run drops the failed one's staging
    ids, *_ = _outputs(out)
    assert len(ids) == summary["patches_written"] != len(before[0])
    assert not storage.exists(storage.join(out, "_staging"))


def test_a_publish_cut_short_is_finished_by_the_next_run(
    ray_local, local_cohort, stage_folder, tiny_config, monkeypatch
):
    manifest, out = f"{local_cohort}/manifest.csv", stage_folder
    preprocess(manifest, out, tiny_config.preprocess)
    other = dataclasses.replace(tiny_config.preprocess, patches_per_bscan=5, grid_stride=48)
    replace, replaced = storage.replace, []

    def replace_once(src: str, dst: str) -> None:  # the job dies after publishing `patches`
        if replaced:
            raise KeyboardInterrupt("killed while publishing")
        replaced.append(dst)
        replace(src, dst)

    monkeypatch.setattr(storage, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        preprocess(manifest, out, other)
    assert replaced == [storage.join(out, "patches")]
    assert not storage.exists(storage.join(out, "summary.json"))  # out/ is half old, half new
    monkeypatch.undo()

    # the next run fails too, late, but first finishes the publish the killed run had begun
    _failing_late(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        preprocess(manifest, out, tiny_config.preprocess)
    ids, summary, *_ = _outputs(out)
    assert summary["config"]["patches_per_bscan"] == 5  # the killed run's complete outputs
    assert len(ids) == summary["patches_written"]
    assert _geometry(out).num_rows == summary["bscans"]


def test_a_killed_rerun_leaves_the_previous_table_readable(
    ray_local, local_cohort, tmp_path, tiny_config
):
    """SIGKILL of `anogan-ray preprocess` while its volumes are being processed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    manifest, out = f"{local_cohort}/manifest.csv", str(tmp_path / "preprocess")
    preprocess(manifest, out, tiny_config.preprocess)
    before = _outputs(out)
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    command = [
        str(Path(sys.executable).parent / "anogan-ray"), "preprocess", "--manifest", manifest,
        "--out", out, "--config", "tiny", "--set", "preprocess.patches_per_bscan=5",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    records = Path(out, "_staging", "_volumes")
    deadline = time.monotonic() + 120
    while not (records.is_dir() and any(records.iterdir())):  # a volume is done, others are not
        assert process.poll() is None, f"preprocess ended first:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "preprocess did not start in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stderr.close()

    assert _outputs(out) == before
    assert not Path(out, "_staging", "summary.json").exists()  # killed before its staging was done
    summary = preprocess(manifest, out, tiny_config.preprocess)
    assert _outputs(out)[0] == before[0] and summary["patches_written"] == len(before[0])
    assert not Path(out, "_staging").exists()
