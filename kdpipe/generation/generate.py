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
from kdpipe.teachers.checkpoints import TeacherInfo

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
    results = {i.name: TeacherResult(i.name, i.digest, inv.fs.unstrip_protocol(inv.dirs[i.name]), len(inv.shards),
                                     metrics=i.metrics) for i in inv.infos}
    _reference_reusable_units(inv, results)
    todo = _units_to_label(inv, results)
    if todo:
        _label_missing(cfg, inv, todo, results, progress)
    precision = {t.name: teacher_precision(t) for t in cfg.teachers}
    for info in inv.infos:
        _commit_manifest_and_ref(cfg, inv, info, precision[info.name], results[info.name])
    return GenerateReport(inv.fingerprint, cfg.cache.root, results, round(time.time() - started, 2))


def _reference_reusable_units(inv: Inventory, results: dict[str, TeacherResult]) -> None:
    """Take the units committed for another version of the dataset (same teacher, same label
    settings) as this one's: referenced by the manifest written at the end, not relabelled, and
    not copied (no request per unit). Until that manifest lands, a rerun finds them again."""
    for name in inv.dirs:
        for sid, record in inv.reusable[name].items():
            inv.done[name][sid] = record
            results[name].units_reused += 1


def _units_to_label(inv: Inventory, results: dict[str, TeacherResult]) -> dict[str, list[str]]:
    """{teacher: the shard ids it has no committed unit for}, teachers with none left out."""
    missing = {name: [s.shard_id for s in inv.shards if s.shard_id not in inv.done[name]] for name in inv.dirs}
    for name in inv.dirs:
        log.info("teacher %s: %d of %d units committed (%d reused), %d to label", name,
                 len(inv.done[name]), len(inv.shards), results[name].units_reused, len(missing[name]))
    return {name: ids for name, ids in missing.items() if ids}


def _label_missing(cfg: Config, inv: Inventory, todo: dict[str, list[str]], results: dict[str, TeacherResult],
                   progress: bool) -> None:
    """Run the pipeline over the shards some teacher is missing; record the units it commits."""
    by_id = {s.shard_id: s for s in inv.shards}
    needed = sorted({sid for ids in todo.values() for sid in ids})
    new_units = _run_pipeline(cfg, inv.source, [by_id[s] for s in needed], todo, inv.fs, inv.dirs, progress)
    for name, recs in new_units.items():
        inv.done[name].update(recs)
        results[name].units_written = len(recs)
        results[name].rows_labelled = sum(r["rows"] for r in recs.values())


def _commit_manifest_and_ref(cfg: Config, inv: Inventory, info: TeacherInfo, precision: str,
                             result: TeacherResult) -> None:
    """Write the teacher's manifest after all its units (unless it is there and nothing changed),
    then move its `latest` ref to it (unless the ref already points there)."""
    fs, name, directory = inv.fs, info.name, inv.dirs[info.name]
    units = [inv.done[name][s.shard_id] for s in inv.shards]
    manifest = cache.read_manifest(fs, directory)
    if manifest is None or result.units_written or result.units_reused:
        teacher_meta = {"name": name, "arch": info.arch, "digest": info.digest,
                        "checkpoint": info.checkpoint, "checkpoint_sha256": info.checkpoint_sha256,
                        "metrics": info.metrics, "precision": precision}
        manifest = cache.build_manifest(teacher_meta, inv.fingerprint, cfg.data.train, inv.settings[name], units)
        storage.write_json(fs, storage.join(directory, cache.MANIFEST), manifest, compact=True)
    result.quality = manifest["quality"]
    ref = {"teacher": name, "digest": info.digest, "fingerprint": inv.fingerprint,
           "label_hash": inv.label_hash[name], "manifest": storage.join(fs.unstrip_protocol(directory), cache.MANIFEST)}
    old = cache.read_ref(fs, inv.root, name)
    if old is None or any(old.get(k) != v for k, v in ref.items()):  # a rerun with no change moves nothing
        cache.write_ref(fs, inv.root, name, {**ref, "updated_at": time.time(),
                                             "previous": None if old is None else old.get("digest")})
