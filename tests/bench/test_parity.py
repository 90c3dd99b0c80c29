"""The parity benchmark's reference loop, its distillation arguments and its table (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe import cli, config
from kdpipe.bench import parity
from kdpipe.errors import ConfigError
from kdpipe.teachers.models import build_model
from kdpipe.training import losses, trainer
from kdpipe.training.losses import LossOptions


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the benchmark runs its plain loop (on a busy machine, more threads
    spin on each other: the same tiny fits took 100x longer with two)."""
    with parity.torch_threads(parity.PLAIN_THREADS):
        yield


def gaussian_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian classes shaped like [1, 8, 8] images, sorted by class (as
    class-folder shards would be read): x [n, 1, 8, 8] float32, y [n] int64."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(2), n // 2)
    centres = np.stack([np.full(64, -1.0), np.full(64, 1.0)])
    x = centres[y] + rng.normal(0.0, 1.0, (len(y), 64))
    return x.reshape(-1, 1, 8, 8).astype(np.float32), y.astype(np.int64)


def fit(x, y, seed=0, epochs=3, distill=None, arch="small_mlp", num_classes=2):
    return parity.plain_fit(arch, num_classes, x, y, epochs=epochs, batch_size=16, lr=1e-2, weight_decay=0.0,
                            seed=seed, distill=distill)


def test_the_plain_loop_learns_class_sorted_rows_and_is_deterministic_for_a_seed():
    x, y = gaussian_classes(200, seed=0)
    xh, yh = gaussian_classes(400, seed=1)
    a, b, other = fit(x, y, seed=3), fit(x, y, seed=3), fit(x, y, seed=4)
    assert parity.accuracy(a, xh, yh) > 0.97
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, po) for pa, po in zip(a.state_dict().values(), other.state_dict().values(),
                                                         strict=True))


def test_the_plain_loop_starts_from_the_weights_kdpipe_workers_draw_for_the_seed():
    """Workers seed torch with train.seed before build_model (loop.setup): zero epochs leave them."""
    x, y = gaussian_classes(20, seed=0)
    torch.manual_seed(5)
    expected = build_model("small_mlp", 2, (1, 8, 8))
    for got, want in zip(fit(x, y, seed=5, epochs=0).state_dict().values(), expected.state_dict().values(),
                         strict=True):
        assert torch.equal(got, want)


def kl_to(model: torch.nn.Module, x: np.ndarray, target: torch.Tensor, temperature: float) -> float:
    with torch.no_grad():
        log_q = F.log_softmax(model(torch.from_numpy(x)) / temperature, dim=-1)
    return float(F.kl_div(log_q, target, reduction="batchmean"))


def test_the_distilled_plain_loop_with_alpha_1_moves_the_student_to_the_teachers():
    """Two teachers whose mean distribution ignores the labels (a fixed random map of the
    pixels): only the distillation term can bring the student to it."""
    x, y = gaussian_classes(200, seed=0)
    gen = torch.Generator().manual_seed(7)
    maps = torch.randn(2, 64, 3, generator=gen)
    logits = torch.einsum("nd,kdc->nkc", torch.from_numpy(x).flatten(1), maps)  # [N, 2 teachers, 3 classes]
    t = 2.0
    target = F.softmax(logits / t, dim=-1).mean(dim=1)
    term = parity.PlainDistill(logits, temperature=t, alpha=1.0, weights=None, loss=LossOptions())
    before = kl_to(fit(x, y, seed=0, epochs=0, num_classes=3), x, target, t)
    alone = kl_to(fit(x, y, seed=0, epochs=8, num_classes=3), x, target, t)
    distilled = kl_to(fit(x, y, seed=0, epochs=8, num_classes=3, distill=term), x, target, t)
    assert distilled < 0.3 * before and distilled < 0.3 * alone


def test_the_plain_distillation_term_is_the_one_the_kdpipe_run_plans():
    cfg = config.resolve_paths(config.load_config(None, ["workdir=/tmp/unused", "train.teacher_weights=[1,2,3]",
                                                         "train.alpha=0.7", "train.temperature=3"]))
    names = parity.teacher_names(cfg)
    plan = trainer.plan_distillation(cfg, names, [])
    logits = torch.randn(5, 3, 10, generator=torch.Generator().manual_seed(0))
    term = parity.plain_distill(cfg, logits)
    assert names == ["mlp", "cnn", "wide_cnn"] and term.loss == plan.loss and term.loss.ensemble == "mean"
    assert (term.alpha, term.temperature) == (0.7, 3.0) and term.weights.tolist() == list(plan.weights)
    # and the same value as the cached path, which reads the teachers' weighted mean distribution
    student, y = torch.randn(5, 10), torch.arange(5)
    ours, _ = losses.distillation_loss(student, logits, y, term.temperature, term.alpha, term.weights,
                                       **term.loss.kwargs())
    w = torch.tensor([1.0, 2.0, 3.0]) / 6
    probs = torch.einsum("bkc,k->bc", F.softmax(logits / 3.0, dim=-1), w)
    cached, _ = losses.distillation_loss(student, None, y, 3.0, 0.7, teacher_probs=probs)
    assert torch.allclose(ours, cached, atol=1e-5)


@pytest.mark.parametrize("override, key", [("labels.mode=topk", "labels.mode"),
                                           ("train.augment=replay", "train.augment"),
                                           ("train.alpha_end=0.5", "train.alpha_end"),
                                           ("train.teachers=[ghost]", "train.teachers")])
def test_settings_the_plain_loop_does_not_mirror_are_refused_naming_them(override, key):
    try:
        cfg = config.load_config(None, [override])
    except ConfigError as e:  # refused already by the config's own validation
        assert key.split(".")[-1] in str(e)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parity.check_comparable(cfg)


def test_mixing_means_the_metrics_present_and_skips_absent_ones():
    history = [{"epoch": 0, "batch_classes": 2.0, "batch_classes_random": 9.0},
               {"epoch": 1, "batch_classes": 4.0, "batch_classes_random": 9.5}]
    assert parity.mixing(history) == {"batch_classes": 3.0, "batch_classes_random": 9.25}
    assert parity.mixing([{"epoch": 0, "loss": 1.0}]) == {}


def test_classes_per_shard_counts_labels_in_each_shards_rows():
    from kdpipe.data.inputs import InputShard

    shards = [InputShard(f"s{i}", f"mem://s{i}", n, {}) for i, n in enumerate((3, 2, 4))]
    y = np.array([0, 0, 0, 1, 1, 2, 3, 2, 2])
    assert parity.classes_per_shard(shards, y) == pytest.approx((1 + 1 + 2) / 3)
    assert parity.classes_per_shard(shards, y[:-1]) is None  # rows skipped: the counts no longer line up
    assert parity.classes_per_shard([*shards[:2], InputShard("t", "mem://t", None, {})], y) is None


def result(mixing: dict | None = None) -> dict:
    acc = {"kdpipe_alone": [0.90, 0.92], "plain_alone": [0.95, 0.97],
           "kdpipe_distilled": [0.951, 0.953], "plain_distilled": [0.95, 0.952]}
    r = {"seeds": [0, 1], "student": "small_mlp", "epochs": 3, "workers": 2, "batch_size_per_worker": 16,
         "global_batch": 32, "teachers": ["mlp", "cnn"], "data_format": "imagefolder", "train_rows": 899,
         "holdout_rows": 898, "input_shards": 10, "classes_per_shard": 1.0, **parity.summarise(acc)}
    if mixing is not None:
        r["mixing"] = mixing
    return r


def test_the_table_prints_each_side_the_gaps_and_the_verdicts():
    r = result()
    assert r["gaps"]["alone"]["points"] == pytest.approx(-5.0) and not r["gaps"]["alone"]["within"]
    assert r["gaps"]["distilled"]["points"] == pytest.approx(0.1) and r["gaps"]["distilled"]["within"]
    lines = parity.format_parity(r).splitlines()
    assert "10 input shards, 1.0 classes per shard" in lines[0]
    assert lines[1].split() == ["held-out", "accuracy", "mean", "seed", "0", "seed", "1"]
    assert lines[2].split() == ["kdpipe", "alone", "0.9100", "0.9000", "0.9200"]
    assert lines[5].split() == ["plain", "distilled", "0.9510", "0.9500", "0.9520"]
    assert lines[6] == "kdpipe - plain, alone:      -5.00 points (NOT within 0.5; per seed -5.00, -5.00)"
    assert lines[7] == "kdpipe - plain, distilled:  +0.10 points (within 0.5; per seed +0.10, +0.10)"
    assert len(lines) == 8  # no batch-mix lines without the metrics


def test_the_table_prints_the_kdpipe_runs_batch_mix_when_reported():
    mix = {"kdpipe_alone": {"batch_classes": [1.5, 1.75], "batch_classes_random": [9.8, 9.9]},
           "kdpipe_distilled": {"batch_classes": [None, None], "batch_classes_random": [None, None]}}
    lines = parity.format_parity(result(mix)).splitlines()
    assert lines[8:] == ["kdpipe alone batch mix, mean per epoch per seed: batch_classes 1.50, 1.75; "
                         "batch_classes_random 9.80, 9.90"]


@pytest.mark.parametrize("argv, flag", [(["--seeds", ","], "--seeds"), (["--seeds", "0,x"], "--seeds"),
                                        (["--epochs", "0"], "--epochs")])
def test_bad_flags_exit_2_naming_them_before_anything_is_written(tmp_path, capsys, argv, flag):
    assert cli.main(["bench", "parity", *argv, "--workdir", str(tmp_path)]) == 2
    assert f"kdpipe bench: error: {flag} " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
