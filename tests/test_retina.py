"""Per-volume preprocessing (no Ray): readers, manifest checks, segmentation, flattening, patches."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from anogan_ray.config import PreprocessConfig
from anogan_ray.data import phantom, retina, volumes
from anogan_ray.data.volumes import ManifestError, VolumeError
from anogan_ray.tables import PATCH_COLUMNS, decode_pixels

# Segmentation bounds on the tiny phantom (256 x 256, resampled to 134 columns): mean absolute
# error in pixels against the phantom's true boundaries, resampled along x like the image.
ILM_MAE_BOUND = 1.5
BM_MAE_BOUND = 2.0
SIZE = 64


@pytest.fixture(scope="module")
def phantom_cfg(tiny_config):
    return tiny_config.phantom


def _resampled_truth(
    volume: phantom.PhantomVolume, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    return (
        retina.resample_x(volume.ilm, spacing, 22.0),
        retina.resample_x(volume.bm, spacing, 22.0),
    )


@pytest.mark.parametrize(
    ("subject", "pathological"), [(0, False), (1, False), (3, True), (4, True), (5, True)]
)
def test_segmentation_matches_phantom_boundaries(phantom_cfg, subject, pathological):
    volume = phantom.generate_volume(phantom_cfg, subject, 0, pathological=pathological)
    if pathological:
        assert volume.mask.any(), "a pathological phantom volume must carry lesions"
    image = retina.resample_x(retina.normalize_volume(volume.image), phantom_cfg.spacing_x_um, 22.0)
    ilm, bm = retina.segment_retina(image)
    true_ilm, true_bm = _resampled_truth(volume, phantom_cfg.spacing_x_um)
    assert np.abs(ilm - true_ilm).mean() < ILM_MAE_BOUND
    assert np.abs(bm - true_bm).mean() < BM_MAE_BOUND


@pytest.mark.parametrize(("subject", "pathological"), [(1, False), (5, True)])
def test_flattening_makes_bruchs_membrane_straight(phantom_cfg, subject, pathological):
    volume = phantom.generate_volume(phantom_cfg, subject, 0, pathological=pathological)
    image = retina.resample_x(retina.normalize_volume(volume.image), phantom_cfg.spacing_x_um, 22.0)
    ilm, bm = retina.segment_retina(image)
    bm_row = retina.flat_bm_row(ilm, bm, image.shape[1], margin=8)
    shifts = retina.flatten_shifts(bm, bm_row)
    _, true_bm = _resampled_truth(volume, phantom_cfg.spacing_x_um)
    after = np.abs(true_bm + shifts - bm_row)  # the true BM's distance from the line, flattened
    before = np.abs(true_bm - np.median(true_bm))  # ... and from its median row, unflattened
    assert np.median(after) <= 1.0
    assert after.mean() <= BM_MAE_BOUND
    assert before.mean() >= 3 * after.mean()  # the phantom's BM is curved and tilted
    # the image moved with it: flattening is a per-column shift of the pixels
    flat = retina.flatten(image[0], shifts[0])
    column = 40
    shift = shifts[0, column]
    assert np.array_equal(
        flat[max(shift, 0) : 200, column], image[0, max(-shift, 0) : 200 - shift, column]
    )


def _write_volume(tmp_path, name, array) -> str:
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def _record(volume_url, mask_url, split, volume_id="v0", spacing=11.5, modality="oct") -> dict:
    return {
        "subject_id": "s0",
        "volume_id": volume_id,
        "path": volume_url,
        "modality": modality,
        "split": split,
        "spacing_x_um": spacing,
        "mask_path": mask_url,
    }


@pytest.fixture(scope="module")
def pathological_files(tmp_path_factory, phantom_cfg):
    folder = tmp_path_factory.mktemp("volume")
    volume = phantom.generate_volume(phantom_cfg, 4, 0, pathological=True)
    return (
        _write_volume(folder, "v.npy", volume.image),
        _write_volume(folder, "m.npy", volume.mask),
        volume,
    )


def _original_mask_under_patch(mask, geometry, y, x):
    """The original mask pixels a flattened, resampled patch covers (mapped back, see retina)."""
    values = []
    for column in range(x, x + SIZE):
        source_x = int(
            np.clip(np.rint((column + 0.5) * geometry.x_scale - 0.5), 0, mask.shape[1] - 1)
        )
        rows = np.arange(y, y + SIZE) - geometry.shifts[column]
        rows = rows[(rows >= 0) & (rows < mask.shape[0])]
        values.append(mask[rows, source_x])
    return np.concatenate(values)


def test_training_patches_are_centred_in_the_retina(pathological_files):
    volume_url, mask_url, volume = pathological_files
    cfg = PreprocessConfig(patches_per_bscan=12)
    result = retina.preprocess_volume(_record(volume_url, mask_url, "train"), cfg)
    columns = result.columns
    assert set(columns) == set(PATCH_COLUMNS)
    assert result.num_patches == 12 * volume.image.shape[0]
    assert len(set(columns["patch_id"])) == result.num_patches
    assert columns["pixels"].shape == (result.num_patches, SIZE, SIZE)
    assert columns["pixels"].dtype == np.uint8
    for bscan, y, x in zip(columns["bscan"], columns["y"], columns["x"]):
        geometry = result.geometry[bscan]
        centre_y, centre_x = y + SIZE // 2, x + SIZE // 2
        top = geometry.ilm[centre_x] + geometry.shifts[centre_x]
        bottom = geometry.bm[centre_x] + geometry.shifts[centre_x]
        assert top <= centre_y <= bottom
        assert 0 <= y <= volume.image.shape[1] - SIZE
        assert 0 <= x <= len(geometry.shifts) - SIZE


def test_grid_patch_labels_agree_with_the_original_masks(pathological_files):
    volume_url, mask_url, volume = pathological_files
    cfg = PreprocessConfig(grid_stride=32)
    result = retina.preprocess_volume(_record(volume_url, mask_url, "test"), cfg)
    columns = result.columns
    labels = columns["label"]
    assert set(np.unique(labels)) == {0, 1}  # a lesion volume has both kinds of patches
    for index in range(result.num_patches):
        bscan, y, x = columns["bscan"][index], columns["y"][index], columns["x"][index]
        under = _original_mask_under_patch(volume.mask[bscan], result.geometry[bscan], y, x)
        assert labels[index] == int((under != 0).any())
    fractions = columns["anomaly_fraction"]
    assert np.all((fractions > 0) == (labels == 1))


def test_grid_covers_the_whole_retina(pathological_files):
    volume_url, mask_url, volume = pathological_files
    cfg = PreprocessConfig(grid_stride=48)
    result = retina.preprocess_volume(_record(volume_url, mask_url, "val"), cfg)
    height = volume.image.shape[1]
    for geometry in result.geometry:
        width = len(geometry.shifts)
        covered = np.zeros((height, width), dtype=bool)
        mine = result.columns["bscan"] == geometry.bscan
        for y, x in zip(result.columns["y"][mine], result.columns["x"][mine]):
            covered[y : y + SIZE, x : x + SIZE] = True
        rows = np.arange(height)[:, None]
        retina_pixels = (rows >= geometry.ilm + geometry.shifts) & (
            rows <= geometry.bm + geometry.shifts
        )
        assert covered[retina_pixels].all()


def test_same_volume_gives_the_same_patches(pathological_files):
    volume_url, mask_url, _ = pathological_files
    cfg = PreprocessConfig(patches_per_bscan=6, seed=3)
    first = retina.preprocess_volume(_record(volume_url, mask_url, "train"), cfg)
    second = retina.preprocess_volume(_record(volume_url, mask_url, "train"), cfg)
    assert list(first.columns["patch_id"]) == list(second.columns["patch_id"])
    assert np.array_equal(first.columns["pixels"], second.columns["pixels"])
    other_seed = retina.preprocess_volume(
        _record(volume_url, mask_url, "train"), PreprocessConfig(patches_per_bscan=6, seed=4)
    )
    assert set(other_seed.columns["patch_id"]) != set(first.columns["patch_id"])


def test_volume_without_mask_has_unknown_labels(pathological_files):
    volume_url, _, _ = pathological_files
    result = retina.preprocess_volume(_record(volume_url, None, "test"), PreprocessConfig())
    assert np.all(result.columns["label"] == -1)
    assert np.isnan(result.columns["anomaly_fraction"]).all()


@pytest.mark.parametrize("label", [0, 1])
def test_a_manifest_label_without_a_mask_labels_the_volume(pathological_files, label):
    """Image-level labels (most public sets): 0 makes every patch healthy; 1 marks the volume,
    its patches stay unknown (where in the image is not known)."""
    volume_url, _, _ = pathological_files
    record = {**_record(volume_url, None, "test"), "label": label}
    columns = retina.preprocess_volume(record, PreprocessConfig()).columns
    assert np.all(columns["volume_label"] == label)
    assert np.all(columns["label"] == (0 if label == 0 else -1))
    assert (
        np.all(columns["anomaly_fraction"] == 0)
        if label == 0
        else np.isnan(columns["anomaly_fraction"]).all()
    )


def test_a_label_that_contradicts_the_mask_is_refused(pathological_files):
    volume_url, mask_url, _ = pathological_files
    with pytest.raises(VolumeError, match="label 0 contradicts the mask"):
        retina.preprocess_volume(
            {**_record(volume_url, mask_url, "test"), "label": 0}, PreprocessConfig()
        )
    labelled = {**_record(volume_url, mask_url, "test"), "label": 1}
    assert np.all(
        retina.preprocess_volume(labelled, PreprocessConfig()).columns["volume_label"] == 1
    )


@pytest.mark.parametrize("side", [64, 70])
@pytest.mark.parametrize("split", ["train", "test"])
def test_patch_ids_stay_unique_for_images_near_the_patch_size(tmp_path, side, split):
    """An image no larger than a patch gives one patch; random training positions that would
    coincide (more wanted than exist) never give two rows one id."""
    image = (np.random.default_rng(side).random((side, side)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "small.png")
    record = _record(str(tmp_path / "small.png"), None, split, modality="image", spacing=None)
    cfg = PreprocessConfig(patches_per_bscan=100, grid_stride=4)
    ids = list(retina.preprocess_volume(record, cfg).columns["patch_id"])
    assert len(ids) == len(set(ids)) >= 1
    if side == 64:
        assert len(ids) == 1
    else:
        assert len(ids) <= (side - 64 + 1) ** 2


def test_images_smaller_than_a_patch_are_enlarged_not_rejected(tmp_path):
    """A 28 x 28 digit (and its mask) becomes one 64 x 64 patch with the digit's content; a
    28 x 40 image keeps its aspect (64 x 91) and is covered by the grid."""
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a "1"
    mask = np.zeros((28, 28), np.uint8)
    mask[6:10, 12:16] = 1  # its top is the defect
    Image.fromarray(digit).save(tmp_path / "one.png")
    np.save(tmp_path / "one_mask.npy", mask)
    record = {
        **_record(str(tmp_path / "one.png"), None, "test", modality="image", spacing=None),
        "mask_path": str(tmp_path / "one_mask.npy"),
    }
    result = retina.preprocess_volume(record, PreprocessConfig())
    assert result.num_patches == 1
    patch = decode_pixels(result.columns["pixels"][0])
    assert patch.shape == (SIZE, SIZE)
    expected = retina.enlarge_to_patch(digit[None] / 127.5 - 1, SIZE)[0][0]
    assert np.abs(patch - expected).max() <= 1 / 127.5 + 1e-6
    assert patch[:, 40:].max() < -0.9 and patch[16:48, 28:36].min() > 0.9  # the stroke, in place
    assert result.columns["label"][0] == 1
    assert result.columns["anomaly_fraction"][0] == pytest.approx(16 / 784, abs=0.01)
    geometry = result.geometry[0]
    assert geometry.y_scale == pytest.approx(28 / 64) and geometry.x_scale == pytest.approx(28 / 64)

    Image.fromarray(np.tile(digit, (1, 2))[:, :40]).save(tmp_path / "wide.png")
    wide = _record(str(tmp_path / "wide.png"), None, "test", modality="image", spacing=None)
    result = retina.preprocess_volume(wide, PreprocessConfig(grid_stride=32))
    assert set(result.columns["y"]) == {0} and set(result.columns["x"]) == {0, 27}


def test_8_bit_images_keep_their_gray_scale(tmp_path):
    """A bright scratch on an 8-bit photograph leaves the rest of it as it was (a per-image
    stretch would dim it); a 16-bit image, whose range the file does not fix, is stretched."""
    rng = np.random.default_rng(3)
    photo = rng.integers(60, 180, size=(96, 96), dtype=np.uint8)
    scratched = photo.copy()
    scratched[40:43, 10:60] = 255
    patches = []
    for name, image in (("photo", photo), ("scratched", scratched)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        record = _record(
            str(tmp_path / f"{name}.png"), None, "test", modality="image", spacing=None
        )
        result = retina.preprocess_volume(record, PreprocessConfig())
        patches.append(decode_pixels(result.columns["pixels"][0]))
    assert np.abs(patches[0] - (photo[:64, :64] / 127.5 - 1)).max() <= 1 / 127.5 + 1e-6
    untouched = np.ones((64, 64), bool)
    untouched[40:43, 10:60] = False
    assert np.abs(patches[0] - patches[1])[untouched].max() <= 1 / 127.5 + 1e-6
    wide = (photo.astype(np.uint16) * 200)[None]
    assert retina.normalize_image(wide).min() == -1.0 and retina.normalize_image(wide).max() == 1.0


def test_normalization_maps_to_unit_range():
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 20.0, size=(2, 80, 90)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # one saturated voxel must not squash the rest
    normalized = retina.normalize_volume(volume)
    assert normalized.min() == -1.0 and normalized.max() == 1.0
    assert normalized.std() > 0.2
    with pytest.raises(VolumeError, match="constant"):
        retina.normalize_volume(np.full((1, 70, 70), 7, np.uint8))


def test_resampling_to_22_um_scales_the_width():
    volume = np.tile(np.arange(512, dtype=np.float32), (2, 10, 1))
    resampled = retina.resample_x(volume, 11.5, 22.0)
    assert resampled.shape == (2, 10, 268) and resampled.dtype == np.float32
    # column j samples the original at (j + 0.5) * x_scale - 0.5, x_scale = 512 / 268 (22 µm
    # rounded to whole columns): a linear ramp stays linear (away from the edges)
    assert np.allclose(resampled[0, 0, 10], 10.5 * 512 / 268 - 0.5, atol=1e-3)
    labels = np.zeros((1, 4, 512), np.uint8)
    labels[..., 100:140] = 3
    resampled_labels = retina.resample_x(labels, 11.5, 22.0, nearest=True)
    assert resampled_labels.dtype == np.uint8 and set(np.unique(resampled_labels)) == {0, 3}


def test_resampling_does_not_alias_fine_speckle():
    """Texture finer than 22 µm (here a 14 µm period at 5.7 µm spacing) is filtered out before
    sampling, not folded into a coarse false pattern."""
    columns = np.arange(1024)
    fine = np.cos(2 * np.pi * columns / 2.5).astype(np.float32)[None, None, :]  # (1, 1, 1024)
    resampled = retina.resample_x(fine, 5.7, 22.0)
    assert resampled.shape == (1, 1, 265)
    assert resampled[..., 5:-5].std() < 0.05 * fine.std()


def test_image_modality_uses_the_whole_frame(tmp_path):
    rng = np.random.default_rng(1)
    image = (rng.random((100, 130)) * 65535).astype(np.uint16)  # a 16-bit PNG
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    record = _record(str(path), None, "test", modality="image", spacing=None)
    result = retina.preprocess_volume(record, PreprocessConfig(grid_stride=32))
    ys, xs = set(result.columns["y"]), set(result.columns["x"])
    assert ys == {0, 32, 36} and xs == {0, 32, 64, 66}
    y, x = 32, 64
    index = int(np.flatnonzero((result.columns["y"] == y) & (result.columns["x"] == x))[0])
    patch = decode_pixels(result.columns["pixels"][index])
    expected = retina.normalize_volume(image[None])[0][y : y + SIZE, x : x + SIZE]
    assert np.abs(patch - expected).max() <= 1 / 127.5 + 1e-6


# --------------------------------------------------------------------------------------------
# readers and bad input
# --------------------------------------------------------------------------------------------


def test_readers_agree_across_formats(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 255, size=(3, 70, 80), dtype=np.uint8)
    np.save(tmp_path / "v.npy", volume)
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", np.repeat(volume[0][..., None], 3, 2), photometric="rgb")
    Image.fromarray(volume[0]).save(tmp_path / "b.png")
    rgb = np.repeat(volume[0][..., None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(volumes.read_volume(str(tmp_path / "v.npy")), volume)
    assert np.array_equal(volumes.read_volume(str(tmp_path / "v.tif")), volume)
    assert np.array_equal(volumes.read_volume(str(tmp_path / "rgb.tif")), volume[:1])
    assert np.array_equal(volumes.read_volume(str(tmp_path / "b.png")), volume[:1])
    assert np.array_equal(volumes.read_volume(str(tmp_path / "c.png")), volume[:1])  # gray RGB
    Image.fromarray(volume[0]).save(tmp_path / "d.jpg", quality=95)
    assert np.abs(volumes.read_volume(str(tmp_path / "d.jpg")).astype(int) - volume[:1]).mean() < 12


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "unreadable or truncated"),
        (
            lambda p: p.write_bytes(_npy_bytes(np.ones((3, 70, 70)))[:-500]),
            "unreadable or truncated",
        ),
        (lambda p: p.write_bytes(_npy_bytes(np.ones((2, 3, 70, 70)))), "wrong dimensions"),
    ],
)
def test_bad_files_raise_a_reason(tmp_path, writer, reason):
    path = tmp_path / "bad.npy"
    writer(path)
    with pytest.raises(VolumeError, match=reason):
        volumes.read_volume(str(path))


def test_missing_file_and_bad_values_raise_a_reason(tmp_path):
    with pytest.raises(VolumeError, match="missing file"):
        volumes.read_volume(str(tmp_path / "nowhere.npy"))
    with pytest.raises(VolumeError, match="NaN"):
        volumes.check_image_values(np.array([[[1.0, np.nan]]]))
    with pytest.raises(VolumeError, match="constant"):
        volumes.check_image_values(np.zeros((1, 64, 64), np.uint8))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


MANIFEST_HEADER = "subject_id,volume_id,path,modality,spacing_x_um,split,label,mask_path\n"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("s,a,a.npy,oct,11.5,train,0,\n", None),
        ("s,a,a.npy,oct,11.5,train,0,\ns,a,b.npy,oct,11.5,test,1,\n", "row 2, column 'volume_id'"),
        (
            "s,a,a.npy,oct,11.5,train,0,\ns,b,b.npy,fundus,11.5,test,1,\n",
            "row 2, column 'modality'",
        ),
        ("s,a,a.npy,oct,11.5,holdout,0,\n", "row 1, column 'split'"),
        ("s,a,,oct,11.5,train,0,\n", "row 1, column 'path'"),
        ("s,a,a.npy,oct,wide,train,0,\n", "row 1, column 'spacing_x_um'"),
    ],
)
def test_bad_manifest_fails_naming_row_and_column(tmp_path, rows, message):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(MANIFEST_HEADER + rows)
    if message is None:
        frame = volumes.read_manifest(str(manifest))
        assert frame.loc[0, "path"] == str(tmp_path / "a.npy")  # resolved against the manifest
        assert frame.loc[0, "mask_path"] is None
        return
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        volumes.read_manifest(str(manifest))


def test_manifest_missing_column_is_named(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,volume_id,path,split\ns,a,a.npy,train\n")
    with pytest.raises(ManifestError, match="missing column 'modality'"):
        volumes.read_manifest(str(manifest))


def test_parquet_manifest_with_missing_optional_values(tmp_path):
    frame = pd.DataFrame(
        {
            "subject_id": ["s1", "s2"],
            "volume_id": ["a", "b"],
            "path": ["a.npy", "s3://bucket/b.png"],
            "modality": ["oct", "image"],
            "spacing_x_um": [11.5, None],
            "split": ["train", "test"],
            "label": pd.array([0, None], dtype="Int64"),
        }
    )
    frame.to_parquet(tmp_path / "manifest.parquet")
    manifest = volumes.read_manifest(str(tmp_path / "manifest.parquet"))
    assert manifest["path"].tolist() == [str(tmp_path / "a.npy"), "s3://bucket/b.png"]
    assert manifest.loc[0, "spacing_x_um"] == 11.5 and np.isnan(manifest.loc[1, "spacing_x_um"])
    assert manifest.loc[0, "label"] == 0 and pd.isna(manifest.loc[1, "label"])
    assert manifest["mask_path"].isna().all()


def test_manifest_blank_mask_paths_are_none_beside_given_ones(tmp_path):
    """A mask on some rows only: the blank ones read as None (never NaN, which a reader would
    take for a path)."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "subject_id,volume_id,path,modality,split,mask_path\n"
        "s1,a,a.npy,oct,test,a_mask.npy\ns2,b,b.npy,oct,test,\n"
    )
    frame = volumes.read_manifest(str(manifest))
    assert frame["mask_path"].tolist() == [str(tmp_path / "a_mask.npy"), None]
