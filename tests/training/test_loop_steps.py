"""The training recipe's steps without Ray: the settings that cross to the workers, the
distillation plan's checks, one epoch over hand-made batches with a tiny real model, held-out
evaluation, checkpoints and the metrics of an epoch."""

from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.config import load_config
from kdpipe.data.images import make_preprocess
from kdpipe.errors import CacheError, ConfigError, KdpipeError
from kdpipe.teachers.models import build_model
from kdpipe.training import loop, losses, trainer
from kdpipe.training.join import JoinPlan, MeanTarget, TeacherUnits
from kdpipe.training.loop import EpochPass, LoopSettings, OnlineTeacher, TrainState
from kdpipe.training.losses import LossOptions

PRE = make_preprocess([1, 8, 8], None, 1 / 16, [], [])
VIEWS = {"views": 2, "seed": 0, "crop_scale": [0.5, 1.0], "flip": True}


def _units(name: str, mode: str = "full", k: int | None = None, augment: dict | None = None) -> TeacherUnits:
    return TeacherUnits(teacher=name, directory=f"/cache/{name}", storage_options={}, mode=mode, format="parquet",
                        k=k, temperature=4.0, augment=augment, records={"s0": {"shard_id": "s0", "rows": 12}})


def _batches(sizes: list[int], teachers: int = 3, views: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches as the read step makes them: x uint8 [B, 1, 8, 8] ([B, V, 1, 8, 8] with views),
    labels and teachers' logits [B, K, 10] ([B, V, K, 10])."""
    g = torch.Generator().manual_seed(seed)
    lead = (views,) if views else ()
    return [{"x": torch.randint(0, 17, (n, *lead, 1, 8, 8), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 10, (n,), generator=g),
             "teacher_logits": torch.randn(n, *lead, teachers, 10, generator=g) * 3} for n in sizes]


def _settings(**kw) -> LoopSettings:
    return LoopSettings(student="small_mlp", num_classes=10, preprocess=PRE, run_uri="/nowhere", **kw)


def test_what_crosses_to_the_workers_is_frozen_and_pickles():
    online = OnlineTeacher("cnn", "cnn", "/ckpt/cnn.pt", PRE)
    settings = _settings(epochs=3, weights=(1.0, 2.0), loss=LossOptions((2.0, 3.0), "sum", "soft_ce", "confidence"),
                         online_teachers=(online,))
    plan = JoinPlan(10, (2.0, 3.0), None, 2, MeanTarget((1.0, 2.0), (2.0, 3.0)))
    for value in (settings, plan, _units("mlp", augment=VIEWS), online, settings.loss, plan.ensemble):
        assert pickle.loads(pickle.dumps(value)) == value
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)


def test_the_plan_of_full_labels_forms_the_mean_target_once():
    cfg = load_config(None)
    plan = trainer.plan_distillation(cfg, ["mlp", "cnn"], [_units("mlp"), _units("cnn")])
    assert plan.distill and plan.teachers == ("mlp", "cnn") and plan.online == ()
    assert plan.join == JoinPlan(10, (5.0, 5.0), None, 0, MeanTarget((1.0, 1.0), (5.0, 5.0)))
    assert plan.loss == LossOptions(None, "mean", "kl", "fixed") and plan.weights == ()
    # a per-sample weighting needs every teacher's logits: no mean target then
    weighted = trainer.plan_distillation(load_config(None, ["train.teacher_weighting=confidence"]), ["mlp"],
                                         [_units("mlp")])
    assert weighted.join.ensemble is None and weighted.loss.weighting == "confidence"


def test_the_plan_of_topk_labels_sums_per_teacher_terms():
    cfg = load_config(None, ["train.teacher_temperatures=[2.0, 3.0]", "train.teacher_weights=[1.0, 3.0]",
                             "train.teachers=[mlp, cnn]"])
    plan = trainer.plan_distillation(cfg, ["mlp", "cnn"], [_units("mlp", "topk", 4), _units("cnn")])
    assert plan.join == JoinPlan(10, (2.0, 3.0), 4, 0, None)
    assert plan.loss == LossOptions((2.0, 3.0), "sum", "kl", "fixed") and plan.weights == (1.0, 3.0)


def test_the_baseline_plan_has_no_teachers():
    plan = trainer.plan_distillation(load_config(None), [], [])
    assert not plan.distill and plan.units == () and plan.weights == () and plan.join == JoinPlan(10)


def test_plans_that_cannot_work_are_refused():
    cfg = load_config(None)
    with pytest.raises(CacheError, match=r"different k \[4, 5\]"):
        trainer.plan_distillation(cfg, ["mlp", "cnn"], [_units("mlp", "topk", 4), _units("cnn", "topk", 5)])
    with pytest.raises(ConfigError, match="train.ensemble=mean needs full labels"):
        trainer.plan_distillation(load_config(None, ["train.ensemble=mean"]), ["mlp"], [_units("mlp", "topk", 4)])
    scheduled = load_config(None, ["train.schedule=linear", "train.temperature_end=2.0"])
    with pytest.raises(ConfigError, match="a temperature schedule needs full labels"):
        trainer.plan_distillation(scheduled, ["mlp"], [_units("mlp", "topk", 4)])
    assert trainer.plan_distillation(scheduled, ["mlp"], [_units("mlp")]).join.ensemble is None  # changes per epoch


def test_replay_needs_the_same_cached_views_of_every_teacher():
    cfg = load_config(None, ["train.augment=replay"])
    plan = trainer.plan_distillation(cfg, ["mlp", "cnn"], [_units("mlp", augment=VIEWS), _units("cnn", augment=VIEWS)])
    assert plan.join.replay == 2
    with pytest.raises(ConfigError, match="needs distillation from cached labels"):
        trainer.replay_views([])
    with pytest.raises(CacheError, match=r"teacher\(s\) \['cnn'\] have no augmented views"):
        trainer.plan_distillation(cfg, ["mlp", "cnn"], [_units("mlp", augment=VIEWS), _units("cnn")])
    with pytest.raises(CacheError, match="the teachers' views differ"):
        trainer.plan_distillation(cfg, ["mlp", "cnn"],
                                  [_units("mlp", augment=VIEWS), _units("cnn", augment={**VIEWS, "seed": 1})])


def test_online_teachers_come_from_the_config():
    cfg = load_config(None, ["train.online=true"])
    plan = trainer.plan_distillation(cfg, ["mlp", "cnn"], [])
    assert [t.name for t in plan.online] == ["mlp", "cnn"] and plan.join.temperatures == (5.0, 5.0)
    with pytest.raises(ConfigError, match="must all be configured under `teachers`"):
        trainer.plan_distillation(cfg, ["mlp", "nobody"], [])


def test_config_only_checks_come_before_any_storage_is_read():
    with pytest.raises(ConfigError, match="train.alpha=0 ignores the teachers"):
        trainer.choose_teachers(load_config(None, ["train.alpha=0"]), True)
    with pytest.raises(ConfigError, match="pinned teachers"):
        trainer.choose_teachers(load_config(None, ["train.online=true", "train.teachers=[cnn@0123456789abcdef]"]), True)
    assert trainer.choose_teachers(load_config(None, ["train.alpha=0"]), False) == []
    assert trainer.choose_teachers(load_config(None), True) == ["mlp", "cnn", "wide_cnn"]
    assert issubclass(ConfigError, KdpipeError) and issubclass(ConfigError, ValueError)


def test_one_epoch_trains_the_model_and_sums_the_loss_parts_per_row():
    """train_epoch over hand-made batches: the weights move, every row is counted, and the loss
    sums are those of the same steps taken by hand with distillation_loss (row-weighted)."""
    batches = _batches([16, 16, 5])
    settings = _settings(alpha=0.7, temperature=3.0)
    state = loop.setup(settings)
    before = [p.detach().clone() for p in state.model.parameters()]
    done = loop.train_epoch(state, settings, batches, 0, 0.7, 3.0)
    assert done.rows == 37 and done.replayed == 0 and done.seconds > 0 and 0 <= done.waited <= done.seconds
    assert state.first_step_at is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True))
    assert batches[0]["x"].dtype == torch.uint8  # the caller's batches are left as they were

    torch.manual_seed(0)  # a twin, as setup builds it, stepped by hand through autograd
    twin = build_model("small_mlp", 10, (1, 8, 8))
    opt = torch.optim.Adam(twin.parameters(), lr=settings.lr)
    want = {"kd": 0.0, "ce": 0.0, "loss": 0.0}
    for b in batches:
        loss, parts = losses.distillation_loss(twin(PRE.normalise(b["x"])), b["teacher_logits"], b["label"], 3.0, 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k in want:
            want[k] += float(parts[k]) * len(b["x"])
    assert done.sums == pytest.approx(want, rel=1e-5)
    for a, b in zip(state.model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_epoch_replays_one_cached_view_per_sample():
    settings = _settings(use_labels=False, alpha=1.0)
    state = loop.setup(settings)
    done = loop.train_epoch(state, settings, _batches([8, 4], views=3), 0, 1.0, 4.0)
    assert done.rows == 12 and done.replayed == 3
    assert set(done.sums) == {"kd", "loss"}  # label-free: no cross-entropy


def test_online_targets_are_the_teachers_logits_on_their_own_pixels():
    torch.manual_seed(0)
    teacher = build_model("small_mlp", 10, (1, 8, 8)).eval()
    column = PRE.pixels_column()
    batch = {"x": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "label": torch.arange(4),
             column: torch.randint(0, 17, (4, 1, 8, 8), dtype=torch.uint8)}
    out = loop.with_online_targets([(PRE, column, teacher)], batch)
    assert set(out) == {"x", "label", "teacher_logits"} and out["teacher_logits"].shape == (4, 1, 10)
    with torch.no_grad():
        assert torch.allclose(out["teacher_logits"][:, 0], teacher(PRE.normalise(batch[column])))


class _Wrapped(nn.Module):
    """Stands for DDP: holds the model as .module; its own forward must not be used by rank 0."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        raise AssertionError("held-out evaluation went through the DDP wrapper")


def test_holdout_evaluation_against_hand_computed_accuracy():
    """The model's logits are the 10 pixels of a [1, 1, 10] image: its prediction is the
    brightest pixel. 5 of 8 rows are labelled with it."""
    pre = make_preprocess([1, 1, 10], None, 1.0, [], [])
    x = torch.zeros(8, 1, 1, 10, dtype=torch.uint8)
    brightest = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    x[torch.arange(8), 0, 0, brightest] = 200
    labels = brightest.clone()
    labels[[1, 4, 7]] = 0
    state = TrainState(_Wrapped(nn.Flatten()), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), "cpu")
    settings = LoopSettings(student="linear", num_classes=10, preprocess=pre, run_uri="/nowhere")
    got = loop.evaluate_holdout(state, settings, [{"x": x[:5], "label": labels[:5]}, {"x": x[5:], "label": labels[5:]}])
    assert got["holdout_accuracy"] == 5 / 8 and got["holdout_rows"] == 8 and got["eval_s"] >= 0


def test_a_checkpoint_resumes_the_run_and_exports_the_student():
    from kdpipe.training.export import load_student

    settings = _settings(epochs=4)
    state = loop.setup(settings)
    loop.train_epoch(state, settings, _batches([8]), 0, 0.95, 5.0)
    state.history = [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]  # epoch 2's report never made it
    buf = io.BytesIO()
    torch.save(loop.checkpoint_state(state, settings, 1), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)

    other = loop.setup(dataclasses.replace(settings, seed=1))
    loop.resume(other, saved)
    assert other.start_epoch == 2 and other.history == [{"epoch": 0}, {"epoch": 1}]
    for a, b in zip(state.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert other.optimizer.state_dict()["state"][0]["step"] == 1
    student, shape = load_student(saved)
    x = torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert shape == (1, 8, 8) and torch.allclose(student(x.float()), state.model.eval()(PRE.normalise(x)))


def test_epoch_metrics_passes_and_checkpoint_epochs():
    trained, plain = EpochPass(100, 2.0, {"kd": 50.0, "loss": 80.0}, 0, 0.5), EpochPass(100, 1.0, {}, 0, 0.1)
    m = loop.epoch_metrics(3, 0.9, 4.0, 0.01, trained, plain, 12.5)
    assert m.pop("first_step_s") != m.pop("first_step_s", 0)  # NaN: a pass made by hand has no first step
    assert m == {"epoch": 3, "rows": 100, "samples_per_s": 50.0, "train_s": 2.0, "input_wait_s": 0.5, "alpha": 0.9,
                 "temperature": 4.0, "lr": 0.01, "replayed_views": 0, "first_step_at": 12.5, "kd": 0.5, "loss": 0.8,
                 "plain_rows": 100, "plain_train_s": 1.0, "plain_samples_per_s": 100.0, "plain_input_wait_s": 0.1}
    assert "plain_rows" not in loop.epoch_metrics(3, 0.9, 4.0, 0.01, trained)
    assert [loop.epoch_passes(True, e) for e in (0, 1)] == [["plain", "train"], ["train", "plain"]]
    assert loop.epoch_passes(False, 0) == ["train"]
    settings = _settings(epochs=5, checkpoint_every=2)
    assert [e for e in range(5) if loop.checkpoint_due(settings, e, checkpointed_at=100.0, now=101.0)] == [1, 3, 4]
    by_time = _settings(epochs=5, checkpoint_every_s=30.0)  # checkpoint_every 0: by wall time only
    assert [e for e in range(5) if loop.checkpoint_due(by_time, e, checkpointed_at=100.0, now=120.0)] == [4]
    assert loop.checkpoint_due(by_time, 1, checkpointed_at=100.0, now=130.0)
    assert loop.epoch_schedule(_settings(epochs=3, alpha=0.9, alpha_end=0.5, schedule="linear"), 1) == \
        pytest.approx((0.7, 5.0))


def test_class_mix_counts_distinct_labels_per_step_and_compares_with_random_batches():
    from kdpipe.training.view import expected_classes

    mix = loop.ClassMix(4, torch.device("cpu"))
    for labels in ([0, 0, 0, 0], [1, 1, 2, 3], [3, 3, 3, 3]):
        mix.add(torch.tensor(labels))
    distinct, counts = mix.read()
    assert distinct == 1 + 3 + 1 and counts == (4, 2, 1, 5)
    trained = EpochPass(12, 1.0, {}, 0, 0.0, 0.1, 3, distinct, counts)
    got = loop.class_mix_metrics(trained, 4)
    assert got["batch_classes"] == pytest.approx(5 / 3)
    assert got["batch_classes_random"] == pytest.approx(expected_classes(counts, 4))
    assert loop.class_mix_metrics(EpochPass(12, 1.0, {}, 0, 0.0), 4) == {}  # label-free: no figure


def test_block_count_merges_small_shards_caps_bytes_and_never_splits():
    from kdpipe.training.view import BLOCK_BYTES, block_count

    # The benchmark's 64 shards of ~112 rows (7,192 rows, small rows): ~1,024 rows a block.
    assert block_count(7192, 120, 64, 2) == 8
    # The demo's 899 rows: one block per training worker, not one per shard.
    assert block_count(899, 120, 8, 2) == 2
    # Large rows: no block over BLOCK_BYTES, even when that means fewer rows than BLOCK_ROWS.
    row = 150_528  # one 224x224 RGB image
    n = block_count(1_281_167, row, 5000, 8)
    assert 1_281_167 * row / n <= BLOCK_BYTES and n < 5000
    # Never more blocks than the shards give, never fewer than one.
    assert block_count(10, 120, 3, 8) == 3 and block_count(0, 120, 1, 1) == 1


def test_expected_classes_matches_sampling_without_replacement():
    from kdpipe.training.view import expected_classes

    counts = [50, 30, 15, 5]
    rng = np.random.default_rng(0)
    population = np.repeat(np.arange(4), counts)
    draws = [len(np.unique(rng.choice(population, 8, replace=False))) for _ in range(20000)]
    assert expected_classes(counts, 8) == pytest.approx(np.mean(draws), abs=0.02)
    assert expected_classes([10] * 10, 100) == 10.0 and expected_classes([5, 5], 1) == pytest.approx(1.0)
