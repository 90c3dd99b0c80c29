"""Student training with Ray Train: DDP workers stream inputs joined with cached soft labels.

No teacher is built here. One read task per input shard loads the shard's rows and, for each
chosen teacher, that shard's committed unit; it checks the unit's checksum and that its sample
keys are exactly the shard's, then emits rows with the teachers' logits stacked as [K, C].
The training step itself (`train_step`) is a pure function of tensors.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("kdpipe")


@dataclass
class TrainReport:
    run: str
    storage: str
    teachers: list[str]
    holdout_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               temperature: float, alpha: float, weights: torch.Tensor | None) -> dict[str, float]:
    model.train()
    out = model(batch["x"])
    topk = (batch["topk_ids"], batch["topk_probs"], batch["topk_tail"]) if "topk_ids" in batch else None
    loss, parts = losses.distillation_loss(out, batch.get("teacher_logits"), batch.get("label"),
                                           temperature, alpha, weights, teacher_topk=topk)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return parts


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
    model = build_model(config["student"], config["num_classes"], pre.image_shape)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    weights = torch.tensor(config["weights"]) if config["weights"] else None
    device = ray.train.torch.get_device()
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: Ray Train hands back the last reported checkpoint
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    train_shard = ray.train.get_dataset_shard("train")
    every = config["checkpoint_every"]
    for epoch in range(start_epoch, config["epochs"]):
        t0, rows, sums = time.time(), 0, {}
        for batch in train_shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                                    local_shuffle_buffer_size=config["shuffle_buffer"],
                                                    local_shuffle_seed=config["seed"] * 1000 + epoch * 10 + rank):
            batch["x"] = pre.normalise(batch["x"])
            parts = train_step(model, optimizer, batch, config["temperature"], config["alpha"], weights)
            n = len(batch["x"])
            rows += n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * n
        t1 = time.time()
        metrics = {"epoch": epoch, "rows": rows, "samples_per_s": rows / max(1e-9, t1 - t0), "train_s": t1 - t0}
        metrics.update({k: v / max(1, rows) for k, v in sums.items()})
        if rank == 0:  # every rank holds the same weights after the DDP step
            holdout = ray.train.get_dataset_shard("holdout")
            acc, n = evaluate(model, ({**b, "x": pre.normalise(b["x"])}
                                      for b in holdout.iter_torch_batches(batch_size=512, device=device)))
            metrics.update(holdout_accuracy=acc, holdout_rows=n, eval_s=time.time() - t1)
            history.append(metrics)
        last = epoch == config["epochs"] - 1
        if not (last or (epoch + 1) % every == 0):
            continue
        # Reports are collective (every rank calls them) and block until Ray Train takes them,
        # so they come every `checkpoint_every` epochs, carrying the epochs since the last one.
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                raw = model.module if hasattr(model, "module") else model
                torch.save({"model": model.state_dict(), "student": raw.state_dict(),
                            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history},
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
                      "k": lab.get("k"), "temperature": lab["temperature"],
                      "records": {u["shard_id"]: u for u in manifest["units"]}})
    return units


def _common_k(units: list[dict[str, Any]]) -> int | None:
    """None when every teacher stored full logits, else the one k all top-k teachers share."""
    ks = {u["k"] for u in units if u["mode"] == "topk"}
    if len(ks) > 1:
        raise ValueError(f"teachers {[u['teacher'] for u in units]} have top-k labels with different k {sorted(ks)}: "
                         "generate them with the same labels.k")
    return ks.pop() if ks else None


def train_student(cfg: Config, distill: bool = True, run_name: str | None = None) -> TrainReport:
    """Train cfg.train.student with Ray Train. distill=False trains on labels alone (the baseline).

    `cfg` must have its paths resolved. Ray is started (or joined, per cfg.ray) after the
    cached labels are found."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.time()
    tr = cfg.train
    specs = (tr.teachers or [t.name for t in cfg.teachers]) if distill else []
    if distill and not specs:
        raise ValueError("no teachers to distil from: set train.teachers or list teachers in the config")
    if distill and tr.alpha == 0:
        raise ValueError("train.alpha=0 ignores the teachers: use alpha > 0 to distil")
    if not cfg.data.label_column:
        raise ValueError("data.label_column is null: held-out evaluation needs labels on data.holdout")
    source = datasets.source_spec(cfg.data)
    shards = datasets.list_shards(cfg.data.train, source)
    units = _teacher_units(cfg, datasets.fingerprint(shards, source), specs) if distill else []
    for uri in (cfg.data.train, cfg.data.holdout, cfg.cache.root, tr.storage_path):
        storage.check_shared(uri)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    data = {"temperature": tr.temperature, "num_classes": cfg.data.num_classes, "topk_k": _common_k(units)}
    pre = preprocess_for(cfg)
    holdout_shards = datasets.list_shards(cfg.data.holdout, source)
    train_ds = student_dataset(source, shards, pre, units, data)
    holdout_ds = student_dataset(source, holdout_shards, pre, [], data)
    row_bytes = int(np.prod(pre.image_shape)) + 4 * len(units) * cfg.data.num_classes + 16
    rows = sum(_rows_estimate(s, units) for s in shards) + sum(_rows_estimate(s, []) for s in holdout_shards)
    if _preload(tr.preload, rows * row_bytes):
        # Small data: decode and join once, then every epoch reads from the object store.
        train_ds, holdout_ds = train_ds.materialize(), holdout_ds.materialize()
    train_ds = train_ds.randomize_block_order(seed=tr.seed)

    cpus, _ = runtime.cluster_cpus_gpus()
    per_worker = runtime.plan_train_worker_cpus(cpus, tr.num_workers, tr.cpus_per_worker)
    name = run_name or f"{tr.name}-{'distilled' if distill else 'alone'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_config = _run_config(tr.storage_path, cfg.cache.storage_options, name)
    loop_config = {
        "student": tr.student, "num_classes": cfg.data.num_classes, "preprocess": pre,
        "epochs": tr.epochs, "batch_size": tr.batch_size, "lr": tr.lr, "weight_decay": tr.weight_decay,
        "temperature": tr.temperature, "alpha": tr.alpha if distill else 0.0, "seed": tr.seed,
        "weights": list(tr.teacher_weights) if distill else [], "shuffle_buffer": tr.shuffle_buffer,
        "checkpoint_every": tr.checkpoint_every,
        "threads": max(1, int(per_worker)),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                               resources_per_worker={"CPU": per_worker}),
        datasets={"train": train_ds, "holdout": holdout_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=run_config,
    )
    log.info("training %s (%s) on %d worker(s) x %.2f CPU", tr.student, name, tr.num_workers, per_worker)
    result = trainer.fit()
    history = _history(result)
    final = history[-1] if history else dict(result.metrics or {})
    return TrainReport(run=name, storage=storage.join(tr.storage_path, name), teachers=specs,
                       holdout_accuracy=float(final.get("holdout_accuracy", float("nan"))),
                       history=history, seconds=round(time.time() - started, 2))


def student_dataset(source: dict[str, Any], shards: list[datasets.InputShard], pre, units: list[dict[str, Any]],
                    data: dict[str, Any]):
    """The student's input stream: one read task per input shard, joined with the teachers' units."""
    import ray.data

    items = [{"shard_id": s.shard_id} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(datasets.read_joined_shard, batch_size=1, num_cpus=runtime.READ_TASK_CPUS,
                          fn_kwargs={"source": source, "shards": {s.shard_id: s for s in shards},
                                     "geometry": pre.geometry(), "units": units, "data": data})


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


def _run_config(storage_path: str, storage_options: dict[str, Any], name: str):
    import ray.train

    fs, path = storage.filesystem(storage_path, storage_options)
    quiet = ray.train.LoggingConfig(log_level="WARNING")
    if storage.is_local(fs):
        return ray.train.RunConfig(name=name, storage_path=path, logging_config=quiet)
    return ray.train.RunConfig(name=name, storage_path=path, logging_config=quiet,
                               storage_filesystem=storage.pyarrow_filesystem(fs))


def _history(result) -> list[dict[str, Any]]:
    """Per-epoch metrics of rank 0, as carried by the last report."""
    return list((result.metrics or {}).get("history", []))
