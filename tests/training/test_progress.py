"""The per-epoch terminal lines (training.progress): the format, the time left, and the driver
thread that follows metrics.jsonl as the loop rewrites it (Ray-free)."""

from __future__ import annotations

import io
import json
import time

from kdpipe import storage
from kdpipe.training.progress import EpochLines, format_epoch, seconds_left


def _epoch(epoch: int, **extra) -> dict:
    m = {"epoch": epoch, "rows": 500, "train_s": 0.5, "world_size": 2, "loss": 0.5, "kd": 0.4, "ce": 0.1,
         "holdout_accuracy": 0.9312, "first_step_at": 1000.0, "attempt_start": 0}
    return {**m, **extra}


def test_a_line_names_the_epoch_loss_parts_accuracy_throughput_and_time_left():
    line = format_epoch(_epoch(2), 60, 125.0, "distilled")
    assert line == ("distilled epoch  3/60  loss 0.5000 (kd 0.4000, ce 0.1000)  held-out 0.9312"
                    "  2,000 samples/s  2:05 left")
    alone = {k: v for k, v in _epoch(0).items() if k not in ("kd",)}
    assert format_epoch(alone, 5, None) == "epoch 1/5  loss 0.5000  held-out 0.9312  2,000 samples/s"
    assert format_epoch(_epoch(0), 2, 3725.0).endswith("1:02:05 left")


def test_time_left_is_this_attempts_pace_over_the_epochs_to_go():
    # 4 epochs done in 40 s since the attempt's first step: 10 s each, 6 to go
    assert seconds_left(_epoch(3), 10, 4, now=1040.0) == 60.0
    # a resumed attempt (started at epoch 5) counts only its own epochs
    assert seconds_left(_epoch(6, attempt_start=5), 10, 2, now=1020.0) == 30.0
    assert seconds_left(_epoch(9), 10, 10, now=1100.0) == 0.0
    assert seconds_left({"epoch": 0}, 10, 1, now=5.0) is None


def test_the_driver_prints_each_new_epoch_once_and_skips_those_a_resumed_run_had(tmp_path):
    run = str(tmp_path / "run")
    fs, path = storage.filesystem(run)
    metrics = storage.join(path, "metrics.jsonl")

    def write(history):
        storage.write_bytes(fs, metrics, "".join(json.dumps(h) + "\n" for h in history).encode())

    write([_epoch(0), _epoch(1)])  # a previous attempt's epochs: not printed again
    out = io.StringIO()
    with EpochLines(run, {}, 4, out=out, poll_s=0.01) as lines:
        write([_epoch(0), _epoch(1), _epoch(2, attempt_start=2)])
        deadline = time.time() + 5
        while len(lines.lines) < 1 and time.time() < deadline:
            time.sleep(0.01)
        write([_epoch(0), _epoch(1), _epoch(2, attempt_start=2), _epoch(3, attempt_start=2)])
    printed = out.getvalue().splitlines()
    assert [p.split("/")[0] for p in printed] == ["epoch 3", "epoch 4"]
    assert printed == lines.lines


def test_a_run_without_metrics_yet_prints_nothing_and_a_torn_line_waits(tmp_path):
    run = str(tmp_path / "run")
    out = io.StringIO()
    lines = EpochLines(run, {}, 3, out=out)
    lines.poll()
    assert out.getvalue() == ""
    fs, path = storage.filesystem(run)
    storage.write_bytes(fs, storage.join(path, "metrics.jsonl"), (json.dumps(_epoch(0)) + "\n{\"epo").encode())
    lines.poll()
    assert out.getvalue().startswith("epoch 1/3")
    assert len(out.getvalue().splitlines()) == 1
