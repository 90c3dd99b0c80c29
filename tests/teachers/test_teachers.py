"""Teacher checks before any work: missing checkpoint, wrong class count, wrong architecture,
unsafe pickles; and the batch predictor (built from its frozen settings) against a direct forward pass."""

from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch

from kdpipe.data.images import make_preprocess
from kdpipe.errors import ConfigError, StorageMissing
from kdpipe.teachers.checkpoints import inspect_teacher, load_teacher, save_checkpoint
from kdpipe.teachers.models import build_model
from kdpipe.teachers.predictor import (
    PredictorSettings,
    TeacherPredictor,
    logits_column,
    mask_column,
)
from kdpipe.testing import faults

PRE = {"image_shape": [1, 8, 8], "scale": 0.0625}


def _save(tmp_path, arch, classes):
    path = str(tmp_path / f"{arch}-{classes}.pt")
    save_checkpoint(build_model(arch, classes, (1, 8, 8)), path, {}, arch, classes, {"holdout_accuracy": 0.5})
    return path


def _settings(path, pre, **kw) -> PredictorSettings:
    """Teacher 't', a cnn for 10 classes, reading the column 'view'."""
    return PredictorSettings(name="t", arch="cnn", checkpoint=path, storage_options={}, num_classes=10,
                             preprocess=pre, column="view", **kw)


def test_inspect_gives_stable_digest_and_metrics(tmp_path):
    path = _save(tmp_path, "cnn", 10)
    a = inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), PRE)
    b = inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), PRE)
    assert a.digest == b.digest and a.metrics["holdout_accuracy"] == 0.5
    c = inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), {**PRE, "scale": 1.0})
    assert c.digest != a.digest  # preprocessing is part of the digest


def test_missing_checkpoint_names_teacher_and_path(tmp_path):
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError) as e:
        inspect_teacher("big", "cnn", missing, {}, 10, (1, 8, 8), PRE)
    assert "'big'" in str(e.value) and missing in str(e.value)
    assert isinstance(e.value, StorageMissing)  # a user's error: the CLI prints it, exit status 2


def test_class_count_mismatch_names_teacher(tmp_path):
    path = _save(tmp_path, "mlp", 100)
    with pytest.raises(ConfigError, match=r"teacher 'r50' gives 100 classes, the dataset has 10"):
        inspect_teacher("r50", "mlp", path, {}, 10, (1, 8, 8), PRE)


def test_checkpoint_for_another_architecture(tmp_path):
    path = _save(tmp_path, "mlp", 10)
    with pytest.raises(ConfigError, match="does not fit architecture 'cnn'"):
        inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), PRE)
    with pytest.raises(ConfigError, match="unknown architecture 'resnet_9000'"):
        build_model("resnet_9000", 10, (3, 32, 32))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"state_dict": {}, "x": Evil()}, buf, pickle_module=pickle)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        inspect_teacher("t", "mlp", str(path), {}, 10, (1, 8, 8), PRE)


def test_predictor_matches_direct_forward_and_masks_other_shards(tmp_path):
    path = _save(tmp_path, "cnn", 10)
    pre = make_preprocess([1, 8, 8], None, 1 / 16, [0.5], [0.25])
    pred = TeacherPredictor(_settings(path, pre, shard_ids=("a",)))
    x = np.random.default_rng(0).integers(0, 17, (6, 1, 8, 8), dtype=np.uint8)
    out = pred({"view": x, "shard_id": np.array(["a", "b", "a", "a", "b", "a"], dtype=object),
                "placeholder": np.array([False, False, False, True, False, False])})
    mask = out[mask_column("t")]
    assert mask.tolist() == [True, False, True, False, False, True]  # other shard, placeholder row
    model = build_model("cnn", 10, (1, 8, 8))
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    with torch.no_grad():
        direct = model.eval()((torch.from_numpy(x).float() / 16 - 0.5) / 0.25).numpy()
    assert np.allclose(out[logits_column("t")][mask], direct[mask], atol=1e-5)
    assert not out[logits_column("t")][~mask].any()


def test_predictor_settings_are_a_frozen_message_that_pickles(tmp_path):
    """Ray pickles the settings to every actor of the pool: they must come back equal, and no
    actor may change them."""
    pre = make_preprocess([1, 8, 8], None, 1 / 16, [0.5], [0.25])
    fault = faults.for_cache("teacher_exit:teacher=t:call=2", str(tmp_path / "cache"), {})
    settings = _settings(str(tmp_path / "t.pt"), pre, shard_ids=("a", "b"), num_threads=2, fault=fault,
                         precision="bf16", drop=("view",))
    back = pickle.loads(pickle.dumps(settings))
    assert back == settings and back is not settings
    assert back.preprocess == pre and back.fault == fault and back.shard_ids == ("a", "b")
    assert back != dataclasses.replace(settings, shard_ids=("a",))  # equality compares the fields
    assert hash(back) == hash(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.shard_ids = None


def test_predictor_from_settings_labels_as_the_loaded_teacher(tmp_path):
    """A predictor built from (pickled) settings gives, bit for bit, the logits of load_teacher's
    model on the normalised batch, marks every row labelled and drops the columns in `drop`."""
    path = _save(tmp_path, "cnn", 10)
    pre = make_preprocess([1, 8, 8], None, 1 / 16, [0.5], [0.25])
    settings = pickle.loads(pickle.dumps(_settings(path, pre, device="cpu", drop=("view",))))
    x = np.random.default_rng(2).integers(0, 17, (7, 1, 8, 8), dtype=np.uint8)
    keys = np.array([f"k{i}" for i in range(7)], dtype=object)
    out = TeacherPredictor(settings)({"view": x, "sample_key": keys, "shard_id": np.full(7, "a", dtype=object)})
    model = load_teacher("t", "cnn", path, {}, 10, (1, 8, 8))
    with torch.inference_mode():
        want = model(pre.normalise(torch.from_numpy(x))).numpy()
    got = out[logits_column("t")]
    assert got.dtype == np.float32 and got.shape == (7, 10) and np.abs(want).max() > 0
    assert np.array_equal(got, want)
    assert out[mask_column("t")].all() and "view" not in out and list(out["sample_key"]) == list(keys)


USER_MODULE = '''
import pathlib
import torch

pathlib.Path(__file__).with_name("imported.marker").write_text("this module's code ran")


def build(num_classes, input_shape):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))


def not_a_model(num_classes, input_shape):
    return "a string"
'''


def test_module_function_teachers_need_the_explicit_opt_in(tmp_path, monkeypatch):
    from kdpipe.config import ConfigError, load_config
    from kdpipe.teachers.checkpoints import load_teacher
    from kdpipe.training.export import load_student

    (tmp_path / "kd_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = "kd_user_models:build"
    with pytest.raises(ConfigError, match=r"teachers\[0\].arch='kd_user_models:build'.*allow_import: true"):
        load_config(None, [f"teachers.0.arch={arch}"])
    with pytest.raises(ConfigError, match=r"train.student.*allow_import"):
        load_config(None, [f"train.student={arch}"])
    assert load_config(None, [f"teachers.0.arch={arch}", "allow_import=true"]).teachers[0].arch == arch

    with pytest.raises(ValueError, match="imports module 'kd_user_models' and runs its code"):
        build_model(arch, 10, (1, 8, 8))
    assert not (tmp_path / "imported.marker").exists()  # refused before importing anything
    path = str(tmp_path / "user.pt")
    save_checkpoint(build_model(arch, 10, (1, 8, 8), allow_import=True), path, {}, arch, 10, {})
    assert (tmp_path / "imported.marker").exists()
    with pytest.raises(ValueError, match="allow_import"):
        inspect_teacher("u", arch, path, {}, 10, (1, 8, 8), PRE)
    info = inspect_teacher("u", arch, path, {}, 10, (1, 8, 8), PRE, allow_import=True)
    model = load_teacher("u", arch, path, {}, 10, (1, 8, 8), allow_import=True)
    assert info.arch == arch and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="returned str, not a torch.nn.Module"):
        build_model("kd_user_models:not_a_model", 10, (1, 8, 8), allow_import=True)
    # A student checkpoint naming a module:function (e.g. a crafted state.pt) is refused on export too.
    state = {"arch": arch, "num_classes": 10, "student": {},
             "preprocess": {"image_shape": [1, 8, 8], "scale": 1.0, "mean": [], "std": []}}
    with pytest.raises(ValueError, match="allow_import"):
        load_student(state)


def test_bf16_precision_runs_under_autocast_and_is_part_of_the_digest(tmp_path):
    """precision: auto is fp32 on a CPU and bf16 on a GPU; bf16 (testable on a CPU too) gives
    logits close to fp32's but not equal, so it is in the digest: other labels, other units."""
    from kdpipe.config import ConfigError, load_config, teacher_precision
    from kdpipe.teachers.precision import resolve_precision

    assert resolve_precision("auto", on_gpu=False) == "fp32" and resolve_precision("auto", on_gpu=True) == "bf16"
    cfg = load_config(None, ["teachers.0.num_gpus=0.5", "teachers.1.precision=bf16"])
    assert [teacher_precision(t) for t in cfg.teachers] == ["bf16", "bf16", "fp32"]
    with pytest.raises(ConfigError, match=r"teachers\[0\].precision='fp16'"):
        load_config(None, ["teachers.0.precision=fp16"])

    path = _save(tmp_path, "cnn", 10)
    pre = make_preprocess([1, 8, 8], None, 1 / 16, [0.5], [0.25])
    x = np.random.default_rng(1).integers(0, 17, (32, 1, 8, 8), dtype=np.uint8)
    batch = {"view": x, "shard_id": np.full(32, "a", dtype=object)}
    fp32 = TeacherPredictor(_settings(path, pre, device="cpu"))(dict(batch))
    bf16 = TeacherPredictor(_settings(path, pre, device="cpu", precision="bf16"))(dict(batch))
    a, b = fp32[logits_column("t")], bf16[logits_column("t")]
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 compute, float32 labels
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
    digests = {p: inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), PRE, precision=p).digest for p in ("fp32", "bf16")}
    assert digests["fp32"] == inspect_teacher("t", "cnn", path, {}, 10, (1, 8, 8), PRE).digest
    assert digests["fp32"] != digests["bf16"]
