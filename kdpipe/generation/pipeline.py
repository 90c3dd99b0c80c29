"""The Ray Data pass: one read of each input shard feeds every teacher; units commit as shards finish.

    read+decode (tasks, one per input shard) -> teacher A pool -> teacher B pool -> ... -> driver

Each input shard is read and decoded once; every teacher runs in its own actor pool with its own
resources, chained so all pools work at the same time on different batches. With
`ray.teacher_placement: fused`, one pool instead, each of whose actors runs every teacher on each
batch (FusedTeacherPredictor): images make no hop from pool to pool, and fewer actor processes
start. The driver groups label rows by input shard and commits a unit the moment all of a
shard's rows are in.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kdpipe import runtime, storage
from kdpipe.config import (
    Config,
    TeacherConfig,
    labels_for,
    preprocess_for,
    teacher_placement,
    teacher_precision,
)
from kdpipe.data import inputs, readers
from kdpipe.errors import InputError, StorageUnreachable
from kdpipe.labels import cache, codec, softlabels
from kdpipe.teachers.predictor import (
    FusedTeacherPredictor,
    PredictorSettings,
    TeacherPredictor,
    logits_column,
    mask_column,
)
from kdpipe.testing import faults

log = logging.getLogger("kdpipe")


def predictor_settings(cfg: Config, teacher: TeacherConfig, plan: runtime.ActorPlan,
                       shard_ids: list[str] | None = None, drop: Iterable[str] = (),
                       fault: faults.Fault | None = None) -> PredictorSettings:
    """The settings of `teacher`'s actors under `plan` (generation's, and the benchmarks' stage):
    label only the rows of `shard_ids` (None: every row), leave the pixel columns `drop` out of
    the output."""
    pre = preprocess_for(cfg, teacher.name)
    return PredictorSettings(
        name=teacher.name, arch=teacher.arch, checkpoint=teacher.checkpoint,
        storage_options=dict(cfg.cache.storage_options), num_classes=cfg.data.num_classes,
        preprocess=pre, column=pre.pixels_column(), shard_ids=None if shard_ids is None else tuple(shard_ids),
        num_threads=plan.threads, allow_import=cfg.allow_import, fault=fault,
        precision=teacher_precision(teacher), drop=tuple(drop))


def _run_pipeline(cfg: Config, source: inputs.SourceSpec, shards: list[inputs.InputShard], todo: dict[str, list[str]],
                  fs, dirs: dict[str, str], progress: bool) -> dict[str, dict[str, dict]]:
    """Label `shards` with the teachers of `todo` ({teacher: shard ids it is missing}) and commit
    each unit as its shard completes. Returns {teacher: {shard_id: unit record}}."""
    for uri in (cfg.data.train, cfg.cache.root):
        storage.check_shared(uri)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)
    teachers = [t for t in cfg.teachers if t.name in todo]
    fault = faults.for_cache(cfg.cache.inject_fault, cfg.cache.root, cfg.cache.storage_options)
    ds = _labelled_dataset(cfg, source, shards, todo, teachers, fault)
    return _commit_units(cfg, ds.iter_batches(batch_size=None, batch_format="numpy"), shards, todo, teachers,
                         fs, dirs, fault, progress)


def _labelled_dataset(cfg: Config, source: inputs.SourceSpec, shards: list[inputs.InputShard],
                      todo: dict[str, list[str]], teachers: list[TeacherConfig], fault: faults.Fault | None):
    """The lazy Ray Data plan: read + decode every shard once, then each teacher's actor pool in turn."""
    import ray.data

    cpus, gpus = runtime.cluster_cpus_gpus()
    fused = teacher_placement(cfg, teachers) == "fused" and len(teachers) > 1
    requests = [(t.name, t.num_cpus, t.num_gpus, t.pool_size) for t in teachers]
    if fused:  # one pool whose every actor runs all the teachers: a GPU each when they asked for GPUs
        requests = [("+".join(t.name for t in teachers), None, 1.0 if any(t.num_gpus for t in teachers) else 0.0, None)]
    plans = runtime.plan_teacher_pools(cpus, gpus, requests)
    pre = {t.name: preprocess_for(cfg, t.name) for t in teachers}
    geometries = {p.pixels_column(): p.geometry() for p in pre.values()}  # teachers with the same geometry share a view
    log.info("%d teacher(s), %d distinct preprocessing view(s): each image is decoded once", len(teachers), len(geometries))
    ds = readers.shard_dataset(shards, readers.read_teacher_inputs, cfg.data.decode_cpus, source=source,
                               geometries=geometries, augment=augment_settings(cfg))
    # Each input shard is one block and Ray Data bundles blocks up to the batch size, so a pool
    # gets at most min(shards, ceil(rows / batch)) bundles: more actors would start and never
    # label, taking CPU from those that do (measured: a 1-shard run on 2 cores, 8.2 s, not 9.8 s).
    rows = None if any(s.num_rows is None for s in shards) else \
        sum(s.num_rows for s in shards) * (1 + cfg.labels.views)
    settings = []
    for i, (t, plan) in enumerate(zip(teachers, plans * len(teachers) if fused else plans, strict=True)):
        later = {pre[u.name].pixels_column() for u in teachers[i + 1:]}
        settings.append(predictor_settings(cfg, t, plan, None if len(todo[t.name]) == len(shards) else todo[t.name],
                                           drop=[v for v in geometries if v not in later], fault=fault))
    # (actor class, its settings, batch size, plan, the teachers it runs): a stage per teacher, or one for all
    stages = [(FusedTeacherPredictor, tuple(settings), min(t.batch_size for t in teachers), plans[0], teachers)] \
        if fused else [(TeacherPredictor, s, t.batch_size, plan, [t])
                       for s, t, plan in zip(settings, teachers, plans, strict=True)]
    for predictor, stage_settings, batch_size, plan, members in stages:
        bundles = len(shards) if rows is None else min(len(shards), max(1, math.ceil(rows / batch_size)))
        size = min(plan.pool_size, bundles)
        log.info("teacher %s: %d actor(s) x %.2f CPU, %.2f GPU, batch %d, %s", " + ".join(t.name for t in members),
                 size, plan.num_cpus, plan.num_gpus, batch_size, "/".join(dict.fromkeys(teacher_precision(t) for t in members)))
        ds = ds.map_batches(
            predictor,
            fn_constructor_kwargs={"settings": stage_settings},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus or None,
        )
    return ds


def _complete_shards(batches: Iterable[dict[str, np.ndarray]], by_id: dict[str, inputs.InputShard]
                     ) -> Iterator[tuple[str, dict[str, np.ndarray], list[dict[str, str]]]]:
    """The driver's grouping: label batches in any order in, (shard_id, its rows, its skipped
    samples) out the moment all of a shard's rows are in. Raises if a shard gets more rows than
    it has, or (at the end) fewer."""
    buffers: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    expected: dict[str, int] = {}
    skipped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for batch in batches:
        sids = batch["shard_id"].astype(str)
        for sid in np.unique(sids):
            part = {k: v[sids == sid] for k, v in batch.items()}
            # Read tasks take whole shards, so every row knows its shard's (post-skip) row count.
            expected[sid] = int(part["shard_rows"][0])
            skipped[sid] += [s for text in part["skipped"] if text for s in json.loads(text)]
            real = ~part[readers.PLACEHOLDER]
            buffers[sid].append({k: v[real] for k, v in part.items()})
            counts[sid] += int(real.sum())
            if counts[sid] > expected[sid]:
                raise RuntimeError(f"input shard {by_id[sid].uri}: got {counts[sid]} rows, "
                                   f"expected {expected[sid]} (duplicated rows)")
            if counts[sid] == expected[sid]:
                parts = buffers.pop(sid)
                yield sid, {k: np.concatenate([b[k] for b in parts]) for k in batch}, skipped[sid]
    incomplete = {sid: counts.get(sid, 0) for sid in by_id if sid not in expected or counts[sid] != expected[sid]}
    if incomplete:
        raise RuntimeError(f"generation ended with incomplete input shards {incomplete}; rerun to finish them")


def _commit_units(cfg: Config, batches: Iterable[dict[str, np.ndarray]], shards: list[inputs.InputShard],
                  todo: dict[str, list[str]], teachers: list[TeacherConfig], fs, dirs: dict[str, str],
                  fault: faults.Fault | None, progress: bool) -> dict[str, dict[str, dict]]:
    """Commit every teacher's unit of each shard as the shard completes; {teacher: {shard_id: record}}."""
    by_id = {s.shard_id: s for s in shards}
    wanted = {name: set(ids) for name, ids in todo.items()}  # (a list's `in` is linear in the shards)
    written: dict[str, dict[str, dict]] = {t.name: {} for t in teachers}
    committed = 0  # units committed by this run
    with tqdm(total=sum(len(v) for v in todo.values()), desc="units committed", unit="unit",
              disable=not progress) as bar:
        for sid, rows, skipped in _complete_shards(batches, by_id):
            for t in teachers:
                if sid not in wanted[t.name]:
                    continue
                try:
                    written[t.name][sid] = _commit_unit(cfg, fs, dirs[t.name], t.name, by_id[sid], rows, skipped)
                except Exception as e:
                    if not storage.unreachable(e):
                        raise
                    raise StorageUnreachable(
                        f"cache {fs.unstrip_protocol(dirs[t.name])}: the store stopped answering while "
                        f"committing teacher {t.name!r}, input shard {by_id[sid].uri} ({e}). The {committed} "
                        "unit(s) committed before are kept and nothing partial is visible: rerun the "
                        "same command once the store answers; it labels only what is missing") from e
                committed += 1
                bar.update(1)
                faults.units_committed(fault, committed)
    return written


def augment_settings(cfg: Config) -> dict[str, Any] | None:
    """The augmented views every teacher labels (labels.views etc.), or None for the plain view only."""
    lab = cfg.labels
    if not lab.views:
        return None
    return {"views": lab.views, "seed": lab.view_seed, "crop_scale": list(lab.crop_scale), "flip": lab.flip}


def _commit_unit(cfg: Config, fs, directory: str, teacher: str, shard: inputs.InputShard,
                 rows: dict[str, np.ndarray], skipped: list[dict[str, str]]) -> dict[str, Any]:
    keys = [str(k) for k in rows["sample_key"]]
    where = f"teacher {teacher!r}, input shard {shard.uri}"
    if len(set(keys)) != len(keys):
        raise InputError(f"{where}: duplicate sample keys; keys must be unique within a dataset")
    if not rows[mask_column(teacher)].all():
        raise RuntimeError(f"{where}: some rows were not labelled")
    logits = rows[logits_column(teacher)]
    lab = labels_for(cfg, teacher)
    softlabels.check_storable(logits, keys, where, lab.dtype, lab.temperature, lab.mode == "topk")
    aug = rows.get("aug")
    data = codec.encode_unit(keys, logits, lab.mode, lab.k, lab.temperature, lab.dtype, lab.format,
                             lab.row_group_size, aug)
    plain = slice(None) if aug is None else aug[:, 2] == 0  # quality figures: the plain views
    label = rows.get("label")
    quality = softlabels.quality(logits[plain], lab.temperature, None if label is None else label[plain],
                                 lab.k if lab.mode == "topk" else None)
    return cache.write_unit(fs, directory, {"shard_id": shard.shard_id, "uri": shard.uri, "token": shard.token},
                            data, lab.format, keys, quality, skipped)
