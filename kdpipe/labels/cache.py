"""The label cache's layout and commit protocol: label settings and their hash, unit directories,
part files and unit records, manifests and refs. Under the cache root:

    teachers/<teacher>/<digest>/<fingerprint>-<label settings hash>/
        part-<shard id>-<sha256>.parquet|.tar   a unit's labels: immutable, named by content
        _units/<shard id>.json                  its record, written once the part is complete
        _manifest.json                          written last: the teacher's labels are complete
    refs/<teacher>.json                         the latest labels of each teacher (generate, regenerate)

A crash leaves at most a part file no record names; a rerun writes exactly the missing units.

A manifest's units carry what their records say of them (quality included), and may live in a
sibling directory (same teacher and label settings, another version of the dataset): units are
reused by reference, in the manifest, without a copy of their records.

Readers trust manifests and unit records. Finding them costs requests in proportion to the
directories, not to the shards: a directory's manifest (one read) and one listing of its
`_units/` (the records committed since), then a read only for a record the manifest lacks. It knows nothing of the config: the driver turns a config into
label settings (kdpipe.generation.planning.label_settings_for).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from kdpipe import __version__, storage
from kdpipe.errors import CacheError, CacheMissing
from kdpipe.labels import codec, softlabels

MANIFEST = "_manifest.json"
UNITS = "_units"


def label_settings(temperature: float, mode: str, dtype: str, fmt: str, num_classes: int,
                   class_names: list[str], k: int | None = None,
                   augment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes the stored labels of a given teacher on given inputs. `augment`
    ({views, seed, crop_scale, flip}, views > 0) adds the augmented views' labels."""
    settings = {"schema_version": softlabels.SCHEMA_VERSION, "temperature": float(temperature), "mode": mode,
                "dtype": dtype, "format": fmt, "num_classes": int(num_classes),
                "class_names": list(class_names)}
    if mode == "topk":
        settings["k"] = int(k)
    if augment and augment["views"] > 0:
        settings["augment"] = {"views": int(augment["views"]), "seed": int(augment["seed"]),
                               "crop_scale": [float(v) for v in augment["crop_scale"]],
                               "flip": bool(augment["flip"])}
    return settings


EXACTNESS = {
    "full": "exact: every logit is stored, so softmax(z/T') is exact (up to the dtype) at any T'",
    "topk": "exact at the generation T: the top-k probabilities and the tail mass; at another T' the "
            "ratios between stored classes stay exact and the tail is approximated by its maximum-"
            "entropy completion (softlabels.retemper_topk)",
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
    return f"part-{shard_id}{suffix}.{codec.EXTENSIONS[fmt]}"


def unit_record_path(directory: str, shard_id: str) -> str:
    return storage.join(directory, UNITS, f"{shard_id}.json")


def unit_part_path(directory: str, record: dict[str, Any]) -> str:
    """Where a unit's part file lives: a unit may be committed in a sibling directory (same
    teacher digest and label settings, another dataset version) and referenced from here."""
    parent, _, own = directory.rstrip("/").rpartition("/")
    return storage.join(parent, record.get("dir") or own, record["part"])


def committed_units(fs, directory: str, shard_ids: list[str] | set[str]) -> dict[str, dict[str, Any]]:
    """{shard_id: record} of the units of `shard_ids` committed in `directory`: those its manifest
    names (records there or referenced from a sibling), and those with a record in `_units/`
    (committed since the manifest, or before it was first written). One manifest read and one
    listing, then a read per record the manifest lacks: a rerun with nothing to do makes a few
    requests per directory, whatever the number of shards."""
    wanted = set(shard_ids)
    if not wanted:
        return {}
    manifest = read_manifest(fs, directory)
    found = {sid: rec for sid, rec in manifest_records(manifest).items() if sid in wanted} if manifest else {}
    listed = listed_units(fs, directory) & wanted
    found.update(read_units(fs, directory, sorted(listed - found.keys())))
    return found


def listed_units(fs, directory: str) -> set[str]:
    """The shard ids with a unit record in `directory`: one listing of its `_units/`."""
    path = storage.join(directory, UNITS)
    fs.invalidate_cache(path)  # another writer may have committed since this process last listed it
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {n.rstrip("/").rpartition("/")[2].removesuffix(".json") for n in names if n.endswith(".json")}


def read_units(fs, directory: str, shard_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The unit records of `shard_ids` in `directory` (each known to exist), read in parallel:
    an object store answers each in the time of a request, not of its bytes."""
    if not shard_ids:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    def one(sid: str) -> tuple[str, dict[str, Any]]:
        return sid, storage.read_json(fs, unit_record_path(directory, sid))

    with ThreadPoolExecutor(max_workers=min(16, len(shard_ids))) as pool:
        return dict(pool.map(one, shard_ids))


def manifest_records(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The unit records a manifest keeps, {shard_id: record}, each with its skipped samples and
    its `dir`; units of manifests written before they carried their quality are left out (their
    records are read instead)."""
    skipped: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest.get("skipped", []):
        skipped.setdefault(entry["shard_id"], []).append(entry)
    out = {}
    for unit in manifest.get("units", []):
        if "quality" not in unit:
            continue
        mine = skipped.get(unit["shard_id"], [])
        out[unit["shard_id"]] = {**unit, "input_uri": mine[0].get("input_uri") if mine else None,
                                 "skipped": [{k: v for k, v in e.items() if k not in ("shard_id", "input_uri")}
                                             for e in mine]}
    return out


def find_reusable_units(fs, directory: str, shard_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Committed units for `shard_ids` in sibling directories with the same label settings.

    Lists the teacher digest's directory to find siblings (a discovery step), then takes each
    sibling's committed units (committed_units: its manifest and one listing), the first sibling
    in name order that has a shard winning. Returns {shard_id: record pointing at the sibling's
    part file}."""
    remaining = set(shard_ids)
    if not remaining:
        return {}
    parent, _, own = directory.rstrip("/").rpartition("/")
    label_hash = own.rpartition("-")[2]
    siblings = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(parent, detail=False)) if fs.exists(parent) else []
    siblings = [s for s in siblings if s != own and s.endswith(f"-{label_hash}")]
    found: dict[str, dict[str, Any]] = {}
    for sibling in siblings:
        if not remaining:
            break
        for sid, record in committed_units(fs, storage.join(parent, sibling), remaining).items():
            found[sid] = {**record, "dir": record.get("dir") or sibling}
        remaining -= found.keys()
    return found


def write_unit(fs, directory: str, shard: dict[str, Any], data: bytes, fmt: str, keys: list[str],
               quality: dict[str, Any], skipped: list[dict[str, str]] = ()) -> dict[str, Any]:
    """Commit one unit: the part file (`data`, encoded by codec.encode_unit), then its record.
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
        "schema_version": softlabels.SCHEMA_VERSION,
        "kdpipe_version": __version__,
        "teacher": teacher,
        "dataset": {"uri": dataset_uri, "fingerprint": fingerprint},
        "labels": settings,
        "exactness": EXACTNESS[settings["mode"]],
        "units": [{k: u[k] for k in ("shard_id", "dir", "part", "rows", "keys_sha256", "sha256", "bytes", "quality")}
                  for u in units],
        "rows": sum(u["rows"] for u in units),
        # Samples dropped under data.on_bad_sample=skip, with the reason: never silent.
        "skipped": [{"shard_id": u["shard_id"], "input_uri": u.get("input_uri"), **s}
                    for u in units for s in u.get("skipped", [])],
        "quality": softlabels.summarize_quality([u["quality"] for u in units if u["rows"]]),
        "created_at": time.time(),
    }


def read_manifest(fs, directory: str) -> dict[str, Any] | None:
    path = storage.join(directory, MANIFEST)
    if not fs.exists(path):
        return None
    manifest = storage.read_json(fs, path)
    version = manifest.get("schema_version")
    if version != softlabels.SCHEMA_VERSION:
        raise CacheError(
            f"{path}: schema version {version!r} is not supported by kdpipe {__version__} "
            f"(reads version {softlabels.SCHEMA_VERSION}); regenerate these labels or upgrade kdpipe"
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
            raise CacheMissing(
                f"teacher {name!r} has no labels in cache {root!r} (no refs/{name}.json): "
                "run `kdpipe generate` first"
            )
        digest = ref["digest"]
    directory = unit_dir(root, name, digest, fingerprint, label_hash)
    manifest = read_manifest(fs, directory)
    if manifest is None:
        raise CacheMissing(
            f"no committed labels for {spec!r} (digest {digest}) on this dataset and label settings: "
            f"{storage.join(directory, MANIFEST)} is missing; run `kdpipe generate` with the same data and labels config"
        )
    return directory, manifest
