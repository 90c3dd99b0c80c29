"""`kdpipe regenerate`: bring the cache up to date with the current teachers and inputs.

One cycle:
  1. plan: every teacher's current digest (checkpoint bytes, architecture, preprocessing) and
     the input shard list, compared with what is committed; each unit to label gets a reason
     (new teacher, checkpoint changed, label settings changed, new input shard, unit missing);
  2. generate exactly those units (the generation pipeline labels only what is missing);
  3. move the `latest` refs (refs/<teacher>.json) to the new labels. Old labels stay committed,
     so a student pinned to `teacher@old-digest` keeps training on them.
A cycle with nothing to do starts no Ray and writes nothing. `--every` repeats cycles on a
schedule, re-reading the config (and its teacher registry) each time.

Concurrency: a cycle takes a lease (<cache>/_locks/regenerate.json, with an expiry) before it
writes; a second regenerate that finds a live lease held by another yields (it does nothing and
says who holds it). Should two writers still meet (an expired lease, a plain `kdpipe generate`
beside a regenerate), the commit protocol keeps the cache valid: part files are named by their
content and every record names its own complete part, so nothing is ever interleaved.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kdpipe import storage
from kdpipe.config import Config
from kdpipe.generation import generate, planning
from kdpipe.labels import cache

log = logging.getLogger("kdpipe")

LOCK = "_locks/regenerate.json"


@dataclass
class TeacherPlan:
    name: str
    digest: str
    previous_digest: str | None  # what refs/<name>.json points to now (None: no labels yet)
    units_total: int
    units_committed: int  # already in this teacher's current unit directory
    units_reused: int  # committed for another version of the dataset: referenced, not relabelled
    todo: list[dict[str, str]] = field(default_factory=list)  # {"shard_id", "uri", "reason"}
    removed_shards: int = 0  # in the latest labels, no longer among the inputs
    ref_moves: bool = False

    @property
    def up_to_date(self) -> bool:
        return not self.todo and not self.units_reused and not self.ref_moves


@dataclass
class Plan:
    fingerprint: str
    shards: int
    teachers: dict[str, TeacherPlan]

    @property
    def up_to_date(self) -> bool:
        return all(t.up_to_date for t in self.teachers.values())

    @property
    def units_to_label(self) -> int:
        return sum(len(t.todo) for t in self.teachers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "shards": self.shards, "up_to_date": self.up_to_date,
                "units_to_label": self.units_to_label,
                "teachers": {k: asdict(v) for k, v in self.teachers.items()}}


def _why_changed(old_manifest: dict[str, Any] | None, info) -> str:
    if old_manifest is None:
        return f"teacher changed (digest {info.digest})"
    old = old_manifest.get("teacher", {})
    if old.get("checkpoint_sha256") != info.checkpoint_sha256:
        return f"checkpoint changed ({info.checkpoint}: sha256 {str(old.get('checkpoint_sha256'))[:12]} -> " \
               f"{info.checkpoint_sha256[:12]})"
    if old.get("arch") != info.arch:
        return f"architecture changed ({old.get('arch')} -> {info.arch})"
    return "preprocessing changed"


def make_plan(cfg: Config, inv: planning.Inventory | None = None) -> tuple[Plan, planning.Inventory]:
    """Compare current teachers and inputs with the cache; reads only refs, manifests and unit
    records (no part file, no listing beyond the inputs and sibling unit directories)."""
    inv = inv or planning.inventory(cfg)
    fs, root = inv.fs, inv.root
    plans: dict[str, TeacherPlan] = {}
    current = {s.shard_id for s in inv.shards}
    for info in inv.infos:
        name = info.name
        ref = cache.read_ref(fs, root, name)
        old_manifest = None
        if ref is not None and ref.get("manifest"):
            old_fs, old_path = storage.filesystem(ref["manifest"], cfg.cache.storage_options)
            old_manifest = storage.read_json(old_fs, old_path) if old_fs.exists(old_path) else None
        old_shards = {u["shard_id"] for u in (old_manifest or {}).get("units", [])}
        plan = TeacherPlan(name, info.digest, None if ref is None else ref.get("digest"), len(inv.shards),
                           len(inv.done[name]), len(inv.reusable[name]))
        missing = set(inv.missing(name))  # once per teacher, not per shard
        for shard in inv.shards:
            if shard.shard_id not in missing:
                continue
            if ref is None:
                reason = "new teacher (no labels yet)"
            elif ref.get("digest") != info.digest:
                reason = _why_changed(old_manifest, info)
            elif ref.get("label_hash") != inv.label_hash[name]:
                reason = "label settings changed"
            elif shard.shard_id not in old_shards:
                reason = "new input shard"
            else:
                reason = "unit missing (never committed, or lost)"
            plan.todo.append({"shard_id": shard.shard_id, "uri": shard.uri, "reason": reason})
        plan.removed_shards = len(old_shards - current)
        wanted = {"digest": info.digest, "fingerprint": inv.fingerprint, "label_hash": inv.label_hash[name]}
        manifest_there = fs.exists(storage.join(inv.dirs[name], cache.MANIFEST))
        plan.ref_moves = ref is None or any(ref.get(k) != v for k, v in wanted.items()) or not manifest_there
        plans[name] = plan
    return Plan(inv.fingerprint, len(inv.shards), plans), inv


def format_plan(plan: Plan) -> str:
    lines = [f"dataset {plan.fingerprint}: {plan.shards} input shard(s)",
             f"{'teacher':<14}{'digest':<18}{'labelled':>9}{'reused':>8}{'to label':>10}  latest"]
    for t in plan.teachers.values():
        moves = ("unchanged" if not t.ref_moves else
                 f"{t.previous_digest or '(none)'} -> {t.digest}" if t.previous_digest != t.digest
                 else "moves here (same teacher, other labels or inputs)")
        lines.append(f"{t.name:<14}{t.digest:<18}{t.units_committed:>9}{t.units_reused:>8}{len(t.todo):>10}  {moves}")
    reasons: dict[tuple[str, str], int] = {}
    for t in plan.teachers.values():
        for item in t.todo:
            reasons[(t.name, item["reason"])] = reasons.get((t.name, item["reason"]), 0) + 1
        if t.removed_shards:
            reasons[(t.name, "input shards gone since the latest labels (nothing to do)")] = t.removed_shards
    for (name, reason), count in sorted(reasons.items()):
        lines.append(f"  {name}: {count} unit(s): {reason}")
    lines.append("up to date: nothing to do" if plan.up_to_date else
                 f"{plan.units_to_label} unit(s) to label")
    return "\n".join(lines)


# --- The lease ------------------------------------------------------------------------------------

class Lease:
    """A best-effort exclusive lease on a cache root (a JSON file with owner and expiry). Object
    stores have no atomic create-if-absent everywhere, so after writing, the holder reads it
    back: if another writer's lease replaced it, this one yields. Safety does not rest on it."""

    def __init__(self, fs, root: str, seconds: float) -> None:
        self.fs, self.path, self.seconds = fs, storage.join(root, LOCK), seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def holder(self) -> dict[str, Any] | None:
        """The live lease of another owner, or None."""
        if not self.fs.exists(self.path):
            return None
        try:
            lease = storage.read_json(self.fs, self.path)
        except (ValueError, OSError):
            return None  # a torn or unreadable lease is no lease
        if lease.get("owner") == self.owner or lease.get("expires_at", 0) < time.time():
            return None
        return lease

    def acquire(self) -> dict[str, Any] | None:
        """None when acquired, else the other holder's lease."""
        other = self.holder()
        if other is not None:
            return other
        now = time.time()
        storage.write_json(self.fs, self.path, {"owner": self.owner, "acquired_at": now,
                                                "expires_at": now + self.seconds})
        time.sleep(0.2)  # let a racing writer's lease land, then see whose survived
        return self.holder()

    def release(self) -> None:
        try:
            if storage.read_json(self.fs, self.path).get("owner") == self.owner:
                self.fs.rm(self.path)
        except (FileNotFoundError, ValueError, OSError):
            pass


def regenerate(cfg: Config, dry_run: bool = False, progress: bool = True, lease_s: float = 6 * 3600,
               say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """One cycle: plan, then (unless dry_run or nothing to do) generate and move the refs.
    Returns {"plan", "status": "dry-run" | "up-to-date" | "yielded" | "done", ...}."""
    started = time.time()
    plan, inv = make_plan(cfg)
    say(format_plan(plan))
    out: dict[str, Any] = {"plan": plan.to_dict()}
    if dry_run:
        return {**out, "status": "dry-run", "seconds": round(time.time() - started, 2)}
    if plan.up_to_date:
        return {**out, "status": "up-to-date", "seconds": round(time.time() - started, 2)}
    lease = Lease(inv.fs, inv.root, lease_s)
    other = lease.acquire()
    if other is not None:
        say(f"another regenerate holds the lease on this cache ({other.get('owner')}, until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other.get('expires_at', 0)))}): yielding")
        return {**out, "status": "yielded", "holder": other.get("owner"), "seconds": round(time.time() - started, 2)}
    try:
        # The inventory is re-taken under the lease: another writer may have committed meanwhile.
        report = generate.generate(cfg, progress=progress)
    finally:
        lease.release()
    return {**out, "status": "done", "generate": report.to_dict(),
            "teacher_forward_passes": report.teacher_forward_passes, "seconds": round(time.time() - started, 2)}


def run_every(load: Callable[[], Config], every_s: float, cycles: int = 0, dry_run: bool = False,
              progress: bool = True, say: Callable[[str], None] = log.info,
              sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """Run a cycle every `every_s` seconds (measured start to start), re-loading the config each
    time; `cycles` > 0 stops after that many. A failed cycle is reported and the loop goes on
    (a scheduler must survive a flaky store); the results of each cycle are returned."""
    results = []
    n = 0
    while True:
        started = time.time()
        n += 1
        try:
            result = regenerate(load(), dry_run=dry_run, progress=progress, say=say)
        except Exception as e:  # noqa: BLE001 - one bad cycle must not end the schedule
            say(f"regenerate cycle {n} failed: {type(e).__name__}: {e}")
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result["cycle"] = n
        results.append(result)
        say(f"cycle {n}: {result['status']}")
        if cycles and n >= cycles:
            return results
        sleep(max(0.0, every_s - (time.time() - started)))
