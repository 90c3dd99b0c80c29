"""Input datasets: the three formats on any fsspec URI, input shards, sample keys, fingerprints,
decoding with the bad-sample policy, and the built-in digits.

Formats (`data.format`):
  parquet      *.parquet files; a key column, an image column holding encoded image bytes (or
               Hugging Face's {bytes, path} struct, or a list of uint8 pixels shaped
               data.pixel_shape) and an optional label column.
  webdataset   *.tar files; samples grouped by `__key__` (the member name up to its first dot),
               an image member (jpg, png, ...) and a `cls` member.
  imagefolder  <root>/<class>/.../<file>.png|jpg: the key is the file's path under the root,
               the label the class folder's position in data.class_names (sorted by default).

An input shard (one file; for imagefolder, up to data.files_per_shard files of one class folder)
is the unit of incremental work, identified by its path and version (size plus ETag or mtime),
never by row order. A sample that cannot be used stops the job with an error naming the shard
and the key, or with data.on_bad_sample=skip is dropped and reported (listed in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import cache, images, labels, storage

WDS_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class InputShard:
    """One unit of input. `uri` names it in messages and records."""

    shard_id: str  # stable, file-name safe: <stem>-<8 hex of path and version>
    uri: str  # full URI, protocol included (imagefolder: the class folder)
    num_rows: int | None  # None until read (tar files are not indexed)
    token: dict[str, Any]  # size + etag/mtime: what fingerprints this shard's version
    root: str = ""  # imagefolder: the dataset root URI
    members: tuple[str, ...] = field(default=())  # imagefolder: the files, relative to `root`


def _safe_stem(relpath: str) -> str:
    stem = next((relpath[: -len(ext)] for ext in (".parquet", *WDS_EXTENSIONS) if relpath.endswith(ext)), relpath)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:80] or "shard"


def make_shard_id(relpath: str, token: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([relpath, token], sort_keys=True).encode()).hexdigest()[:8]
    return f"{_safe_stem(relpath)}-{digest}"


def source_spec(data, check_holdout: bool = True) -> dict[str, Any]:
    """The plain-dict description of how to read the inputs (it travels to Ray tasks).

    `data` is a config.DataConfig. For imagefolder without data.class_names, the class list is
    the train split's folders, and the held-out split must have the same ones."""
    spec = {"format": data.format, "storage_options": dict(data.storage_options),
            "key_column": data.key_column, "image_column": data.image_column,
            "label_column": data.label_column, "pixel_shape": list(data.pixel_shape or data.image_shape),
            "class_names": list(data.class_names), "num_classes": int(data.num_classes),
            "on_bad_sample": data.on_bad_sample, "files_per_shard": int(data.files_per_shard)}
    if data.format == "imagefolder":
        found = class_folders(data.train, data.storage_options)
        if check_holdout and data.holdout:
            held = class_folders(data.holdout, data.storage_options)
            if held != found:
                raise ValueError(
                    f"class folders differ between data.train ({data.train}) and data.holdout ({data.holdout}): "
                    f"only in train {sorted(set(found) - set(held))}, only in held-out {sorted(set(held) - set(found))}; "
                    "labels would mean different classes: make the folders match or set data.class_names")
        names = spec["class_names"] or found
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ValueError(f"class folders {unknown[:5]} in {data.train} are not in data.class_names")
        if len(names) != data.num_classes:
            raise ValueError(f"{data.train} has {len(names)} class folders {names[:5]}..., "
                             f"data.num_classes is {data.num_classes}: set data.num_classes={len(names)}")
        spec["class_names"] = names
    return spec


def fingerprint(shards: list[InputShard], source: dict[str, Any]) -> str:
    """Dataset fingerprint: the sorted shard list (ids carry path + version) and what decides
    which samples, keys and labels come out of them."""
    what = {k: source[k] for k in ("format", "key_column", "image_column", "label_column")}
    if source["format"] == "parquet":
        what["pixel_shape"] = source["pixel_shape"]
    if source["format"] == "imagefolder":  # the folder order is the label; elsewhere names are display only
        what["class_names"] = source["class_names"]
    body = json.dumps({"shards": sorted(s.shard_id for s in shards), "source": what}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _listing(uri: str, storage_options: dict[str, Any]) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    fs, root = storage.filesystem(uri, storage_options)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(f"input dataset {uri!r} does not exist: check data.train / data.holdout")
        found = fs.find(root, detail=True)
    except PermissionError as e:
        raise storage.access_denied(uri, e) from None
    root = root.rstrip("/")
    files = {p: info for p, info in found.items()
             if info.get("type", "file") != "directory" and not posixpath.basename(p).startswith((".", "_"))}
    return fs, root, files


def class_folders(uri: str, storage_options: dict[str, Any]) -> list[str]:
    """The sorted class folder names of an ImageFolder tree (folders holding at least one image)."""
    _, root, files = _listing(uri, storage_options)
    classes = set()
    for path in files:
        rel = path[len(root) + 1:]
        if _is_image(rel):
            if "/" not in rel:
                raise ValueError(f"image {uri.rstrip('/')}/{rel} is not inside a class folder: ImageFolder "
                                 "datasets keep each class's images under <root>/<class>/")
            classes.add(rel.split("/", 1)[0])
    if not classes:
        raise ValueError(f"input dataset {uri!r} holds no images in class folders (<root>/<class>/x.png)")
    return sorted(classes)


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in images.IMAGE_EXTENSIONS


def list_shards(uri: str, source: dict[str, Any]) -> list[InputShard]:
    """The input shards under `uri`, sorted by path; errors name the URI."""
    fmt = source["format"]
    fs, root, files = _listing(uri, source["storage_options"])
    shards: list[InputShard] = []
    if fmt == "imagefolder":
        by_class: dict[str, list[str]] = {}
        for path in sorted(files):
            rel = path[len(root) + 1:]
            if _is_image(rel) and "/" in rel:
                by_class.setdefault(rel.split("/", 1)[0], []).append(path)
        for cls, paths in sorted(by_class.items()):
            step = source["files_per_shard"]
            for c, start in enumerate(range(0, len(paths), step)):
                chunk = paths[start:start + step]
                rels = tuple(p[len(root) + 1:] for p in chunk)
                body = json.dumps([[r, storage.token_from_info(files[p])] for r, p in zip(rels, chunk, strict=True)])
                token = {"files": len(chunk), "sha256": hashlib.sha256(body.encode()).hexdigest()}
                shards.append(InputShard(make_shard_id(f"{cls}/{c:05d}", token), fs.unstrip_protocol(f"{root}/{cls}"),
                                         len(chunk), token, fs.unstrip_protocol(root), rels))
    else:
        suffixes = (".parquet",) if fmt == "parquet" else WDS_EXTENSIONS
        for path in sorted(p for p in files if p.endswith(suffixes)):
            token = storage.token_from_info(files[path])
            num_rows = _parquet_rows(fs, path) if fmt == "parquet" else None
            if num_rows == 0 and source["on_bad_sample"] != "skip":
                raise ValueError(f"input shard {fs.unstrip_protocol(path)!r} is empty: remove it from the dataset "
                                 "(or set data.on_bad_sample: skip to record it and go on)")
            relpath = path[len(root) + 1:]
            shards.append(InputShard(make_shard_id(relpath, token), fs.unstrip_protocol(path), num_rows, token))
    if not shards:
        what = {"parquet": ".parquet files", "webdataset": ".tar files", "imagefolder": "images"}[fmt]
        raise ValueError(f"input dataset {uri!r} holds no {what} (data.format={fmt})")
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids), "shard ids collide"
    return shards


def _parquet_rows(fs, path: str) -> int:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except PermissionError as e:
        raise storage.access_denied(fs.unstrip_protocol(path), e) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"input shard {fs.unstrip_protocol(path)!r} is not a readable Parquet file ({e}): "
                         "re-create or remove it") from e


# --- Reading one shard --------------------------------------------------------------------------


@dataclass
class Samples:
    """The usable samples of one input shard, in the shard's order."""

    keys: list[str]
    images: list[np.ndarray] | np.ndarray  # uint8 [H, W, C] each, or one [N, H, W, C] array
    labels: np.ndarray | None  # int64 [N]; None for label-free data
    skipped: list[dict[str, str]]  # [{"key", "reason"}] dropped under on_bad_sample=skip


class _Collector:
    """Applies the bad-sample policy while a shard is read."""

    def __init__(self, shard: InputShard, source: dict[str, Any]) -> None:
        self.shard, self.source = shard, source
        self.keys: list[str] = []
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.skipped: list[dict[str, str]] = []

    def bad(self, key: str, reason: str) -> None:
        if self.source["on_bad_sample"] == "skip":
            self.skipped.append({"key": key, "reason": reason})
            return
        raise ValueError(f"input shard {self.shard.uri}: sample {key!r}: {reason}; fix or remove it, "
                         "or set data.on_bad_sample: skip to drop such samples (they are listed in the manifest)")

    def label(self, key: str, value: Any) -> int | None:
        if value is None:
            self.bad(key, "the label is missing")
            return None
        try:
            y = int(value)
        except (TypeError, ValueError):
            self.bad(key, f"label {value!r} is not a class index")
            return None
        if not 0 <= y < self.source["num_classes"]:
            self.bad(key, f"label {y} is outside [0, data.num_classes={self.source['num_classes']})")
            return None
        return y

    def add(self, key: str, encoded: bytes | None, label: Any, labelled: bool) -> None:
        y = self.label(key, label) if labelled else 0
        if y is None:
            return
        if encoded is None:
            self.bad(key, "the image is missing")
            return
        try:
            img = images.decode(encoded)
        except images.DecodeError as e:
            self.bad(key, str(e))
            return
        self.keys.append(key)
        self.images.append(img)
        self.labels.append(y)

    def samples(self, labelled: bool) -> Samples:
        _check_unique(self.keys, self.shard)
        return Samples(self.keys, self.images, np.asarray(self.labels, np.int64) if labelled else None, self.skipped)


def _check_unique(keys: list[str], shard: InputShard) -> None:
    if len(set(keys)) != len(keys):
        seen, dup = set(), None
        for k in keys:
            if k in seen:
                dup = k
                break
            seen.add(k)
        raise ValueError(f"input shard {shard.uri}: sample key {dup!r} appears more than once; keys must be unique")


def read_samples(shard: InputShard, source: dict[str, Any]) -> Samples:
    """Read and decode one input shard; bad samples raise or are skipped per the source's policy."""
    try:
        reader = {"parquet": _read_parquet, "webdataset": _read_tar, "imagefolder": _read_folder}[source["format"]]
        samples = reader(shard, source)
    except PermissionError as e:
        raise storage.access_denied(shard.uri, e) from None
    if not samples.keys and not samples.skipped:
        samples.skipped.append({"key": "", "reason": "empty shard"})
        if source["on_bad_sample"] != "skip":
            raise ValueError(f"input shard {shard.uri!r} is empty: remove it from the dataset "
                             "(or set data.on_bad_sample: skip to record it and go on)")
    return samples


def _read_parquet(shard: InputShard, source: dict[str, Any]) -> Samples:
    key_col, image_col, label_col = source["key_column"], source["image_column"], source["label_column"]
    fs, path = storage.filesystem(shard.uri, source["storage_options"])
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, PermissionError):
            raise
        raise ValueError(f"input shard {shard.uri!r} is not a readable Parquet file ({e}): re-create or remove it") from e
    for col, key in ((key_col, "data.key_column"), (image_col, "data.image_column"), (label_col, "data.label_column")):
        if col is not None and col not in table.column_names:
            hint = " (set data.label_column: null for label-free data)" if key == "data.label_column" else ""
            raise ValueError(f"input shard {shard.uri!r} has no column {col!r} ({key}); its columns are "
                             f"{table.column_names}{hint}")
    keys = table.column(key_col).to_pylist()
    if any(k is None for k in keys):
        raise ValueError(f"input shard {shard.uri!r}: column {key_col!r} has null keys; every sample needs a key")
    keys = [str(k) for k in keys]
    ys = table.column(label_col).to_pylist() if label_col else [None] * len(keys)
    column = table.column(image_col).combine_chunks()
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        return _pixel_samples(shard, source, keys, ys, column)
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        column = column.field("bytes")
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"input shard {shard.uri!r}: column {image_col!r} has type {kind}; use encoded image bytes, "
                         "a {bytes, path} struct, or a list of uint8 pixels")
    out = _Collector(shard, source)
    for key, data, y in zip(keys, column.to_pylist(), ys, strict=True):
        out.add(key, data, y, label_col is not None)
    return out.samples(label_col is not None)


def _pixel_samples(shard: InputShard, source: dict[str, Any], keys: list[str], ys: list[Any],
                   column: pa.Array) -> Samples:
    """Pixel lists (like the built-in digits) -> one vectorised [N, H, W, C] uint8 array."""
    c, h, w = source["pixel_shape"]
    n = c * h * w
    labelled = source["label_column"] is not None
    out = _Collector(shard, source)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(column.type):
        size = column.type.list_size
        lengths = np.full(len(column), size)
        starts = (np.arange(len(column)) + column.offset) * size
    else:
        offsets = column.offsets.to_numpy(zero_copy_only=False)
        starts, lengths = offsets[:-1], np.diff(offsets)
    good, good_y = [], []
    for i, (key, y) in enumerate(zip(keys, ys, strict=True)):
        if not valid[i]:
            out.bad(key, "the image is missing")
        elif lengths[i] != n:
            out.bad(key, f"the image has {lengths[i]} pixels; data.pixel_shape {[c, h, w]} needs {n}")
        else:
            y = out.label(key, y) if labelled else 0
            if y is not None:
                good.append(i)
                good_y.append(y)
    values = column.values.to_numpy(zero_copy_only=False)
    idx = np.asarray(good, dtype=np.int64)
    pixels = values[starts[idx][:, None] + np.arange(n)[None, :]] if len(idx) else np.zeros((0, n), np.uint8)
    if pixels.dtype.kind not in "iu" or (pixels.size and (pixels.min() < 0 or pixels.max() > 255)):
        raise ValueError(f"input shard {shard.uri!r}: pixel values must be integers in 0..255 (uint8); "
                         "store uint8 pixels or encoded image bytes")
    keys = [keys[i] for i in good]
    _check_unique(keys, shard)
    arr = pixels.astype(np.uint8).reshape(len(idx), c, h, w).transpose(0, 2, 3, 1)
    return Samples(keys, arr, np.asarray(good_y, np.int64) if labelled else None, out.skipped)


def _read_tar(shard: InputShard, source: dict[str, Any]) -> Samples:
    """A WebDataset tar, streamed member by member (never listed or extracted to disk)."""
    fs, path = storage.filesystem(shard.uri, source["storage_options"])
    labelled = source["label_column"] is not None
    out = _Collector(shard, source)
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> None:
        if current is None:
            return
        if current in seen:
            raise ValueError(f"input shard {shard.uri}: sample key {current!r} appears more than once "
                             "(its members are not contiguous, or the key repeats); keys must be unique")
        seen.add(current)
        image = next((members[e] for e in images.IMAGE_EXTENSIONS if e in members), None)
        label = members.get("cls")
        if labelled and label is not None:
            label = label.decode("utf-8", "replace").strip()
        out.add(current, image, label, labelled)

    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                key = posixpath.join(dirname, stem) if dirname else stem
                if key != current:
                    flush()
                    current, members = key, {}
                members[ext.lower()] = tar.extractfile(member).read()
            # tarfile ends quietly at a cut between members; a whole archive ends with zero blocks.
            size = shard.token.get("size")
            if shard.uri.endswith(".tar") and size is not None and size - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker: the file ends at byte {size}")
            flush()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if isinstance(e, PermissionError):
            raise
        raise ValueError(f"input shard {shard.uri!r} is a truncated or corrupt tar file after {len(seen)} samples "
                         f"({type(e).__name__}: {e}): re-create it") from e
    return out.samples(labelled)


def _read_folder(shard: InputShard, source: dict[str, Any]) -> Samples:
    """Up to files_per_shard files of one class folder, fetched concurrently (fs.cat on a list)."""
    fs, root = storage.filesystem(shard.root, source["storage_options"])
    paths = [f"{root.rstrip('/')}/{rel}" for rel in shard.members]
    fetched = fs.cat(paths, on_error="return")
    class_index = {name: i for i, name in enumerate(source["class_names"])}
    labelled = source["label_column"] is not None
    out = _Collector(shard, source)
    for rel, path in zip(shard.members, paths, strict=True):
        data = fetched.get(path) if isinstance(fetched, dict) else fetched
        if isinstance(data, PermissionError):
            raise data
        if isinstance(data, FileNotFoundError) or data is None:
            raise ValueError(f"input shard {shard.uri}: file {rel!r} was listed but is gone; rerun to list the dataset again")
        if isinstance(data, Exception):
            raise ValueError(f"input shard {shard.uri}: file {rel!r} could not be read ({data})") from data
        out.add(rel, data, class_index.get(rel.split("/", 1)[0]), labelled)
    return out.samples(labelled)


def load_split(uri: str, source: dict[str, Any], preprocess: images.Preprocess, max_rows: int | None = None,
               ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """A whole (small) split in memory: keys, x [N, *image_shape] float32 (preprocessed), labels [N]
    or None; with max_rows, the shards' first rows up to that many. For teacher training and
    evaluation on small data; large data streams through Ray."""
    keys: list[str] = []
    xs, ys = [], []
    for shard in list_shards(uri, source):
        if max_rows is not None and len(keys) >= max_rows:
            break
        s = read_samples(shard, source)
        keys += s.keys
        xs.append(preprocess.normalise(apply_view(s, preprocess.geometry(), shard)))
        if s.labels is not None:
            ys.append(s.labels)
    return keys, np.concatenate(xs), (np.concatenate(ys) if ys else None)


def apply_view(samples: Samples, geometry: dict[str, Any], shard: InputShard) -> np.ndarray:
    """images.apply_geometry with errors that name the shard."""
    try:
        return images.apply_geometry(samples.images, geometry)
    except ValueError as e:
        raise ValueError(f"input shard {shard.uri}: {e}") from e


# Ray Data read functions (one input shard per call). They live here, free of torch, so read
# workers start fast.

PLACEHOLDER = "placeholder"  # a row standing for a shard with no usable samples (never labelled)


def view_key(key: str, view: int) -> str:
    """The label row key of augmented view `view` of sample `key` (keys stay unique in a unit:
    a clash with a real key fails the unit's duplicate-key check)."""
    return f"{key}#{view}"


def sample_params(keys: list[str], augment: dict[str, Any]) -> np.ndarray:
    """float32 [N, V, 5]: every sample's augmented views (images.augment_params)."""
    views = int(augment["views"])
    if not keys:
        return np.zeros((0, views, 5), np.float32)
    return np.stack([images.augment_params(k, views, augment["seed"], augment["crop_scale"], augment["flip"])
                     for k in keys])


def read_views(batch: dict[str, np.ndarray], source: dict[str, Any], shards: dict[str, InputShard],
               views: dict[str, dict[str, Any]], augment: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Generation's read step: one input shard -> rows with sample_key, shard_id, shard_rows,
    skipped (the shard's skip list as JSON on its first row), placeholder, label (when labelled)
    and one uint8 [N, C, H, W] column per distinct teacher geometry (`views`), all cut from a
    single decode of each image. A shard with no usable samples gives one placeholder row so the
    driver still learns that it is done.

    With `augment` ({views: V, seed, crop_scale, flip}), every sample also gives V rows keyed
    `view_key(key, v)` holding its augmented views, and every row an "aug" column [5] with its
    view params (zeros on the plain rows)."""
    assert len(batch["shard_id"]) == 1, "read tasks take one input shard each"
    shard = shards[str(batch["shard_id"][0])]
    s = read_samples(shard, source)
    n = len(s.keys)
    keys = list(s.keys)
    cut = {name: apply_view(s, geometry, shard) for name, geometry in views.items()}
    labels_ = s.labels
    if augment:
        v = int(augment["views"])
        params = sample_params(keys, augment)  # [N, V, 5]
        for name, geometry in views.items():
            extra = images.augmented(s.images, params, geometry)  # [N, V, C, H, W]
            cut[name] = np.concatenate([cut[name], extra.reshape(n * v, *extra.shape[2:])])
        aug = np.concatenate([np.zeros((n, 5), np.float32), params.reshape(n * v, 5)])
        keys = keys + [view_key(k, j) for k in s.keys for j in range(v)]
        labels_ = None if s.labels is None else np.concatenate([s.labels, np.repeat(s.labels, v)])
        n = len(keys)
    out: dict[str, np.ndarray] = {
        "sample_key": np.asarray(keys, dtype=object),
        "shard_id": np.full(n, shard.shard_id, dtype=object),
        "shard_rows": np.full(n, n, dtype=np.int64),
        PLACEHOLDER: np.zeros(n, dtype=bool),
        **cut,
    }
    if augment:
        out["aug"] = aug
    if labels_ is not None:
        out["label"] = labels_
    if n == 0:
        out = {"sample_key": np.asarray([""], dtype=object), "shard_id": np.asarray([shard.shard_id], dtype=object),
               "shard_rows": np.zeros(1, np.int64), PLACEHOLDER: np.ones(1, bool)}
        for name, g in views.items():
            out[name] = np.zeros((1, g["channels"], *g["size"]), np.uint8)
        if source["label_column"] is not None:
            out["label"] = np.zeros(1, np.int64)
        if augment:
            out["aug"] = np.zeros((1, 5), np.float32)
    skipped = np.full(len(out["sample_key"]), "", dtype=object)
    if s.skipped:
        skipped[0] = json.dumps(s.skipped)
    out["skipped"] = skipped
    return out


def _select(rows: dict[str, Any], index: np.ndarray) -> dict[str, Any]:
    """The rows `index` of a decoded unit (every per-row entry)."""
    keys = np.asarray(rows["keys"], dtype=object)
    return {k: (keys[index].tolist() if k == "keys" else np.asarray(v)[index]) for k, v in rows.items()}


def read_joined_shard(batch: dict[str, np.ndarray], source: dict[str, Any], shards: dict[str, InputShard],
                      geometry: dict[str, Any], units: list[dict[str, Any]], data: dict[str, Any],
                      views: dict[str, dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """Training's read step: one input shard, joined by sample_key with each teacher's unit for it.

    Rows get x (uint8 [N, C, H, W] in the student's geometry; normalised on the worker), label,
    and either teacher_logits [N, K, C] (every teacher stored full logits), or teacher_probs
    [N, C] when data["ensemble"] = {"weights", "temperatures"} is set (the teachers' weighted mean
    distribution, labels.ensemble_probs: all a mean-ensemble KL needs, K times smaller), or, when
    data["topk_k"] is set, topk_ids / topk_probs [N, K, k] and topk_tail [N, K], each teacher's
    at its training temperature data["temperatures"][k].

    With data["replay"] = V (units generated with labels.views = V), rows carry all V augmented
    views instead: x [N, V, C, H, W], cut from the decoded image with the view params stored in
    the units, and the teachers' labels of those very views, [N, V, K, C] (or [N, V, K, k]); the
    training loop picks one view per sample per epoch."""
    shard = shards[str(batch["shard_id"][0])]
    s = read_samples(shard, source)
    keys = np.asarray(s.keys, dtype=str)
    order = np.argsort(keys, kind="stable")  # unit files are sorted by key
    replay = int(data.get("replay") or 0)
    out: dict[str, np.ndarray] = {} if replay else {"x": apply_view(s, geometry, shard)[order]}
    for name, g in (views or {}).items():  # online distillation: the teachers' own views
        out[name] = apply_view(s, g, shard)[order]
    if s.labels is not None:
        out["label"] = s.labels[order]
    uri, shard_id = shard.uri, shard.shard_id
    teacher_rows = []
    params = None
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
        aug = rows.get(labels.AUG)
        plain = rows if aug is None else _select(rows, np.flatnonzero(aug[:, 2] == 0))
        unit_keys = np.asarray(plain["keys"], dtype=str)
        if len(unit_keys) != len(keys) or not np.array_equal(unit_keys, keys[order]):
            diff = sorted(set(unit_keys.tolist()) ^ set(keys.tolist()))[:3]
            raise ValueError(f"{where}: sample keys differ from input shard {uri} "
                             f"({len(unit_keys)} vs {len(keys)} rows; e.g. {diff}); regenerate the labels")
        if replay:
            if aug is None:
                raise ValueError(f"{where}: train.augment=replay needs labels of augmented views; "
                                 "generate with labels.views > 0")
            position = {k: i for i, k in enumerate(rows["keys"])}
            try:
                index = np.asarray([[position[view_key(k, j)] for j in range(replay)] for k in unit_keys], np.int64)
            except KeyError as e:
                raise ValueError(f"{where}: no labels for view {e.args[0]!r}: the unit holds fewer than "
                                 f"{replay} views; regenerate with labels.views={replay}") from None
            mine = aug[index]  # [N, V, 5]
            if params is None:
                params = mine
            elif not np.array_equal(params, mine):
                raise ValueError(f"{where}: its views differ from teacher {units[0]['teacher']!r}'s "
                                 "(other labels.view_seed / crop_scale / flip): generate them together")
            plain = _select(rows, index.reshape(-1))
        teacher_rows.append((unit, plain))
    if replay:
        if params is None:
            raise ValueError("train.augment=replay needs teachers: their units hold the view params")
        imgs = [s.images[i] for i in order]
        out["x"] = images.augmented(imgs, params, geometry)  # [N, V, C, H, W]
    shape = (len(keys), replay) if replay else (len(keys),)
    if teacher_rows and data.get("topk_k"):
        bins = [labels.student_targets(rows, unit["mode"], data["topk_k"], unit["temperature"], t, data["num_classes"])
                for (unit, rows), t in zip(teacher_rows, data["temperatures"], strict=True)]
        stacked = [np.stack(a, axis=1) for a in zip(*bins, strict=True)]  # [N*V, K, ...]
        out["topk_ids"], out["topk_probs"], out["topk_tail"] = (a.reshape(*shape, *a.shape[1:]) for a in stacked)
    elif teacher_rows:
        z = np.stack([rows[labels.LOGITS] for _, rows in teacher_rows], axis=1)  # [N*V, K, C]
        if data.get("ensemble"):  # the loss needs only the teachers' mean distribution: form it once
            p = labels.ensemble_probs(z, data["ensemble"]["temperatures"], data["ensemble"]["weights"])
            out["teacher_probs"] = p.reshape(*shape, p.shape[-1])
        else:
            out["teacher_logits"] = z.reshape(*shape, *z.shape[1:])
    return out
