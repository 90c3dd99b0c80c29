"""Student training with Ray Train: DDP workers stream inputs joined with cached soft labels.

The driver side: find the chosen teachers' committed units, plan the distillation, build the
student's datasets and run the TorchTrainer. No teacher is built here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdpipe import runtime, storage
from kdpipe.config import Config, preprocess_for
from kdpipe.data import inputs
from kdpipe.labels import cache
from kdpipe.training import losses
from kdpipe.training.join import student_dataset
from kdpipe.training.loop import _train_loop

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
    source = inputs.source_spec(cfg.data, check_holdout=labelled)
    shards = inputs.list_shards(cfg.data.train, source)
    online = distill and tr.online
    if online and any("@" in spec for spec in specs):
        raise ValueError("train.online runs the configured checkpoints: pinned teachers (name@digest) are cache-only")
    units = _teacher_units(cfg, inputs.fingerprint(shards, source), specs) if distill and not online else []
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
    holdout_shards = inputs.list_shards(cfg.data.holdout, source) if labelled else []
    geometries = {t["preprocess"].pixels_column(): t["preprocess"].geometry() for t in online_teachers}
    train_ds = student_dataset(source, shards, pre, units, data, geometries, cfg.data.decode_cpus)
    datasets_ = {"train": train_ds}
    label_floats = (1 if data.get("ensemble") else len(units)) * cfg.data.num_classes
    row_bytes = (int(np.prod(pre.image_shape)) + sum(int(np.prod(g["size"])) * g["channels"] for g in geometries.values())
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
        from kdpipe.training import plots

        plots.write_curves(history, storage.join(run_uri, "curves.png"), cfg.cache.storage_options,
                           f"{tr.student} {'distilled from ' + ', '.join(specs) if distill else 'alone'}")
    if tr.export:
        from kdpipe.training import export

        x, y = export.holdout_pixels(cfg) if labelled else (None, None)
        report.export = export.export_student(run_uri, cfg.cache.storage_options, x, y, tuple(tr.export),
                                              tr.export_int8, cfg.allow_import)
    return report


def _rows_estimate(shard: inputs.InputShard, units: list[dict[str, Any]]) -> int:
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
