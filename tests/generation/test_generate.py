"""Generation on a real local Ray with real (small, trained) teachers and real files."""

from __future__ import annotations

import copy
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe import config, storage
from kdpipe.data import inputs, readers
from kdpipe.generation import generate
from kdpipe.labels import cache, codec, softlabels, upkeep
from kdpipe.teachers.checkpoints import load_teacher

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _units(cfg, report, name):
    fs, _ = storage.filesystem(cfg.cache.root)
    directory = report.teachers[name].directory
    manifest = storage.read_json(fs, storage.join(directory, cache.MANIFEST))
    return fs, directory, manifest


@pytest.fixture(scope="module")
def generated(ray_cluster, digits_cfg):
    return generate.generate(digits_cfg, progress=False)


def test_cache_rows_and_keys_equal_inputs(digits_cfg, generated):
    d = digits_cfg.data
    shards = inputs.list_shards(d.train, inputs.source_spec(d))
    assert generated.teacher_forward_passes == 3 * sum(s.num_rows for s in shards)
    for name in ("mlp", "cnn", "wide_cnn"):
        fs, directory, manifest = _units(digits_cfg, generated, name)
        assert manifest["rows"] == sum(s.num_rows for s in shards)
        assert sorted(u["shard_id"] for u in manifest["units"]) == sorted(s.shard_id for s in shards)
        for shard in shards:
            unit = next(u for u in manifest["units"] if u["shard_id"] == shard.shard_id)
            stored = pq.read_table(io.BytesIO(fs.cat_file(storage.join(directory, unit["part"]))))
            stored_keys = stored.column(softlabels.KEY).to_pylist()
            input_keys = readers.read_samples(shard, inputs.source_spec(d)).keys
            assert stored_keys == sorted(input_keys)  # no duplicate, no missing row
            assert len(set(stored_keys)) == len(stored_keys)


def test_stored_soft_labels_equal_teacher_forward(digits_cfg, generated):
    d, T = digits_cfg.data, digits_cfg.labels.temperature
    keys, x, _ = readers.load_split(d.train, inputs.source_spec(d), config.preprocess_for(digits_cfg))
    for t in digits_cfg.teachers:
        model = load_teacher(t.name, t.arch, t.checkpoint, {}, d.num_classes, tuple(d.image_shape))
        with torch.no_grad():
            direct = softlabels.softmax(model(torch.from_numpy(x)).numpy(), T)
        fs, directory, manifest = _units(digits_cfg, generated, t.name)
        stored = {}
        for unit in manifest["units"]:
            table = pq.read_table(io.BytesIO(fs.cat_file(storage.join(directory, unit["part"]))))
            p = softlabels.softmax(codec.table_logits(table), T)
            stored.update(zip(table.column(softlabels.KEY).to_pylist(), p, strict=True))
        got = np.stack([stored[k] for k in keys])
        assert np.allclose(got.sum(-1), 1.0, atol=1e-6)
        assert np.abs(got - direct).max() < 2e-3  # float16 logits
        assert manifest["labels"]["temperature"] == T and manifest["labels"]["dtype"] == "float16"


def test_rerun_reuses_everything(digits_cfg, generated):
    from kdpipe.demo import ensure_teachers

    assert ensure_teachers(digits_cfg, progress=False) == []  # checkpoints exist: no teacher retrained
    again = generate.generate(digits_cfg, progress=False)
    assert again.teacher_forward_passes == 0
    assert all(r.units_written == 0 for r in again.teachers.values())


def test_fused_placement_labels_as_the_pools_do(digits_cfg, generated, tmp_path):
    """The default placement here (auto, no GPU) is fused: one actor pool whose every actor runs
    all three teachers on each batch. Its committed units hold the same keys and labels as the
    chained pools' (ray.teacher_placement=pools)."""
    assert config.teacher_placement(digits_cfg, digits_cfg.teachers) == "fused"
    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path / "cache")
    cfg.ray.teacher_placement = "pools"
    pooled = generate.generate(cfg, progress=False)
    assert pooled.teacher_forward_passes == generated.teacher_forward_passes
    for t in cfg.teachers:
        fs, fused_dir, mine = _units(digits_cfg, generated, t.name)
        _, pools_dir, pools = _units(cfg, pooled, t.name)
        assert [u["shard_id"] for u in mine["units"]] == [u["shard_id"] for u in pools["units"]]
        for a, b in zip(pools["units"], mine["units"], strict=True):
            ta = pq.read_table(io.BytesIO(fs.cat_file(storage.join(pools_dir, a["part"]))))
            tb = pq.read_table(io.BytesIO(fs.cat_file(storage.join(fused_dir, b["part"]))))
            assert ta.column(softlabels.KEY).to_pylist() == tb.column(softlabels.KEY).to_pylist()
            np.testing.assert_allclose(codec.table_logits(ta), codec.table_logits(tb), rtol=2e-3, atol=2e-3)


def test_lost_unit_is_redone_alone(digits_cfg, generated):
    """A crash between part file and record leaves the unit uncommitted (and, as the manifest is
    written last, no manifest naming it); a rerun redoes just it."""
    fs, directory, manifest = _units(digits_cfg, generated, "cnn")
    victim = manifest["units"][0]
    fs.rm(cache.unit_record_path(fs._strip_protocol(directory), victim["shard_id"]))
    fs.rm(storage.join(fs._strip_protocol(directory), cache.MANIFEST))
    again = generate.generate(digits_cfg, progress=False)
    assert again.teachers["cnn"].units_written == 1
    assert again.teachers["cnn"].rows_labelled == victim["rows"]
    assert again.teachers["mlp"].units_written == 0 and again.teachers["wide_cnn"].units_written == 0
    _, _, new_manifest = _units(digits_cfg, again, "cnn")
    redone = next(u for u in new_manifest["units"] if u["shard_id"] == victim["shard_id"])
    assert redone["sha256"] == victim["sha256"]  # deterministic bytes


def test_changing_temperature_makes_new_units(digits_cfg, generated):
    cfg = copy.deepcopy(digits_cfg)
    cfg.labels.temperature = 2.0
    cfg.teachers = cfg.teachers[:1]
    rep = generate.generate(cfg, progress=False)
    assert rep.teachers["mlp"].units_written == len(inputs.list_shards(cfg.data.train, inputs.source_spec(cfg.data)))
    assert rep.teachers["mlp"].directory != generated.teachers["mlp"].directory


def test_missing_checkpoint_fails_before_any_work(digits_cfg, ray_cluster):
    cfg = copy.deepcopy(digits_cfg)
    cfg.teachers[1].checkpoint = cfg.teachers[1].checkpoint + ".missing"
    with pytest.raises(FileNotFoundError, match=r"teacher 'cnn': checkpoint .*\.missing"):
        generate.generate(cfg, progress=False)


def test_wrong_class_count_fails(digits_cfg, ray_cluster):
    cfg = copy.deepcopy(digits_cfg)
    cfg.data.num_classes = 12
    with pytest.raises(ValueError, match="teacher 'mlp' gives 10 classes, the dataset has 12"):
        generate.generate(cfg, progress=False)


def test_new_input_shard_labels_only_that_shard(ray_cluster, digits_cfg, tmp_path, local_epoch):
    """New shards arrive: only their units run through the teachers; the rest are reused by
    reference, and the new dataset version trains with labels from both."""
    import shutil

    import pyarrow as pa


    cfg = copy.deepcopy(digits_cfg)
    cfg.data.train = str(tmp_path / "train")
    cfg.cache.root = str(tmp_path / "cache")
    cfg.teachers = cfg.teachers[:2]
    cfg.train.epochs = 1
    shutil.copytree(digits_cfg.data.train, cfg.data.train)
    first = generate.generate(cfg, progress=False)
    assert all(r.units_written == 4 for r in first.teachers.values())

    holdout = pq.read_table(inputs.list_shards(cfg.data.holdout, inputs.source_spec(cfg.data))[0].uri)
    extra = holdout.slice(0, 37)
    extra = extra.set_column(0, "sample_key", pa.array([f"extra-{i:04d}" for i in range(37)]))
    pq.write_table(extra, str(tmp_path / "train" / "train-99999.parquet"))

    from kdpipe.generation import regenerate

    result = regenerate.regenerate(cfg, progress=False)
    for name in ("mlp", "cnn"):
        planned = result["plan"]["teachers"][name]
        assert [i["reason"] for i in planned["todo"]] == ["new input shard"] and planned["units_reused"] == 4
        r = result["generate"]["teachers"][name]
        assert (r["units_written"], r["units_reused"], r["rows_labelled"]) == (1, 4, 37)
    assert result["teacher_forward_passes"] == 2 * 37
    second = generate.generate(cfg, progress=False)
    assert second.fingerprint != first.fingerprint and second.teacher_forward_passes == 0
    fs, _ = storage.filesystem(cfg.cache.root)
    manifest = storage.read_json(fs, storage.join(second.teachers["cnn"].directory, cache.MANIFEST))
    assert manifest["rows"] == 899 + 37 and len(manifest["units"]) == 5
    assert len({u["dir"] for u in manifest["units"]}) == 2  # 4 units borrowed, 1 new

    assert all(r.units_reused == 0 for r in second.teachers.values())
    assert regenerate.regenerate(cfg, progress=False)["status"] == "up-to-date"

    _, epoch = local_epoch(cfg)  # the student trains on every row, the new shard's included
    assert epoch.rows == 899 + 37 and epoch.sums["kd"] > 0

    # gc keeps the old dataset version's directory: the latest one borrows its units.
    entries = upkeep.list_caches(fs, fs._strip_protocol(cfg.cache.root))
    assert len(entries) == 4 and upkeep.garbage(entries, 0) == []


def test_regenerate_after_a_checkpoint_change_relabels_only_that_teacher_and_pins_still_train(
        ray_cluster, digits_cfg, tmp_path, local_epoch):
    from kdpipe.demo import fit_classifier
    from kdpipe.generation import regenerate
    from kdpipe.teachers.checkpoints import save_checkpoint

    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path / "cache")
    first = regenerate.regenerate(cfg, progress=False)
    assert first["status"] == "done" and first["teacher_forward_passes"] == 3 * 899
    assert {i["reason"] for t in first["plan"]["teachers"].values() for i in t["todo"]} == {"new teacher (no labels yet)"}
    old_cnn = first["plan"]["teachers"]["cnn"]["digest"]
    fs, root = storage.filesystem(cfg.cache.root)
    refs = {n: cache.read_ref(fs, root, n) for n in ("mlp", "cnn", "wide_cnn")}

    nothing = regenerate.regenerate(cfg, progress=False)  # nothing changed: nothing runs, no ref moves
    assert nothing["status"] == "up-to-date" and "generate" not in nothing
    assert {n: cache.read_ref(fs, root, n) for n in refs} == refs

    d = cfg.data
    _, x, y = readers.load_split(d.train, inputs.source_spec(d), config.preprocess_for(cfg))
    cfg.teachers[1].checkpoint = str(tmp_path / "cnn-v2.pt")
    save_checkpoint(fit_classifier("cnn", x, y, 10, 2, seed=99), cfg.teachers[1].checkpoint, {}, "cnn", 10, {})
    plan = regenerate.regenerate(cfg, dry_run=True, progress=False)["plan"]["teachers"]
    assert {n: len(t["todo"]) for n, t in plan.items()} == {"mlp": 0, "cnn": 4, "wide_cnn": 0}
    assert all(i["reason"].startswith("checkpoint changed") for i in plan["cnn"]["todo"])
    assert cache.read_ref(fs, root, "cnn") == refs["cnn"]  # a dry run changes nothing

    held = regenerate.Lease(fs, root, 60)
    assert held.acquire() is None
    yielded = regenerate.regenerate(cfg, progress=False)  # another holds the lease: this one yields
    assert yielded["status"] == "yielded" and yielded["holder"] == held.owner
    held.release()

    second = regenerate.regenerate(cfg, progress=False)
    assert second["status"] == "done" and second["teacher_forward_passes"] == 899  # only cnn ran
    units = {n: t["units_written"] for n, t in second["generate"]["teachers"].items()}
    assert units == {"mlp": 0, "cnn": 4, "wide_cnn": 0}
    new_ref = cache.read_ref(fs, root, "cnn")
    assert new_ref["digest"] != old_cnn and new_ref["previous"] == old_cnn
    assert cache.read_ref(fs, root, "mlp") == refs["mlp"]
    assert not fs.exists(f"{root}/{regenerate.LOCK}")  # released

    cfg.train.teachers = [f"cnn@{old_cnn}"]  # pinned: the old labels, still committed
    prepared, epoch = local_epoch(cfg)
    assert prepared.plan.teachers == (f"cnn@{old_cnn}",) and epoch.sums["kd"] > 0
    assert old_cnn in prepared.plan.units[0].directory  # the pinned version's directory


def test_labels_stored_as_inf_are_never_committed(ray_cluster, digits_cfg, tmp_path):
    """A teacher whose logits reach 81,000: finite in float32, Inf once cast to the stored
    float16. Nothing is committed and the ref does not move (NaN outputs: the unit tests of
    softlabels.check_storable)."""
    from kdpipe.teachers.checkpoints import save_checkpoint
    from kdpipe.teachers.models import build_model

    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path / "cache")
    model = build_model("mlp", 10, (1, 8, 8))
    with torch.no_grad():
        model[-1].bias.fill_(81_000.0)
    cfg.teachers = [copy.deepcopy(cfg.teachers[0])]
    cfg.teachers[0].checkpoint = str(tmp_path / "nan.pt")
    save_checkpoint(model, cfg.teachers[0].checkpoint, {}, "mlp", 10, {})
    with pytest.raises(ValueError, match=r"teacher 'mlp', input shard .*: the labels of sample 'digits-\d+' would be "
                                         r"stored as Inf \(a logit of 8\d{4}(\.\d+)? is beyond float16's range"):
        generate.generate(cfg, progress=False)
    fs, root = storage.filesystem(cfg.cache.root)
    assert not fs.glob(f"{root}/teachers/mlp/*/*/_units/*.json")  # nothing committed
    assert not fs.glob(f"{root}/teachers/mlp/*/*/_manifest.json")
    assert cache.read_ref(fs, root, "mlp") is None


def test_one_teachers_label_settings_change_regenerates_only_it(ray_cluster, digits_cfg, tmp_path, local_epoch):

    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path / "cache")
    cfg.teachers = cfg.teachers[:2]
    generate.generate(cfg, progress=False)
    cfg.teachers[1].labels = {"mode": "topk", "k": 4, "dtype": "float32", "format": "webdataset"}
    rep = generate.generate(cfg, progress=False)
    assert rep.teachers["mlp"].units_written == 0
    assert rep.teachers["cnn"].units_written == 4 and rep.teachers["cnn"].rows_labelled == 899
    fs, _ = storage.filesystem(cfg.cache.root)
    manifest = storage.read_json(fs, storage.join(rep.teachers["cnn"].directory, cache.MANIFEST))
    assert (manifest["labels"]["mode"], manifest["labels"]["k"], manifest["labels"]["dtype"]) == ("topk", 4, "float32")
    assert manifest["units"][0]["part"].endswith(".tar")
    # A student mixing a full Parquet teacher and a top-k WebDataset teacher trains on both.
    prepared, epoch = local_epoch(cfg)
    assert prepared.plan.teachers == ("mlp", "cnn") and epoch.sums["kd"] > 0 and epoch.rows == 899


def test_regenerate_every_rereads_the_teacher_registry(digits_cfg, generated, tmp_path):
    """A scheduled dry-run loop over a config whose teachers live in a registry file: when the
    registry points a teacher at a new checkpoint, the next cycle plans that teacher's units."""
    import yaml

    from kdpipe.generation import regenerate

    registry = tmp_path / "teachers.yaml"
    teachers = [{"name": t.name, "arch": t.arch, "checkpoint": t.checkpoint} for t in digits_cfg.teachers]
    registry.write_text(yaml.safe_dump({"teachers": teachers}))
    raw = config.to_dict(digits_cfg)
    raw["teachers"], raw["registry"] = [], str(registry)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    from kdpipe.teachers.checkpoints import save_checkpoint

    moved = tmp_path / "mlp-v2.pt"  # the same weights re-saved with other metadata: other bytes, a new digest
    mlp = load_teacher("mlp", "mlp", teachers[0]["checkpoint"], {}, 10, (1, 8, 8))
    save_checkpoint(mlp, str(moved), {}, "mlp", 10, {"release": 2})

    def between_cycles(seconds):
        teachers[0]["checkpoint"] = str(moved)
        registry.write_text(yaml.safe_dump({"teachers": teachers}))

    said = []
    cycles = regenerate.run_every(lambda: config.resolve_paths(config.load_config(str(path))), 3600, cycles=2,
                                  dry_run=True, say=said.append, sleep=between_cycles)
    first, second = (c["plan"]["teachers"] for c in cycles)
    assert all(c["status"] == "dry-run" for c in cycles)
    assert {n: len(t["todo"]) for n, t in first.items()} == {"mlp": 0, "cnn": 0, "wide_cnn": 0}
    assert {n: len(t["todo"]) for n, t in second.items()} == {"mlp": 4, "cnn": 0, "wide_cnn": 0}
    assert second["mlp"]["todo"][0]["reason"].startswith("checkpoint changed")
    assert any("mlp" in line and "checkpoint changed" in line for line in said)


def test_registry_and_teachers_list_do_not_mix(tmp_path):
    registry = tmp_path / "teachers.yaml"
    registry.write_text("teachers:\n  - {name: a, arch: mlp}\n")
    cfg = config.load_config(None, ["teachers=[]", f"registry={registry}"])
    assert [t.name for t in cfg.teachers] == ["a"] and "teachers: []" in config.dump_config(cfg)
    with pytest.raises(config.ConfigError, match="both `registry"):
        config.load_config(None, [f"registry={registry}"])  # the default teachers are still listed
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_config(None, ["teachers=[]", f"registry={tmp_path / 'missing.yaml'}"])
    registry.write_text("teachers:\n  - {name: a, arch: mlp, colour: red}\n")
    with pytest.raises(config.ConfigError, match=r"teachers\[0\].colour"):
        config.load_config(None, ["teachers=[]", f"registry={registry}"])
