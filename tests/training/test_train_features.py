"""Per-experiment training features on Ray Train (2 gloo workers): schedules, per-teacher
temperatures, loss variants and per-sample weighting; metrics (JSON lines, TensorBoard, PNG);
export checked on held-out data; resume after a rerun and after a killed worker."""

from __future__ import annotations

import copy
import json
import struct

import pytest

from kdpipe import storage
from kdpipe.generation import generate
from kdpipe.training import loop, trainer

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_schedules_reach_their_ends():
    assert [loop.schedule_value(0.9, 0.5, "linear", e, 5) for e in range(5)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    cos = [loop.schedule_value(4.0, 2.0, "cosine", e, 5) for e in range(5)]
    assert cos[0] == 4.0 and cos[-1] == pytest.approx(2.0) and cos[2] == pytest.approx(3.0)
    assert loop.schedule_value(0.9, 0.5, "constant", 3, 5) == 0.9 and loop.schedule_value(0.9, None, "linear", 3, 5) == 0.9


@pytest.fixture(scope="module")
def cached(ray_cluster, digits_cfg):
    """The digits labelled by the three teachers, plain and in 2 augmented views per sample."""
    cfg = copy.deepcopy(digits_cfg)
    cfg.labels.views = 2
    cfg.data.decode_cpus = 0.4  # read-and-decode tasks of generation and training at 0.4 CPU
    rep = generate.generate(cfg, progress=False)
    assert rep.teacher_forward_passes == 3 * 899 * 3
    return cfg


def _scalars(data: bytes, tag: str) -> list[float]:
    """Values of one scalar tag in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        out += [v.simple_value for v in event.summary.value if v.tag == tag]
    return out


def _lines(uri: str) -> list[dict]:
    fs, path = storage.filesystem(uri)
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]


def test_experiment_settings_metrics_export_and_resume(cached, tmp_path):
    cfg = copy.deepcopy(cached)
    cfg.train.storage_path = str(tmp_path / "runs")
    tr = cfg.train
    tr.run, tr.epochs, tr.checkpoint_every, tr.num_workers = "exp1", 2, 1, 1  # DDP itself: test_train.py
    tr.schedule, tr.alpha, tr.alpha_end, tr.temperature, tr.temperature_end = "linear", 0.9, 0.5, 4.0, 2.0
    tr.ensemble, tr.loss, tr.teacher_weighting = "sum", "soft_ce", "confidence"
    tr.teacher_temperatures = [2.0, 3.0, 4.0]
    tr.export, tr.export_int8 = ["torchscript", "onnx"], True
    first = trainer.train_student(cfg, distill=True)
    assert first.run == "exp1" and [h["epoch"] for h in first.history] == [0, 1]
    assert [h["alpha"] for h in first.history] == pytest.approx([0.9, 0.5])
    assert [h["temperature"] for h in first.history] == pytest.approx([4.0, 2.0])
    assert all(h["kd"] > 0 and h["ce"] > 0 for h in first.history)

    run = tmp_path / "runs" / "exp1"
    lines = _lines(str(run / loop.METRICS_FILE))
    assert [m["epoch"] for m in lines] == [0, 1] and lines[-1]["holdout_accuracy"] == first.holdout_accuracy
    events = list((run / "tensorboard").iterdir())
    assert events and events[0].name.startswith("events.out.tfevents")
    assert _scalars(events[0].read_bytes(), "alpha") == pytest.approx([0.9, 0.5])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    models = first.export["models"]
    assert set(models) == {"torchscript", "onnx", "torchscript-int8"}
    trained = first.export["trained_holdout_accuracy"]
    assert trained == pytest.approx(first.holdout_accuracy)
    assert models["torchscript"]["holdout_accuracy"] == trained and models["torchscript"]["max_abs_logit_diff"] < 1e-4
    assert models["onnx"]["holdout_accuracy"] == trained and models["onnx"]["max_abs_logit_diff"] < 1e-3
    assert abs(models["torchscript-int8"]["holdout_accuracy"] - trained) < 0.02
    assert (run / "export" / "student.onnx").exists() and (run / "export" / "export.json").exists()

    # The same run name again, with more epochs: it continues from its last checkpoint.
    tr.epochs, tr.export = 4, []
    second = trainer.train_student(cfg, distill=True)
    assert [h["epoch"] for h in second.history] == [0, 1, 2, 3]
    assert second.history[:2] == first.history  # restored, not retrained
    assert [h["attempt_start"] for h in second.history] == [0, 0, 2, 2]


def test_label_free_training_on_replayed_views_survives_a_killed_worker(cached, tmp_path):
    cfg = copy.deepcopy(cached)
    cfg.train.storage_path = str(tmp_path / "runs")
    tr = cfg.train
    tr.run, tr.epochs, tr.checkpoint_every = "faulty", 3, 1
    tr.use_labels, tr.alpha, tr.augment = False, 1.0, "replay"
    tr.shuffle_buffer = 0  # none (Ray Data hangs on a buffer of 0 rows: kdpipe passes None)
    tr.inject_fault = "worker_exit:epoch=1:rank=1"
    rep = trainer.train_student(cfg, distill=True)
    assert [h["epoch"] for h in rep.history] == [0, 1, 2]
    assert all(h["replayed_views"] == 2 for h in rep.history)  # one of 2 cached views per sample and epoch
    assert [h["attempt_start"] for h in rep.history] == [0, 1, 1]  # resumed after epoch 0's checkpoint
    assert all("ce" not in h and h["kd"] > 0 for h in rep.history)  # no ground truth used
    assert (tmp_path / "runs" / "faulty" / "_fault_injected").exists()
    assert rep.holdout_accuracy > 0.5


def test_online_baseline_runs_the_teachers_in_every_step(cached, tmp_path, local_epoch):
    cfg = copy.deepcopy(cached)
    cfg.train.storage_path = str(tmp_path / "runs")
    cfg.train.epochs, cfg.train.online, cfg.train.num_workers = 1, True, 1
    cfg.cache.root = str(tmp_path / "no-cache")  # nothing cached here: online needs no labels
    prepared, epoch = local_epoch(cfg)  # the loop's own epoch; Ray Train's part is the other tests'
    assert "online" in prepared.name and len(prepared.settings.online_teachers) == 3
    assert epoch.sums["kd"] > 0 and epoch.rows == 899
