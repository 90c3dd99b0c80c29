"""Config loading: YAML, overrides, validation messages that name the key and value."""

from __future__ import annotations

import pytest

from kdpipe import config
from kdpipe.config import ConfigError, dump_config, load_config, resolve_paths


def test_builtin_default_has_three_teachers_and_resolves_paths(tmp_path):
    cfg = resolve_paths(load_config(None, [f"workdir={tmp_path}"]))
    assert [t.name for t in cfg.teachers] == ["mlp", "cnn", "wide_cnn"]
    assert cfg.cache.root == f"{tmp_path}/cache"
    assert cfg.teachers[0].checkpoint == f"{tmp_path}/cache/checkpoints/mlp.pt"


def test_yaml_roundtrip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(load_config(None)))
    cfg = load_config(str(path), ["labels.temperature=2", "teachers.1.batch_size=32", "train.teachers=[cnn]"])
    assert cfg.labels.temperature == 2.0
    assert cfg.teachers[1].batch_size == 32
    assert cfg.train.teachers == ["cnn"]


@pytest.mark.parametrize("override, needle", [
    ("labels.temprature=2", "labels.temprature"),
    ("trian.epochs=3", "trian"),
    ("teachers.0.ckpt=x.pt", "teachers[0].ckpt"),
])
def test_unknown_key_fails_naming_it(override, needle):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("labels.temperature=0", "labels.temperature=0"),
    ("train.alpha=1.5", "train.alpha=1.5"),
    ("data.decode_cpus=0", "data.decode_cpus=0"),
    ("labels.dtype=int8", "labels.dtype='int8'"),
    ("train.epochs=many", "train.epochs"),
    ("train.teacher_weights=[1, 2]", "train.teacher_weights"),
    ("teachers.0.name=bad/name", "teachers[0].name"),
    ("ray.teacher_placement=stacked", "ray.teacher_placement='stacked'"),
])
def test_bad_values_fail_naming_key_and_value(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_example_configs_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "jobs/configs/ has example configs"
    for f in files:
        cfg = load_config(str(f))
        assert cfg.teachers


def test_per_teacher_label_overrides():
    from kdpipe.config import labels_for

    cfg = load_config(None, ["teachers.1.labels.temperature=2", "teachers.1.labels.mode=topk", "teachers.1.labels.k=3"])
    assert labels_for(cfg, "cnn").temperature == 2.0 and labels_for(cfg, "cnn").k == 3
    assert labels_for(cfg, "mlp") == cfg.labels
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.labels\.tempo"):
        load_config(None, ["teachers.1.labels.tempo=2"])
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.labels\.k=99"):
        load_config(None, ["teachers.1.labels.mode=topk", "teachers.1.labels.k=99"])


# --- one validator per section -------------------------------------------------------------------


def _demo_config():
    return load_config(None)


def _with(cfg, edit):
    edit(cfg)
    return cfg


@pytest.mark.parametrize("check, needle", [
    (lambda: config.validate_labels(config.LabelConfig(mode="all"), 10), "labels.mode='all'"),
    (lambda: config.validate_labels(config.LabelConfig(mode="topk", k=11), 10, "teachers[2].labels"),
     "teachers[2].labels.k=11"),
    (lambda: config.validate_cache(config.CacheConfig(inject_fault="disk_full")), "cache.inject_fault='disk_full'"),
    (lambda: config.validate_train_loop(config.TrainConfig(num_workers=0)), "train.num_workers=0"),
    (lambda: config.validate_train_loop(config.TrainConfig(shuffle_buffer=-1)), "train.shuffle_buffer=-1"),
    (lambda: config.validate_data(config.DataConfig(format="csv")), "data.format='csv'"),
    (lambda: config.validate_data(config.DataConfig(image_shape=[2, 8, 8])), "data.image_shape=[2, 8, 8]"),
    (lambda: config.validate_preprocess({"image_shape": [1, 8, 8], "resize": 0, "scale": 1.0, "mean": [], "std": []},
                                        "teachers[0].preprocess"), "teachers[0].preprocess.resize=0"),
    (lambda: config.validate_imports(_with(_demo_config(), lambda c: setattr(c.train, "student", "pkg:build"))),
     "train.student='pkg:build'"),
    (lambda: config.validate_teachers(_with(_demo_config(), lambda c: setattr(c.teachers[1], "batch_size", 0))),
     "teachers[1].batch_size=0"),
    (lambda: config.validate_teachers(_with(_demo_config(), lambda c: setattr(c.teachers[2], "name", "mlp"))),
     "teachers=['mlp', 'cnn', 'mlp']"),
    (lambda: config.validate_train_objective(config.TrainConfig(loss="l1")), "train.loss='l1'"),
    (lambda: config.validate_train_run(config.TrainConfig(max_failures=-2)), "train.max_failures=-2"),
    (lambda: config.validate_teacher_mix(config.TrainConfig(teacher_weights=[1.0]), ["a", "b"]),
     "train.teacher_weights=[1.0]"),
])
def test_each_section_validator_rejects_a_bad_value_naming_the_key(check, needle):
    with pytest.raises(ConfigError) as e:
        check()
    assert needle in str(e.value)


def test_section_validators_accept_the_defaults():
    cfg = _demo_config()
    config.validate_labels(cfg.labels, cfg.data.num_classes)
    config.validate_cache(cfg.cache)
    config.validate_train_loop(cfg.train)
    config.validate_data(cfg.data)
    config.validate_imports(cfg)
    config.validate_teachers(cfg)
    config.validate_train_objective(cfg.train)
    config.validate_train_run(cfg.train)
    config.validate_teacher_mix(cfg.train, [t.name for t in cfg.teachers])


@pytest.mark.parametrize("overrides, first", [
    (["data.format=csv", "train.loss=l1"], "data.format"),  # data before the training objective
    (["data.format=csv", "train.alpha=2"], "train.alpha"),  # the loop's numbers before data
    (["train.run=a/b", "train.teacher_weights=[1]", "teachers.0.batch_size=0"], "teachers[0].batch_size"),
    (["train.run=a/b", "train.teacher_weights=[1]"], "train.run"),
    (["labels.dtype=int8", "cache.inject_fault=disk_full"], "labels.dtype"),
])
def test_a_config_with_several_faults_reports_the_first_in_section_order(overrides, first):
    with pytest.raises(ConfigError, match=r"config key (\S+)=") as e:
        load_config(None, overrides)
    assert str(e.value).startswith(f"config key {first}="), str(e.value)


# --- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("7d", 604800.0),
    ("2w", 1209600.0), (" 1h 30m ", 5400.0),
])
def test_parse_duration_accepts_seconds_and_units(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "5y", "-3", "1h x", "h", "1h30"])
def test_parse_duration_rejects_anything_else_naming_the_text(text):
    with pytest.raises(ConfigError) as e:
        config.parse_duration(text)
    assert f"duration {text!r}:" in str(e.value)


# --- files ---------------------------------------------------------------------------------------


def test_config_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file '{tmp_path}' is a directory"):
        load_config(str(tmp_path))


def test_missing_registry_is_a_config_error_naming_uri_and_key(tmp_path):
    uri = str(tmp_path / "registry.yaml")
    with pytest.raises(ConfigError, match=rf"teacher registry '{uri}' does not exist: check `registry`"):
        load_config(None, [f"registry={uri}", "teachers=[]"])
