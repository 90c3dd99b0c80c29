"""Generation: label the inputs with every teacher; commit units, manifests and refs.

An interrupted run keeps every finished unit, and a rerun labels exactly the missing ones. Only
shards some teacher is missing are read, and each teacher runs only on the shards it is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kdpipe import storage
from kdpipe.config import Config, teacher_precision
from kdpipe.generation.pipeline import _run_pipeline
from kdpipe.generation.planning import Inventory, inventory
from kdpipe.labels import cache

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
