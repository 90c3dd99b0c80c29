"""The student's training loop on each Ray Train worker, as a recipe of named steps: setup (model,
optimiser, resume), one epoch over any iterable of batches, evaluation, checkpoint and report.

No teacher is built here (except for the online baseline). The training step itself
(`train_step`) is a pure function of tensors, and the steps below run without Ray on plain
iterables of batch dicts; only `_train_loop` and its thin wrappers talk to Ray Train.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kdpipe import storage
from kdpipe.data.images import Preprocess
from kdpipe.teachers.checkpoints import load_teacher
from kdpipe.teachers.models import build_model
from kdpipe.training import losses
from kdpipe.training.losses import LossOptions

log = logging.getLogger("kdpipe")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OnlineTeacher:
    """A teacher the online baseline (train.online) builds on every worker and runs in every step."""

    name: str
    arch: str
    checkpoint: str  # URI of its weights
    preprocess: Preprocess  # its own geometry and normalisation


@dataclass(frozen=True)
class LoopSettings:
    """What every training worker needs, made once by the driver (trainer.loop_settings) and
    pickled to the workers inside Ray Train's train_loop_config ({"settings": LoopSettings})."""

    student: str  # the architecture
    num_classes: int
    preprocess: Preprocess  # the student's
    run_uri: str  # the run's directory: metrics.jsonl, tensorboard/, the fault marker
    storage_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    batch_size: int = 16  # rows per step on each worker
    lr: float = 1e-2
    weight_decay: float = 0.0
    alpha: float = 0.95  # weight of the distillation term (0: labels alone)
    alpha_end: float | None = None  # the schedule's end (None: constant)
    temperature: float = 5.0
    temperature_end: float | None = None
    schedule: str = "constant"  # constant | linear | cosine
    seed: int = 0
    use_labels: bool = True  # False: label-free distillation (no cross-entropy term)
    weights: tuple[float, ...] = ()  # one per teacher; () = equal
    loss: LossOptions = field(default_factory=LossOptions)
    shuffle_buffer: int = 512
    checkpoint_every: int = 0  # epochs between checkpoints and reports (0: by time only); the last epoch always
    checkpoint_every_s: float = 60.0  # and whenever this long has passed since the last one
    evaluate: bool = False  # every rank evaluates its share of the "holdout" dataset after every epoch
    inject_fault: str = ""  # test-only, see _inject_fault
    online_teachers: tuple[OnlineTeacher, ...] = ()
    paired_plain: bool = False  # benchmarks only: a pass of plain steps over "plain" every epoch too
    threads: int = 1  # torch threads per worker
    allow_import: bool = False


@dataclass
class TrainState:
    """One worker's training state, carried from epoch to epoch: what `setup` builds and a
    checkpoint restores (`resume`)."""

    model: torch.nn.Module  # in DDP when Ray Train runs more than one worker
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int = 0
    weights: torch.Tensor | None = None  # [K] teacher weights, None for equal
    online: list[tuple[Preprocess, str, torch.nn.Module]] = field(default_factory=list)  # (its preprocess, pixel column, teacher)
    start_epoch: int = 0  # > 0: this attempt resumed from a checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)  # rank 0's metrics, one dict per epoch
    first_step_at: float | None = None  # wall clock of this attempt's first optimiser step
    checkpointed_at: float = field(default_factory=time.time)  # wall clock of the last checkpoint (or the start)


@dataclass(frozen=True)
class EpochPass:
    """One pass of training steps over an epoch's batches on one worker."""

    rows: int
    seconds: float
    sums: dict[str, float]  # each loss part summed over the rows (a step's value times its rows)
    replayed: int  # views per sample in the rows read (replayed augmentation; 0 without)
    waited: float  # of `seconds`, the time spent waiting for the next batch (input-bound if large)
    first_step_s: float = float("nan")  # from the pass's start to its first step done
    steps: int = 0
    batch_classes: float = 0.0  # distinct labels summed over the steps (labelled rows only)
    class_counts: tuple[int, ...] = ()  # labelled rows per class seen in the pass


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               temperature: float, alpha: float, weights: torch.Tensor | None,
               loss_options: LossOptions | None = None, use_labels: bool = True) -> dict[str, torch.Tensor]:
    """One optimiser step on batch {"x" [B, ...] (normalised), "label" [B], and the teachers'
    targets, see losses.distillation_loss}. Returns the loss parts as detached scalar tensors on
    the model's device (the caller sums them and reads them once per epoch: no wait for the GPU
    per step)."""
    model.train()
    out = model(batch["x"])
    topk = (batch["topk_ids"], batch["topk_probs"], batch["topk_tail"]) if "topk_ids" in batch else None
    args = (out, batch.get("teacher_logits"), batch.get("label") if use_labels else None, temperature, alpha, weights)
    kwargs = {"teacher_topk": topk, "teacher_probs": batch.get("teacher_probs"),
              **(loss_options or LossOptions()).kwargs()}
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


CHECKPOINT_FILE = "state.pt"


def setup(settings: LoopSettings, rank: int = 0, device: torch.device | str = "cpu",
          prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> TrainState:
    """Seed, threads, the student (through `prepare_model`, Ray Train's DDP wrapper, when
    given; else moved to `device`), its optimiser, and the online baseline's teachers."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    pre = settings.preprocess
    model = build_model(settings.student, settings.num_classes, pre.image_shape, settings.allow_import)
    model = prepare_model(model) if prepare_model is not None else model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    weights = torch.tensor(settings.weights) if settings.weights else None
    online = [(t.preprocess, t.preprocess.pixels_column(),
               load_teacher(t.name, t.arch, t.checkpoint, settings.storage_options, settings.num_classes,
                            t.preprocess.image_shape, settings.allow_import).to(device))
              for t in settings.online_teachers]
    return TrainState(model, optimizer, torch.device(device), rank, weights, online)


def resume(state: TrainState, saved: dict[str, Any]) -> None:
    """Continue from a checkpoint (`checkpoint_state`): weights, optimiser, and the metrics of
    the epochs it had done."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.start_epoch = saved["epoch"] + 1
    state.history = [h for h in saved["history"] if h["epoch"] < state.start_epoch]


def epoch_schedule(settings: LoopSettings, epoch: int) -> tuple[float, float]:
    """(alpha, temperature) of `epoch`."""
    alpha = schedule_value(settings.alpha, settings.alpha_end, settings.schedule, epoch, settings.epochs)
    temperature = schedule_value(settings.temperature, settings.temperature_end, settings.schedule, epoch,
                                 settings.epochs)
    return alpha, temperature


def epoch_passes(paired_plain: bool, epoch: int) -> list[str]:
    """The datasets an epoch trains on, in order. paired_plain (benchmarks only): a plain pass
    too, first on even epochs, last on odd ones."""
    if not paired_plain:
        return ["train"]
    return ["plain", "train"] if epoch % 2 == 0 else ["train", "plain"]


def with_online_targets(online: list[tuple[Preprocess, str, torch.nn.Module]], batch: Batch) -> Batch:
    """The baseline kdpipe exists to avoid: every teacher runs on every batch. The batch with
    teacher_logits [B, K, C] from the teachers' own pixel columns, those columns dropped."""
    with torch.no_grad():
        logits = torch.stack([t(p.normalise(batch[column])).float() for p, column, t in online], dim=1)
    columns = {column for _, column, _ in online}
    return {**{k: v for k, v in batch.items() if k not in columns}, "teacher_logits": logits}


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


def train_epoch(state: TrainState, settings: LoopSettings, batches: Iterable[Batch], epoch: int, alpha: float,
                temperature: float) -> EpochPass:
    """One pass of training steps over `batches` (dicts of tensors on the model's device, one
    step each: x uint8 [B, C, H, W], or [B, V, C, H, W] with V cached views, label, teachers'
    targets). Sets state.first_step_at at the first step."""
    t0, rows, replayed, waited, first_step_s, steps = time.time(), 0, 0, 0.0, float("nan"), 0
    names, totals = None, None  # the loss parts' names, and their row-weighted sums in one tensor
    mix = ClassMix(settings.num_classes, state.device)
    views = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch * 1009 + state.rank)
    ready = time.perf_counter()
    for batch in batches:
        waited += time.perf_counter() - ready
        if state.online:
            batch = with_online_targets(state.online, batch)
        if batch["x"].dim() == 5:  # replayed augmentation: one of the cached views per sample
            replayed = batch["x"].shape[1]
            batch = pick_views(batch, views)
        batch = {**batch, "x": settings.preprocess.normalise(batch["x"])}
        parts = train_step(state.model, state.optimizer, batch, temperature, alpha, state.weights, settings.loss,
                           settings.use_labels)
        state.first_step_at = state.first_step_at or time.time()
        if not steps:
            first_step_s = time.time() - t0
        steps += 1
        if "label" in batch:
            mix.add(batch["label"])
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
    distinct, counts = mix.read()
    return EpochPass(rows, time.time() - t0, sums, replayed, waited, first_step_s, steps, distinct, counts)


class ClassMix:
    """How mixed an epoch's batches are: distinct labels per batch and rows per class, counted
    on the model's device (no wait for it per step) and read once per epoch."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.distinct = torch.zeros((), dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.seen = False

    def add(self, label: torch.Tensor) -> None:
        present = torch.zeros_like(self.counts).index_fill_(0, label.long(), 1.0)
        self.distinct += present.sum()
        self.counts.index_add_(0, label.long(), torch.ones_like(label, dtype=self.counts.dtype))
        self.seen = True

    def read(self) -> tuple[float, tuple[int, ...]]:
        if not self.seen:
            return 0.0, ()
        return float(self.distinct), tuple(int(c) for c in self.counts.tolist())


def epoch_metrics(epoch: int, alpha: float, temperature: float, lr: float, trained: EpochPass,
                  plain: EpochPass | None = None, first_step_at: float | None = None) -> dict[str, Any]:
    """An epoch's metrics (before evaluation): throughput, schedules, the loss parts per row."""
    # input_wait_s: the part of train_s spent waiting for the next batch (input-bound if large)
    metrics = {"epoch": epoch, "rows": trained.rows, "samples_per_s": trained.rows / max(1e-9, trained.seconds),
               "train_s": trained.seconds, "input_wait_s": trained.waited, "first_step_s": trained.first_step_s,
               "alpha": alpha, "temperature": temperature, "lr": lr,
               "replayed_views": trained.replayed, "first_step_at": first_step_at}
    metrics.update({k: float(v) / max(1, trained.rows) for k, v in trained.sums.items()})
    if plain is not None:
        metrics.update({"plain_rows": plain.rows, "plain_train_s": plain.seconds,
                        "plain_samples_per_s": plain.rows / max(1e-9, plain.seconds),
                        "plain_input_wait_s": plain.waited})
    return metrics


def evaluate(model: torch.nn.Module, batches) -> tuple[int, int]:
    """(correct, rows) of `model` over an iterable of {"x", "label"} batches: counts, which sum
    across ranks exactly."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            pred = model(b["x"]).argmax(-1)
            correct += int((pred == b["label"]).sum())
            total += len(pred)
    return correct, total


def evaluate_holdout(state: TrainState, settings: LoopSettings, batches: Iterable[Batch],
                     reduce: Callable[[list[float]], list[float]] = lambda v: v) -> dict[str, float]:
    """Held-out evaluation of the student on this rank's share of {"x" uint8, "label"} batches,
    summed over the ranks by `reduce` (an all-reduce): holdout_accuracy, holdout_rows and eval_s."""
    t0 = time.time()
    # The module inside DDP: DDP's forward broadcasts buffers (BatchNorm statistics) in a
    # collective; evaluation runs the same weights on every rank without one.
    model = getattr(state.model, "module", state.model)
    counts = evaluate(model, ({**b, "x": settings.preprocess.normalise(b["x"])} for b in batches))
    correct, total = reduce([float(c) for c in counts])
    return {"holdout_accuracy": correct / total if total else float("nan"), "holdout_rows": int(round(total)),
            "eval_s": time.time() - t0}


def class_mix_metrics(trained: EpochPass, batch_size: int,
                      reduce: Callable[[list[float]], list[float]] = lambda v: v) -> dict[str, float]:
    """How mixed the epoch's batches were, over all ranks (`reduce`): batch_classes, the mean
    number of distinct labels per step, and batch_classes_random, its expected value for batches
    drawn at random from the rows the epoch saw. Empty for label-free data."""
    from kdpipe.training.view import expected_classes

    if not trained.class_counts:
        return {}
    summed = reduce([trained.batch_classes, float(trained.steps), *map(float, trained.class_counts)])
    counts = [int(round(c)) for c in summed[2:]]
    return {"batch_classes": summed[0] / max(1.0, summed[1]),
            "batch_classes_random": expected_classes(counts, batch_size)}


def checkpoint_due(settings: LoopSettings, epoch: int, checkpointed_at: float, now: float | None = None) -> bool:
    """Checkpoint (and report) after `epoch`? After the last epoch, every checkpoint_every epochs
    (when set), and once checkpoint_every_s seconds have passed since the last checkpoint: a
    report costs Ray Train ~2 s of polling, so by wall time they stay a small part of a fit."""
    if epoch == settings.epochs - 1:
        return True
    if settings.checkpoint_every and (epoch + 1) % settings.checkpoint_every == 0:
        return True
    return (time.time() if now is None else now) - checkpointed_at >= settings.checkpoint_every_s


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """`values` summed (or maxed) over the ranks of the process group; as they are with none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def checkpoint_state(state: TrainState, settings: LoopSettings, epoch: int) -> dict[str, Any]:
    """What a checkpoint's state.pt holds: enough to resume (`resume`) and to export the
    student alone (export.load_student: "student", "arch", "num_classes", "preprocess")."""
    return {"model": state.model.state_dict(), "student": getattr(state.model, "module", state.model).state_dict(),
            "optimizer": state.optimizer.state_dict(), "epoch": epoch, "history": state.history,
            "arch": settings.student, "num_classes": settings.num_classes, "preprocess": settings.preprocess.spec()}


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train's function on each worker; config["settings"] is the run's LoopSettings."""
    import ray.train
    import ray.train.torch

    settings: LoopSettings = config["settings"]
    ctx = ray.train.get_context()
    state = setup(settings, ctx.get_world_rank(), ray.train.torch.get_device(), ray.train.torch.prepare_model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: after a worker failure, or a rerun of the same run name
        with checkpoint.as_directory() as d:
            resume(state, torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True))
    sink = MetricsSink(settings.run_uri, settings.storage_options) if state.rank == 0 else None
    for epoch in range(state.start_epoch, settings.epochs):
        if settings.inject_fault:
            _inject_fault(settings.inject_fault, epoch, state.rank, settings.run_uri, settings.storage_options)
        alpha, temperature = epoch_schedule(settings, epoch)
        done: dict[str, EpochPass] = {}
        for name in epoch_passes(settings.paired_plain, epoch):  # plain: labels alone, same workers and steps
            done[name] = train_epoch(state, settings, _shard_steps(name, settings, state, epoch), epoch,
                                     0.0 if name == "plain" else alpha, temperature)
        metrics = epoch_metrics(epoch, alpha, temperature, state.optimizer.param_groups[0]["lr"], done["train"],
                                done.get("plain"), state.first_step_at)
        metrics.update(class_mix_metrics(done["train"], settings.batch_size, all_reduce))
        if settings.evaluate:  # every rank its share; every rank holds the same weights after the DDP step
            holdout = ray.train.get_dataset_shard("holdout")
            metrics.update(evaluate_holdout(state, settings, holdout.iter_torch_batches(batch_size=512, device=state.device),
                                            all_reduce))
        if state.rank == 0:
            metrics["world_size"] = ctx.get_world_size()
            metrics["attempt_start"] = state.start_epoch  # > 0: this attempt resumed from a checkpoint
            state.history.append(metrics)
            sink.write(state.history)
        # Every rank must agree (reports are collective): due if due on any rank's clock.
        if all_reduce([float(checkpoint_due(settings, epoch, state.checkpointed_at))], "max")[0]:
            _report(state, settings, epoch, metrics)
            state.checkpointed_at = time.time()


def _shard_steps(name: str, settings: LoopSettings, state: TrainState, epoch: int) -> Iterator[Batch]:
    """This worker's share of dataset `name` for one epoch, locally shuffled, in steps."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    fetched = shard.iter_torch_batches(batch_size=fetch_rows(settings.batch_size), device=state.device,
                                       local_shuffle_buffer_size=settings.shuffle_buffer or None,  # (Ray hangs on 0)
                                       local_shuffle_seed=settings.seed * 1000 + epoch * 10 + state.rank)
    return split_batches(fetched, settings.batch_size)


def _report(state: TrainState, settings: LoopSettings, epoch: int, metrics: dict[str, Any]) -> None:
    """Report to Ray Train, rank 0 with a checkpoint and the history. Reports are collective
    (every rank calls them) and block until Ray Train takes them, so they come only when a
    checkpoint is due (checkpoint_due), carrying the epochs since the last one."""
    import ray.train

    if state.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(checkpoint_state(state, settings, epoch), os.path.join(d, CHECKPOINT_FILE))
        ray.train.report({**metrics, "history": state.history}, checkpoint=ray.train.Checkpoint.from_directory(d))
