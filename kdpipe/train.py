"""Student training with Ray Train: DDP workers stream inputs joined with cached soft labels.

No teacher is built here. One read task per input shard loads the shard's rows and, for each
chosen teacher, that shard's committed unit; it checks the unit's checksum and that its sample
keys are exactly the shard's, then emits rows with the teachers' logits stacked as [K, C].
The training step itself (`train_step`) is a pure function of tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdpipe import cache, datasets, losses, runtime, storage
from kdpipe.config import Config, preprocess_for
from kdpipe.models import build_model
from kdpipe.teachers import load_teacher

log = logging.getLogger("kdpipe")


@dataclass
class TrainReport:
    run: str
    storage: str
    teachers: list[str]
    holdout_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    export: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock when train_student was called

    @property
    def seconds_to_first_step(self) -> float:
        """From the call to the first optimiser step of the first epoch (cache lookup, data
        pipeline, worker start-up): what a user waits before anything trains."""
        first = self.history[0].get("first_step_at") if self.history else None
        return float("nan") if first is None else first - self.started_at


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
    online = [(t["preprocess"], t["preprocess"].view(),
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


def _teacher_units(cfg: Config, fingerprint: str, specs: list[str]) -> list[dict[str, Any]]:
    """Resolve each teacher spec to its committed manifest and unit records (driver side)."""
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    units = []
    for spec in specs:
        settings = cache.settings_from_config(cfg, spec.partition("@")[0])
        directory, manifest = cache.resolve_manifest(fs, root, spec, fingerprint, cache.settings_hash(settings))
        if manifest["labels"]["num_classes"] != cfg.data.num_classes:
            raise ValueError(f"teacher {spec!r} labels have {manifest['labels']['num_classes']} classes, "
                             f"the dataset has {cfg.data.num_classes}: set data.num_classes")
        lab = manifest["labels"]
        units.append({"teacher": spec, "directory": fs.unstrip_protocol(directory),
                      "storage_options": cfg.cache.storage_options, "mode": lab["mode"], "format": lab["format"],
                      "k": lab.get("k"), "temperature": lab["temperature"], "augment": lab.get("augment"),
                      "records": {u["shard_id"]: u for u in manifest["units"]}})
    return units


def _common_k(units: list[dict[str, Any]]) -> int | None:
    """None when every teacher stored full logits, else the one k all top-k teachers share."""
    ks = {u["k"] for u in units if u["mode"] == "topk"}
    if len(ks) > 1:
        raise ValueError(f"teachers {[u['teacher'] for u in units]} have top-k labels with different k {sorted(ks)}: "
                         "generate them with the same labels.k")
    return ks.pop() if ks else None


def _replay_views(units: list[dict[str, Any]]) -> int:
    """train.augment=replay: the number of augmented views every chosen teacher labelled (the same)."""
    if not units:
        raise ValueError("train.augment=replay replays the teachers' cached views: it needs distillation "
                         "from cached labels (not --no-distill, not train.online)")
    found = {u["teacher"]: u["augment"] for u in units}
    missing = [t for t, a in found.items() if not a]
    if missing:
        raise ValueError(f"train.augment=replay: teacher(s) {missing} have no augmented views in the cache; "
                         "generate with labels.views > 0 (e.g. --set labels.views=4)")
    if len({json.dumps(a, sort_keys=True) for a in found.values()}) > 1:
        raise ValueError(f"train.augment=replay: the teachers' views differ {found}: generate them together "
                         "with one labels.views / view_seed / crop_scale / flip")
    return int(next(iter(found.values()))["views"])


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


def train_student(cfg: Config, distill: bool = True, run_name: str | None = None,
                  paired_plain: bool = False) -> TrainReport:
    """Train cfg.train.student with Ray Train. distill=False trains on labels alone (the baseline).

    paired_plain (benchmarks only, `kdpipe bench student`): the same workers also stream the
    inputs without labels joined and, every epoch, make a pass of plain supervised steps over them
    next to the distilled pass (the order turning each epoch); each epoch's metrics then carry
    plain_samples_per_s. Both sides are timed seconds apart in one process group, so a slow spell
    of the machine falls on both.

    `cfg` must have its paths resolved. Ray is started (or joined, per cfg.ray) after the
    cached labels are found."""
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.time()
    tr = cfg.train
    specs = (tr.teachers or [t.name for t in cfg.teachers]) if distill else []
    if distill and not specs:
        raise ValueError("no teachers to distil from: set train.teachers or list teachers in the config")
    if distill and tr.alpha == 0:
        raise ValueError("train.alpha=0 ignores the teachers: use alpha > 0 to distil")
    labelled = cfg.data.label_column is not None
    if not labelled and (tr.use_labels or not distill):
        raise ValueError("data.label_column is null (no labels): distil label-free with train.use_labels=false "
                         "and train.alpha=1; the baseline and held-out evaluation need labels")
    source = datasets.source_spec(cfg.data, check_holdout=labelled)
    shards = datasets.list_shards(cfg.data.train, source)
    online = distill and tr.online
    if online and any("@" in spec for spec in specs):
        raise ValueError("train.online runs the configured checkpoints: pinned teachers (name@digest) are cache-only")
    units = _teacher_units(cfg, datasets.fingerprint(shards, source), specs) if distill and not online else []
    online_teachers = [{"name": t.name, "arch": t.arch, "checkpoint": t.checkpoint,
                        "preprocess": preprocess_for(cfg, t.name)} for t in cfg.teachers if t.name in specs] if online else []
    if online and len(online_teachers) != len(specs):
        raise ValueError(f"train.online: teachers {specs} must all be configured under `teachers`")
    topk_k = _common_k(units)
    ensemble = tr.ensemble if tr.ensemble != "auto" else ("sum" if topk_k else "mean")
    if topk_k and ensemble == "mean":
        raise ValueError("train.ensemble=mean needs full labels: top-k teachers have different supports; use sum")
    if topk_k and tr.temperature_end is not None and tr.temperature_end != tr.temperature:
        raise ValueError("a temperature schedule needs full labels (labels.mode: full): top-k targets are "
                         "fixed at one temperature per teacher when they are read")
    temperatures = list(tr.teacher_temperatures) or [tr.temperature] * (len(units) or len(online_teachers))
    replay = _replay_views(units) if distill and tr.augment == "replay" else 0
    for uri in (cfg.data.train, cfg.data.holdout, cfg.cache.root, tr.storage_path):
        storage.check_shared(uri)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    data = {"temperatures": temperatures, "num_classes": cfg.data.num_classes, "topk_k": topk_k, "replay": replay}
    if units and not topk_k and losses.needs_only_the_mean_target(ensemble, tr.loss, tr.teacher_weighting) \
            and tr.temperature_end in (None, tr.temperature):
        # The loss needs only the teachers' mean distribution, the same every epoch: the read step
        # forms it once (teacher_probs [C] per row instead of K teachers' logits).
        data["ensemble"] = {"weights": list(tr.teacher_weights) or [1.0] * len(units), "temperatures": temperatures}
    pre = preprocess_for(cfg)
    holdout_shards = datasets.list_shards(cfg.data.holdout, source) if labelled else []
    views = {t["preprocess"].view(): t["preprocess"].geometry() for t in online_teachers}
    train_ds = student_dataset(source, shards, pre, units, data, views, cfg.data.decode_cpus)
    datasets_ = {"train": train_ds}
    label_floats = (1 if data.get("ensemble") else len(units)) * cfg.data.num_classes
    row_bytes = (int(np.prod(pre.image_shape)) + sum(int(np.prod(g["size"])) * g["channels"] for g in views.values())
                 + 4 * label_floats) * max(1, replay) + 16
    rows = sum(_rows_estimate(s, units) for s in shards) + sum(_rows_estimate(s, []) for s in holdout_shards)
    if paired_plain:
        if not distill or online:
            raise ValueError("paired_plain pairs cached-label training with plain training: distill from the cache")
        datasets_["plain"] = student_dataset(source, shards, pre, [], {**data, "replay": 0},
                                             decode_cpus=cfg.data.decode_cpus)
        rows += sum(_rows_estimate(s, []) for s in shards)  # (counted at the larger row size: an upper bound)
    if holdout_shards:
        datasets_["holdout"] = student_dataset(source, holdout_shards, pre, [], {**data, "replay": 0},
                                               decode_cpus=cfg.data.decode_cpus)
    if _preload(tr.preload, rows * row_bytes):
        # Small data: decode and join once, then every epoch reads from the object store.
        datasets_ = {k: v.materialize() for k, v in datasets_.items()}
    for split in ("train", "plain"):
        if split in datasets_:
            datasets_[split] = datasets_[split].randomize_block_order(seed=tr.seed)

    cpus, _ = runtime.cluster_cpus_gpus()
    per_worker = runtime.plan_train_worker_cpus(cpus, tr.num_workers, tr.cpus_per_worker)
    kind = ("online" if online else "distilled") if distill else "alone"
    name = run_name or (f"{tr.run}{'' if distill else '-alone'}" if tr.run else
                        f"{tr.name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_uri = storage.join(tr.storage_path, name)
    run_config = _run_config(tr.storage_path, cfg.cache.storage_options, name, tr.max_failures, tr.keep_checkpoints)
    loop_config = {
        "student": tr.student, "num_classes": cfg.data.num_classes, "preprocess": pre,
        "epochs": tr.epochs, "batch_size": tr.batch_size, "lr": tr.lr, "weight_decay": tr.weight_decay,
        "temperature": tr.temperature, "temperature_end": tr.temperature_end,
        "alpha": tr.alpha if distill else 0.0, "alpha_end": tr.alpha_end if distill else None,
        "schedule": tr.schedule, "seed": tr.seed, "use_labels": tr.use_labels and labelled,
        "weights": list(tr.teacher_weights) if distill else [], "shuffle_buffer": tr.shuffle_buffer,
        "loss_options": {"temperatures": temperatures if tr.teacher_temperatures else None, "ensemble": ensemble,
                         "kind": tr.loss, "weighting": tr.teacher_weighting},
        "checkpoint_every": tr.checkpoint_every, "evaluate": bool(holdout_shards),
        "run_uri": run_uri, "storage_options": cfg.cache.storage_options, "inject_fault": tr.inject_fault,
        "online_teachers": online_teachers, "paired_plain": paired_plain,
        "threads": max(1, int(per_worker)), "allow_import": cfg.allow_import,
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                               resources_per_worker={"CPU": per_worker}),
        datasets=datasets_,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in ("train", "plain") if k in datasets_]),
        run_config=run_config,
    )
    log.info("training %s (%s) on %d worker(s) x %.2f CPU", tr.student, name, tr.num_workers, per_worker)
    result = trainer.fit()
    history = _history(result)
    final = history[-1] if history else dict(result.metrics or {})
    report = TrainReport(run=name, storage=run_uri, teachers=specs,
                         holdout_accuracy=float(final.get("holdout_accuracy", float("nan"))),
                         history=history, seconds=round(time.time() - started, 2), started_at=started)
    if history:
        from kdpipe import plots

        plots.write_curves(history, storage.join(run_uri, "curves.png"), cfg.cache.storage_options,
                           f"{tr.student} {'distilled from ' + ', '.join(specs) if distill else 'alone'}")
    if tr.export:
        from kdpipe import export

        x, y = export.holdout_pixels(cfg) if labelled else (None, None)
        report.export = export.export_student(run_uri, cfg.cache.storage_options, x, y, tuple(tr.export),
                                              tr.export_int8, cfg.allow_import)
    return report


def student_dataset(source: dict[str, Any], shards: list[datasets.InputShard], pre, units: list[dict[str, Any]],
                    data: dict[str, Any], views: dict[str, dict[str, Any]] | None = None,
                    decode_cpus: float | None = None):
    """The student's input stream: one read task per input shard, joined with the teachers' units
    (or, for online distillation, carrying the teachers' own `views` instead)."""
    import ray.data

    items = [{"shard_id": s.shard_id} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(datasets.read_joined_shard, batch_size=1, num_cpus=decode_cpus or runtime.READ_TASK_CPUS,
                          fn_kwargs={"source": source, "shards": {s.shard_id: s for s in shards},
                                     "geometry": pre.geometry(), "units": units, "data": data, "views": views})


def _rows_estimate(shard: datasets.InputShard, units: list[dict[str, Any]]) -> int:
    """Rows of a shard before reading it: known for Parquet and folders; for tars, from a unit
    record when labels exist, else a guess from the file size (10 KiB per sample)."""
    if shard.num_rows is not None:
        return shard.num_rows
    for unit in units:
        if shard.shard_id in unit["records"]:
            return int(unit["records"][shard.shard_id]["rows"])
    return max(1, int(shard.token.get("size", 0)) // 10240)


def _preload(setting: str, estimated_bytes: int) -> bool:
    """Materialise the joined data in the object store? "auto": when it takes <= 10% of it."""
    if setting != "auto":
        return setting == "always"
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    return estimated_bytes <= 0.1 * store


def _run_config(storage_path: str, storage_options: dict[str, Any], name: str, max_failures: int,
                keep: int = 2):
    """Ray Train's run: checkpoints under <storage_path>/<name>; a rerun with the same name
    resumes from its last checkpoint; worker failures restart from it up to max_failures."""
    import ray.train

    fs, path = storage.filesystem(storage_path, storage_options)
    kwargs = {"name": name, "storage_path": path, "logging_config": ray.train.LoggingConfig(log_level="WARNING"),
              "failure_config": ray.train.FailureConfig(max_failures=max_failures),
              "checkpoint_config": ray.train.CheckpointConfig(num_to_keep=keep)}
    if not storage.is_local(fs):
        kwargs["storage_filesystem"] = storage.pyarrow_filesystem(fs)
    return ray.train.RunConfig(**kwargs)


def _history(result) -> list[dict[str, Any]]:
    """Per-epoch metrics of rank 0, as carried by the last report."""
    return list((result.metrics or {}).get("history", []))
