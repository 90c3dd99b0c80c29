"""One line per epoch on the terminal while Ray Train runs the student.

The workers' own output stays in Ray's logs (its prefixes and noise are not for the person at the
terminal). The driver instead follows rank 0's `metrics.jsonl`, which the loop rewrites after every
epoch on the run's storage (local or an object store), and prints each new epoch on stderr: the
loss parts, held-out accuracy, throughput and the time left. stdout keeps the command's result
only (`--json` stays one object).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any, TextIO

from kdpipe import storage
from kdpipe.training.loop import METRICS_FILE

POLL_S = 1.0  # a HEAD-sized read per second: nothing next to an epoch


def format_epoch(metrics: dict[str, Any], epochs: int, seconds_left: float | None, label: str = "") -> str:
    """`metrics`: one epoch of metrics.jsonl (training.loop.epoch_metrics plus evaluation)."""
    world = max(1, int(metrics.get("world_size", 1)))
    width = len(str(epochs))
    parts = [f"{label} " if label else "", f"epoch {metrics['epoch'] + 1:>{width}}/{epochs}"]
    if "loss" in metrics:
        split = [f"{k} {metrics[k]:.4f}" for k in ("kd", "ce") if k in metrics]
        parts.append(f"  loss {metrics['loss']:.4f}" + (f" ({', '.join(split)})" if len(split) > 1 else ""))
    if "holdout_accuracy" in metrics:
        parts.append(f"  held-out {metrics['holdout_accuracy']:.4f}")
    if metrics.get("train_s"):  # rank 0's rows: every rank takes an equal share
        parts.append(f"  {metrics['rows'] * world / metrics['train_s']:,.0f} samples/s")
    if seconds_left is not None and math.isfinite(seconds_left):
        parts.append(f"  {_clock(seconds_left)} left")
    return "".join(parts)


def seconds_left(metrics: dict[str, Any], epochs: int, attempt_epochs: int, now: float) -> float | None:
    """The rest of the run at this attempt's pace so far: wall time since its first step (which
    counts evaluation and checkpoints) over the epochs it has done."""
    first = metrics.get("first_step_at")
    if not first or attempt_epochs < 1 or now < first:
        return None
    return (now - first) / attempt_epochs * max(0, epochs - 1 - metrics["epoch"])


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class EpochLines:
    """A driver thread that prints each new epoch of a run's metrics.jsonl (see the module's
    docstring). Use as a context manager around the fit; epochs already in the file when it
    starts (a resumed run) are not printed again."""

    def __init__(self, run_uri: str, storage_options: dict[str, Any], epochs: int, label: str = "",
                 out: TextIO | None = None, poll_s: float = POLL_S) -> None:
        self.fs, run = storage.filesystem(run_uri, storage_options)
        self.path = storage.join(run, METRICS_FILE)
        self.epochs, self.label, self.out, self.poll_s = epochs, label, out, poll_s
        self.printed: set[int] = set()
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="kdpipe-epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self.printed = {m["epoch"] for m in self._read()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll_quietly()  # the last epochs, written just before the fit returned

    def poll(self) -> None:
        for m in self._read():
            if m["epoch"] in self.printed:
                continue
            self.printed.add(m["epoch"])
            start = int(m.get("attempt_start", 0))
            done = m["epoch"] + 1 - start
            line = format_epoch(m, self.epochs, seconds_left(m, self.epochs, done, time.time()), self.label)
            self.lines.append(line)
            print(line, file=self.out or sys.stderr, flush=True)

    def _read(self) -> list[dict[str, Any]]:
        try:
            text = self.fs.cat_file(self.path).decode()
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a write caught halfway (object stores replace whole; local may not)
                break
        return rows

    def _poll_quietly(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - a progress line must never fail the run
            pass

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll_quietly()
