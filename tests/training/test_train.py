"""Student training with Ray Train (2 gloo workers) from cached labels only."""

from __future__ import annotations

import copy
import io
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch import nn

from kdpipe import storage
from kdpipe.generation import generate
from kdpipe.labels import cache, codec, softlabels
from kdpipe.teachers.models import build_model
from kdpipe.training import loop, trainer

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def cached(ray_cluster, digits_cfg):
    generate.generate(digits_cfg, progress=False)
    return digits_cfg


def test_distilled_training_runs_without_any_teacher(cached, tmp_path):
    """Two DDP workers distil a student with BatchNorm from the cache alone. (BatchNorm: DDP's
    forward broadcasts its buffers, so rank 0's held-out evaluation must not go through DDP; it
    once waited there for a rank that never came.)"""
    cfg = copy.deepcopy(cached)
    cfg.train.student = "cnn"
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("cnn", 10, (1, 8, 8)).modules())
    # Hide every checkpoint: training must not need (or build) a teacher.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for t in cfg.teachers:
        shutil.move(t.checkpoint, hidden / os.path.basename(t.checkpoint))
    try:
        rep = trainer.train_student(cfg, distill=True)
    finally:
        for t in cfg.teachers:
            shutil.move(hidden / os.path.basename(t.checkpoint), t.checkpoint)
    assert rep.teachers == ["mlp", "cnn", "wide_cnn"]
    assert [h["epoch"] for h in rep.history] == [0, 1]
    assert all(h["kd"] > 0 and h["ce"] > 0 for h in rep.history)
    assert rep.history[-1]["holdout_rows"] == 898
    assert rep.holdout_accuracy > 0.5  # 10 classes: chance is 0.1
    fs, path = storage.filesystem(rep.storage)
    assert any("checkpoint" in p for p in fs.ls(path))


def _first_unit(cfg):
    fs, root = storage.filesystem(cfg.cache.root)
    ref = cache.read_ref(fs, root, "cnn")
    directory = ref["manifest"].rsplit("/", 1)[0]
    fs, d = storage.filesystem(directory)
    manifest = storage.read_json(fs, storage.join(d, cache.MANIFEST))
    return fs, d, manifest["units"][0]


def test_corrupt_unit_is_named(cached):
    fs, d, unit = _first_unit(cached)
    path = storage.join(d, unit["part"])
    original = fs.cat_file(path)
    try:
        fs.pipe_file(path, original[:-20] + b"\0" * 20)
        with pytest.raises(Exception, match=f"{unit['part']} does not match its recorded checksum"):
            trainer.train_student(cached, distill=True)
    finally:
        fs.pipe_file(path, original)


def test_unit_with_other_keys_is_refused(cached):
    fs, d, unit = _first_unit(cached)
    path = storage.join(d, unit["part"])
    record_path = cache.unit_record_path(d, unit["shard_id"])
    manifest_path = storage.join(d, cache.MANIFEST)
    saved = {p: fs.cat_file(p) for p in (path, record_path, manifest_path)}
    try:
        table = pq.read_table(io.BytesIO(saved[path]))
        keys = table.column(softlabels.KEY).to_pylist()
        keys[0] = "intruder-0000"
        forged = codec.parquet_bytes(codec.labels_table(keys, codec.table_logits(table), "float16"), 1024)
        fs.pipe_file(path, forged)
        manifest = storage.read_json(fs, manifest_path)
        for u in manifest["units"]:
            if u["shard_id"] == unit["shard_id"]:
                u["sha256"] = storage.sha256_bytes(forged)
        storage.write_json(fs, manifest_path, manifest)
        with pytest.raises(Exception, match=r"sample keys differ from input shard .*intruder-0000"):
            trainer.train_student(cached, distill=True)
    finally:
        for p, data in saved.items():
            fs.pipe_file(p, data)


def test_unknown_teacher_and_pinned_digest(cached):
    cfg = copy.deepcopy(cached)
    cfg.train.teachers = ["nobody"]
    with pytest.raises(FileNotFoundError, match="teacher 'nobody' has no labels"):
        trainer.train_student(cfg, distill=True)
    cfg.train.teachers = ["cnn@0000000000000000"]
    with pytest.raises(FileNotFoundError, match="cnn@0000000000000000"):
        trainer.train_student(cfg, distill=True)


def test_train_step_is_pure_torch():
    import torch

    from kdpipe.teachers.models import build_model

    torch.manual_seed(0)
    model = build_model("small_mlp", 10, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"x": torch.randn(8, 1, 8, 8), "label": torch.randint(0, 10, (8,)),
             "teacher_logits": torch.randn(8, 3, 10)}
    first = float(loop.train_step(model, opt, batch, 4.0, 0.9, None)["loss"])
    for _ in range(20):
        last = float(loop.train_step(model, opt, batch, 4.0, 0.9, None)["loss"])
    assert last < first
    assert np.isfinite(last)


def test_train_step_on_the_common_loss_moves_the_weights_as_autograd_would():
    """The train step forms the common loss's gradient directly (losses.distillation_grad) and
    runs the model's backward from it: after a step the weights are those a step on autograd's
    gradient of distillation_loss gives, from formed targets and from teachers' logits."""
    import torch

    from kdpipe.teachers.models import build_model
    from kdpipe.training import losses

    g = torch.Generator().manual_seed(1)
    x, y, z = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g), torch.randn(8, 3, 10, generator=g)
    for teachers in ({"teacher_logits": z}, {"teacher_probs": losses._mean_target(z, 4.0)}):
        torch.manual_seed(0)
        model = build_model("cnn", 10, (1, 8, 8))
        twin = build_model("cnn", 10, (1, 8, 8))
        twin.load_state_dict(model.state_dict())
        opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, twin))
        for step in range(3):
            torch.manual_seed(step)  # the same dropout masks on both sides
            parts = loop.train_step(model, opt, {"x": x, "label": y, **teachers}, 4.0, 0.9, None)
            twin.train()
            torch.manual_seed(step)
            loss, want = losses.distillation_loss(twin(x), teachers.get("teacher_logits"), y, 4.0, 0.9,
                                                  teacher_probs=teachers.get("teacher_probs"))
            twin_opt.zero_grad()
            loss.backward()
            twin_opt.step()
            assert {k: float(v) for k, v in parts.items()} == pytest.approx({k: float(v) for k, v in want.items()},
                                                                            rel=1e-5)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_fetched_batches_are_cut_into_the_steps_of_the_configured_batch():
    """The loop takes >= 256 rows per batch from Ray Data and cuts them into steps on the worker:
    the same rows in the same order, every step batch_size rows but the epoch's last."""
    import torch

    assert loop.fetch_rows(16) == 256 and loop.fetch_rows(100) == 200 and loop.fetch_rows(512) == 512
    rows = torch.arange(700)
    fetched = [{"x": rows[i:i + 256], "label": -rows[i:i + 256]} for i in range(0, 700, 256)]  # 256, 256, 188
    steps = list(loop.split_batches(fetched, 16))
    assert [len(s["x"]) for s in steps] == [16] * 43 + [12]
    assert torch.equal(torch.cat([s["x"] for s in steps]), rows)
    assert all(torch.equal(s["label"], -s["x"]) for s in steps)
    assert len(list(loop.split_batches(fetched, 512))) == 3  # batches no larger than a step pass whole


def test_class_sorted_shards_train_on_batches_mixed_like_random_sampling(ray_cluster, tmp_path):
    """Digits as an ImageFolder: every input shard is one class folder. Streamed shard by shard
    through a local buffer, batches held one or two classes; through the training view (built
    once on the cache's storage, here with preload off) each epoch's batches hold as many
    distinct classes as random batches would, every rank evaluates its share of the held-out
    split, and a second run reuses the view."""
    from kdpipe import config
    from kdpipe.data import digits, inputs
    from kdpipe.training import view
    from kdpipe.training.join import JoinPlan

    cfg = config.resolve_paths(config.load_config(None, [
        f"workdir={tmp_path}", "data.format=imagefolder", "train.epochs=3", "train.preload=never",
        "train.checkpoint_every_s=3600"]))
    digits.ensure_builtin(cfg.data)
    source = inputs.source_spec(cfg.data)
    shards = inputs.list_shards(cfg.data.train, source)
    assert len(shards) == 10  # one per class folder
    rep = trainer.train_student(cfg, distill=False)
    for h in rep.history:
        assert h["batch_classes"] >= 0.9 * h["batch_classes_random"], h  # shard by shard: ~1.5 of ~8.2
        assert h["first_step_s"] < 60
    assert rep.history[-1]["holdout_rows"] == 898 and rep.holdout_accuracy > 0.5
    fs, path = storage.filesystem(rep.storage)
    saved = [p for p in fs.ls(path) if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json")]
    assert len(saved) == 1  # by wall time (an hour here): only the last epoch's
    views = storage.join(cfg.cache.root, view.VIEWS_DIR)
    fs, views_path = storage.filesystem(views)
    built = fs.ls(views_path)
    assert len(built) == 1
    manifest = storage.read_json(fs, storage.join(built[0], view.MANIFEST))
    assert manifest["rows"] == 899 and sum(manifest["class_counts"]) == 899 and len(manifest["files"]) == 2
    # (10 class folders of ~90 rows, written as one file per training worker: view.block_count)
    # A later run with the same inputs and targets finds it (no Ray work: nothing is built).
    again = view.ensure_view(cfg.cache.root, {}, inputs.fingerprint(shards, source), source, shards,
                             config.preprocess_for(cfg).geometry(), (), JoinPlan(10))
    assert again.files == tuple(f"{fs.unstrip_protocol(built[0])}/{f}" for f in manifest["files"])
    assert fs.ls(views_path) == built and storage.read_json(fs, storage.join(built[0], view.MANIFEST)) == manifest
