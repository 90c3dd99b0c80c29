"""Generation: one Ray Data pass over the input shards feeds every teacher; units commit as shards finish.

    read+decode (tasks, one per input shard) -> teacher A pool -> teacher B pool -> ... -> driver

Each input shard is read and decoded once; every teacher runs in its own actor pool with its own
resources, chained so all pools work at the same time on different batches. Only the label rows
(keys + logits, small) come back to the driver, which groups them by input shard and commits a
unit the moment all of a shard's rows are in: an interrupted run keeps every finished unit, and a
rerun labels exactly the missing ones. Only shards some teacher is missing are read, and each
teacher runs only on the shards it is missing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kdpipe import cache, datasets, faults, labels, runtime, storage
from kdpipe.config import Config, labels_for, preprocess_for, teacher_precision
from kdpipe.teachers import (
    TeacherInfo,
    TeacherPredictor,
    inspect_teacher,
    logits_column,
    mask_column,
)

log = logging.getLogger("kdpipe")


@dataclass
class TeacherResult:
    name: str
    digest: str
    directory: str
    units_total: int
    units_written: int = 0
    units_reused: int = 0  # committed earlier for another version of the dataset
    rows_labelled: int = 0
    quality: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerateReport:
    fingerprint: str
    cache_root: str
    teachers: dict[str, TeacherResult]
    seconds: float

    @property
    def teacher_forward_passes(self) -> int:
        return sum(t.rows_labelled for t in self.teachers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "cache_root": self.cache_root, "seconds": self.seconds,
                "teacher_forward_passes": self.teacher_forward_passes,
                "teachers": {k: asdict(v) for k, v in self.teachers.items()}}


def _shard_plan(fs, shards: list[datasets.InputShard], dirs: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{teacher: {shard_id: committed unit record}} for the units already in the cache."""
    done: dict[str, dict[str, dict]] = {}
    for name, directory in dirs.items():
        done[name] = {}
        for s in shards:
            rec = cache.read_unit(fs, directory, s.shard_id)
            if rec is not None:
                done[name][s.shard_id] = rec
    return done


def inspect_teachers(cfg: Config) -> list[TeacherInfo]:
    """Validate every teacher before any work starts (checkpoint, architecture, class count)."""
    infos = []
    for t in cfg.teachers:
        pre = preprocess_for(cfg, t.name)
        infos.append(inspect_teacher(t.name, t.arch, t.checkpoint, cfg.cache.storage_options, cfg.data.num_classes,
                                     pre.image_shape, pre.spec(), cfg.allow_import, teacher_precision(t)))
    return infos


@dataclass
class Inventory:
    """What generation would do, found without writing anything: the teachers (validated, with
    digests), the input shards, and per teacher its unit directory, the units committed there and
    those committed for another version of the dataset that can be referenced instead."""

    infos: list[TeacherInfo]
    source: dict[str, Any]
    shards: list[datasets.InputShard]
    fingerprint: str
    settings: dict[str, dict[str, Any]]
    label_hash: dict[str, str]
    fs: Any
    root: str
    dirs: dict[str, str]
    done: dict[str, dict[str, dict]]
    reusable: dict[str, dict[str, dict]]

    def missing(self, name: str) -> list[str]:
        have = self.done[name].keys() | self.reusable[name].keys()
        return [s.shard_id for s in self.shards if s.shard_id not in have]


def inventory(cfg: Config) -> Inventory:
    if not cfg.teachers:
        raise ValueError("no teachers configured: add at least one entry under `teachers` (or a `registry`)")
    infos = inspect_teachers(cfg)
    source = datasets.source_spec(cfg.data, check_holdout=False)
    shards = datasets.list_shards(cfg.data.train, source)
    fingerprint = datasets.fingerprint(shards, source)
    settings = {i.name: cache.settings_from_config(cfg, i.name) for i in infos}
    label_hash = {name: cache.settings_hash(s) for name, s in settings.items()}
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    dirs = {i.name: cache.unit_dir(root, i.name, i.digest, fingerprint, label_hash[i.name]) for i in infos}
    done = _shard_plan(fs, shards, dirs)
    # Same teacher, same labels, an input shard committed for another dataset version (e.g.
    # before new shards arrived): reference it instead of relabelling.
    reusable = {name: cache.find_reusable_units(fs, directory, [s.shard_id for s in shards
                                                                if s.shard_id not in done[name]])
                for name, directory in dirs.items()}
    return Inventory(infos, source, shards, fingerprint, settings, label_hash, fs, root, dirs, done, reusable)


def generate(cfg: Config, progress: bool = True, inv: Inventory | None = None) -> GenerateReport:
    """Label cfg.data.train with every teacher in cfg.teachers; commit units, manifests, refs.

    `cfg` must have its paths resolved (config.resolve_paths). Teachers are checked before
    anything else; Ray is started (or joined, per cfg.ray) only when some unit is missing.
    `inv`: an inventory just taken (kdpipe regenerate's plan), to not take it twice."""
    started = time.time()
    inv = inv or inventory(cfg)
    infos, source, shards, fingerprint, fs, root, dirs, done = (inv.infos, inv.source, inv.shards, inv.fingerprint,
                                                                inv.fs, inv.root, inv.dirs, inv.done)
    settings, label_hash = inv.settings, inv.label_hash
    results = {i.name: TeacherResult(i.name, i.digest, fs.unstrip_protocol(dirs[i.name]), len(shards),
                                     metrics=i.metrics) for i in infos}
    for name, directory in dirs.items():
        for sid, record in inv.reusable[name].items():
            storage.write_json(fs, cache.unit_record_path(directory, sid), record)
            done[name][sid] = record
            results[name].units_reused += 1
    missing = {name: [s.shard_id for s in shards if s.shard_id not in done[name]] for name in dirs}
    todo = {name: ids for name, ids in missing.items() if ids}
    for name in dirs:
        log.info("teacher %s: %d of %d units committed (%d reused), %d to label", name,
                 len(done[name]), len(shards), results[name].units_reused, len(missing[name]))

    if todo:
        by_id = {s.shard_id: s for s in shards}
        needed = sorted({sid for ids in todo.values() for sid in ids})
        new_units = _run_pipeline(cfg, source, [by_id[s] for s in needed], todo, fs, dirs, progress)
        for name, recs in new_units.items():
            done[name].update(recs)
            results[name].units_written = len(recs)
            results[name].rows_labelled = sum(r["rows"] for r in recs.values())

    teacher_by_name = {i.name: i for i in infos}
    precision = {t.name: teacher_precision(t) for t in cfg.teachers}
    for name, directory in dirs.items():
        units = [done[name][s.shard_id] for s in shards]
        manifest = cache.read_manifest(fs, directory)
        if manifest is None or results[name].units_written or results[name].units_reused:
            info = teacher_by_name[name]
            teacher_meta = {"name": name, "arch": info.arch, "digest": info.digest,
                            "checkpoint": info.checkpoint, "checkpoint_sha256": info.checkpoint_sha256,
                            "metrics": info.metrics, "precision": precision[name]}
            manifest = cache.build_manifest(teacher_meta, fingerprint, cfg.data.train, settings[name], units)
            storage.write_json(fs, storage.join(directory, cache.MANIFEST), manifest)
        results[name].quality = manifest["quality"]
        ref = {"teacher": name, "digest": teacher_by_name[name].digest, "fingerprint": fingerprint,
               "label_hash": label_hash[name], "manifest": storage.join(fs.unstrip_protocol(directory), cache.MANIFEST)}
        old = cache.read_ref(fs, root, name)
        if old is None or any(old.get(k) != v for k, v in ref.items()):  # a rerun with no change moves nothing
            cache.write_ref(fs, root, name, {**ref, "updated_at": time.time(),
                                             "previous": None if old is None else old.get("digest")})
    return GenerateReport(fingerprint, cfg.cache.root, results, round(time.time() - started, 2))


def _run_pipeline(cfg: Config, source: dict[str, Any], shards: list[datasets.InputShard], todo: dict[str, list[str]],
                  fs, dirs: dict[str, str], progress: bool) -> dict[str, dict[str, dict]]:
    import ray.data

    for uri in (cfg.data.train, cfg.cache.root):
        storage.check_shared(uri)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    cpus, gpus = runtime.cluster_cpus_gpus()
    teachers = [t for t in cfg.teachers if t.name in todo]
    plans = runtime.plan_teacher_pools(cpus, gpus, [(t.name, t.num_cpus, t.num_gpus, t.pool_size) for t in teachers])
    pre = {t.name: preprocess_for(cfg, t.name) for t in teachers}
    fault = faults.for_cache(cfg.cache.inject_fault, cfg.cache.root, cfg.cache.storage_options)
    views = {p.view(): p.geometry() for p in pre.values()}  # teachers with the same geometry share a view
    log.info("%d teacher(s), %d distinct preprocessing view(s): each image is decoded once", len(teachers), len(views))
    items = [{"shard_id": s.shard_id} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(datasets.read_views, batch_size=1, num_cpus=cfg.data.decode_cpus or runtime.READ_TASK_CPUS,
                        fn_kwargs={"source": source, "shards": {s.shard_id: s for s in shards}, "views": views,
                                   "augment": augment_settings(cfg)})
    # Each input shard is one block and Ray Data bundles blocks up to the batch size, so a pool
    # gets at most min(shards, ceil(rows / batch)) bundles: more actors would start and never
    # label, taking CPU from those that do (measured: a 1-shard run on 2 cores, 8.2 s, not 9.8 s).
    rows = None if any(s.num_rows is None for s in shards) else \
        sum(s.num_rows for s in shards) * (1 + cfg.labels.views)
    for i, (t, plan) in enumerate(zip(teachers, plans, strict=True)):
        later = {pre[u.name].view() for u in teachers[i + 1:]}
        bundles = len(shards) if rows is None else min(len(shards), max(1, math.ceil(rows / t.batch_size)))
        size = min(plan.pool_size, bundles)
        log.info("teacher %s: %d actor(s) x %.2f CPU, %.2f GPU, batch %d, %s", t.name, size,
                 plan.num_cpus, plan.num_gpus, t.batch_size, teacher_precision(t))
        ds = ds.map_batches(
            TeacherPredictor,
            fn_constructor_kwargs={
                "name": t.name, "arch": t.arch, "checkpoint": t.checkpoint,
                "storage_options": cfg.cache.storage_options, "num_classes": cfg.data.num_classes,
                "preprocess": pre[t.name], "view": pre[t.name].view(),
                "shard_ids": None if len(todo[t.name]) == len(shards) else todo[t.name],
                "num_threads": plan.threads, "allow_import": cfg.allow_import, "fault": fault,
                "precision": teacher_precision(t), "drop": [v for v in views if v not in later],
            },
            batch_size=t.batch_size,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )

    by_id = {s.shard_id: s for s in shards}
    buffers: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    expected: dict[str, int] = {}
    skipped: dict[str, list[dict[str, str]]] = defaultdict(list)
    written: dict[str, dict[str, dict]] = {t.name: {} for t in teachers}
    committed = 0  # units committed by this run
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc="units committed", unit="unit", disable=not progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sids = batch["shard_id"].astype(str)
        for sid in np.unique(sids):
            part = {k: v[sids == sid] for k, v in batch.items()}
            # Read tasks take whole shards, so every row knows its shard's (post-skip) row count.
            expected[sid] = int(part["shard_rows"][0])
            skipped[sid] += [s for text in part["skipped"] if text for s in json.loads(text)]
            real = ~part[datasets.PLACEHOLDER]
            buffers[sid].append({k: v[real] for k, v in part.items()})
            counts[sid] += int(real.sum())
            if counts[sid] > expected[sid]:
                raise RuntimeError(f"input shard {by_id[sid].uri}: got {counts[sid]} rows, "
                                   f"expected {expected[sid]} (duplicated rows)")
            if counts[sid] == expected[sid]:
                parts = buffers.pop(sid)
                rows = {k: np.concatenate([b[k] for b in parts]) for k in batch}
                for t in teachers:
                    if sid in todo[t.name]:
                        try:
                            written[t.name][sid] = _commit_unit(cfg, fs, dirs[t.name], t.name, by_id[sid], rows,
                                                                skipped[sid])
                        except Exception as e:
                            if not storage.unreachable(e):
                                raise
                            raise storage.StorageUnreachable(
                                f"cache {fs.unstrip_protocol(dirs[t.name])}: the store stopped answering while "
                                f"committing teacher {t.name!r}, input shard {by_id[sid].uri} ({e}). The {committed} "
                                "unit(s) committed before are kept and nothing partial is visible: rerun the "
                                "same command once the store answers; it labels only what is missing") from e
                        committed += 1
                        bar.update(1)
                        faults.units_committed(fault, committed)
    bar.close()
    incomplete = {sid: counts.get(sid, 0) for sid in by_id if sid not in expected or counts[sid] != expected[sid]}
    if incomplete:
        raise RuntimeError(f"generation ended with incomplete input shards {incomplete}; rerun to finish them")
    return written


def augment_settings(cfg: Config) -> dict[str, Any] | None:
    """The augmented views every teacher labels (labels.views etc.), or None for the plain view only."""
    lab = cfg.labels
    if not lab.views:
        return None
    return {"views": lab.views, "seed": lab.view_seed, "crop_scale": list(lab.crop_scale), "flip": lab.flip}


def _commit_unit(cfg: Config, fs, directory: str, teacher: str, shard: datasets.InputShard,
                 rows: dict[str, np.ndarray], skipped: list[dict[str, str]]) -> dict[str, Any]:
    keys = [str(k) for k in rows["sample_key"]]
    where = f"teacher {teacher!r}, input shard {shard.uri}"
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: duplicate sample keys; keys must be unique within a dataset")
    if not rows[mask_column(teacher)].all():
        raise RuntimeError(f"{where}: some rows were not labelled")
    logits = rows[logits_column(teacher)]
    labels.check_finite(logits, keys, where)
    lab = labels_for(cfg, teacher)
    aug = rows.get("aug")
    data = labels.encode_unit(keys, logits, lab.mode, lab.k, lab.temperature, lab.dtype, lab.format,
                              lab.row_group_size, aug)
    plain = slice(None) if aug is None else aug[:, 2] == 0  # quality figures: the plain views
    label = rows.get("label")
    quality = labels.quality(logits[plain], lab.temperature, None if label is None else label[plain],
                             lab.k if lab.mode == "topk" else None)
    return cache.write_unit(fs, directory, {"shard_id": shard.shard_id, "uri": shard.uri, "token": shard.token},
                            data, lab.format, keys, quality, skipped)
