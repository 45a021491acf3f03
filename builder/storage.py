"""Storage URIs: one way to reach a local directory, ``file://``, ``s3://`` and any fsspec URI.

``open_fs(uri)`` returns an fsspec filesystem and the path inside it. A local path is resolved to
an absolute one. For ``s3://`` the endpoint comes from ``storage_options['endpoint_url']`` or the
``AWS_ENDPOINT_URL`` environment variable (MinIO, moto, other S3-compatible stores); credentials
come from the usual AWS environment/config chain or from ``storage_options`` ('key', 'secret').

The helpers below take a URI (plus the same ``storage_options``) and turn every storage failure
(missing bucket, no permission, a file where a directory should be, unknown protocol) into a
``StorageError`` whose message names the location and what to check.

Object stores have no directories: ``makedirs`` is only called where directories are real, so a
missing bucket is reported, never silently created.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import re
import uuid
from typing import Any, Iterable, Iterator, Optional

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from builder.errors import StorageError

_LOCAL_PROTOCOLS = (None, "file", "local")
_S3_PROTOCOLS = ("s3", "s3a")
_OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl",
                                     "oss", "r2"})

try:
    from botocore.exceptions import BotoCoreError, ClientError

    _BACKEND_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError)
except ImportError:  # pragma: no cover - s3fs (and so botocore) is a dependency
    _BACKEND_ERRORS = ()

_STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError,
                                                    *_BACKEND_ERRORS)


def is_local_uri(uri: str) -> bool:
    """True for a plain path or a ``file://`` URI."""
    protocol, _ = split_protocol(str(uri))
    return protocol in _LOCAL_PROTOCOLS


def open_fs(uri: str, storage_options: Optional[dict[str, Any]] = None
            ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path of ``uri`` inside it."""
    uri = str(uri)
    opts = dict(storage_options or {})
    protocol, path = split_protocol(uri)
    try:
        if protocol in _LOCAL_PROTOCOLS:
            return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
        if protocol in _S3_PROTOCOLS:
            endpoint = (opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
            if endpoint:
                opts["endpoint_url"] = endpoint
            fs = fsspec.filesystem("s3", **opts)
            return fs, fs._strip_protocol(uri).rstrip("/")
        fs, fs_path = fsspec.core.url_to_fs(uri, **opts)
        return fs, fs_path.rstrip("/") or fs_path
    except _STORAGE_ERRORS as exc:
        raise StorageError(
            f"cannot open storage location {uri!r}: {type(exc).__name__}: {exc}. "
            "Check the URI scheme is one fsspec knows (install its package, e.g. gcsfs for "
            "gs://) and that storage_options are valid for it."
        ) from exc


def same_location(a: str, b: str, a_options: Optional[dict[str, Any]] = None,
                  b_options: Optional[dict[str, Any]] = None) -> bool:
    """Whether two URIs name one place (a local path resolved through links), each opened
    with its own storage options."""
    (fs_a, path_a), (fs_b, path_b) = open_fs(a, a_options), open_fs(b, b_options)
    if is_local_uri(a) and is_local_uri(b):
        return os.path.realpath(path_a) == os.path.realpath(path_b)
    return type(fs_a) is type(fs_b) and path_a.rstrip("/") == path_b.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, separated by exactly one '/'."""
    out = str(uri)
    if not out.endswith("://"):
        out = out.rstrip("/") or "/"
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else out + "/" + part
    return out


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """True where directories are not real (a prefix exists only while it holds files)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in _OBJECT_STORE_PROTOCOLS for p in protocols)


def ensure_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the parent directory of ``path`` where directories are real."""
    if is_object_store(fs):
        return
    parent = fs._parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Turn a storage backend's exception into a ``StorageError`` naming ``uri`` and ``action``."""
    try:
        yield
    except StorageError:
        raise
    except _STORAGE_ERRORS as exc:
        raise StorageError(_explain(uri, action, exc)) from exc


def _explain(uri: str, action: str, exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        hint = ("the credentials in use may not read or write there; check permissions / the "
                "bucket policy")
    elif isinstance(exc, FileNotFoundError):
        hint = ("it does not exist: check the bucket or parent directory exists "
                "(buckets are never created by PixCrawler)")
    elif isinstance(exc, (NotADirectoryError, FileExistsError)):
        hint = "a file stands where a directory is needed; choose another output location"
    else:
        hint = "check the location exists, is reachable and the credentials allow it"
    return f"cannot {action} {uri}: {type(exc).__name__}: {exc} ({hint})"


def exists(uri: str, storage_options: Optional[dict[str, Any]] = None) -> bool:
    """Whether a file or directory exists at ``uri`` (reading fresh, not from a listing cache)."""
    fs, path = open_fs(uri, storage_options)
    with storage_errors(uri, "check"):
        fs.invalidate_cache(path)
        return bool(fs.exists(path))


def write_bytes(uri: str, data: bytes, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Write ``data`` to the file ``uri``, creating parent directories where they are real."""
    fs, path = open_fs(uri, storage_options)
    with storage_errors(uri, "write"):
        ensure_parent(fs, path)
        fs.pipe_file(path, data)


def read_bytes(uri: str, storage_options: Optional[dict[str, Any]] = None) -> bytes:
    """The bytes of the file ``uri``."""
    fs, path = open_fs(uri, storage_options)
    with storage_errors(uri, "read"):
        return fs.cat_file(path)


_GLOB_MAGIC = re.compile(r"[*?\[]")


def delete_files(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> None:
    """Delete these files, each by its own name. fsspec's ``rm`` reads ``*``, ``?`` and ``[``
    in a path as a glob pattern on object stores: ``s3://b/runs[1]`` had ``runs1``'s files
    deleted and kept its own. Paths without them go in one batched call."""
    paths = sorted(set(paths))
    plain = [p for p in paths if not _GLOB_MAGIC.search(p)]
    if plain:
        fs.rm(plain)
        if not isinstance(fs, LocalFileSystem):
            _check_deleted(fs, plain)
    for p in paths:
        if _GLOB_MAGIC.search(p):
            fs.rm_file(p)


CHECK_ONE_BY_ONE = 16
"""Up to this many deleted files are checked one by one; more, by listing their folders."""


def _check_deleted(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Raise ``StorageError`` for any of ``paths`` still there as a file. An object store's
    batched delete answers the keys it could not delete (access denied, an object lock) inside
    a successful reply, which s3fs drops: a shard or journal file "deleted" that way would
    still be read as part of the dataset or of a job. A few files are checked each by itself;
    more, by listing each folder once. A folder's placeholder key (``data/``, as consoles make
    them) is no file and is not checked."""
    names = {fs._strip_protocol(p) for p in paths if not p.endswith("/")}
    left: list[str] = []
    if len(names) <= CHECK_ONE_BY_ONE:
        for name in sorted(names):
            fs.invalidate_cache(name)
            try:
                if fs.info(name).get("type") == "file":
                    left.append(name)
            except FileNotFoundError:
                pass
    else:
        by_folder: dict[str, set[str]] = {}
        for name in names:
            by_folder.setdefault(name.rsplit("/", 1)[0], set()).add(name)
        for folder, wanted in sorted(by_folder.items()):
            fs.invalidate_cache(folder)
            try:
                listed = {fs._strip_protocol(e["name"]) for e in fs.ls(folder, detail=True)
                          if e.get("type") == "file"}
            except FileNotFoundError:
                continue
            left += sorted(wanted & listed)
    if left:
        raise StorageError(
            f"the store kept {len(left)} of {len(names)} files it was asked to delete (first: "
            f"{left[0]}): check that these credentials may delete objects there (s3:DeleteObject)"
            " and that no object lock or retention holds them, then run the command again")


def delete_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete every file under ``path`` (by name, as ``delete_files``), then its empty
    directories."""
    delete_files(fs, list_files(fs, path))
    prune_empty_dirs(fs, path)


TEMP_MARK = ".tmp-"
"""``atomic_open``'s temporary file is the path, this and 12 hex digits."""


def cut_writes(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The temporary files an ``atomic_open`` of ``path`` left when its process was killed
    mid-write (only local disks have them)."""
    if not isinstance(fs, LocalFileSystem):
        return []
    return fs.glob(f"{glob.escape(path)}{TEMP_MARK}{'[0-9a-f]' * 12}")


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so the file appears whole or not at all."""
    with atomic_open(fs, path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """A binary file to write at ``path`` that appears only when the block ends without error.

    Local disks: a temporary name beside it, renamed into place (atomic). Object stores publish
    an object only when its upload completes, so it is written in place, and an error in the
    block discards the upload (fsspec's own ``with`` would complete it, half written). Other
    filesystems are written in place.
    """
    ensure_parent(fs, path)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        if isinstance(f, AbstractBufferedFile):
            f.discard()  # an object store's multipart upload is aborted
            f.closed = True  # close() would upload what was written so far
        else:
            f.close()
        raise
    f.close()


def flush_to_disk(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Have a local disk hold what has been written under ``path`` before the caller goes on:
    by this process and every other on this machine (the workers'), data and renames alike.

    The kernel writes files out in its own order: without this, a marker written after the
    files it vouches for could reach the disk first, and after a crash or a power cut say
    complete over empty or missing files. Linux flushes the one filesystem ``path`` is on
    (``syncfs``; a folder under it that another filesystem is mounted on is not flushed);
    other systems flush them all (``os.sync``, which on some, macOS among them, starts the
    writes without waiting for them). Object stores hold an object once its upload
    completes, and other filesystems keep their own promises (a network filesystem's client
    sends a file on close): those are left as they are.
    """
    if not isinstance(fs, LocalFileSystem):
        return
    syncfs = _libc_syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                raise OSError(err, "could not flush the filesystem to disk: "
                              f"{os.strerror(err)}", path)
            os.sync()  # (a sandbox that forbids syncfs, as a seccomp profile may)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _libc_syncfs() -> Optional[Any]:
    """The C library's ``syncfs`` (Linux), or None where it has none."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, TypeError):  # (TypeError: Windows loads no CDLL(None))
        return None


def list_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """All files under ``path`` (recursively), sorted; [] when nothing is there. A folder's
    placeholder key on an object store (``data/``, as consoles and Hadoop make them) is no
    file: s3fs lists it as one, and then deletes ``data`` instead."""
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [path]
    return sorted(p for p in fs.find(path, withdirs=False) if not p.endswith("/"))


def prune_empty_dirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove empty directories under and including ``path`` (local filesystems only)."""
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return
    for root, _dirs, _files in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(root)


def ensure_writable(uri: str, storage_options: Optional[dict[str, Any]] = None) -> None:
    """Raise ``StorageError`` unless a file can be written and removed under ``uri``.

    Run before a long job so an unreachable or read-only output fails in seconds, not at the end.
    """
    probe = join(uri, f".pixcrawler-probe-{uuid.uuid4().hex}")
    fs, path = open_fs(probe, storage_options)
    with storage_errors(uri, "write to"):
        ensure_parent(fs, path)
        fs.pipe_file(path, b"probe")
        fs.rm(path)
