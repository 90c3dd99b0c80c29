"""Faults during generation, injected at known points of real runs (cache.inject_fault, see
kdpipe.testing.faults): a teacher actor killed, the driver killed, the object store going away, two
generations of one cache at once. Each ends in a cache equal to an uninterrupted run's, sample
for sample, or in a clear error that leaves only whole units behind.

(A training worker killed mid-epoch is in test_train_features.py.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from kdpipe import config, storage
from kdpipe.data import inputs
from kdpipe.errors import StorageUnreachable
from kdpipe.generation import generate
from kdpipe.labels import cache, codec, upkeep
from kdpipe.testing import faults

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

TEACHERS = ("mlp", "cnn", "wide_cnn")


def _config(digits_cfg, root: str, fault: str = "", storage_options: dict | None = None) -> config.Config:
    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root, cfg.cache.inject_fault = root, fault
    cfg.cache.storage_options = dict(storage_options or {})
    return cfg


def _values(cfg: config.Config) -> dict[str, tuple[Counter, dict[str, np.ndarray]]]:
    """Per teacher, as a reader sees the cache through its `latest` ref and manifest: how often
    each key occurs, and its stored logits."""
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    out = {}
    for name in TEACHERS:
        ref = cache.read_ref(fs, root, name)
        directory = fs._strip_protocol(ref["manifest"]).rsplit("/", 1)[0]
        manifest = cache.read_manifest(fs, directory)
        counts, logits = Counter(), {}
        for unit in manifest["units"]:
            rows = codec.decode_unit(fs.cat_file(storage.join(directory, unit["part"])), "full", "parquet")
            counts.update(rows["keys"])
            logits.update(zip(rows["keys"], rows["logits"], strict=True))
        assert upkeep.verify_cache(fs, directory) == [], f"teacher {name}: cache does not verify"
        out[name] = (counts, logits)
    return out


def _assert_same_as(reference: dict, cfg: config.Config) -> None:
    got = _values(cfg)
    for name in TEACHERS:
        counts, logits = got[name]
        ref_counts, ref_logits = reference[name]
        assert set(counts.values()) == {1}, f"teacher {name}: some keys committed more than once"
        assert counts == ref_counts, f"teacher {name}: keys differ from the uninterrupted run"
        diff = max(float(np.abs(logits[k] - ref_logits[k]).max()) for k in ref_logits)
        assert diff < 1e-2, f"teacher {name}: logits differ from the uninterrupted run by {diff}"


def _committed(cfg: config.Config) -> int:
    """Unit records in the cache: each one is a whole, committed unit."""
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    return len(fs.glob(storage.join(root, "teachers", "*", "*", "*", "_units", "*.json")))


def _no_temporary_files(cfg: config.Config) -> None:
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    leftovers = [p for p in fs.find(root) if ".tmp-" in p]
    assert leftovers == [], f"temporary files visible: {leftovers}"


@pytest.fixture(scope="module")
def reference(ray_cluster, digits_cfg, tmp_path_factory):
    """An uninterrupted generation: what every faulty run must end up equal to."""
    cfg = _config(digits_cfg, str(tmp_path_factory.mktemp("reference") / "cache"))
    generate.generate(cfg, progress=False)
    values = _values(cfg)
    shards = inputs.list_shards(cfg.data.train, inputs.source_spec(cfg.data))
    assert sum(values["mlp"][0].values()) == sum(s.num_rows for s in shards)
    return values


def _kdpipe(cfg: config.Config, tmp_path, name: str, *args: str, wait: bool = True):
    """`kdpipe generate` in its own process, joining this session's Ray cluster."""
    import ray

    cfg = copy.deepcopy(cfg)
    cfg.ray.address = ray.get_runtime_context().gcs_address
    path = tmp_path / f"{name}.yaml"
    path.write_text(config.dump_config(cfg))
    command = [sys.executable, "-m", "kdpipe.cli", "generate", str(path), *args]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {path}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_killed_teacher_actor_is_restarted_and_the_job_completes(reference, digits_cfg, tmp_path):
    cfg = _config(digits_cfg, str(tmp_path / "cache"), "teacher_exit:teacher=cnn:call=2")
    report = generate.generate(cfg, progress=False)
    marker = faults.for_cache(cfg.cache.inject_fault, cfg.cache.root, {}).marker
    assert os.path.exists(marker)  # the actor did exit at its second batch
    assert all(r.units_written == 4 for r in report.teachers.values())
    _assert_same_as(reference, cfg)  # every key exactly once, values as uninterrupted
    _no_temporary_files(cfg)


def test_killed_driver_rerun_commits_only_the_missing_units(reference, digits_cfg, tmp_path):
    cfg = _config(digits_cfg, str(tmp_path / "cache"), "driver_exit:units=5")
    crashed = _kdpipe(cfg, tmp_path, "crash")
    assert crashed.returncode == faults.EXIT_CODE, crashed.stderr
    assert _committed(cfg) == 5
    fs, root = storage.filesystem(cfg.cache.root)
    assert all(cache.read_ref(fs, root, name) is None for name in TEACHERS)  # readers see nothing unfinished
    # The same command again (the fault fires once per cache): only the 7 missing units run.
    rerun = generate.generate(cfg, progress=False)
    assert sum(r.units_written for r in rerun.teachers.values()) == 12 - 5
    _assert_same_as(reference, cfg)
    _no_temporary_files(cfg)


def test_object_store_stopped_mid_run_fails_clearly_and_a_rerun_finishes(reference, digits_cfg, tmp_path):
    from kdpipe.testing import s3local

    secret = "kdpipe-outage-secret-0123456789"
    server = s3local.start(str(tmp_path / "s3"), "KDPIPEOUTAGEKEY", secret, bucket="kdpipe-outage")
    try:
        go = str(tmp_path / "go")
        cfg = _config(digits_cfg, "s3://kdpipe-outage/cache", f"driver_pause:units=2:until={go}", server.options)
        outcome = {}

        def run():
            try:
                outcome["report"] = generate.generate(cfg, progress=False)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                outcome["error"] = e

        worker = threading.Thread(target=run)
        worker.start()
        _wait_for(go + ".paused")
        server.kill()  # the store goes away between two unit commits
        open(go, "w").close()
        worker.join(timeout=120)
        assert not worker.is_alive()
        error = outcome.get("error")
        assert isinstance(error, StorageUnreachable), repr(error)
        message = str(error)
        assert "s3://kdpipe-outage/cache" in message and "rerun the same command" in message
        assert secret not in message

        server.restart()
        fs, _ = storage.filesystem(cfg.cache.root, server.options)
        records = fs.glob("kdpipe-outage/cache/teachers/*/*/*/_units/*.json")
        assert len(records) == 2  # the units committed before the outage, each whole:
        for path in records:
            record = storage.read_json(fs, path)
            part = fs.cat_file(cache.unit_part_path(path.rsplit("/_units/", 1)[0], record))
            assert storage.sha256_bytes(part) == record["sha256"]
        rerun = generate.generate(cfg, progress=False)
        assert sum(r.units_written for r in rerun.teachers.values()) == 12 - 2
        _assert_same_as(reference, cfg)
    finally:
        server.stop()


def test_two_generations_of_one_cache_at_once(reference, digits_cfg, tmp_path):
    """A second run starts while the first has committed one unit and holds its Ray Data
    pipeline open; the second commits everything, then the first finishes too."""
    go = str(tmp_path / "go")
    cfg = _config(digits_cfg, str(tmp_path / "cache"))
    for t in cfg.teachers:  # both runs' actors fit on 2 CPUs at once
        t.num_cpus, t.pool_size = 0.2, 1
    cfg.data.decode_cpus = 0.1
    first = _kdpipe(_config_with(cfg, f"driver_pause:units=1:until={go}"), tmp_path, "first", wait=False)
    try:
        _wait_for(go + ".paused", first)
        second = generate.generate(cfg, progress=False)
        assert sum(r.units_written for r in second.teachers.values()) == 12 - 1
        _assert_same_as(reference, cfg)
    finally:
        open(go, "w").close()
        out, _ = first.communicate(timeout=180)
    assert first.returncode == 0, out
    _assert_same_as(reference, cfg)  # the first run's later commits left it valid and complete
    _no_temporary_files(cfg)


def _config_with(cfg: config.Config, fault: str) -> config.Config:
    c = copy.deepcopy(cfg)
    c.cache.inject_fault = fault
    return c


def test_unknown_fault_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"cache.inject_fault='disk_full': unknown fault 'disk_full'"):
        config.load_config(None, ["cache.inject_fault=disk_full"])
    with pytest.raises(config.ConfigError, match=r"'units' is not key=value"):
        config.load_config(None, ["cache.inject_fault=driver_exit:units"])
