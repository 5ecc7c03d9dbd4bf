"""The storage helper against the local disk and a real S3 endpoint (moto's server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anogan_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/prefix"


def test_bytes_and_json_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(root, "summary.json"), {"patches": 3, "auc": 0.9})
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(root, "summary.json")) == {"patches": 3, "auc": 0.9}
    assert storage.exists(storage.join(root, "a", "b.bin"))
    assert storage.list_files(root, ".json") == [storage.join(root, "summary.json")]


def test_remove_deletes_a_folder(root):
    storage.write_bytes(storage.join(root, "d", "x"), b"x")
    storage.remove(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d", "x"))
    assert storage.list_files(storage.join(root, "d")) == []


def test_arrow_filesystem_reads_and_writes_parquet(root):
    storage.makedirs(root)
    fs, path = storage.arrow_filesystem(storage.join(root, "t.parquet"))
    table = pa.table({"patch_id": ["a", "b"], "anomaly_score": [1.0, 2.0]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_relative_paths_resolve_against_a_base(tmp_path):
    assert storage.resolve("volumes/v.npy", "s3://b/cohort") == "s3://b/cohort/volumes/v.npy"
    assert storage.resolve("s3://other/v.npy", str(tmp_path)) == "s3://other/v.npy"
    assert storage.resolve("v.npy", str(tmp_path)) == os.path.join(str(tmp_path), "v.npy")
    assert storage.parent("s3://b/cohort/manifest.csv") == "s3://b/cohort"


def test_credentials_come_from_the_environment_and_are_not_printed(bucket, s3_server):
    fs, _ = storage.filesystem(bucket)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(fs) and secret not in str(storage.arrow_filesystem(bucket)[0])


def test_one_s3_client_per_environment_that_sees_what_others_just_wrote(
    bucket, s3_server, monkeypatch
):
    import boto3

    url = f"{bucket}/stage"
    assert storage.list_files(url) == []  # a listing before another process writes
    # another process (boto3's own client here) writes an object
    name = bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=name, Key="stage/x", Body=b"1")
    assert storage.list_files(url) == [f"{url}/x"] and storage.exists(f"{url}/x")
    # the filesystem is reused while the AWS environment stays, and made anew when it changes
    before = storage.filesystem(url)[0]
    assert storage.filesystem(bucket)[0] is before
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "other-key")
    assert storage.filesystem(url)[0] is not before
