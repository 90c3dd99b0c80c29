"""Cache upkeep: list what a cache root holds, verify units against manifests, find garbage."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kdpipe import storage
from kdpipe.labels import codec, softlabels
from kdpipe.labels.cache import MANIFEST, keys_digest, read_manifest, unit_part_path


def list_caches(fs, root: str) -> list[dict[str, Any]]:
    """Every unit directory under <root>/teachers with its manifest summary (or `complete: False`)."""
    base = storage.join(root, "teachers")
    if not fs.exists(base):
        return []
    refs = {}
    refs_dir = storage.join(root, "refs")
    if fs.exists(refs_dir):
        for path in fs.ls(refs_dir, detail=False):
            if path.endswith(".json"):
                ref = storage.read_json(fs, path)
                refs[ref["teacher"]] = ref
    out = []
    for teacher_dir in sorted(fs.ls(base, detail=False)):
        teacher = teacher_dir.rstrip("/").rsplit("/", 1)[-1]
        for digest_dir in sorted(fs.ls(teacher_dir, detail=False)):
            digest = digest_dir.rstrip("/").rsplit("/", 1)[-1]
            for unit_dir_path in sorted(fs.ls(digest_dir, detail=False)):
                name = unit_dir_path.rstrip("/").rsplit("/", 1)[-1]
                fingerprint, _, label_hash = name.rpartition("-")
                entry: dict[str, Any] = {"teacher": teacher, "digest": digest, "fingerprint": fingerprint,
                                         "label_hash": label_hash, "directory": fs.unstrip_protocol(unit_dir_path)}
                ref = refs.get(teacher)
                entry["latest"] = bool(ref and ref["digest"] == digest and ref["fingerprint"] == fingerprint
                                       and ref["label_hash"] == label_hash)
                manifest_path = storage.join(unit_dir_path, MANIFEST)
                if fs.exists(manifest_path):
                    m = storage.read_json(fs, manifest_path)
                    entry.update(complete=True, rows=m["rows"], units=len(m["units"]),
                                 references=sorted({u["dir"] for u in m["units"]} - {name}),
                                 bytes=sum(u["bytes"] for u in m["units"]), created_at=m["created_at"],
                                 labels={k: m["labels"][k] for k in ("mode", "temperature", "dtype", "format", "k")
                                         if k in m["labels"]},
                                 quality=m["quality"], dataset=m["dataset"]["uri"])
                else:
                    entry.update(complete=False, created_at=_newest_mtime(fs, unit_dir_path))
                out.append(entry)
    return out


def _newest_mtime(fs, path: str) -> float:
    newest = 0.0
    for info in fs.find(path, detail=True).values():
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        newest = max(newest, float(mtime))
    return newest


def verify_cache(fs, directory: str) -> list[str]:
    """Re-read every unit named by the manifest in `directory`: checksum, row count, key digest,
    finite values and probability sums. Returns the faults found (empty: the cache is sound)."""
    try:
        manifest = read_manifest(fs, directory)
    except ValueError as e:
        return [str(e)]
    if manifest is None:
        return [f"{fs.unstrip_protocol(directory)}: no {MANIFEST} (incomplete generation: rerun `kdpipe generate`)"]
    faults = []
    settings = manifest["labels"]
    temperature = settings["temperature"]
    for unit in manifest["units"]:
        path = unit_part_path(directory, unit)
        where = f"unit {unit['shard_id']} ({fs.unstrip_protocol(path)})"
        if not fs.exists(path):
            faults.append(f"{where}: part file is missing")
            continue
        data = fs.cat_file(path)
        if storage.sha256_bytes(data) != unit["sha256"]:
            faults.append(f"{where}: checksum differs from the manifest (corrupt or modified)")
            continue
        try:
            rows = codec.decode_unit(data, settings["mode"], settings["format"])
        except Exception as e:  # pyarrow and tarfile raise several types for damaged files
            faults.append(f"{where}: unreadable {settings['format']} unit ({e})")
            continue
        keys = rows["keys"]
        if len(keys) != unit["rows"]:
            faults.append(f"{where}: {len(keys)} rows, manifest says {unit['rows']}")
        if keys_digest(keys) != unit["keys_sha256"]:
            faults.append(f"{where}: sample keys differ from the committed ones")
        values = rows[softlabels.LOGITS] if settings["mode"] == "full" else rows[softlabels.TOPK_VALUES]
        if not np.isfinite(values).all():
            faults.append(f"{where}: non-finite logits")
            continue
        if settings["mode"] == "full":
            sums = softlabels.softmax(values, temperature).sum(-1)
        else:  # the stored probabilities plus the tail mass: <= 1 before clipping the tail
            p = softlabels.topk_probs(values, rows[softlabels.LOG_Z], temperature).sum(-1)
            sums = p + softlabels.tail_mass(values, rows[softlabels.LOG_Z], temperature)
        if not np.allclose(sums, 1.0, atol=1e-6 if settings["mode"] == "full" else 2e-3):
            faults.append(f"{where}: probabilities do not sum to 1 (worst {float(np.abs(sums - 1).max()):.2e})")
    return faults


def garbage(entries: list[dict[str, Any]], older_than_s: float, now: float | None = None) -> list[dict[str, Any]]:
    """The unit directories no ref points to, that no latest cache borrows units from, and
    older than `older_than_s` seconds."""
    now = time.time() if now is None else now
    borrowed = {(e["teacher"], e["digest"], ref) for e in entries if e["latest"] for ref in e.get("references", [])}

    def live(e: dict[str, Any]) -> bool:
        return e["latest"] or (e["teacher"], e["digest"], f"{e['fingerprint']}-{e['label_hash']}") in borrowed

    return [e for e in entries if not live(e) and now - float(e.get("created_at") or 0) >= older_than_s]
