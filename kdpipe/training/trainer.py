"""Student training with Ray Train: DDP workers stream inputs joined with cached soft labels.

The driver side, as a recipe (`train_student`): choose the teachers and find their committed
units, plan the distillation (`plan_distillation`), build the student's datasets
(`build_datasets`), make the workers' settings (`loop_settings`), fit, and finish the run
(history, curves, export). No teacher is built here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kdpipe import runtime, storage
from kdpipe.config import Config, preprocess_for
from kdpipe.data import inputs
from kdpipe.errors import CacheError, ConfigError
from kdpipe.generation.planning import label_settings_for
from kdpipe.labels import cache
from kdpipe.training import losses, view
from kdpipe.training.join import JoinPlan, MeanTarget, TeacherUnits, student_dataset
from kdpipe.training.loop import LoopSettings, OnlineTeacher, _train_loop
from kdpipe.training.losses import LossOptions
from kdpipe.training.progress import EpochLines

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


@dataclass(frozen=True)
class DistillPlan:
    """Whom the student learns from and how: the teachers' cached units (or, for the online
    baseline, the teachers to run), what the read step forms from the units, and the loss."""

    teachers: tuple[str, ...]  # the chosen specs; () = no distillation (labels alone)
    units: tuple[TeacherUnits, ...]  # cached labels, one per teacher; () for the online baseline
    online: tuple[OnlineTeacher, ...]  # train.online: the teachers every step runs
    join: JoinPlan
    loss: LossOptions
    weights: tuple[float, ...]  # train.teacher_weights; () = equal

    @property
    def distill(self) -> bool:
        return bool(self.teachers)


def train_student(cfg: Config, distill: bool = True, run_name: str | None = None,
                  paired_plain: bool = False, progress: bool = True) -> TrainReport:
    """Train cfg.train.student with Ray Train. distill=False trains on labels alone (the baseline).

    paired_plain (benchmarks only, `kdpipe bench student`): the same workers also stream the
    inputs without labels joined and, every epoch, make a pass of plain supervised steps over them
    next to the distilled pass (the order turning each epoch); each epoch's metrics then carry
    plain_samples_per_s. Both sides are timed seconds apart in one process group, so a slow spell
    of the machine falls on both.

    progress: one line per epoch on stderr (training.progress).

    `cfg` must have its paths resolved. Ray is started (or joined, per cfg.ray) after the
    cached labels are found."""
    started = time.time()
    run = prepare_run(cfg, distill, run_name, paired_plain)
    lines = (EpochLines(run.uri, cfg.cache.storage_options, cfg.train.epochs,
                        "distilled" if run.plan.distill else "alone") if progress else contextlib.nullcontext())
    with lines:
        result = fit(cfg, run.settings, run.datasets, run.name, run.per_worker)
    return finish_run(cfg, run.plan, result, run.name, run.uri, started)


@dataclass
class PreparedRun:
    """Everything a fit needs, before Ray Train starts: what `train_student` hands to `fit`. The
    datasets are Ray Data's (inputs joined with the chosen teachers' cached targets), so a test
    or a user's own loop can take its batches without Ray Train."""

    plan: DistillPlan
    datasets: dict[str, Any]  # "train", and "holdout" when the data has labels ("plain": paired_plain)
    settings: LoopSettings
    name: str
    uri: str
    per_worker: float  # CPUs per training worker


def prepare_run(cfg: Config, distill: bool = True, run_name: str | None = None,
                paired_plain: bool = False) -> PreparedRun:
    """The steps of `train_student` before the fit: the teachers and their cached units, the
    plan, Ray (started or joined), the datasets, the run's name and the loop's settings."""
    tr = cfg.train
    specs = choose_teachers(cfg, distill)
    labelled = cfg.data.label_column is not None
    source = inputs.source_spec(cfg.data, check_holdout=labelled)
    shards = inputs.list_shards(cfg.data.train, source)
    units = find_units(cfg, inputs.fingerprint(shards, source), specs) if distill and not tr.online else []
    plan = plan_distillation(cfg, specs, units)
    if paired_plain and (not plan.distill or plan.online):
        raise ConfigError("paired_plain pairs cached-label training with plain training: distill from the cache")
    for uri in (cfg.data.train, cfg.data.holdout, cfg.cache.root, tr.storage_path):
        storage.check_shared(uri)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)
    holdout_shards = inputs.list_shards(cfg.data.holdout, source) if labelled else []
    datasets = build_datasets(cfg, plan, source, shards, holdout_shards, paired_plain)
    name = run_name or default_run_name(cfg, plan)
    run_uri = storage.join(tr.storage_path, name)
    cpus, _ = runtime.cluster_cpus_gpus()
    per_worker = runtime.plan_train_worker_cpus(cpus, tr.num_workers, tr.cpus_per_worker)
    settings = loop_settings(cfg, plan, run_uri, evaluate="holdout" in datasets, paired_plain=paired_plain,
                             threads=max(1, int(per_worker)))
    return PreparedRun(plan, datasets, settings, name, run_uri, per_worker)


def choose_teachers(cfg: Config, distill: bool) -> list[str]:
    """The teacher specs to distil from ([] for the baseline), after the checks that need
    nothing but the config."""
    tr = cfg.train
    specs = (tr.teachers or [t.name for t in cfg.teachers]) if distill else []
    if distill and not specs:
        raise ConfigError("no teachers to distil from: set train.teachers or list teachers in the config")
    if distill and tr.alpha == 0:
        raise ConfigError("train.alpha=0 ignores the teachers: use alpha > 0 to distil")
    if cfg.data.label_column is None and (tr.use_labels or not distill):
        raise ConfigError("data.label_column is null (no labels): distil label-free with train.use_labels=false "
                          "and train.alpha=1; the baseline and held-out evaluation need labels")
    if distill and tr.online and any("@" in spec for spec in specs):
        raise ConfigError("train.online runs the configured checkpoints: pinned teachers (name@digest) are cache-only")
    return specs


def find_units(cfg: Config, fingerprint: str, specs: list[str]) -> list[TeacherUnits]:
    """Resolve each teacher spec to its committed manifest and unit records (driver side)."""
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    units = []
    for spec in specs:
        settings = label_settings_for(cfg, spec.partition("@")[0])
        directory, manifest = cache.resolve_manifest(fs, root, spec, fingerprint, cache.settings_hash(settings))
        lab = manifest["labels"]
        if lab["num_classes"] != cfg.data.num_classes:
            raise CacheError(f"teacher {spec!r} labels have {lab['num_classes']} classes, "
                             f"the dataset has {cfg.data.num_classes}: set data.num_classes")
        units.append(TeacherUnits(
            teacher=spec, directory=fs.unstrip_protocol(directory), storage_options=cfg.cache.storage_options,
            mode=lab["mode"], format=lab["format"], k=lab.get("k"), temperature=lab["temperature"],
            augment=lab.get("augment"), records={u["shard_id"]: u for u in manifest["units"]}))
    return units


def plan_distillation(cfg: Config, specs: list[str], units: list[TeacherUnits]) -> DistillPlan:
    """The distillation of cfg.train from teachers `specs` ([]: none), with their cached `units`
    ([] for the online baseline): top-k k, ensemble, temperatures, replayed views, and whether
    the read step forms the teachers' mean distribution once. Refuses what cannot work."""
    tr = cfg.train
    distill = bool(specs)
    online = ()
    if distill and tr.online:
        online = tuple(OnlineTeacher(t.name, t.arch, t.checkpoint, preprocess_for(cfg, t.name))
                       for t in cfg.teachers if t.name in specs)
        if len(online) != len(specs):
            raise ConfigError(f"train.online: teachers {specs} must all be configured under `teachers`")
    topk_k = common_k(units)
    ensemble = tr.ensemble if tr.ensemble != "auto" else ("sum" if topk_k else "mean")
    if topk_k and ensemble == "mean":
        raise ConfigError("train.ensemble=mean needs full labels: top-k teachers have different supports; use sum")
    if topk_k and tr.temperature_end is not None and tr.temperature_end != tr.temperature:
        raise ConfigError("a temperature schedule needs full labels (labels.mode: full): top-k targets are "
                          "fixed at one temperature per teacher when they are read")
    temperatures = tuple(tr.teacher_temperatures) or (tr.temperature,) * (len(units) or len(online))
    replay = replay_views(units) if distill and tr.augment == "replay" else 0
    mean = None
    if units and not topk_k and losses.needs_only_the_mean_target(ensemble, tr.loss, tr.teacher_weighting) \
            and tr.temperature_end in (None, tr.temperature):
        # The loss needs only the teachers' mean distribution, the same every epoch: the read step
        # forms it once (teacher_probs [C] per row instead of K teachers' logits).
        mean = MeanTarget(tuple(tr.teacher_weights) or (1.0,) * len(units), temperatures)
    return DistillPlan(
        teachers=tuple(specs), units=tuple(units), online=online,
        join=JoinPlan(cfg.data.num_classes, temperatures, topk_k, replay, mean),
        loss=LossOptions(temperatures if tr.teacher_temperatures else None, ensemble, tr.loss, tr.teacher_weighting),
        weights=tuple(tr.teacher_weights) if distill else ())


def common_k(units: list[TeacherUnits] | tuple[TeacherUnits, ...]) -> int | None:
    """None when every teacher stored full logits, else the one k all top-k teachers share."""
    ks = {u.k for u in units if u.mode == "topk"}
    if len(ks) > 1:
        raise CacheError(f"teachers {[u.teacher for u in units]} have top-k labels with different k {sorted(ks)}: "
                         "generate them with the same labels.k")
    return ks.pop() if ks else None


def replay_views(units: list[TeacherUnits] | tuple[TeacherUnits, ...]) -> int:
    """train.augment=replay: the number of augmented views every chosen teacher labelled (the same)."""
    if not units:
        raise ConfigError("train.augment=replay replays the teachers' cached views: it needs distillation "
                          "from cached labels (not --no-distill, not train.online)")
    found = {u.teacher: u.augment for u in units}
    missing = [t for t, a in found.items() if not a]
    if missing:
        raise CacheError(f"train.augment=replay: teacher(s) {missing} have no augmented views in the cache; "
                         "generate with labels.views > 0 (e.g. --set labels.views=4)")
    if len({json.dumps(a, sort_keys=True) for a in found.values()}) > 1:
        raise CacheError(f"train.augment=replay: the teachers' views differ {found}: generate them together "
                         "with one labels.views / view_seed / crop_scale / flip")
    return int(next(iter(found.values()))["views"])


def build_datasets(cfg: Config, plan: DistillPlan, source: inputs.SourceSpec, shards: list[inputs.InputShard],
                   holdout_shards: list[inputs.InputShard], paired_plain: bool = False) -> dict[str, Any]:
    """The student's Ray Datasets: "train" (inputs joined with the units, or carrying the online
    teachers' pixels), "plain" (paired_plain: inputs alone) and "holdout" (when listed).

    The training rows are shuffled across the whole dataset once, so that batches have the class
    mix of random sampling however the inputs are laid out (an ImageFolder shard is one class):
    small data in the object store (preload), larger data as a training view on the cache's
    storage that later runs reuse (training.view). Every epoch then reads them in a new order.
    The online baseline streams shard by shard, as it must carry the teachers' own pixels."""
    pre = preprocess_for(cfg)
    decode = cfg.data.decode_cpus
    geometries = {t.preprocess.pixels_column(): t.preprocess.geometry() for t in plan.online}
    alone = replace(plan.join, replay=0)  # no units joined: the inputs and their labels
    preload = _preload(cfg.train.preload, _estimate_bytes(plan, pre, geometries, shards, holdout_shards, paired_plain))
    if plan.online:
        datasets = {"train": student_dataset(source, shards, pre, plan.units, plan.join, geometries, decode)}
        if preload:
            datasets["train"] = datasets["train"].materialize()
        datasets["train"] = datasets["train"].randomize_block_order(seed=cfg.train.seed)
    else:
        datasets = {"train": shuffled_rows(cfg, source, shards, plan.units, plan.join, preload)}
    if paired_plain:
        datasets["plain"] = shuffled_rows(cfg, source, shards, (), alone, preload)
    if holdout_shards:
        holdout = student_dataset(source, holdout_shards, pre, [], alone, decode_cpus=decode)
        datasets["holdout"] = holdout.materialize() if preload else holdout
    return datasets


def shuffled_rows(cfg: Config, source: inputs.SourceSpec, shards: list[inputs.InputShard],
                  units: tuple[TeacherUnits, ...], join: JoinPlan, preload: bool):
    """The training rows (inputs joined with `units` per `join`) shuffled across the whole
    dataset once, as a Ray Dataset that every execution (epoch) reads in a new, seeded order:
    in the object store when `preload`, else from the training view on the cache's storage."""
    pre = preprocess_for(cfg)
    seed = cfg.train.seed
    blocks = view.block_count(sum(_rows_estimate(s, units) for s in shards), _row_bytes(pre, {}, units, join),
                              len(shards), cfg.train.num_workers)
    if preload:
        rows = student_dataset(source, shards, pre, units, join, decode_cpus=cfg.data.decode_cpus)
        rows = view.coalesce(rows.random_shuffle(seed=seed, num_cpus=runtime.READ_TASK_CPUS), len(shards), blocks)
        return rows.materialize().randomize_block_order(seed=seed)
    found = view.ensure_view(cfg.cache.root, cfg.cache.storage_options, inputs.fingerprint(shards, source), source,
                             shards, pre.geometry(), tuple(units), join, cfg.data.decode_cpus, files=blocks)
    return view.view_dataset(found, seed)


def _estimate_bytes(plan: DistillPlan, pre, geometries: dict[str, dict[str, Any]], shards: list[inputs.InputShard],
                    holdout_shards: list[inputs.InputShard], paired_plain: bool) -> int:
    """The datasets' size once decoded and joined, before reading them (for the preload choice)."""
    row_bytes = _row_bytes(pre, geometries, plan.units, plan.join)
    rows = sum(_rows_estimate(s, plan.units) for s in shards) + sum(_rows_estimate(s, ()) for s in holdout_shards)
    if paired_plain:
        rows += sum(_rows_estimate(s, ()) for s in shards)  # (counted at the larger row size: an upper bound)
    return rows * row_bytes


def _row_bytes(pre, geometries: dict[str, dict[str, Any]], units: tuple[TeacherUnits, ...] | list[TeacherUnits],
               join: JoinPlan) -> int:
    """One training row's bytes once decoded and joined: the student's pixels, the online
    teachers' pixels (`geometries`), the targets of `units` as `join` forms them, per replayed view."""
    label_floats = (1 if join.ensemble else len(units)) * join.num_classes if units else 0
    return (int(np.prod(pre.image_shape)) + sum(int(np.prod(g["size"])) * g["channels"] for g in geometries.values())
            + 4 * label_floats) * max(1, join.replay) + 16


def default_run_name(cfg: Config, plan: DistillPlan) -> str:
    """train.run (with "-alone" for the baseline), else <train.name>-<kind>-<time>."""
    tr = cfg.train
    if tr.run:
        return f"{tr.run}{'' if plan.distill else '-alone'}"
    kind = ("online" if plan.online else "distilled") if plan.distill else "alone"
    return f"{tr.name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def loop_settings(cfg: Config, plan: DistillPlan, run_uri: str, evaluate: bool, paired_plain: bool,
                  threads: int) -> LoopSettings:
    """What every training worker gets (train_loop_config's "settings")."""
    tr = cfg.train
    return LoopSettings(
        student=tr.student, num_classes=cfg.data.num_classes, preprocess=preprocess_for(cfg), run_uri=run_uri,
        storage_options=cfg.cache.storage_options, epochs=tr.epochs, batch_size=tr.batch_size, lr=tr.lr,
        weight_decay=tr.weight_decay, alpha=tr.alpha if plan.distill else 0.0,
        alpha_end=tr.alpha_end if plan.distill else None, temperature=tr.temperature,
        temperature_end=tr.temperature_end, schedule=tr.schedule, seed=tr.seed,
        use_labels=tr.use_labels and cfg.data.label_column is not None, weights=plan.weights, loss=plan.loss,
        shuffle_buffer=tr.shuffle_buffer, checkpoint_every=tr.checkpoint_every,
        checkpoint_every_s=tr.checkpoint_every_s, evaluate=evaluate,
        inject_fault=tr.inject_fault, online_teachers=plan.online, paired_plain=paired_plain, threads=threads,
        allow_import=cfg.allow_import)


def fit(cfg: Config, settings: LoopSettings, datasets: dict[str, Any], name: str, per_worker: float):
    """Run the TorchTrainer: train.num_workers DDP workers of `per_worker` CPUs each; returns
    Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tr = cfg.train
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"settings": settings},
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                               resources_per_worker={"CPU": per_worker}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in ("train", "plain", "holdout") if k in datasets]),
        run_config=_run_config(tr.storage_path, cfg.cache.storage_options, name, tr.max_failures, tr.keep_checkpoints),
    )
    log.info("training %s (%s) on %d worker(s) x %.2f CPU", tr.student, name, tr.num_workers, per_worker)
    return trainer.fit()


def finish_run(cfg: Config, plan: DistillPlan, result, name: str, run_uri: str, started: float) -> TrainReport:
    """The report of a fitted run: rank 0's history, the curves' PNG and, per train.export, the
    exported student."""
    tr = cfg.train
    history = _history(result)
    final = history[-1] if history else dict(result.metrics or {})
    report = TrainReport(run=name, storage=run_uri, teachers=list(plan.teachers),
                         holdout_accuracy=float(final.get("holdout_accuracy", float("nan"))),
                         history=history, seconds=round(time.time() - started, 2), started_at=started)
    if history:
        from kdpipe.training import plots

        plots.write_curves(history, storage.join(run_uri, "curves.png"), cfg.cache.storage_options,
                           f"{tr.student} {'distilled from ' + ', '.join(plan.teachers) if plan.distill else 'alone'}")
    if tr.export:
        from kdpipe.training import export

        x, y = export.holdout_pixels(cfg) if cfg.data.label_column is not None else (None, None)
        report.export = export.export_student(run_uri, cfg.cache.storage_options, x, y, tuple(tr.export),
                                              tr.export_int8, cfg.allow_import)
    return report


def _rows_estimate(shard: inputs.InputShard, units: list[TeacherUnits] | tuple[TeacherUnits, ...]) -> int:
    """Rows of a shard before reading it: known for Parquet and folders; for tars, from a unit
    record when labels exist, else a guess from the file size (10 KiB per sample)."""
    if shard.num_rows is not None:
        return shard.num_rows
    for unit in units:
        if shard.shard_id in unit.records:
            return int(unit.records[shard.shard_id]["rows"])
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
