"""builder.storage: URIs to filesystems, the helpers, and clear errors. S3 runs in test_writers."""

from __future__ import annotations

import os
import uuid

import pytest
from fsspec.implementations.local import LocalFileSystem

from builder import storage
from builder.errors import StorageError


def test_local_paths_resolve_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.open_fs("out/ds")
    assert isinstance(fs, LocalFileSystem)
    assert path == str(tmp_path / "out" / "ds")
    fs2, path2 = storage.open_fs(f"file://{tmp_path}/x")
    assert isinstance(fs2, LocalFileSystem) and path2 == str(tmp_path / "x")
    assert storage.is_local_uri("rel/dir") and storage.is_local_uri("file:///a")
    assert not storage.is_local_uri("s3://bucket/a")


def test_join():
    assert storage.join("s3://bucket/", "a", "/b/", "c.txt") == "s3://bucket/a/b/c.txt"
    assert storage.join("s3://", "bucket", "k") == "s3://bucket/k"
    assert storage.join("/data/ds", "_staging", "job") == "/data/ds/_staging/job"
    assert storage.join("/", "x") == "/x"
    assert storage.join("rel", "", "y") == "rel/y"


@pytest.mark.parametrize("base", ["local", "memory"])
def test_helpers_round_trip(tmp_path, base):
    root = str(tmp_path) if base == "local" else f"memory://pixcrawler-{uuid.uuid4().hex}"
    f = storage.join(root, "a", "b", "c.bin")
    assert not storage.exists(f)
    storage.write_bytes(f, b"hello")
    assert storage.exists(f)
    assert storage.read_bytes(f) == b"hello"
    fs, path = storage.open_fs(storage.join(root, "a"))
    storage.delete_tree(fs, path)
    assert not storage.exists(f)
    storage.delete_tree(fs, path)  # nothing there is not an error


def test_unwritable_location_raises_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    target = str(blocker / "sub" / "x.bin")
    with pytest.raises(StorageError, match="cannot write .*a-file/sub/x.bin"):
        storage.write_bytes(target, b"data")
    with pytest.raises(StorageError, match="cannot write to"):
        storage.ensure_writable(str(blocker / "dataset"))
    storage.ensure_writable(str(tmp_path / "fine"))
    assert os.listdir(tmp_path / "fine") == []


def test_missing_file_and_unknown_protocol(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope.bin"))
    with pytest.raises(StorageError, match="nosuchproto://x"):
        storage.open_fs("nosuchproto://x")


def test_s3_endpoint_from_options_or_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.open_fs("s3://bucket/prefix/")
    assert path == "bucket/prefix" and fs.endpoint_url == "http://127.0.0.1:9"
    assert storage.is_object_store(fs)
    fs2, _ = storage.open_fs("s3://bucket/p", {"endpoint_url": "http://127.0.0.1:10"})
    assert fs2.endpoint_url == "http://127.0.0.1:10"


def test_a_file_the_store_refused_to_delete_is_an_error(moto_s3, monkeypatch):
    """S3's batched delete answers the keys it refused (access denied, an object lock) inside
    a successful reply, which s3fs drops: such a file stayed, "deleted", and was read later as
    part of the dataset or of a job."""
    import s3fs

    from tests.conftest import make_bucket

    bucket = f"del-{uuid.uuid4().hex[:8]}"
    make_bucket(moto_s3, bucket)
    options = {"endpoint_url": moto_s3}
    for name in ("a.parquet", "b.parquet", "locked.parquet"):
        storage.write_bytes(f"s3://{bucket}/x/{name}", b"1", options)
    real = s3fs.S3FileSystem._bulk_delete

    async def refuses_one(self, pathlist, **kwargs):  # as a per-key AccessDenied does
        return await real(self, [p for p in pathlist if "locked" not in p], **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_bulk_delete", refuses_one)
    fs, root = storage.open_fs(f"s3://{bucket}/x", options)
    with pytest.raises(StorageError, match=r"kept 1 of 3 files .*locked\.parquet.*DeleteObject"):
        storage.delete_tree(fs, root)
    assert [p.rsplit("/", 1)[-1] for p in storage.list_files(fs, root)] == ["locked.parquet"]
    monkeypatch.setattr(s3fs.S3FileSystem, "_bulk_delete", real)
    storage.delete_tree(fs, root)
    assert storage.list_files(fs, root) == []
    # more files than are checked one by one: their folders are listed
    many = [f"s3://{bucket}/y/{i:03d}.parquet" for i in range(storage.CHECK_ONE_BY_ONE + 4)]
    for path in many + [f"s3://{bucket}/y/locked.parquet"]:
        storage.write_bytes(path, b"1", options)
    monkeypatch.setattr(s3fs.S3FileSystem, "_bulk_delete", refuses_one)
    fs, root = storage.open_fs(f"s3://{bucket}/y", options)
    with pytest.raises(StorageError, match=r"kept 1 of 21 files .*locked\.parquet"):
        storage.delete_tree(fs, root)


def test_a_folder_placeholder_is_not_a_file_the_store_kept(moto_s3):
    """Consoles and Hadoop make "folder/" keys: no file to list (a location holding only
    one read as holding dataset files), and a delete of the files beside one is no
    refusal."""
    import boto3

    from tests.conftest import make_bucket

    bucket = f"del-{uuid.uuid4().hex[:8]}"
    make_bucket(moto_s3, bucket)
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="ds/data/", Body=b"")
    client.put_object(Bucket=bucket, Key="ds/data/train-00000.parquet", Body=b"1")
    fs, root = storage.open_fs(f"s3://{bucket}/ds", {"endpoint_url": moto_s3})
    assert storage.list_files(fs, root) == [f"{bucket}/ds/data/train-00000.parquet"]
    storage.delete_tree(fs, root)
    assert storage.list_files(fs, root) == []
