"""Input datasets: input shards, stable sample keys, fingerprints, and the built-in digits.

An input dataset is a directory of Parquet shards with a key column (the stable `sample_key`),
an image column (a fixed-size list of uint8 pixels, reshaped to `image_shape`) and an optional
label column. Each shard is a unit of incremental work, identified by its path and version
(size plus ETag or mtime), never by row order.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import cache, labels, storage

DATASET_RECORD = "_dataset.json"


@dataclass(frozen=True)
class InputShard:
    """One file of an input dataset. `path` is within the dataset's filesystem."""

    shard_id: str  # stable, file-name safe: <stem>-<8 hex of path and version>
    uri: str  # full URI, protocol included
    num_rows: int
    token: dict[str, Any]  # size + etag/mtime: what fingerprints this file's version


def _safe_stem(relpath: str) -> str:
    stem = relpath.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:80] or "shard"


def make_shard_id(relpath: str, token: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([relpath, token], sort_keys=True).encode()).hexdigest()[:8]
    return f"{_safe_stem(relpath)}-{digest}"


def list_shards(uri: str, storage_options: dict[str, Any] | None = None) -> list[InputShard]:
    """The Parquet input shards under `uri`, sorted by path; errors name the URI when empty."""
    fs, root = storage.filesystem(uri, storage_options)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(f"input dataset {uri!r} does not exist: check data.train / data.holdout")
        paths = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    except PermissionError as e:
        raise storage.access_denied(uri, e) from None
    if not paths:
        raise ValueError(f"input dataset {uri!r} holds no .parquet shards")
    shards = []
    for path in paths:
        token = storage.stat_token(fs, path)
        relpath = path[len(root.rstrip("/")) + 1 :]
        try:
            with fs.open(path, "rb") as f:
                num_rows = pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"input shard {fs.unstrip_protocol(path)!r} is not a readable Parquet file: {e}") from e
        if num_rows == 0:
            raise ValueError(f"input shard {fs.unstrip_protocol(path)!r} is empty: remove it from the dataset")
        shards.append(InputShard(make_shard_id(relpath, token), fs.unstrip_protocol(path), num_rows, token))
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids), "shard ids collide"
    return shards


def fingerprint(shards: list[InputShard], preprocessing: dict[str, Any]) -> str:
    """Dataset fingerprint: hash of the sorted shard list (ids carry path + version) and preprocessing."""
    body = json.dumps({"shards": sorted(s.shard_id for s in shards), "pre": preprocessing}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def preprocessing_spec(image_shape: list[int], scale: float) -> dict[str, Any]:
    return {"image_shape": list(image_shape), "scale": float(scale)}


def to_tensor_array(images: Any, image_shape: list[int], scale: float) -> np.ndarray:
    """Pixels (array [B, prod(shape)] or list column) -> float32 [B, *image_shape], times `scale`."""
    n = int(np.prod(image_shape))
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    if isinstance(images, pa.FixedSizeListArray):
        arr = images.flatten().to_numpy(zero_copy_only=False).reshape(len(images), images.type.list_size)
    elif isinstance(images, pa.Array):
        arr = np.asarray(images.to_pylist())
    else:
        arr = np.asarray(images)
        if arr.dtype == object:
            arr = np.stack([np.asarray(a) for a in arr])
    if arr.ndim != 2 or arr.shape[1] != n:
        raise ValueError(f"images have shape {arr.shape}; expected [batch, {n}] for image_shape {image_shape}")
    return (arr.astype(np.float32) * np.float32(scale)).reshape(len(arr), *image_shape)


def read_shard(uri: str, storage_options: dict[str, Any] | None,
               columns: list[str] | None = None) -> pa.Table:
    """Read one input shard (whole file) as an Arrow table; errors name the shard."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"input shard {uri!r} could not be read: {e}") from e
    missing = [c for c in (columns or []) if c not in table.column_names]
    if missing:
        raise ValueError(f"input shard {uri!r} has no column(s) {missing}: check the data.*_column keys")
    return table


def _digits_table(indices: np.ndarray, images: np.ndarray, targets: np.ndarray) -> pa.Table:
    flat = images.reshape(len(images), -1).astype(np.uint8)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.uint8()), flat.shape[1])
    return pa.table({
        "sample_key": pa.array([f"digits-{i:04d}" for i in indices]),
        "image": pixels,
        "label": pa.array(targets.astype(np.int64)),
    })


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(fs, path, buf.getvalue())


def ensure_digits(train_uri: str, holdout_uri: str, storage_options: dict[str, Any] | None,
                  num_shards: int, holdout_fraction: float, seed: int) -> bool:
    """Write sklearn's 8x8 digits as Parquet shards (train split in `num_shards` files) unless
    already there. Returns True when it wrote them. Pixel values are 0..16 (use scale 1/16)."""
    from sklearn.datasets import load_digits

    settings = {"name": "digits", "num_shards": num_shards, "holdout_fraction": holdout_fraction,
                "seed": seed}
    fs, train_root = storage.filesystem(train_uri, storage_options)
    _, holdout_root = storage.filesystem(holdout_uri, storage_options)
    records = [storage.join(train_root, DATASET_RECORD), storage.join(holdout_root, DATASET_RECORD)]
    if all(fs.exists(r) for r in records):
        for r in records:
            if storage.read_json(fs, r).get("settings") != settings:
                raise ValueError(
                    f"{r} was written with other settings than {settings}: "
                    "use another workdir or data path, or delete the old data"
                )
        return False
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_holdout = int(round(len(order) * holdout_fraction))
    holdout, train = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    for name, root, idx, parts in (("train", train_root, train, num_shards), ("holdout", holdout_root, holdout, 1)):
        for s, chunk in enumerate(np.array_split(idx, parts)):
            table = _digits_table(chunk, digits.images[chunk], digits.target[chunk])
            _write_parquet(fs, storage.join(root, f"{name}-{s:05d}.parquet"), table)
        storage.write_json(fs, storage.join(root, DATASET_RECORD),
                           {"settings": settings, "rows": int(len(idx)), "shards": parts})
    return True


def load_split(uri: str, storage_options: dict[str, Any] | None, key_column: str, image_column: str,
               label_column: str | None, image_shape: list[int], scale: float) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """A whole (small) split in memory: keys, x [N, *image_shape] float32, labels [N] or None.
    For teacher training and evaluation on small data; large data streams through Ray instead."""
    keys: list[str] = []
    xs, ys = [], []
    columns = [key_column, image_column] + ([label_column] if label_column else [])
    for shard in list_shards(uri, storage_options):
        table = read_shard(shard.uri, storage_options, columns)
        keys += [str(k) for k in table.column(key_column).to_pylist()]
        xs.append(to_tensor_array(table.column(image_column), image_shape, scale))
        if label_column:
            ys.append(table.column(label_column).to_numpy(zero_copy_only=False).astype(np.int64))
    return keys, np.concatenate(xs), (np.concatenate(ys) if label_column else None)


# Ray Data read functions (one input shard per call). They live here, free of torch, so read
# workers start fast.

def read_decoded_shard(batch: dict[str, np.ndarray], data: dict[str, Any]) -> dict[str, np.ndarray]:
    """One input shard per call -> rows with sample_key, shard_id, label, x [N, *image_shape]."""
    assert len(batch["uri"]) == 1, "read tasks take one input shard each"
    uri, shard_id = str(batch["uri"][0]), str(batch["shard_id"][0])
    columns = [data["key_column"], data["image_column"]] + ([data["label_column"]] if data["label_column"] else [])
    table = read_shard(uri, data["storage_options"], columns)
    keys = np.asarray(table.column(data["key_column"]).to_pylist(), dtype=object)
    n = len(keys)
    out = {
        "sample_key": keys,
        "shard_id": np.full(n, shard_id, dtype=object),
        "x": to_tensor_array(table.column(data["image_column"]), data["image_shape"], data["scale"]),
    }
    if data["label_column"]:
        out["label"] = np.asarray(table.column(data["label_column"]).to_numpy(zero_copy_only=False), dtype=np.int64)
    return out


def read_joined_shard(batch: dict[str, np.ndarray], data: dict[str, Any], units: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One input shard per call, joined by sample_key with each teacher's unit for that shard.

    Rows get x, label and either teacher_logits [N, K, C] (every teacher stored full logits) or,
    when data["topk_k"] is set, topk_ids / topk_probs [N, K, k] and topk_tail [N, K] at the
    student's temperature data["temperature"]."""
    uri, shard_id = str(batch["uri"][0]), str(batch["shard_id"][0])
    columns = [data["key_column"], data["image_column"]] + ([data["label_column"]] if data["label_column"] else [])
    table = read_shard(uri, data["storage_options"], columns)
    keys = np.asarray(table.column(data["key_column"]).to_pylist(), dtype=str)
    order = np.argsort(keys, kind="stable")  # unit files are sorted by key
    out: dict[str, np.ndarray] = {
        "x": to_tensor_array(table.column(data["image_column"]), data["image_shape"], data["scale"])[order],
    }
    if data["label_column"]:
        out["label"] = table.column(data["label_column"]).to_numpy(zero_copy_only=False).astype(np.int64)[order]
    teacher_rows = []
    for unit in units:
        record = unit["records"].get(shard_id)
        where = f"teacher {unit['teacher']!r} unit {shard_id}"
        if record is None:
            raise ValueError(f"{where}: no committed labels for input shard {uri} "
                             f"in {unit['directory']}; run `kdpipe generate` for this dataset")
        fs, directory = storage.filesystem(unit["directory"], unit["storage_options"])
        path = cache.unit_part_path(directory, record)
        payload = fs.cat_file(path)
        if storage.sha256_bytes(payload) != record["sha256"]:
            raise ValueError(f"{where}: {fs.unstrip_protocol(path)} does not match its recorded checksum "
                             "(corrupt or modified); delete the unit record and rerun `kdpipe generate`")
        try:
            rows = labels.decode_unit(payload, unit["mode"], unit["format"])
        except Exception as e:  # pyarrow and tarfile raise several types for damaged files
            raise ValueError(f"{where}: {fs.unstrip_protocol(path)} cannot be read ({e})") from e
        unit_keys = np.asarray(rows["keys"], dtype=str)
        if len(unit_keys) != len(keys) or not np.array_equal(unit_keys, keys[order]):
            diff = sorted(set(unit_keys.tolist()) ^ set(keys.tolist()))[:3]
            raise ValueError(f"{where}: sample keys differ from input shard {uri} "
                             f"({len(unit_keys)} vs {len(keys)} rows; e.g. {diff}); regenerate the labels")
        teacher_rows.append((unit, rows))
    if teacher_rows and data.get("topk_k"):
        bins = [labels.student_targets(rows, unit["mode"], data["topk_k"], unit["temperature"],
                                       data["temperature"], data["num_classes"]) for unit, rows in teacher_rows]
        out["topk_ids"], out["topk_probs"], out["topk_tail"] = (np.stack(a, axis=1) for a in zip(*bins, strict=True))
    elif teacher_rows:
        out["teacher_logits"] = np.stack([rows[labels.LOGITS] for _, rows in teacher_rows], axis=1)  # [N, K, C]
    return out
