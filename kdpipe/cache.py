"""The soft-label cache: keys, units, manifests, refs. No Ray here.

Layout (DESIGN.md):
    <root>/teachers/<teacher>/<digest>/<dataset_fingerprint>-<label_hash>/
        part-<shard_id>.parquet     immutable, deterministic bytes
        _units/<shard_id>.json      written after its part file: the unit is committed
        _manifest.json              written last: the cache is complete
    <root>/refs/<teacher>.json      the teacher's "latest" pointer

Readers trust unit records and manifests, never a directory listing: a part file without its
record (a crash mid-write) is invisible and is simply rewritten by the next run.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from kdpipe import __version__, labels, storage

MANIFEST = "_manifest.json"


def label_settings(temperature: float, mode: str, dtype: str, fmt: str, num_classes: int,
                   class_names: list[str], k: int | None = None,
                   augment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes the stored labels of a given teacher on given inputs. `augment`
    ({views, seed, crop_scale, flip}, views > 0) adds the augmented views' labels."""
    settings = {"schema_version": labels.SCHEMA_VERSION, "temperature": float(temperature), "mode": mode,
                "dtype": dtype, "format": fmt, "num_classes": int(num_classes),
                "class_names": list(class_names)}
    if mode == "topk":
        settings["k"] = int(k)
    if augment and augment["views"] > 0:
        settings["augment"] = {"views": int(augment["views"]), "seed": int(augment["seed"]),
                               "crop_scale": [float(v) for v in augment["crop_scale"]],
                               "flip": bool(augment["flip"])}
    return settings


def settings_from_config(cfg, teacher: str) -> dict[str, Any]:
    """label_settings() of `teacher` in a kdpipe Config (class names default to "0".."C-1")."""
    from kdpipe.config import labels_for

    lab, data = labels_for(cfg, teacher), cfg.data
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    augment = {"views": lab.views, "seed": lab.view_seed, "crop_scale": lab.crop_scale, "flip": lab.flip}
    return label_settings(lab.temperature, lab.mode, lab.dtype, lab.format, data.num_classes, names, lab.k, augment)


EXACTNESS = {
    "full": "exact: every logit is stored, so softmax(z/T') is exact (up to the dtype) at any T'",
    "topk": "exact at the generation T: the top-k probabilities and the tail mass; at another T' the "
            "ratios between stored classes stay exact and the tail is approximated by its maximum-"
            "entropy completion (labels.retemper_topk)",
}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def keys_digest(keys: list[str] | np.ndarray) -> str:
    """Order-independent digest of a set of sample keys."""
    return hashlib.sha256("\n".join(sorted(map(str, keys))).encode()).hexdigest()


def unit_dir(root: str, teacher: str, digest: str, fingerprint: str, label_hash: str) -> str:
    return storage.join(root, "teachers", teacher, digest, f"{fingerprint}-{label_hash}")


def part_name(shard_id: str, fmt: str = "parquet", sha256: str = "") -> str:
    """part-<shard id>-<first 12 hex of the content's sha256>.<ext>: the same labels give the same
    name, and two writers racing on one unit with different bytes (float kernels are not
    bit-stable across batch sizes) write different files, so whichever record lands last names
    a complete part of its own and nothing is ever half one writer's, half the other's."""
    suffix = f"-{sha256[:12]}" if sha256 else ""
    return f"part-{shard_id}{suffix}.{labels.EXTENSIONS[fmt]}"


def unit_record_path(directory: str, shard_id: str) -> str:
    return storage.join(directory, "_units", f"{shard_id}.json")


def unit_part_path(directory: str, record: dict[str, Any]) -> str:
    """Where a unit's part file lives: a unit may be committed in a sibling directory (same
    teacher digest and label settings, another dataset version) and referenced from here."""
    parent, _, own = directory.rstrip("/").rpartition("/")
    return storage.join(parent, record.get("dir") or own, record["part"])


def find_reusable_units(fs, directory: str, shard_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Committed units for `shard_ids` in sibling directories with the same label settings.

    Lists the teacher digest's directory to find siblings (a discovery step), then trusts only
    their unit records. Returns {shard_id: record pointing at the sibling's part file}."""
    if not shard_ids:
        return {}
    parent, _, own = directory.rstrip("/").rpartition("/")
    label_hash = own.rpartition("-")[2]
    siblings = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(parent, detail=False)) if fs.exists(parent) else []
    siblings = [s for s in siblings if s != own and s.endswith(f"-{label_hash}")]
    found: dict[str, dict[str, Any]] = {}
    for sid in shard_ids:
        for sibling in siblings:
            record = read_unit(fs, storage.join(parent, sibling), sid)
            if record is not None:
                found[sid] = {**record, "dir": record.get("dir") or sibling}
                break
    return found


def read_unit(fs, directory: str, shard_id: str) -> dict[str, Any] | None:
    path = unit_record_path(directory, shard_id)
    return storage.read_json(fs, path) if fs.exists(path) else None


def write_unit(fs, directory: str, shard: dict[str, Any], data: bytes, fmt: str, keys: list[str],
               quality: dict[str, Any], skipped: list[dict[str, str]] = ()) -> dict[str, Any]:
    """Commit one unit: the part file (`data`, encoded by labels.encode_unit), then its record.
    `skipped`: the input samples dropped under on_bad_sample=skip, [{"key", "reason"}]."""
    digest = storage.sha256_bytes(data)
    name = part_name(shard["shard_id"], fmt, digest)
    storage.write_bytes(fs, storage.join(directory, name), data)
    record = {
        "shard_id": shard["shard_id"],
        "input_uri": shard["uri"],
        "input_token": shard["token"],
        "part": name,
        "dir": directory.rstrip("/").rpartition("/")[2],
        "rows": len(keys),
        "keys_sha256": keys_digest(keys),
        "sha256": digest,
        "bytes": len(data),
        "quality": quality,
        "skipped": list(skipped),
        "committed_at": time.time(),
    }
    storage.write_json(fs, unit_record_path(directory, shard["shard_id"]), record)
    return record


def build_manifest(teacher: dict[str, Any], fingerprint: str, dataset_uri: str,
                   settings: dict[str, Any], units: list[dict[str, Any]]) -> dict[str, Any]:
    units = sorted(units, key=lambda u: u["shard_id"])
    return {
        "schema_version": labels.SCHEMA_VERSION,
        "kdpipe_version": __version__,
        "teacher": teacher,
        "dataset": {"uri": dataset_uri, "fingerprint": fingerprint},
        "labels": settings,
        "exactness": EXACTNESS[settings["mode"]],
        "units": [{k: u[k] for k in ("shard_id", "dir", "part", "rows", "keys_sha256", "sha256", "bytes")}
                  for u in units],
        "rows": sum(u["rows"] for u in units),
        # Samples dropped under data.on_bad_sample=skip, with the reason: never silent.
        "skipped": [{"shard_id": u["shard_id"], "input_uri": u.get("input_uri"), **s}
                    for u in units for s in u.get("skipped", [])],
        "quality": labels.summarize_quality([u["quality"] for u in units if u["rows"]]),
        "created_at": time.time(),
    }


def read_manifest(fs, directory: str) -> dict[str, Any] | None:
    path = storage.join(directory, MANIFEST)
    if not fs.exists(path):
        return None
    manifest = storage.read_json(fs, path)
    version = manifest.get("schema_version")
    if version != labels.SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {version!r} is not supported by kdpipe {__version__} "
            f"(reads version {labels.SCHEMA_VERSION}); regenerate these labels or upgrade kdpipe"
        )
    return manifest


def write_ref(fs, root: str, teacher: str, ref: dict[str, Any]) -> None:
    storage.write_json(fs, storage.join(root, "refs", f"{teacher}.json"), ref)


def read_ref(fs, root: str, teacher: str) -> dict[str, Any] | None:
    path = storage.join(root, "refs", f"{teacher}.json")
    return storage.read_json(fs, path) if fs.exists(path) else None


def resolve_manifest(fs, root: str, spec: str, fingerprint: str, label_hash: str) -> tuple[str, dict[str, Any]]:
    """Find the committed labels for `teacher` (its latest ref) or `teacher@digest` (pinned)
    on the dataset `fingerprint`. Returns (unit directory, manifest); errors say what to run."""
    name, _, digest = spec.partition("@")
    if not digest:
        ref = read_ref(fs, root, name)
        if ref is None:
            raise FileNotFoundError(
                f"teacher {name!r} has no labels in cache {root!r} (no refs/{name}.json): "
                "run `kdpipe generate` first"
            )
        digest = ref["digest"]
    directory = unit_dir(root, name, digest, fingerprint, label_hash)
    manifest = read_manifest(fs, directory)
    if manifest is None:
        raise FileNotFoundError(
            f"no committed labels for {spec!r} (digest {digest}) on this dataset and label settings: "
            f"{storage.join(directory, MANIFEST)} is missing; run `kdpipe generate` with the same data and labels config"
        )
    return directory, manifest


# --- Inventory: listing, verification, garbage collection (`kdpipe cache ...`) -------------------
# These are the only functions that list directories: an inventory must find what no ref names.


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
            rows = labels.decode_unit(data, settings["mode"], settings["format"])
        except Exception as e:  # pyarrow and tarfile raise several types for damaged files
            faults.append(f"{where}: unreadable {settings['format']} unit ({e})")
            continue
        keys = rows["keys"]
        if len(keys) != unit["rows"]:
            faults.append(f"{where}: {len(keys)} rows, manifest says {unit['rows']}")
        if keys_digest(keys) != unit["keys_sha256"]:
            faults.append(f"{where}: sample keys differ from the committed ones")
        values = rows[labels.LOGITS] if settings["mode"] == "full" else rows[labels.TOPK_VALUES]
        if not np.isfinite(values).all():
            faults.append(f"{where}: non-finite logits")
            continue
        if settings["mode"] == "full":
            sums = labels.softmax(values, temperature).sum(-1)
        else:  # the stored probabilities plus the tail mass: <= 1 before clipping the tail
            p = labels.topk_probs(values, rows[labels.LOG_Z], temperature).sum(-1)
            sums = p + labels.tail_mass(values, rows[labels.LOG_Z], temperature)
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
