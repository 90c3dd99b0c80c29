"""The student's training loop on each Ray Train worker: steps, epochs, evaluation, checkpoints.

No teacher is built here (except for the online baseline). The training step itself
(`train_step`) is a pure function of tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import torch

from kdpipe import storage
from kdpipe.teachers.checkpoints import load_teacher
from kdpipe.teachers.models import build_model
from kdpipe.training import losses

log = logging.getLogger("kdpipe")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               temperature: float, alpha: float, weights: torch.Tensor | None,
               loss_options: dict[str, Any] | None = None, use_labels: bool = True) -> dict[str, float]:
    """One optimiser step. loss_options: temperatures / ensemble / kind / weighting for
    losses.distillation_loss. Returns the loss parts as detached scalar tensors on the model's
    device (the caller sums them and reads them once per epoch: no wait for the GPU per step)."""
    model.train()
    out = model(batch["x"])
    topk = (batch["topk_ids"], batch["topk_probs"], batch["topk_tail"]) if "topk_ids" in batch else None
    args = (out, batch.get("teacher_logits"), batch.get("label") if use_labels else None, temperature, alpha, weights)
    kwargs = {"teacher_topk": topk, "teacher_probs": batch.get("teacher_probs"), **(loss_options or {})}
    # The common loss (teachers' mean distribution, plus cross-entropy) has its gradient written
    # out: no autograd graph for the loss, a few ops instead of ~4x plain cross-entropy's.
    direct = losses.distillation_grad(*args, **kwargs)
    optimizer.zero_grad(set_to_none=True)
    if direct is not None:
        grad, parts = direct
        out.backward(grad)
    else:
        loss, parts = losses.distillation_loss(*args, **kwargs)
        loss.backward()
    optimizer.step()
    return parts


FETCH_ROWS = 256  # rows per batch taken from Ray Data when the step's batch is smaller


def fetch_rows(batch_size: int) -> int:
    """Rows per batch to take from Ray Data for steps of `batch_size`: a multiple of it, at
    least FETCH_ROWS. Each batch from the iterator costs ~0.6 ms of conversion and bookkeeping
    on 2 cores whatever its size, 10 % of a small model's step at batch 16; split into steps on
    the worker (split_batches), the same rows make the same steps in the same order."""
    return batch_size * max(1, FETCH_ROWS // batch_size)


def split_batches(batches, batch_size: int):
    """Cut each batch (a dict of tensors with equal first dims) into steps of `batch_size` rows;
    the last step of a batch is shorter only when the batch is (the epoch's last)."""
    for batch in batches:
        n = len(next(iter(batch.values())))
        if n <= batch_size:
            yield batch
            continue
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in batch.items()}


def schedule_value(start: float, end: float | None, kind: str, epoch: int, epochs: int) -> float:
    """The value of a scheduled hyperparameter at `epoch` (0-based) of `epochs`: constant, or
    linear / cosine from `start` at the first epoch to `end` at the last."""
    if end is None or kind == "constant" or epochs <= 1:
        return float(start)
    t = min(1.0, max(0.0, epoch / (epochs - 1)))
    f = t if kind == "linear" else (1 - math.cos(math.pi * t)) / 2
    return float(start + (end - start) * f)


class MetricsSink:
    """Rank 0's metrics: `metrics.jsonl` (one line per epoch, rewritten whole so object stores
    need no append) and TensorBoard event files under <run>/tensorboard, on any fsspec URI."""

    def __init__(self, run_uri: str, storage_options: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self.fs, self.run = storage.filesystem(run_uri, storage_options)
        self.local = tempfile.mkdtemp(prefix="kdpipe-tb-")
        self.writer = SummaryWriter(self.local, flush_secs=3600)

    def write(self, history: list[dict[str, Any]]) -> None:
        last = history[-1]
        for key, value in last.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=last["epoch"])
        self.writer.flush()
        lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
        storage.write_bytes(self.fs, storage.join(self.run, METRICS_FILE), lines.encode())
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(self.fs, storage.join(self.run, "tensorboard", name), f.read())


METRICS_FILE = "metrics.jsonl"


def _inject_fault(spec: str, epoch: int, rank: int, run_uri: str, storage_options: dict[str, Any]) -> None:
    """Test-only (train.inject_fault): "worker_exit:epoch=E:rank=R" kills that worker process
    once per run (a marker in the run directory remembers), as a crash or an OOM kill would."""
    kind, *args = spec.split(":")
    opts = dict(a.split("=", 1) for a in args)
    if kind != "worker_exit" or int(opts.get("epoch", 0)) != epoch or int(opts.get("rank", 0)) != rank:
        return
    fs, run = storage.filesystem(run_uri, storage_options)
    marker = storage.join(run, "_fault_injected")
    if fs.exists(marker):
        return
    # Crash once the last checkpoint is registered (Ray Train's snapshot names it), as a crash
    # some time after a checkpoint would; a crash right after a report may lose that report.
    deadline = time.time() + 60
    while not fs.exists(storage.join(run, "checkpoint_manager_snapshot.json")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    storage.write_bytes(fs, marker, b"1")
    log.warning("inject_fault: worker rank %d exits at epoch %d", rank, epoch)
    os._exit(17)


def evaluate(model: torch.nn.Module, batches) -> tuple[float, int]:
    """(accuracy, rows) of `model` over an iterable of {"x", "label"} batches."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            pred = model(b["x"]).argmax(-1)
            correct += int((pred == b["label"]).sum())
            total += len(pred)
    return (correct / total if total else float("nan")), total


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    pre = config["preprocess"]
    model = build_model(config["student"], config["num_classes"], pre.image_shape, config["allow_import"])
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    weights = torch.tensor(config["weights"]) if config["weights"] else None
    device = ray.train.torch.get_device()
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: after a worker failure, or a rerun of the same run name
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        history = [h for h in history if h["epoch"] < start_epoch]
    sink = MetricsSink(config["run_uri"], config["storage_options"]) if rank == 0 else None
    online = [(t["preprocess"], t["preprocess"].pixels_column(),
               load_teacher(t["name"], t["arch"], t["checkpoint"], config["storage_options"], config["num_classes"],
                            t["preprocess"].image_shape, config["allow_import"]).to(device)) for t in config["online_teachers"]]
    every, epochs = config["checkpoint_every"], config["epochs"]
    loss_options = config["loss_options"]
    first_step_at = None  # wall clock of this attempt's first optimiser step (time to first step)

    def one_pass(name: str, epoch: int, alpha: float, temperature: float) -> tuple[int, float, dict, int, float]:
        """One epoch's pass over dataset `name`: (rows, seconds, loss sums, replayed views,
        seconds spent waiting for the input stream)."""
        nonlocal first_step_at
        t0, rows, replayed, waited = time.time(), 0, 0, 0.0
        names, totals = None, None  # the loss parts' names, and their row-weighted sums in one tensor
        ready = time.perf_counter()
        views = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 1009 + rank)
        shard = ray.train.get_dataset_shard(name)
        fetched = shard.iter_torch_batches(batch_size=fetch_rows(config["batch_size"]), device=device,
                                           local_shuffle_buffer_size=config["shuffle_buffer"],
                                           local_shuffle_seed=config["seed"] * 1000 + epoch * 10 + rank)
        for batch in split_batches(fetched, config["batch_size"]):
            waited += time.perf_counter() - ready
            if online:  # the baseline kdpipe exists to avoid: every teacher runs on every batch
                with torch.no_grad():
                    batch["teacher_logits"] = torch.stack(
                        [t(p.normalise(batch[view])).float() for p, view, t in online], dim=1)
                for _, view, _ in online:
                    batch.pop(view, None)
            if batch["x"].dim() == 5:  # replayed augmentation: one of the cached views per sample
                replayed = batch["x"].shape[1]
                batch = pick_views(batch, views)
            batch["x"] = pre.normalise(batch["x"])
            parts = train_step(model, optimizer, batch, temperature, alpha, weights, loss_options, config["use_labels"])
            first_step_at = first_step_at or time.time()
            n = len(batch["x"])
            rows += n
            # Two ops per step for all the parts (each tensor op costs microseconds of dispatch,
            # a kernel launch on a GPU: a small student's step has few to spare).
            if totals is None:
                names = list(parts)
                totals = torch.stack([parts[k] for k in names]) * n
            else:
                totals.add_(torch.stack([parts[k] for k in names]), alpha=n)
            ready = time.perf_counter()
        sums = dict(zip(names, totals.tolist(), strict=True)) if totals is not None else {}
        return rows, time.time() - t0, sums, replayed, waited

    for epoch in range(start_epoch, epochs):
        if config["inject_fault"]:
            _inject_fault(config["inject_fault"], epoch, rank, config["run_uri"], config["storage_options"])
        alpha = schedule_value(config["alpha"], config["alpha_end"], config["schedule"], epoch, epochs)
        temperature = schedule_value(config["temperature"], config["temperature_end"], config["schedule"], epoch, epochs)
        paired: dict[str, float] = {}
        passes = ["train"]
        if config["paired_plain"]:  # benchmarks only: a plain pass too, first on even epochs, last on odd
            passes = ["plain", "train"] if epoch % 2 == 0 else ["train", "plain"]
        for name in passes:
            if name == "plain":  # labels alone (alpha 0), same workers, same steps
                n, sec, _, _, wait = one_pass("plain", epoch, 0.0, temperature)
                paired = {"plain_rows": n, "plain_train_s": sec, "plain_samples_per_s": n / max(1e-9, sec),
                          "plain_input_wait_s": wait}
            else:
                rows, seconds, sums, replayed, waited = one_pass("train", epoch, alpha, temperature)
        # input_wait_s: the part of train_s spent waiting for the next batch (input-bound if large)
        metrics = {"epoch": epoch, "rows": rows, "samples_per_s": rows / max(1e-9, seconds), "train_s": seconds,
                   "input_wait_s": waited,
                   "alpha": alpha, "temperature": temperature, "lr": optimizer.param_groups[0]["lr"],
                   "replayed_views": replayed, "first_step_at": first_step_at}
        metrics.update({k: float(v) / max(1, rows) for k, v in sums.items()})
        metrics.update(paired)
        t1 = time.time()
        if rank == 0:  # every rank holds the same weights after the DDP step
            if config["evaluate"]:
                holdout = ray.train.get_dataset_shard("holdout")
                # The module inside DDP: DDP's forward broadcasts buffers (BatchNorm statistics),
                # a collective that the other ranks, already training on, would never join.
                acc, n = evaluate(getattr(model, "module", model),
                                  ({**b, "x": pre.normalise(b["x"])}
                                   for b in holdout.iter_torch_batches(batch_size=512, device=device)))
                metrics.update(holdout_accuracy=acc, holdout_rows=n, eval_s=time.time() - t1)
            metrics["world_size"] = ctx.get_world_size()
            metrics["attempt_start"] = start_epoch  # > 0: this attempt resumed from a checkpoint
            history.append(metrics)
            sink.write(history)
        last = epoch == epochs - 1
        if not (last or (epoch + 1) % every == 0):
            continue
        # Reports are collective (every rank calls them) and block until Ray Train takes them,
        # so they come every `checkpoint_every` epochs, carrying the epochs since the last one.
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                raw = model.module if hasattr(model, "module") else model
                torch.save({"model": model.state_dict(), "student": raw.state_dict(),
                            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                            "arch": config["student"], "num_classes": config["num_classes"],
                            "preprocess": pre.spec()},
                           os.path.join(d, "state.pt"))
                ray.train.report({**metrics, "history": history},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def pick_views(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Replayed augmentation: from rows carrying V views ([B, V, ...] entries), keep one random
    view per sample, the same one for the image and for every teacher's labels."""
    x = batch["x"]
    rows, views = x.shape[:2]
    pick = torch.randint(views, (rows,), generator=generator).to(x.device)
    arange = torch.arange(rows, device=x.device)
    out = dict(batch)
    for key in ("x", "teacher_logits", "teacher_probs", "topk_ids", "topk_probs", "topk_tail"):
        if key in batch:
            out[key] = batch[key][arange, pick]
    return out
