"""The driver's side of generation without Ray: label settings and their hash from a config, the
settings each teacher's actors get, and the grouping of label batches into units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdpipe import config, runtime
from kdpipe.data import readers
from kdpipe.data.inputs import InputShard
from kdpipe.errors import ConfigError
from kdpipe.generation import pipeline, planning
from kdpipe.labels import cache
from kdpipe.teachers.predictor import PredictorSettings
from kdpipe.testing import faults


def _hashes(cfg: config.Config) -> dict[str, str]:
    return {t.name: cache.settings_hash(planning.label_settings_for(cfg, t.name)) for t in cfg.teachers}


def test_label_settings_hash_is_the_one_committed_caches_carry():
    """The hash names every committed unit directory: these literals were computed by the code
    before label_settings_for moved out of the cache layer (cache.settings_from_config)."""
    assert _hashes(config.load_config(None)) == {"mlp": "5342c6e9", "cnn": "5342c6e9", "wide_cnn": "5342c6e9"}
    cfg = config.load_config(None, ["labels.views=2", "teachers.1.labels.mode=topk", "teachers.1.labels.k=3"])
    assert _hashes(cfg) == {"mlp": "6da7c38f", "cnn": "15c3d452", "wide_cnn": "6da7c38f"}


def test_label_settings_are_the_cache_s_flat_settings_of_the_teacher_s_labels():
    cfg = config.load_config(None, ["teachers.2.labels.temperature=2", "labels.dtype=float32"])
    names = [str(i) for i in range(10)]
    assert planning.label_settings_for(cfg, "wide_cnn") == cache.label_settings(2.0, "full", "float32", "parquet",
                                                                               10, names, 10)
    assert planning.label_settings_for(cfg, "mlp")["temperature"] == 5.0


def test_no_teachers_is_a_config_error():
    cfg = config.load_config(None)
    cfg.teachers = []
    with pytest.raises(ConfigError, match="no teachers configured"):
        planning.inventory(cfg)


def test_predictor_settings_carry_the_teacher_the_config_and_the_plan(tmp_path):
    cfg = config.load_config(None, ["teachers.1.precision=bf16", "cache.storage_options.anon=true"])
    teacher = cfg.teachers[1]
    plan = runtime.ActorPlan(num_cpus=0.5, num_gpus=0.0, pool_size=2, threads=3)
    fault = faults.for_cache("driver_exit:units=1", str(tmp_path), {})
    pre = config.preprocess_for(cfg, teacher.name)
    settings = pipeline.predictor_settings(cfg, teacher, plan, ["s2", "s1"], drop=["x_a"], fault=fault)
    assert settings == PredictorSettings(
        name="cnn", arch=teacher.arch, checkpoint=teacher.checkpoint, storage_options={"anon": True},
        num_classes=10, preprocess=pre, column=pre.pixels_column(), shard_ids=("s2", "s1"), num_threads=3,
        device="auto", allow_import=False, fault=fault, precision="bf16", drop=("x_a",))
    every = pipeline.predictor_settings(cfg, cfg.teachers[0], plan)
    assert every.shard_ids is None and every.drop == () and every.fault is None and every.precision == "fp32"


def _batch(rows: list[tuple[str, str]], shard_rows: dict[str, int], placeholder: tuple[int, ...] = (),
           skipped: dict[int, list[dict[str, str]]] | None = None) -> dict[str, np.ndarray]:
    """A label batch as the last teacher hands it to the driver: rows of (shard_id, sample_key)."""
    n = len(rows)
    skipped = skipped or {}
    return {"shard_id": np.array([s for s, _ in rows], dtype=object),
            "sample_key": np.array([k for _, k in rows], dtype=object),
            "shard_rows": np.array([shard_rows[s] for s, _ in rows]),
            "skipped": np.array([json.dumps(skipped[i]) if i in skipped else "" for i in range(n)], dtype=object),
            readers.PLACEHOLDER: np.isin(np.arange(n), placeholder),
            "logits__t": np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)}


def _shards(*ids: str) -> dict[str, InputShard]:
    return {sid: InputShard(shard_id=sid, uri=f"memory://{sid}", num_rows=None, token={}) for sid in ids}


def test_driver_groups_rows_into_a_unit_the_moment_a_shard_is_complete():
    counts = {"a": 3, "b": 2, "c": 0}
    batches = [_batch([("a", "a0"), ("b", "b1"), ("a", "a2")], counts, skipped={1: [{"key": "b9", "reason": "bad"}]}),
               _batch([("c", "")], counts, placeholder=(0,)),  # a shard with no usable sample
               _batch([("b", "b0"), ("a", "a1")], counts)]
    out = list(pipeline._complete_shards(iter(batches), _shards("a", "b", "c")))
    assert [sid for sid, _, _ in out] == ["c", "a", "b"]
    rows = {sid: r for sid, r, _ in out}
    assert list(rows["a"]["sample_key"]) == ["a0", "a2", "a1"] and list(rows["b"]["sample_key"]) == ["b1", "b0"]
    assert len(rows["c"]["sample_key"]) == 0 and not rows["a"][readers.PLACEHOLDER].any()
    assert {sid: s for sid, _, s in out} == {"a": [], "b": [{"key": "b9", "reason": "bad"}], "c": []}


def test_driver_refuses_duplicated_and_missing_rows():
    counts = {"a": 1, "b": 2}
    with pytest.raises(RuntimeError, match="got 2 rows, expected 1"):
        list(pipeline._complete_shards(iter([_batch([("a", "a0"), ("a", "a0")], counts)]), _shards("a")))
    grouped = pipeline._complete_shards(iter([_batch([("a", "a0"), ("b", "b0")], counts)]), _shards("a", "b"))
    assert next(grouped)[0] == "a"
    with pytest.raises(RuntimeError, match=r"incomplete input shards \{'b': 1\}"):
        next(grouped)


def test_bad_fault_spec_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cache.inject_fault='disk_full': unknown fault 'disk_full'"):
        faults.parse("disk_full")
    with pytest.raises(ConfigError, match=r"'units' is not key=value"):
        faults.parse("driver_exit:units")
