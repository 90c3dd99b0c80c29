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
    from kdpipe import config, datasets
    from kdpipe.demo import ensure_teachers

    workdir = tmp_path_factory.mktemp("workdir")
    cfg = config.resolve_paths(config.load_config(None, [
        f"workdir={workdir}", "data.num_shards=4",
        "teachers.0.train_epochs=3", "teachers.1.train_epochs=3", "teachers.2.train_epochs=3",
        "train.epochs=2",
    ]))
    d = cfg.data
    datasets.ensure_digits(d.train, d.holdout, d.storage_options, d.num_shards, d.holdout_fraction, d.split_seed)
    ensure_teachers(cfg, progress=False)
    return cfg
