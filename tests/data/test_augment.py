"""Augmented views: generation labels V seeded views per sample and stores their crop/flip params
with the labels; the student replays exactly those views. The read functions here are the ones
Ray runs (generation's `read_teacher_inputs`, training's `read_joined_shard`), called directly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kdpipe import storage
from kdpipe.config import ConfigError, DataConfig, load_config
from kdpipe.data import images, inputs, readers
from kdpipe.generation import planning
from kdpipe.labels import cache, codec, softlabels
from kdpipe.teachers.models import build_model
from kdpipe.training import join
from kdpipe.training.join import JoinPlan, MeanTarget, TeacherUnits

AUGMENT = {"views": 3, "seed": 7, "crop_scale": [0.3, 1.0], "flip": True}


@pytest.fixture()
def shard(tmp_path):
    """One Parquet shard of 12 PNG images of different sizes (RGB, 14..20 px), labelled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pngs = [images.encode_png(rng.integers(0, 256, (14 + i % 7, 16 + i % 5, 3), dtype=np.uint8)) for i in range(12)]
    root = tmp_path / "train"
    root.mkdir()
    pq.write_table(pa.table({"sample_key": [f"img/{i:03d}" for i in range(12)], "image": pngs,
                             "label": np.arange(12) % 10}), root / "part-0.parquet")
    data = DataConfig(train=str(root), image_shape=[3, 12, 12], resize=14)
    source = inputs.source_spec(data, check_holdout=False)
    (s,) = inputs.list_shards(str(root), source)
    return source, s


def _label(tmp_path, source, s, geometry, fmt="parquet", mode="full", augment=AUGMENT, seed=0):
    """Generation of one teacher on one shard, as generate.py does it: read_teacher_inputs, a real torch
    model on the teacher's view, then the unit committed with each row's view params."""
    batch = readers.read_teacher_inputs({"shard_id": np.asarray([s.shard_id])}, source, {s.shard_id: s},
                                {"x_t": geometry}, augment)
    torch.manual_seed(seed)
    model = build_model("cnn", 10, (geometry["channels"], *geometry["size"])).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(batch["x_t"]).float() / 255).numpy()
    keys = [str(k) for k in batch["sample_key"]]
    directory = str(tmp_path / f"unit-{fmt}-{mode}-{seed}")
    fs, path = storage.filesystem(directory)
    data = codec.encode_unit(keys, logits, mode, 4, 2.0, "float32", fmt, 1024, batch.get("aug"))
    record = cache.write_unit(fs, path, {"shard_id": s.shard_id, "uri": s.uri, "token": s.token}, data, fmt, keys, {})
    unit = TeacherUnits(teacher=f"t{seed}", directory=directory, storage_options={}, mode=mode, format=fmt,
                        k=4 if mode == "topk" else None, temperature=2.0, augment=augment,
                        records={s.shard_id: record})
    return batch, dict(zip(keys, logits, strict=True)), unit


def test_view_params_are_seeded_per_sample_and_inside_the_image():
    a = images.augment_params("img/001", 8, 7, (0.3, 1.0), True)
    assert np.array_equal(a, images.augment_params("img/001", 8, 7, (0.3, 1.0), True))  # replayable
    assert not np.array_equal(a, images.augment_params("img/002", 8, 7, (0.3, 1.0), True))
    assert not np.array_equal(a, images.augment_params("img/001", 8, 8, (0.3, 1.0), True))
    top, left, h, w, flip = a.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    assert (h * w >= 0.3 * 0.74).all() and set(flip.tolist()) == {0.0, 1.0}
    assert not images.augment_params("img/001", 8, 7, (0.3, 1.0), False)[:, 4].any()


@pytest.mark.parametrize("fmt,mode", [("parquet", "full"), ("webdataset", "topk")])
def test_replayed_view_is_the_labelled_view_pixel_for_pixel(tmp_path, shard, fmt, mode):
    source, s = shard
    geometry = {"channels": 3, "resize": 14, "size": [12, 12]}
    batch, stored, unit = _label(tmp_path, source, s, geometry, fmt, mode)
    n, v = 12, AUGMENT["views"]
    assert len(batch["sample_key"]) == n * (1 + v) and batch["shard_rows"][0] == n * (1 + v)
    assert not batch["aug"][:n].any() and batch["aug"][n:, 2].min() > 0  # plain rows, then the views
    seen = {str(k): batch["x_t"][i] for i, k in enumerate(batch["sample_key"])}

    out = join.read_joined_shard({"shard_id": np.asarray([s.shard_id])}, source, {s.shard_id: s}, geometry,
                                 [unit], JoinPlan(num_classes=10, temperatures=(2.0,), replay=v,
                                                  topk_k=4 if mode == "topk" else None))
    keys = sorted(f"img/{i:03d}" for i in range(n))
    assert out["x"].shape == (n, v, 3, 12, 12) and out["x"].dtype == np.uint8
    for i, key in enumerate(keys):
        for j in range(v):
            assert np.array_equal(out["x"][i, j], seen[readers.view_key(key, j)])  # the teacher's very pixels
    assert len({out["x"][i, j].tobytes() for i in range(n) for j in range(v)}) == n * v  # views really differ
    if mode == "full":
        assert out["teacher_logits"].shape == (n, v, 1, 10)
        want = np.stack([[stored[readers.view_key(k, j)] for j in range(v)] for k in keys])
        np.testing.assert_allclose(out["teacher_logits"][:, :, 0], want, rtol=1e-6)
        # The mean-ensemble target formed when read: one distribution per view, of those logits
        ens = join.read_joined_shard({"shard_id": np.asarray([s.shard_id])}, source, {s.shard_id: s}, geometry,
                                     [unit], JoinPlan(num_classes=10, temperatures=(2.0,), replay=v,
                                                      ensemble=MeanTarget(weights=(1.0,), temperatures=(2.0,))))
        assert "teacher_logits" not in ens and ens["teacher_probs"].shape == (n, v, 10)
        np.testing.assert_allclose(ens["teacher_probs"], softlabels.softmax(want, 2.0), rtol=1e-5, atol=1e-7)
        assert np.array_equal(ens["x"], out["x"])
    else:
        assert out["topk_ids"].shape == (n, v, 1, 4) and out["topk_tail"].shape == (n, v, 1)
        top1 = np.stack([[np.argmax(stored[readers.view_key(k, j)]) for j in range(v)] for k in keys])
        assert np.array_equal(out["topk_ids"][:, :, 0, 0], top1)

    # Without replay the same units give the plain rows only.
    plain = join.read_joined_shard({"shard_id": np.asarray([s.shard_id])}, source, {s.shard_id: s}, geometry,
                                   [unit], JoinPlan(num_classes=10, temperatures=(2.0,),
                                                    topk_k=4 if mode == "topk" else None))
    assert plain["x"].shape == (n, 3, 12, 12)
    assert all(np.array_equal(plain["x"][i], seen[k]) for i, k in enumerate(keys))


def test_a_student_with_another_geometry_replays_the_same_boxes(tmp_path, shard):
    source, s = shard
    teacher = {"channels": 3, "resize": 14, "size": [12, 12]}
    student = {"channels": 1, "resize": None, "size": [8, 8]}
    _, _, unit = _label(tmp_path, source, s, teacher)
    out = join.read_joined_shard({"shard_id": np.asarray([s.shard_id])}, source, {s.shard_id: s}, student,
                                 [unit], JoinPlan(num_classes=10, temperatures=(2.0,), replay=3))
    samples = readers.read_samples(s, source)
    order = np.argsort(np.asarray(samples.keys))
    params = readers.sample_params([samples.keys[i] for i in order], AUGMENT)
    want = images.augmented([samples.images[i] for i in order], params, student)
    assert out["x"].shape == (12, 3, 1, 8, 8) and np.array_equal(out["x"], want)


def test_replay_refuses_units_without_views_or_with_other_views(tmp_path, shard):
    source, s = shard
    geometry = {"channels": 3, "resize": 14, "size": [12, 12]}
    batch = {"shard_id": np.asarray([s.shard_id])}
    plan = JoinPlan(num_classes=10, temperatures=(2.0, 2.0), replay=3)
    _, _, with_views = _label(tmp_path, source, s, geometry, seed=1)
    _, _, plain = _label(tmp_path, source, s, geometry, augment=None, seed=2)
    with pytest.raises(ValueError, match="generate with labels.views > 0"):
        join.read_joined_shard(batch, source, {s.shard_id: s}, geometry, [plain], replace(plan, temperatures=(2.0,)))
    _, _, other_seed = _label(tmp_path, source, s, geometry, augment={**AUGMENT, "seed": 8}, seed=3)
    with pytest.raises(ValueError, match="views differ"):
        join.read_joined_shard(batch, source, {s.shard_id: s}, geometry, [with_views, other_seed], plan)
    with pytest.raises(ValueError, match="fewer than 5 views"):
        join.read_joined_shard(batch, source, {s.shard_id: s}, geometry, [with_views],
                               replace(plan, temperatures=(2.0,), replay=5))


def test_view_settings_are_shared_by_all_teachers_and_validated():
    with pytest.raises(ConfigError, match=r"teachers\[0\].labels.views"):
        load_config(None, ["teachers.0.labels={views: 2}"])
    with pytest.raises(ConfigError, match="labels.crop_scale"):
        load_config(None, ["labels.crop_scale=[0.8, 0.2]"])
    with pytest.raises(ConfigError, match="train.augment"):
        load_config(None, ["train.augment=random"])
    cfg = load_config(None, ["labels.views=2"])
    settings = planning.label_settings_for(cfg, "cnn")
    assert settings["augment"] == {"views": 2, "seed": 0, "crop_scale": [0.5, 1.0], "flip": True}
    assert "augment" not in planning.label_settings_for(load_config(None), "cnn")  # old caches keep their hash
