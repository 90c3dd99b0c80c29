"""Config loading: YAML, overrides, validation messages that name the key and value."""

from __future__ import annotations

import pytest

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
