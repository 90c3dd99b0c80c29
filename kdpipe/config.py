"""Typed configuration: one YAML file per job, `--set a.b=value` overrides, validation on load.

Every section is a dataclass. Unknown keys are errors that name the key and list the known ones,
so a typo never silently falls back to a default. Paths left empty are derived from `workdir`,
which is what lets `kdpipe demo` run with no file at all.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from kdpipe.errors import ConfigError, StorageDenied
from kdpipe.storage import join
from kdpipe.teachers.precision import PRECISIONS, resolve_precision
from kdpipe.training.choices import ENSEMBLES, KINDS, WEIGHTINGS


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray inside the command
    num_cpus: float | None = None  # local Ray only; None lets Ray count the machine's cores
    dashboard: bool = False  # local Ray only: start Ray's dashboard too (ray[default]; ~2 s at start, ~10% of a core)
    # pools: an actor pool per teacher, chained; fused: every teacher in each actor of one pool;
    # auto: fused when no teacher asks for a GPU (1.4x faster on the demo, measured), else pools
    teacher_placement: str = "auto"


INPUT_FORMATS = ("parquet", "webdataset", "imagefolder")
PLACEMENTS = ("auto", "pools", "fused")  # ray.teacher_placement
PREPROCESS_KEYS = ("image_shape", "resize", "scale", "mean", "std")


@dataclass
class DataConfig:
    builtin: str | None = "digits"  # write the built-in dataset (in data.format) at train/holdout if missing
    # Inputs, on any fsspec URI. parquet: *.parquet files (key, image and label columns; the image
    # is encoded bytes or a list of uint8 pixels). webdataset: *.tar files (__key__, an image member
    # jpg/png/..., a `cls` member). imagefolder: <root>/<class>/<file>.png|jpg...
    format: str = "parquet"
    train: str = ""  # "" = <workdir>/data/train
    holdout: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    key_column: str = "sample_key"  # parquet only (webdataset: __key__; imagefolder: the file's path)
    image_column: str = "image"  # parquet only
    label_column: str | None = "label"  # parquet column; null = no labels (label-free data), any format
    pixel_shape: list[int] = field(default_factory=list)  # pixel-list Parquet: stored [C, H, W]; [] = image_shape
    on_bad_sample: str = "error"  # error | skip: skipped samples are listed in the manifest with the reason
    files_per_shard: int = 1000  # imagefolder: files per input shard (unit of work), within a class folder
    decode_cpus: float | None = None  # CPUs per read-and-decode task (one per input shard); None = 0.25
    # Preprocessing of the student (and of every teacher that does not override it): decode,
    # channels = image_shape[0], resize, centre crop to image_shape[1:], then (x*scale - mean)/std.
    image_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    resize: Any = None  # null | shorter side (int) | [H, W]
    scale: float = 1.0 / 16.0
    mean: list[float] = field(default_factory=list)  # per channel; [] = 0
    std: list[float] = field(default_factory=list)  # per channel; [] = 1
    num_classes: int = 10
    class_names: list[str] = field(default_factory=list)  # imagefolder: the class folders in label order
    num_shards: int = 8  # built-in data only: how many train shards to write
    holdout_fraction: float = 0.5  # built-in data only
    split_seed: int = 0  # built-in data only


@dataclass
class TeacherConfig:
    name: str = ""
    arch: str = ""
    checkpoint: str = ""  # fsspec URI of a state_dict saved by torch.save; "" = <cache.root>/checkpoints/<name>.pt
    batch_size: int = 256
    num_cpus: float | None = None  # per actor; None = sized from the cluster
    num_gpus: float = 0.0
    pool_size: int | None = None  # actors in this teacher's pool; None = sized from the cluster
    # auto: bf16 autocast (and channels-last) when the teacher runs on a GPU (num_gpus > 0), fp32
    # on a CPU | fp32 | bf16. Part of the teacher digest unless fp32: other precision, other labels.
    precision: str = "auto"
    labels: dict[str, Any] = field(default_factory=dict)  # overrides of the `labels` section for this teacher
    preprocess: dict[str, Any] = field(default_factory=dict)  # overrides of data.image_shape/resize/scale/mean/std
    # `kdpipe demo` trains the teacher when its checkpoint is missing:
    train_epochs: int = 20
    train_seed: int = 0


@dataclass
class LabelConfig:
    temperature: float = 5.0
    mode: str = "full"  # full: every logit; topk: the k largest, their ids and the log-partition
    k: int = 10  # topk mode only
    dtype: str = "float16"  # storage dtype of logits
    format: str = "parquet"  # parquet | webdataset
    row_group_size: int = 1024
    # Augmented views, labelled once and replayed by students with train.augment=replay: per
    # sample, `views` random resized crops (area fraction in crop_scale, aspect 3/4..4/3) with
    # horizontal flips, seeded by view_seed and the sample key. 0 = the plain view only. Shared by
    # every teacher of a generation (one decode feeds them all), so not overridable per teacher.
    views: int = 0
    view_seed: int = 0
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    flip: bool = True


VIEW_KEYS = ("views", "view_seed", "crop_scale", "flip")
AUGMENTS = ("none", "replay")


@dataclass
class CacheConfig:
    root: str = ""  # "" = <workdir>/cache
    storage_options: dict[str, Any] = field(default_factory=dict)
    inject_fault: str = ""  # test-only: a fault for generation to hit once (kdpipe.testing.faults)


@dataclass
class TrainConfig:
    student: str = "small_mlp"
    teachers: list[str] = field(default_factory=list)  # names in the cache ([] = all in config)
    teacher_weights: list[float] = field(default_factory=list)  # [] = equal weights
    teacher_temperatures: list[float] = field(default_factory=list)  # [] = all `temperature`
    ensemble: str = "auto"  # mean of distributions | sum of per-teacher terms; auto: mean (full), sum (top-k)
    loss: str = "kl"  # kl (T^2 KL) | soft_ce | mse (logits; full labels only)
    teacher_weighting: str = "fixed"  # fixed | confidence | correctness (per sample)
    use_labels: bool = True  # false: label-free distillation (alpha must be 1)
    alpha: float = 0.95  # weight of the distillation term; 0 trains on labels alone
    temperature: float = 5.0
    schedule: str = "constant"  # constant | linear | cosine: alpha -> alpha_end, temperature -> temperature_end
    alpha_end: float | None = None  # None = alpha (no change)
    temperature_end: float | None = None  # None = temperature
    epochs: int = 20
    batch_size: int = 16  # per worker: the global batch is batch_size * num_workers
    lr: float = 1e-2
    weight_decay: float = 0.0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None = sized from the cluster
    seed: int = 0
    shuffle_buffer: int = 512  # rows in each worker's local shuffle buffer (0: none; the rows are shuffled once already)
    checkpoint_every: int = 0  # epochs between checkpoints (and reports to Ray Train); 0: by time only; the last epoch always
    checkpoint_every_s: float = 60.0  # and whenever this long has passed since the last one (a report costs ~2 s)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept in storage_path; older ones are deleted
    preload: str = "auto"  # auto | always | never: decode+join once into Ray's object store
    storage_path: str = ""  # checkpoints and metrics; "" = <workdir>/runs
    name: str = "student"
    run: str = ""  # "" = a new run <name>-<distilled|alone>-<time>; a fixed name resumes that run if it exists
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint); -1 = no limit
    augment: str = "none"  # none | replay: each epoch, one of the cached augmented views per sample (labels.views)
    online: bool = False  # baseline only: run the teachers inside every training step instead of reading the cache
    export: list[str] = field(default_factory=list)  # after training: torchscript and/or onnx, checked on held-out
    export_int8: bool = False  # also a dynamically int8-quantised TorchScript model
    inject_fault: str = ""  # test-only: "worker_exit:epoch=E:rank=R" kills that worker once


@dataclass
class Config:
    workdir: str = "kdpipe-demo"
    # A teacher registry: the URI of a YAML file whose `teachers:` list (same keys as below) replaces
    # this config's `teachers`. Read on every load, so `kdpipe regenerate --every` sees changes.
    registry: str = ""
    # Architectures given as "package.module:function" import and run that module's code: they
    # are refused unless this is true (only for code you trust).
    allow_import: bool = False
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)


def default_teachers() -> list[TeacherConfig]:
    """The demo's three teachers: different families, so their errors differ."""
    return [
        TeacherConfig(name="mlp", arch="mlp", train_seed=1),
        TeacherConfig(name="cnn", arch="cnn", train_seed=1),
        TeacherConfig(name="wide_cnn", arch="wide_cnn", train_seed=1),
    ]


def teacher_precision(t: TeacherConfig) -> str:
    """The precision a teacher's actors run at: `precision`, with auto resolved by where they run."""
    return resolve_precision(t.precision, t.num_gpus > 0)


def validate(cfg: Config) -> None:
    """Check values that types cannot; raise ConfigError naming the key and the value.

    One step per section, in this order (a config with several faults reports the first)."""
    validate_labels(cfg.labels, cfg.data.num_classes)
    if cfg.ray.teacher_placement not in PLACEMENTS:
        raise _bad("ray.teacher_placement", cfg.ray.teacher_placement, f"use {', '.join(PLACEMENTS)}")
    validate_cache(cfg.cache)
    validate_train_loop(cfg.train)
    validate_data(cfg.data)
    validate_imports(cfg)
    validate_teachers(cfg)
    validate_train_objective(cfg.train)
    validate_train_run(cfg.train)
    validate_teacher_mix(cfg.train, [t.name for t in cfg.teachers])


def teacher_placement(cfg: Config, teachers: list[TeacherConfig]) -> str:
    """ray.teacher_placement with "auto" resolved for `teachers`: fused when none asks for a GPU
    (on the demo's three teachers, 2 cores: generate() in 5.2 s fused against 7.3 s in pools,
    medians of 3 alternating runs), else pools (each teacher keeps its own GPU share; no GPU
    measurement has chosen otherwise yet)."""
    if cfg.ray.teacher_placement != "auto":
        return cfg.ray.teacher_placement
    return "pools" if any(t.num_gpus for t in teachers) else "fused"


def _bad(key: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"config key {key}={value!r}: {hint}")


def validate_labels(lab: LabelConfig, num_classes: int, prefix: str = "labels") -> None:
    """The `labels` section, or a teacher's labels merged with it (prefix teachers[i].labels)."""
    if not isinstance(lab.temperature, (int, float)) or lab.temperature <= 0:
        raise _bad(f"{prefix}.temperature", lab.temperature, "must be > 0")
    if lab.mode not in ("full", "topk"):
        raise _bad(f"{prefix}.mode", lab.mode, "use full or topk")
    if lab.mode == "topk" and not (isinstance(lab.k, int) and 1 <= lab.k <= num_classes):
        raise _bad(f"{prefix}.k", lab.k, f"must be in [1, data.num_classes={num_classes}]")
    if lab.dtype not in ("float16", "float32"):
        raise _bad(f"{prefix}.dtype", lab.dtype, "use float16 or float32")
    if lab.format not in ("parquet", "webdataset"):
        raise _bad(f"{prefix}.format", lab.format, "use parquet or webdataset")
    if not isinstance(lab.views, int) or lab.views < 0:
        raise _bad(f"{prefix}.views", lab.views, "the number of augmented views per sample: 0 or more")
    scale = lab.crop_scale
    if not (isinstance(scale, list) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise _bad(f"{prefix}.crop_scale", scale, "give [min, max] area fractions with 0 < min <= max <= 1")


def validate_cache(cache: CacheConfig) -> None:
    """The `cache` section: only the test-only fault has a grammar to check."""
    if cache.inject_fault:
        from kdpipe.testing import faults

        try:
            faults.parse(cache.inject_fault)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def validate_train_loop(tr: TrainConfig) -> None:
    """The `train` numbers the loop runs on: loss weight and temperature, checkpoints, workers."""
    if not 0.0 <= tr.alpha <= 1.0:
        raise _bad("train.alpha", tr.alpha, "must be in [0, 1]")
    if tr.temperature <= 0:
        raise _bad("train.temperature", tr.temperature, "must be > 0")
    if tr.preload not in ("auto", "always", "never"):
        raise _bad("train.preload", tr.preload, "use auto, always or never")
    if tr.checkpoint_every < 0:
        raise _bad("train.checkpoint_every", tr.checkpoint_every, "epochs between checkpoints: 0 (by time only) or more")
    if not tr.checkpoint_every_s > 0:  # also refuses NaN
        raise _bad("train.checkpoint_every_s", tr.checkpoint_every_s, "seconds between checkpoints: must be > 0")
    if tr.keep_checkpoints < 1:
        raise _bad("train.keep_checkpoints", tr.keep_checkpoints, "must be >= 1 (the last one resumes the run)")
    if tr.num_workers < 1:
        raise _bad("train.num_workers", tr.num_workers, "must be >= 1")
    if tr.shuffle_buffer < 0:
        raise _bad("train.shuffle_buffer", tr.shuffle_buffer, "rows in each worker's local shuffle buffer: 0 (none) or more")


def validate_data(data: DataConfig) -> None:
    """The `data` section: the built-in dataset, the input format and policy, preprocessing."""
    if data.num_classes < 2:
        raise _bad("data.num_classes", data.num_classes, "must be >= 2")
    if data.builtin not in (None, "digits"):
        raise _bad("data.builtin", data.builtin, "built-in datasets: digits (or null)")
    if not 0.0 < data.holdout_fraction < 1.0:
        raise _bad("data.holdout_fraction", data.holdout_fraction, "must be in (0, 1)")
    if data.format not in INPUT_FORMATS:
        raise _bad("data.format", data.format, f"use one of {', '.join(INPUT_FORMATS)}")
    if data.on_bad_sample not in ("error", "skip"):
        raise _bad("data.on_bad_sample", data.on_bad_sample, "use error or skip")
    if data.decode_cpus is not None and data.decode_cpus <= 0:
        raise _bad("data.decode_cpus", data.decode_cpus, "CPUs per decode task must be > 0 (or null)")
    if data.files_per_shard < 1:
        raise _bad("data.files_per_shard", data.files_per_shard, "must be >= 1")
    if data.pixel_shape and (len(data.pixel_shape) != 3 or min(data.pixel_shape) < 1):
        raise _bad("data.pixel_shape", data.pixel_shape, "give [channels, height, width] or []")
    if data.class_names and len(data.class_names) != data.num_classes:
        raise _bad("data.class_names", data.class_names, f"give data.num_classes={data.num_classes} names")
    validate_preprocess(vars(data), "data")


def validate_preprocess(p: dict[str, Any], prefix: str) -> None:
    """Preprocessing settings (PREPROCESS_KEYS): the data section's, or a teacher's merged with them."""
    shape = p["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v >= 1 for v in shape)):
        raise _bad(f"{prefix}.image_shape", shape, "give [channels, height, width]")
    if shape[0] not in (1, 3):
        raise _bad(f"{prefix}.image_shape", shape, "channels must be 1 (grey) or 3 (RGB)")
    resize = p["resize"]
    ok = resize is None or (isinstance(resize, int) and resize >= 1) or (
        isinstance(resize, list) and len(resize) == 2 and all(isinstance(v, int) and v >= 1 for v in resize))
    if not ok:
        raise _bad(f"{prefix}.resize", resize, "use null, the shorter side (an int) or [height, width]")
    if not isinstance(p["scale"], (int, float)) or p["scale"] <= 0:
        raise _bad(f"{prefix}.scale", p["scale"], "must be > 0")
    for key in ("mean", "std"):
        if p[key] and len(p[key]) != shape[0]:
            raise _bad(f"{prefix}.{key}", p[key], f"give one value per channel ({shape[0]}) or []")
    if any(v <= 0 for v in p["std"]):
        raise _bad(f"{prefix}.std", p["std"], "must be > 0")


def validate_imports(cfg: Config) -> None:
    """`allow_import`: a module:function architecture (a teacher's or the student's) needs it."""
    if cfg.allow_import:
        return
    archs = [(f"teachers[{i}].arch", t.arch) for i, t in enumerate(cfg.teachers)] + [("train.student", cfg.train.student)]
    for key, arch in archs:
        if ":" in (arch or ""):
            raise _bad(key, arch, "a module:function architecture imports and runs that module's code: "
                                  "set `allow_import: true` at the top of the config to allow it")


def validate_teachers(cfg: Config) -> None:
    """The `teachers` list: each teacher (with its label and preprocessing overrides), unique names."""
    for i, t in enumerate(cfg.teachers):
        _validate_teacher(cfg, i, t)
    names = [t.name for t in cfg.teachers]
    if len(set(names)) != len(names):
        raise _bad("teachers", names, "teacher names must be unique")


def _validate_teacher(cfg: Config, i: int, t: TeacherConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t.name or ""):
        raise _bad(f"teachers[{i}].name", t.name, "use letters, digits, '_', '-', '.'")
    if not t.arch:
        raise _bad(f"teachers[{i}].arch", t.arch, f"teacher {t.name!r} needs an architecture")
    if t.batch_size < 1:
        raise _bad(f"teachers[{i}].batch_size", t.batch_size, "must be >= 1")
    if t.precision not in PRECISIONS:
        raise _bad(f"teachers[{i}].precision", t.precision, "use auto (bf16 on a GPU, fp32 on a CPU), fp32 or bf16")
    label_keys = [f.name for f in dataclasses.fields(LabelConfig)]
    unknown = sorted(set(t.labels) - set(label_keys))
    if unknown:
        raise ConfigError(f"unknown config key 'teachers[{i}].labels.{unknown[0]}': known keys here are "
                          f"{', '.join(label_keys)}")
    shared = sorted(set(t.labels) & set(VIEW_KEYS))
    if shared:
        raise _bad(f"teachers[{i}].labels.{shared[0]}", t.labels[shared[0]],
                   "augmented views are shared by every teacher (one decode feeds them all): set it under `labels`")
    validate_labels(labels_for(cfg, t.name), cfg.data.num_classes, f"teachers[{i}].labels")
    unknown = sorted(set(t.preprocess) - set(PREPROCESS_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key 'teachers[{i}].preprocess.{unknown[0]}': known keys here are "
                          f"{', '.join(PREPROCESS_KEYS)}")
    data = {k: v for k, v in vars(cfg.data).items() if k in PREPROCESS_KEYS}
    validate_preprocess(data | t.preprocess, f"teachers[{i}].preprocess")


def validate_train_objective(tr: TrainConfig) -> None:
    """What the student minimises: augmentation, ensemble, loss, weighting, schedule, labels."""
    if tr.augment not in AUGMENTS:
        raise _bad("train.augment", tr.augment, "use none or replay (replays the views cached with labels.views)")
    if tr.augment == "replay" and tr.online:
        raise _bad("train.augment", tr.augment, "replay reads cached views; the online baseline has none")
    if tr.ensemble not in ("auto", *ENSEMBLES):
        raise _bad("train.ensemble", tr.ensemble, "use auto, mean or sum")
    if tr.loss not in KINDS:
        raise _bad("train.loss", tr.loss, f"use one of {', '.join(KINDS)}")
    if tr.teacher_weighting not in WEIGHTINGS:
        raise _bad("train.teacher_weighting", tr.teacher_weighting, f"use one of {', '.join(WEIGHTINGS)}")
    if tr.schedule not in ("constant", "linear", "cosine"):
        raise _bad("train.schedule", tr.schedule, "use constant, linear or cosine")
    if tr.alpha_end is not None and not 0.0 <= tr.alpha_end <= 1.0:
        raise _bad("train.alpha_end", tr.alpha_end, "must be in [0, 1]")
    if tr.temperature_end is not None and tr.temperature_end <= 0:
        raise _bad("train.temperature_end", tr.temperature_end, "must be > 0")
    if not tr.use_labels and (tr.alpha != 1.0 or (tr.alpha_end is not None and tr.alpha_end != 1.0)):
        raise _bad("train.alpha", tr.alpha, "label-free training (use_labels: false) needs alpha = 1")
    if tr.teacher_weighting == "correctness" and not tr.use_labels:
        raise _bad("train.teacher_weighting", tr.teacher_weighting, "correctness needs labels (use_labels: true)")


def validate_train_run(tr: TrainConfig) -> None:
    """The run around the loop: its name, the exported models, the failures it survives."""
    if tr.run and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tr.run):
        raise _bad("train.run", tr.run, "use letters, digits, '_', '-', '.'")
    if set(tr.export) - {"torchscript", "onnx"}:
        raise _bad("train.export", tr.export, "use [], [torchscript], [onnx] or [torchscript, onnx]")
    if tr.max_failures < -1:
        raise _bad("train.max_failures", tr.max_failures, "use -1 (no limit), 0 or more")


def validate_teacher_mix(tr: TrainConfig, teacher_names: list[str]) -> None:
    """Per-teacher temperatures and weights: one per distilled teacher (train.teachers, or all)."""
    n = len(tr.teachers or teacher_names)
    if tr.teacher_temperatures and (len(tr.teacher_temperatures) != n or min(tr.teacher_temperatures) <= 0):
        raise _bad("train.teacher_temperatures", tr.teacher_temperatures,
                   f"give one temperature > 0 per teacher ({n}) or []")
    if tr.teacher_weights and len(tr.teacher_weights) != n:
        raise _bad("train.teacher_weights", tr.teacher_weights, f"give one weight per teacher ({n})")
    if any(w < 0 for w in tr.teacher_weights) or (tr.teacher_weights and sum(tr.teacher_weights) <= 0):
        raise _bad("train.teacher_weights", tr.teacher_weights, "weights must be >= 0 with a positive sum")


def preprocess_for(cfg: Config, teacher: str | None = None):
    """The images.Preprocess of `teacher` (data-level settings with its overrides) or, for
    teacher=None, of the student."""
    from kdpipe.data.images import make_preprocess

    p = {k: getattr(cfg.data, k) for k in PREPROCESS_KEYS}
    for t in cfg.teachers:
        if teacher is not None and t.name == teacher:
            p.update(t.preprocess)
    return make_preprocess(p["image_shape"], p["resize"], p["scale"], p["mean"], p["std"])


def labels_for(cfg: Config, teacher: str) -> LabelConfig:
    """The label settings of one teacher: the `labels` section with the teacher's overrides."""
    for t in cfg.teachers:
        if t.name == teacher and t.labels:
            merged = {**dataclasses.asdict(cfg.labels), **t.labels}
            if "temperature" in t.labels and isinstance(merged["temperature"], int):
                merged["temperature"] = float(merged["temperature"])
            return LabelConfig(**merged)
    return cfg.labels


def _build(cls: type, raw: Any, path: str) -> Any:
    """Turn plain YAML data into the dataclass `cls`, rejecting unknown keys by their dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {path or '<root>'} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(
                f"unknown config key {dotted!r}: known keys here are {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {path} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {path} must be a mapping, got {value!r}")
        return dict(value)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, path)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {path} must be {tp.__name__}, got {value!r}")
    if tp is float and not isinstance(value, float):
        raise ConfigError(f"config key {path} must be a number, got {value!r}")
    return value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=value` (value parsed as YAML; `teachers.0.arch=cnn` indexes lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    value = yaml.safe_load(text) if text.strip() else ""
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        key: Any = int(part) if isinstance(node, list) else part
        if isinstance(node, list):
            if not 0 <= key < len(node):
                raise ConfigError(f"override {dotted!r}: index {key} out of range ({len(node)} items)")
        elif key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration flag (`regenerate --every`, `cache gc --older-than`): a number of
    seconds ('90'), or numbers with units s, m, h, d, w, alone or combined ('15m', '1h30m', '2w')."""
    body = str(text).strip().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", body):
        return float(body)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ConfigError(f"duration {text!r}: use seconds or a number with s, m, h, d or w "
                          "(e.g. 90, 30m, 6h, 7d, 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml_mapping(path: str, what: str = "config file", error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A local YAML file holding a mapping; `error` names the file when it is missing or not one."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise error(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path!r} is a directory: give the YAML file") from None
    except PermissionError as e:
        raise StorageDenied(f"{what} {path!r} cannot be read ({e.strerror}): check its permissions") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path!r} must hold a mapping at the top level")
    return raw


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the built-in default when `path` is None) and apply overrides."""
    if path is None:
        raw: dict[str, Any] = to_dict(Config(teachers=default_teachers()))
    else:
        raw = read_yaml_mapping(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    if raw.get("registry"):
        raw["teachers"] = _registry_teachers(raw)
    return _build(Config, raw, "")


def _registry_teachers(raw: dict[str, Any]) -> list[Any]:
    """The `teachers` list of the registry file named by raw["registry"] (read with the cache's
    storage options, so a registry can live next to the cache on object storage)."""
    from kdpipe import storage

    uri = raw["registry"]
    if raw.get("teachers"):
        raise ConfigError(f"config has both `registry: {uri}` and a `teachers` list: keep one of them")
    options = ((raw.get("cache") or {}).get("storage_options")) or {}
    try:
        fs, path = storage.filesystem(uri, options)
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise ConfigError(f"teacher registry {uri!r} does not exist: check `registry`") from None
    except PermissionError as e:
        raise storage.access_denied(uri, e, key="registry", options="cache.storage_options") from None
    try:
        body = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"teacher registry {uri!r} is not valid YAML: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("teachers"), list) or set(body) - {"teachers"}:
        raise ConfigError(f"teacher registry {uri!r} must hold a mapping with one key, `teachers`: a list of "
                          "teachers (name, arch, checkpoint, preprocess, labels, resources)")
    return body["teachers"]


def resolve_paths(cfg: Config) -> Config:
    """Fill the empty paths from `workdir` (made absolute when local) and return a new Config."""
    workdir = cfg.workdir
    if "://" not in workdir:
        workdir = os.path.abspath(os.path.expanduser(workdir))
    new = copy.deepcopy(cfg)
    new.workdir = workdir
    new.data.train = cfg.data.train or join(workdir, "data", "train")
    new.data.holdout = cfg.data.holdout or join(workdir, "data", "holdout")
    new.cache.root = cfg.cache.root or join(workdir, "cache")
    new.train.storage_path = cfg.train.storage_path or join(workdir, "runs")
    for t in new.teachers:
        t.checkpoint = t.checkpoint or join(new.cache.root, "checkpoints", f"{t.name}.pt")
    return new


def dump_config(cfg: Config) -> str:
    """YAML that load_config reads back to `cfg` (teachers stay in the registry when one is set)."""
    d = to_dict(cfg)
    if cfg.registry:
        d["teachers"] = []
    return yaml.safe_dump(d, sort_keys=False)
