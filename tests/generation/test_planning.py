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


def _complete_cache(inv: planning.Inventory, shard_ids: list[str], fs=None) -> None:
    """Commit a unit of every teacher for `shard_ids` as the pipeline would (part, then record),
    with stand-in bytes: the inventory and the commit read records and manifests, not parts."""
    by_id = {s.shard_id: s for s in inv.shards}
    for name, directory in inv.dirs.items():
        for sid in shard_ids:
            shard = by_id[sid]
            keys = [f"{sid}-{i}" for i in range(shard.num_rows or 1)]
            cache.write_unit(fs or inv.fs, directory, {"shard_id": sid, "uri": shard.uri, "token": shard.token},
                             f"{name}:{sid}".encode(), "parquet", keys,
                             {"rows": len(keys), "entropy_sum": 1.0, "max_prob_sum": 0.5})


def test_cache_requests_grow_with_teachers_and_new_shards_not_with_the_shards(tmp_path):
    """200 input shards x 3 teachers, with storage requests counted: a rerun with nothing to do
    makes a few per teacher; a new version of the dataset with S new shards references the 200
    committed units through the old manifests (no request per unit) and adds requests for the S
    only. Ray is never started: nothing is left to label when generate runs."""
    import shutil

    from kdpipe import storage
    from kdpipe.data import digits
    from kdpipe.generation import generate
    from kdpipe.teachers.checkpoints import save_checkpoint
    from kdpipe.teachers.models import build_model
    from kdpipe.testing.counting import counting_requests

    cfg = config.resolve_paths(config.load_config(None, [f"workdir={tmp_path}", "data.num_shards=200"]))
    digits.ensure_builtin(cfg.data)
    for t in cfg.teachers:
        save_checkpoint(build_model(t.arch, 10, (1, 8, 8)), t.checkpoint, {}, t.arch, 10, {})
    inv = planning.inventory(cfg)
    assert len(inv.shards) == 200
    _complete_cache(inv, [s.shard_id for s in inv.shards])
    first = generate.generate(cfg, progress=False)  # manifests and refs; nothing to label
    assert first.teacher_forward_passes == 0 and all(r.units_written == 0 for r in first.teachers.values())
    root = str(tmp_path / "cache")

    with counting_requests(root) as rerun:
        again = generate.generate(cfg, progress=False)
    assert again.teacher_forward_passes == 0
    per_teacher = rerun.total / len(cfg.teachers)
    assert rerun.total > 0 and per_teacher <= 12, rerun.requests  # was 2 per unit: ~400 per teacher
    assert rerun.requests["put"] == 0  # nothing changed: nothing written

    # A new version of the dataset: S new shards (copies of the first S, with keys of their own).
    fs, train = storage.filesystem(cfg.data.train)
    files = sorted(p for p in fs.find(train) if p.endswith(".parquet"))
    for s, path in enumerate(files[:5]):
        shutil.copy(path, path.replace(".parquet", f"-new{s}.parquet"))
    new_inv = planning.inventory(cfg)
    new = sorted(set(s.shard_id for s in new_inv.shards) - set(s.shard_id for s in inv.shards))
    assert len(new) == 5 and new_inv.fingerprint != inv.fingerprint
    assert all(len(new_inv.reusable[n]) == 200 and not new_inv.done[n] for n in new_inv.dirs)
    with counting_requests(root) as grown:
        _complete_cache(new_inv, new, grown)  # what the pipeline writes for the S new shards
        report = generate.generate(cfg, progress=False)
    assert all((r.units_reused, r.units_written) == (200, 0) for r in report.teachers.values())
    # Per teacher: a part and a record per new shard, its read back, the manifest and the ref;
    # plus the inventory's few per directory.
    assert grown.requests["put"] == len(cfg.teachers) * (2 * len(new) + 2), grown.requests
    assert grown.total <= len(cfg.teachers) * (3 * len(new) + 20), grown.requests
    # The new manifests reference the old units where they are (in the first version's directory).
    manifest = cache.read_manifest(fs, report.teachers["mlp"].directory.removeprefix("file://"))
    dirs = {u["dir"] for u in manifest["units"]}
    assert len(manifest["units"]) == 205 and len(dirs) == 2 and manifest["rows"] == 899 + sum(
        u["rows"] for u in manifest["units"] if u["shard_id"] in new)
