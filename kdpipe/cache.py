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
                   class_names: list[str]) -> dict[str, Any]:
    """Everything that changes the stored labels of a given teacher on given inputs."""
    return {"schema_version": labels.SCHEMA_VERSION, "temperature": float(temperature), "mode": mode,
            "dtype": dtype, "format": fmt, "num_classes": int(num_classes),
            "class_names": list(class_names)}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def keys_digest(keys: list[str] | np.ndarray) -> str:
    """Order-independent digest of a set of sample keys."""
    return hashlib.sha256("\n".join(sorted(map(str, keys))).encode()).hexdigest()


def unit_dir(root: str, teacher: str, digest: str, fingerprint: str, label_hash: str) -> str:
    return storage.join(root, "teachers", teacher, digest, f"{fingerprint}-{label_hash}")


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def unit_record_path(directory: str, shard_id: str) -> str:
    return storage.join(directory, "_units", f"{shard_id}.json")


def read_unit(fs, directory: str, shard_id: str) -> dict[str, Any] | None:
    path = unit_record_path(directory, shard_id)
    return storage.read_json(fs, path) if fs.exists(path) else None


def write_unit(fs, directory: str, shard: dict[str, Any], table, row_group_size: int,
               quality: dict[str, Any]) -> dict[str, Any]:
    """Commit one unit: the part file, then its record. Returns the record."""
    data = labels.parquet_bytes(table, row_group_size)
    name = part_name(shard["shard_id"])
    storage.write_bytes(fs, storage.join(directory, name), data)
    record = {
        "shard_id": shard["shard_id"],
        "input_uri": shard["uri"],
        "input_token": shard["token"],
        "part": name,
        "rows": table.num_rows,
        "keys_sha256": keys_digest(table.column(labels.KEY).to_pylist()),
        "sha256": storage.sha256_bytes(data),
        "bytes": len(data),
        "quality": quality,
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
        "units": [{k: u[k] for k in ("shard_id", "part", "rows", "keys_sha256", "sha256", "bytes")}
                  for u in units],
        "rows": sum(u["rows"] for u in units),
        "quality": labels.summarize_quality([u["quality"] for u in units]),
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
