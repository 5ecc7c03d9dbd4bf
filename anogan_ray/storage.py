"""The one filesystem helper: every read and write in anogan-ray goes through here.

A location is a URL: a local path (``out/scores``, ``/data/cohort``, ``file:///data``) or
``s3://bucket/prefix``. S3 endpoint, region and credentials come only from the standard AWS
environment variables and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, instance profiles, ...); nothing here takes or prints them.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from typing import IO, Any

import fsspec
import pyarrow.fs as pafs

_S3_SCHEMES = ("s3://", "s3a://")


def is_remote(url: str) -> bool:
    """True for object-storage URLs (``s3://``)."""
    return url.startswith(_S3_SCHEMES)


# The AWS environment an S3 client is made from: a change of any of them makes a new client
_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
_s3_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    """The process's S3 filesystem for the current AWS environment, made on first use.

    Making one costs ~0.2 s of CPU (botocore loads S3's service model and resolves credentials)
    against ~10 ms for a small request over its kept-alive connections (measured against moto on
    127.0.0.1): every call reuses it. It keeps no listings, so a job sees the objects other
    processes just wrote.
    """
    key = (os.getpid(), *(os.environ.get(name) for name in _S3_ENV))
    fs = _s3_filesystems.get(key)
    if fs is None:
        kwargs: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # botocore also reads these; passing it on keeps older aiobotocore in step
            kwargs["endpoint_url"] = endpoint
        fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **kwargs)
        _s3_filesystems[key] = fs
    return fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it (no scheme for s3)."""
    if is_remote(url):
        return _s3_filesystem(), url.split("://", 1)[1].rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (usable as Ray Data's ``filesystem=``) and the path inside it."""
    fs, path = filesystem(url)
    if is_remote(url):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping the scheme."""
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def absolute(url: str) -> str:
    """``url`` with a local path made absolute; remote URLs unchanged.

    For paths handed to Ray Train and Tune workers, which run in working directories of their
    own: a relative path there would land under Ray's session folder.
    """
    return url if is_remote(url) else filesystem(url)[1]


def resolve(url: str, base: str) -> str:
    """Resolve ``url`` against the folder ``base`` unless it is absolute or remote."""
    if is_remote(url) or url.startswith("file://") or os.path.isabs(url):
        return url
    return join(base, url)


def parent(url: str) -> str:
    """The folder that holds ``url``."""
    if is_remote(url):
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(url))


def open_file(url: str, mode: str = "rb") -> IO:
    """Open ``url`` for reading or writing; folders are created for writes."""
    fs, path = filesystem(url)
    if "w" in mode and not is_remote(url):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    """Create a folder (a no-op on object storage, where folders are prefixes)."""
    fs, path = filesystem(url)
    if not is_remote(url):
        fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Delete a file or a whole folder, if it exists."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def replace(src: str, dst: str) -> None:
    """Make ``dst`` (a file or a folder) hold what ``src`` holds, dropping what ``dst`` held.

    Locally two renames on one filesystem: ``dst`` is moved aside, then ``src`` moved in, so a
    reader sees the old or the new ``dst`` whole (or, for that instant, none), and ``src`` is
    gone afterwards. On S3, which has no rename, ``dst``'s objects are deleted and ``src``'s copied
    in (server side); ``src`` stays, so a replace that was cut short can simply be repeated.
    A ``src`` that does not exist replaces ``dst`` by nothing.
    """
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_remote(src):
        if fs.exists(dst_path):
            fs.rm(dst_path, recursive=True)
        if fs.isdir(src_path):
            files = fs.find(src_path)
            fs.copy(files, [dst_path + f[len(src_path) :] for f in files])
        elif fs.exists(src_path):
            fs.copy(src_path, dst_path)
        return
    aside = os.path.join(os.path.dirname(dst_path), f".{os.path.basename(dst_path)}.replaced")
    _remove_local(aside)  # left by a replace that was cut short
    if os.path.lexists(dst_path):
        os.rename(dst_path, aside)
    if os.path.lexists(src_path):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.rename(src_path, dst_path)
    _remove_local(aside)


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def list_files(url: str, suffix: str = "") -> list[str]:
    """All files under ``url`` (recursively) whose name ends with ``suffix``, as URLs, sorted."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    found = fs.find(path)
    prefix = "s3://" if is_remote(url) else ""
    return sorted(prefix + p for p in found if p.endswith(suffix))


def read_bytes(url: str) -> bytes:
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    with open_file(url, "wb") as f:
        f.write(data)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode())


def write_json(url: str, data: Any) -> None:
    """Write ``data`` as indented JSON (``summary.json`` and friends)."""
    write_bytes(url, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())
