"""Vendor formats and public data-set layouts: files written by the tests with the formats' own
libraries (eyepy's VOL format definition, pydicom, scipy's MATLAB writer, ITK), then read through
the manifest and preprocessed."""

from __future__ import annotations

import datetime
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from anogan_ray import storage
from anogan_ray.config import PhantomConfig, PreprocessConfig
from anogan_ray.data import phantom, retina, volumes
from anogan_ray.data.volumes import VolumeError
from anogan_ray.pipelines.preprocess import preprocess
from anogan_ray.tables import LABEL_UNKNOWN

SPACING_MM = 0.0115  # Spectralis-like A-scan spacing
FILE_ILM_OFFSET = 4.0  # rows the files' ILM lies below the phantom's true ILM


@pytest.fixture(scope="module")
def scans():
    """A healthy and a pathological phantom volume (3 B-scans, 128 x 192)."""
    cfg = PhantomConfig(bscans_per_volume=3, height=128, width=192, seed=3)
    return phantom.generate_volume(cfg, 0), phantom.generate_volume(cfg, 1, pathological=True)


def write_heyex_vol(path: str, volume: phantom.PhantomVolume) -> None:
    """A HEYEX VOL file built with eyepy's own VOL format definition, with ILM and BM."""
    import construct as cs
    from eyepy.core.utils import to_vol_intensity
    from eyepy.io.he.vol_reader import SEG_MAPPING, vol_format

    # eyepy 0.21's writer encodes the 64-bit exam time as a float; that field is given raw here
    fmt = cs.Struct(*[("exam_time" / cs.Int64ul) if s.name == "exam_time" else s
                      for s in vol_format.subcons])  # fmt: skip
    n, h, w = volume.image.shape
    date = datetime.datetime(2020, 1, 1).isoformat()

    def segmentations(index: int) -> np.ndarray:
        rows = np.zeros((17, w), np.float32)
        rows[SEG_MAPPING["ILM"]] = volume.layers[index, 0] + FILE_ILM_OFFSET
        rows[SEG_MAPPING["BM"]] = volume.layers[index, -1]
        return rows

    bscans = [
        dict(bscan_hdr_size=256 + 17 * 4 * w, start_x=0.0, start_y=0.12 * i,
             end_x=SPACING_MM * (w - 1), end_y=0.12 * i, num_seg=17, quality=1.0, shift=0,
             iv_transformation=[0] * 6, layer_segmentations=segmentations(i),
             data=to_vol_intensity(volume.image[i]))
        for i in range(n)
    ]  # fmt: skip
    header = dict(
        size_x=w, size_y=h, n_bscans=n, scale_x=SPACING_MM, scale_y=0.0039, distance=0.12,
        size_x_slo=w, size_y_slo=w, scale_x_slo=SPACING_MM, scale_y_slo=SPACING_MM,
        field_size_slo=30, scan_focus=0.0, scan_position="OD", exam_time=0, scan_pattern=3,
        id="vol", reference_id="", pid=1, patient_id="p1", dob=date, vid=1, visit_id="v1",
        visit_date=date, grid_type=0, grid_offset=0, grid_type1=0, grid_offset1=0,
        prog_id="anogan-ray tests", localizer=np.zeros((w, w), np.uint8), bscans=bscans,
    )  # fmt: skip
    with open(path, "wb") as f:
        f.write(fmt.build(header))


def write_dicom(path: str, volume: phantom.PhantomVolume) -> None:
    """A multi-frame DICOM Ophthalmic Tomography object (PixelSpacing in the shared groups)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
    n, h, w = volume.image.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = (
        sop_class,
        meta.MediaStorageSOPInstanceUID,
        "OPT",
    )
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = [0.0039, SPACING_MM]  # (row, column) mm
    measures.SliceThickness = 0.12
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [group]
    ds.PixelData = np.ascontiguousarray(volume.image, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_retouch(folder: str, volume: phantom.PhantomVolume) -> None:
    """A RETOUCH case folder: oct.mhd (16 bit, as Spectralis cases) and reference.mhd (1 IRF,
    2 SRF, 3 PED) written with ITK."""
    import itk

    os.makedirs(folder, exist_ok=True)
    image = itk.image_from_array(volume.image.astype(np.uint16) * 257)
    image.SetSpacing([SPACING_MM, 0.0039, 0.12])  # ITK order: x, y, z
    itk.imwrite(image, os.path.join(folder, "oct.mhd"))
    reference = itk.image_from_array((volume.mask != 0).astype(np.uint8))  # all as IRF
    reference.SetSpacing([SPACING_MM, 0.0039, 0.12])
    itk.imwrite(reference, os.path.join(folder, "reference.mhd"))


def write_duke_dme(path: str, volume: phantom.PhantomVolume, annotated: list[int]) -> None:
    """The Duke DME set's .mat layout: images (h, w, n), manualLayers1 (8, w, n), manualFluid1
    (h, w, n), NaN on the B-scans that carry no fluid annotation."""
    import scipy.io

    n, h, w = volume.image.shape
    layers = np.full((8, w, n), np.nan)
    layers[0] = volume.layers[:, 0].T
    layers[7] = volume.layers[:, -1].T
    fluid = np.full((h, w, n), np.nan)
    for index in annotated:
        fluid[..., index] = (volume.mask[index] != 0).astype(float)
    scipy.io.savemat(path, {
        "images": np.moveaxis(volume.image, 0, -1).astype(np.float64),
        "manualLayers1": layers, "manualFluid1": fluid,
    })  # fmt: skip


def write_duke_amd(path: str, volume: phantom.PhantomVolume) -> None:
    """The Duke AMD (RPEDC) set's .mat layout: images (h, w, n), layerMaps (n, w, 3), Age."""
    import scipy.io

    layer_maps = np.stack(
        [volume.layers[:, 0], volume.layers[:, -2], volume.layers[:, -1]], axis=-1
    )
    scipy.io.savemat(path, {
        "images": np.moveaxis(volume.image, 0, -1).astype(np.float64),
        "layerMaps": layer_maps, "Age": np.array([[70]]),
    })  # fmt: skip


def _record(path: str, split: str = "test", **extra) -> dict:
    record = {"subject_id": "s", "volume_id": os.path.basename(path), "path": path,
              "modality": "oct", "split": split, "spacing_x_um": None, "mask_path": "",
              "label": LABEL_UNKNOWN}  # fmt: skip
    return {**record, **extra}


def test_heyex_vol_gives_spacing_and_layers(tmp_path, scans):
    healthy, _ = scans
    path = str(tmp_path / "eye.vol")
    write_heyex_vol(path, healthy)
    scan = volumes.read_scan(path)
    assert scan.format == "heyex-vol" and scan.image.shape == healthy.image.shape
    assert scan.spacing_x_um == pytest.approx(SPACING_MM * 1000)
    np.testing.assert_allclose(scan.layers["bm"], healthy.layers[:, -1], atol=1e-3)
    assert np.corrcoef(scan.image.ravel(), healthy.image.ravel())[0, 1] > 0.99

    cfg = PreprocessConfig()
    by_file = retina.preprocess_volume(_record(path), cfg)
    by_us = retina.preprocess_volume(_record(path), PreprocessConfig(segmentation="own"))
    assert by_file.spacing_source == "file" and by_file.spacing_x_um == pytest.approx(11.5)
    assert set(by_file.columns["spacing_source"]) == {"file"}
    assert by_file.segmentation["used"] == "file" and by_us.segmentation["used"] == "own"
    # the difference report sees the files' ILM lying FILE_ILM_OFFSET rows below ours
    assert abs(by_file.segmentation["ilm_mean_abs_difference_px"] - FILE_ILM_OFFSET) < 1.5
    assert by_file.segmentation["bm_mean_abs_difference_px"] < 1.5
    file_ilm = np.array([g.ilm for g in by_file.geometry])
    own_ilm = np.array([g.ilm for g in by_us.geometry])
    assert abs(np.mean(file_ilm - own_ilm) - FILE_ILM_OFFSET) < 1.5  # flattening used the file's


def test_spacing_in_manifest_must_agree_with_the_file(tmp_path, scans):
    path = str(tmp_path / "eye.vol")
    write_heyex_vol(path, scans[0])
    agreeing = retina.preprocess_volume(_record(path, spacing_x_um=11.52), PreprocessConfig())
    assert agreeing.spacing_x_um == pytest.approx(11.5)
    with pytest.raises(
        VolumeError, match=r"11\.9 µm in the manifest disagrees with 11\.5 µm.*eye\.vol"
    ):
        retina.preprocess_volume(_record(path, spacing_x_um=11.9), PreprocessConfig())
    with pytest.raises(VolumeError, match="the file has no ILM / BM layers"):
        dicom = str(tmp_path / "eye.dcm")
        write_dicom(dicom, scans[0])
        retina.preprocess_volume(_record(dicom), PreprocessConfig(segmentation="file"))


def test_dicom_ophthalmic_tomography(tmp_path, scans):
    path = str(tmp_path / "eye.dcm")
    write_dicom(path, scans[1])
    scan = volumes.read_scan(path)
    assert scan.format == "dicom" and scan.spacing_x_um == pytest.approx(11.5)
    np.testing.assert_array_equal(scan.image, scans[1].image)
    result = retina.preprocess_volume(_record(path), PreprocessConfig())
    assert result.spacing_source == "file" and result.segmentation["used"] == "own"
    assert result.num_patches > 0


def test_lying_extension_and_missing_extra_are_clear_rejects(tmp_path, scans):
    png = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(scans[0].image[0]).save(png)
    liar = tmp_path / "scan.vol"
    liar.write_bytes(png.read_bytes())
    with pytest.raises(
        VolumeError,
        match=r"content is a PNG image, not a HEYEX VOL file as the extension \.vol says",
    ):
        volumes.read_scan(str(liar))
    not_dicom = tmp_path / "scan.dcm"
    not_dicom.write_bytes(b"hello, not a DICOM file" * 10)
    with pytest.raises(VolumeError, match=r"content is not recognised, not a DICOM file"):
        volumes.read_scan(str(not_dicom))
    garbage_vol = tmp_path / "garbage.vol"
    garbage_vol.write_bytes(b"\x00" * 100)
    with pytest.raises(VolumeError, match="not readable as a HEYEX VOL file"):
        volumes.read_scan(str(garbage_vol))
    topcon = tmp_path / "scan.fds"
    topcon.write_bytes(b"FOCT" + b"\x00" * 100)
    try:
        import oct_converter  # noqa: F401
    except ImportError:  # the test environment does not install the topcon-zeiss extra
        with pytest.raises(VolumeError, match=r"pip install 'anogan-ray\[topcon-zeiss\]'"):
            volumes.read_scan(str(topcon))
    else:
        with pytest.raises(VolumeError, match="not readable as a Topcon FDS file"):
            volumes.read_scan(str(topcon))
    with pytest.raises(VolumeError, match=r"unsupported format '\.xyz'"):
        volumes.read_scan(str(tmp_path / "scan.xyz"))


def test_duke_dme_mask_labels_only_annotated_bscans(tmp_path, scans):
    _, sick = scans
    path = str(tmp_path / "Subject_01.mat")
    write_duke_dme(path, sick, annotated=[1])
    scan = volumes.read_scan(path)
    assert scan.format == "duke-mat" and scan.annotated_bscans.tolist() == [False, True, False]
    result = retina.preprocess_volume(_record(path), PreprocessConfig())
    columns = result.columns
    on_annotated = columns["bscan"] == 1
    assert set(columns["label"][~on_annotated]) == {LABEL_UNKNOWN}
    assert 1 in set(columns["label"][on_annotated]) <= {0, 1}  # labelled from the fluid mask
    assert columns["volume_label"][0] == 1
    assert result.segmentation["used"] == "file" and result.spacing_source == "file"


def test_duke_amd_layers_through_eyepy(tmp_path, scans):
    path = str(tmp_path / "AMD_1001.mat")
    write_duke_amd(path, scans[0])
    scan = volumes.read_scan(path)
    assert scan.spacing_x_um == pytest.approx(6.7)
    np.testing.assert_allclose(scan.layers["ilm"], scans[0].layers[:, 0], atol=1e-4)


def test_cohort_of_vendor_files_through_preprocess(ray_local, tmp_path, scans):
    """A manifest without spacings over VOL, DICOM, RETOUCH and Duke files: spacing and layers
    come from the files, labels from the data sets' masks, a missing file is a reject."""
    healthy, sick = scans
    write_heyex_vol(str(tmp_path / "a.vol"), healthy)
    write_dicom(str(tmp_path / "b.dcm"), sick)
    write_retouch(str(tmp_path / "TRAIN001"), sick)
    write_duke_dme(str(tmp_path / "c.mat"), sick, annotated=[0, 1, 2])
    rows = [
        ("s1", "a", "a.vol", "train", ""),
        ("s2", "b", "b.dcm", "test", "1"),
        ("s3", "r", "TRAIN001", "test", ""),
        ("s4", "c", "c.mat", "test", ""),
        ("s5", "bad", "a.dcm", "test", ""),  # missing
    ]
    pd.DataFrame(rows, columns=["subject_id", "volume_id", "path", "split", "label"]).assign(
        modality="oct"
    ).to_csv(tmp_path / "manifest.csv", index=False)
    out = str(tmp_path / "pre")
    summary = preprocess(str(tmp_path / "manifest.csv"), out, PreprocessConfig(patches_per_bscan=4))
    assert summary["volumes_read"] == 4
    assert summary["rejects"] == [{"volume_id": "bad", "source": str(tmp_path / "a.dcm"),
                                   "reason": "missing file"}]  # fmt: skip
    geometry = {g["volume_id"]: g for g in summary["volume_geometry"]}
    assert {v: g["spacing_source"] for v, g in geometry.items()} == dict.fromkeys("abrc", "file")
    assert geometry["a"]["used"] == "file" and geometry["r"]["used"] == "own"
    assert geometry["a"]["ilm_mean_abs_difference_px"] == pytest.approx(FILE_ILM_OFFSET, abs=1.5)
    table = pq.read_table(storage.join(out, "patches")).to_pandas()
    assert set(table["spacing_source"]) == {"file"}
    labels = table.groupby("volume_id")["label"].agg(set).to_dict()
    assert 1 in labels["r"] <= {0, 1} and 1 in labels["c"] <= {0, 1}  # RETOUCH's, Duke's masks
    assert labels["b"] == {LABEL_UNKNOWN}  # labelled volume, no mask: patches unknown
    assert table.loc[table["volume_id"] == "r", "volume_label"].eq(1).all()


def test_vendor_files_on_object_storage(bucket, tmp_path, scans):
    """A VOL file and a RETOUCH folder (its .mhd names a .raw beside it) read from S3."""
    write_heyex_vol(str(tmp_path / "eye.vol"), scans[0])
    write_retouch(str(tmp_path / "case"), scans[1])
    for local in [tmp_path / "eye.vol", *sorted((tmp_path / "case").iterdir())]:
        storage.write_bytes(f"{bucket}/in/{local.relative_to(tmp_path)}", local.read_bytes())
    vol = volumes.read_scan(f"{bucket}/in/eye.vol")
    assert vol.spacing_x_um == pytest.approx(11.5) and "ilm" in vol.layers
    case = volumes.read_scan(f"{bucket}/in/case")
    assert case.format == "retouch" and case.spacing_x_um == pytest.approx(11.5)
    np.testing.assert_array_equal(case.mask, scans[1].mask != 0)
