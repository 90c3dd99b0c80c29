"""All I/O through fsspec: one URI plus storage_options gives the filesystem, for us and for pyarrow.

Writes that readers may see are atomic: on local disks we write a temporary sibling and rename it;
on object stores a single PUT (or a completed multipart upload) is already all-or-nothing, so a
crashed writer leaves nothing visible under the final name there either.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kdpipe.errors import CacheError, ConfigError, StorageDenied, StorageError


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI such as file:///x, s3://b/k, memory://m or /x."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise ConfigError(f"URI {uri!r}: {e}: use a local path or a URI fsspec knows "
                          "(file://, s3://, gs://, ...)") from None
    except ImportError as e:  # a known protocol whose package is not installed (s3fs, gcsfs, ...)
        raise StorageError(f"URI {uri!r} cannot be opened: {e}") from None
    return fs, path


def access_denied(uri: str, error: Exception, key: str = "", options: str = "storage_options") -> StorageDenied:
    """An error (a PermissionError) that names the URI and what to check (never the credentials):
    `key` is the config key that gave the URI, `options` the one holding its storage options."""
    tail = f", or the URI in {key}" if key else ""
    return StorageDenied(f"access to {uri!r} was denied ({error}): check the storage credentials "
                         f"(environment, profile or {options}) and the endpoint{tail}")


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")


def missing_credentials(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) says that no storage credentials were found (botocore's
    NoCredentialsError, google-auth's DefaultCredentialsError, ...)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(c.__name__ in _NO_CREDENTIALS for c in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


NO_CREDENTIALS_HINT = ("no storage credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(or AWS_PROFILE), GOOGLE_APPLICATION_CREDENTIALS for gs://, or the storage_options of "
                       "the config (data.storage_options, cache.storage_options)")


def unreachable(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) says the store could not be reached: connection
    refused or reset, endpoint down, timeouts; not HTTP errors the store answered with."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in (
                "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
                "ServerDisconnectedError", "ConnectionClosedError"):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem over the same fsspec filesystem (same credentials and options)."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that readers see either nothing or the whole file."""
    parent = path.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)



def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any, compact: bool = False) -> None:
    """`obj` as JSON at `path` (write_bytes): indented, or `compact` (no whitespace: manifests,
    whose size grows with the shards)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")) if compact else json.dumps(obj, indent=2, sort_keys=True)
    write_bytes(fs, path, (text + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        return json.loads(fs.cat_file(path))
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e}); the file is corrupt, delete it and rerun") from e



def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



def stat_token(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """What identifies a file's version without reading it: size plus ETag, or mtime on disks."""
    return token_from_info(fs.info(path))


def token_from_info(info: dict[str, Any]) -> dict[str, Any]:
    """stat_token() from an fsspec info dict (as `find(detail=True)` lists them, no extra request)."""
    token: dict[str, Any] = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        token["etag"] = str(etag).strip('"')
    else:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        token["mtime"] = str(mtime)
    return token


def check_shared(uri: str) -> None:
    """Ray workers are other processes: refuse a process-local filesystem before they fail on it."""
    if uri.startswith("memory://"):
        raise ConfigError(f"{uri!r} is process-local (memory://): Ray workers cannot read it; "
                         "use a local path, file:// or an object store")
