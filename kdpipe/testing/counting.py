"""Storage requests counted (tests and benchmarks): how many reads, writes, listings and
existence checks a step makes on a local folder standing in for object storage, where each is
one request (a GET, PUT, LIST or HEAD) with its latency and price."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

from fsspec.implementations.local import LocalFileSystem

from kdpipe import storage

# The calls that are one request each on object storage (a call made inside another is not counted).
REQUESTS = ("ls", "info", "exists", "isdir", "isfile", "cat_file", "pipe_file", "open", "rm_file", "rm",
            "find", "glob", "mv", "copy", "makedirs", "mkdir")


class CountingFileSystem(LocalFileSystem):
    """A local filesystem that counts the requests made through it, by kind (`requests`)."""

    cachable = False  # one counter per instance

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: Counter[str] = Counter()
        self.bytes_written = 0  # by kdpipe.storage.write_bytes (counting_requests)
        self._lock = threading.Lock()
        self._depth = threading.local()

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def _counted(name: str):
    method = getattr(LocalFileSystem, name)

    def counted(self, *args, **kwargs):
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._lock:
                self.requests[name] += 1
        self._depth.n = depth + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth.n = depth

    counted.__name__ = name
    return counted


for _name in REQUESTS:
    setattr(CountingFileSystem, _name, _counted(_name))


@contextlib.contextmanager
def counting_requests(folder: str) -> Iterator[CountingFileSystem]:
    """While in the block, every `kdpipe.storage.filesystem` for a path under local `folder`
    is one CountingFileSystem: yields it, with the requests made."""
    fs = CountingFileSystem()
    original = storage.filesystem
    prefix = folder.rstrip("/") + "/"

    def patched(uri, storage_options=None):
        real, path = original(uri, storage_options)
        if storage.is_local(real) and (path == folder.rstrip("/") or path.startswith(prefix)):
            return fs, path
        return real, path

    write_bytes = storage.write_bytes

    def counted_write(target, path: str, data: bytes) -> None:
        if target is fs:  # a local write goes through os (an atomic rename), not the filesystem
            with fs._lock:
                fs.requests["put"] += 1
                fs.bytes_written += len(data)
            fs._depth.n = 1
            try:
                return write_bytes(target, path, data)
            finally:
                fs._depth.n = 0
        return write_bytes(target, path, data)

    storage.filesystem, storage.write_bytes = patched, counted_write
    try:
        yield fs
    finally:
        storage.filesystem, storage.write_bytes = original, write_bytes
