"""Reading one input shard: decoding with the bad-sample policy, and generation's read step.

A sample that cannot be used stops the job with an error naming the shard and the key, or with
data.on_bad_sample=skip is dropped and reported (listed in the manifest). The Ray Data read
functions live here, free of torch, so read workers start fast.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.data import images
from kdpipe.data.inputs import InputShard, SourceSpec, list_shards
from kdpipe.errors import InputError


@dataclass
class Samples:
    """The usable samples of one input shard, in the shard's order."""

    keys: list[str]
    images: list[np.ndarray] | np.ndarray  # uint8 [H, W, C] each, or one [N, H, W, C] array
    labels: np.ndarray | None  # int64 [N]; None for label-free data
    skipped: list[dict[str, str]]  # [{"key", "reason"}] dropped under on_bad_sample=skip


class _Collector:
    """Applies the bad-sample policy while a shard is read."""

    def __init__(self, shard: InputShard, source: SourceSpec) -> None:
        self.shard, self.source = shard, source
        self.keys: list[str] = []
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.skipped: list[dict[str, str]] = []

    def bad(self, key: str, reason: str) -> None:
        if self.source.on_bad_sample == "skip":
            self.skipped.append({"key": key, "reason": reason})
            return
        raise InputError(f"input shard {self.shard.uri}: sample {key!r}: {reason}; fix or remove it, "
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
        if not 0 <= y < self.source.num_classes:
            self.bad(key, f"label {y} is outside [0, data.num_classes={self.source.num_classes})")
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
        raise InputError(f"input shard {shard.uri}: sample key {dup!r} appears more than once; keys must be unique")


def read_samples(shard: InputShard, source: SourceSpec) -> Samples:
    """Read and decode one input shard; bad samples raise or are skipped per the source's policy."""
    try:
        reader = {"parquet": _read_parquet, "webdataset": _read_tar, "imagefolder": _read_folder}[source.format]
        samples = reader(shard, source)
    except PermissionError as e:
        raise storage.access_denied(shard.uri, e, options="data.storage_options") from None
    if not samples.keys and not samples.skipped:
        samples.skipped.append({"key": "", "reason": "empty shard"})
        if source.on_bad_sample != "skip":
            raise InputError(f"input shard {shard.uri!r} is empty: remove it from the dataset "
                             "(or set data.on_bad_sample: skip to record it and go on)")
    return samples


def _read_parquet(shard: InputShard, source: SourceSpec) -> Samples:
    key_col, image_col, label_col = source.key_column, source.image_column, source.label_column
    fs, path = storage.filesystem(shard.uri, source.storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, PermissionError):
            raise
        raise InputError(f"input shard {shard.uri!r} is not a readable Parquet file ({e}): re-create or remove it") from e
    for col, key in ((key_col, "data.key_column"), (image_col, "data.image_column"), (label_col, "data.label_column")):
        if col is not None and col not in table.column_names:
            hint = " (set data.label_column: null for label-free data)" if key == "data.label_column" else ""
            raise InputError(f"input shard {shard.uri!r} has no column {col!r} ({key}); its columns are "
                             f"{table.column_names}{hint}")
    keys = table.column(key_col).to_pylist()
    if any(k is None for k in keys):
        raise InputError(f"input shard {shard.uri!r}: column {key_col!r} has null keys; every sample needs a key")
    keys = [str(k) for k in keys]
    ys = table.column(label_col).to_pylist() if label_col else [None] * len(keys)
    column = table.column(image_col).combine_chunks()
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        return _pixel_samples(shard, source, keys, ys, column)
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        column = column.field("bytes")
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise InputError(f"input shard {shard.uri!r}: column {image_col!r} has type {kind}; use encoded image bytes, "
                         "a {bytes, path} struct, or a list of uint8 pixels")
    out = _Collector(shard, source)
    for key, data, y in zip(keys, column.to_pylist(), ys, strict=True):
        out.add(key, data, y, label_col is not None)
    return out.samples(label_col is not None)


def _pixel_samples(shard: InputShard, source: SourceSpec, keys: list[str], ys: list[Any],
                   column: pa.Array) -> Samples:
    """Pixel lists (like the built-in digits) -> one vectorised [N, H, W, C] uint8 array."""
    c, h, w = source.pixel_shape
    n = c * h * w
    labelled = source.label_column is not None
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
        raise InputError(f"input shard {shard.uri!r}: pixel values must be integers in 0..255 (uint8); "
                         "store uint8 pixels or encoded image bytes")
    keys = [keys[i] for i in good]
    _check_unique(keys, shard)
    arr = pixels.astype(np.uint8).reshape(len(idx), c, h, w).transpose(0, 2, 3, 1)
    return Samples(keys, arr, np.asarray(good_y, np.int64) if labelled else None, out.skipped)


def _read_tar(shard: InputShard, source: SourceSpec) -> Samples:
    """A WebDataset tar, streamed member by member (never listed or extracted to disk)."""
    fs, path = storage.filesystem(shard.uri, source.storage_options)
    labelled = source.label_column is not None
    out = _Collector(shard, source)
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> None:
        if current is None:
            return
        if current in seen:
            raise InputError(f"input shard {shard.uri}: sample key {current!r} appears more than once "
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
        raise InputError(f"input shard {shard.uri!r} is a truncated or corrupt tar file after {len(seen)} samples "
                         f"({type(e).__name__}: {e}): re-create it") from e
    return out.samples(labelled)


def _read_folder(shard: InputShard, source: SourceSpec) -> Samples:
    """Up to files_per_shard files of one class folder, fetched concurrently (fs.cat on a list)."""
    fs, root = storage.filesystem(shard.root, source.storage_options)
    paths = [f"{root.rstrip('/')}/{rel}" for rel in shard.members]
    fetched = fs.cat(paths, on_error="return")
    class_index = {name: i for i, name in enumerate(source.class_names)}
    labelled = source.label_column is not None
    out = _Collector(shard, source)
    for rel, path in zip(shard.members, paths, strict=True):
        data = fetched.get(path) if isinstance(fetched, dict) else fetched
        if isinstance(data, PermissionError):
            raise data
        if isinstance(data, FileNotFoundError) or data is None:
            raise InputError(f"input shard {shard.uri}: file {rel!r} was listed but is gone; rerun to list the dataset again")
        if isinstance(data, Exception):
            raise InputError(f"input shard {shard.uri}: file {rel!r} could not be read ({data})") from data
        out.add(rel, data, class_index.get(rel.split("/", 1)[0]), labelled)
    return out.samples(labelled)


def load_split(uri: str, source: SourceSpec, preprocess: images.Preprocess, max_rows: int | None = None,
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
        xs.append(preprocess.normalise(cut_geometry(s, preprocess.geometry(), shard)))
        if s.labels is not None:
            ys.append(s.labels)
    return keys, np.concatenate(xs), (np.concatenate(ys) if ys else None)


def cut_geometry(samples: Samples, geometry: dict[str, Any], shard: InputShard) -> np.ndarray:
    """images.apply_geometry with errors that name the shard."""
    try:
        return images.apply_geometry(samples.images, geometry)
    except ValueError as e:
        raise InputError(f"input shard {shard.uri}: {e}") from e


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


def read_teacher_inputs(batch: dict[str, np.ndarray], source: SourceSpec, shards: dict[str, InputShard],
               geometries: dict[str, dict[str, Any]], augment: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Generation's read step: one input shard -> rows with sample_key, shard_id, shard_rows,
    skipped (the shard's skip list as JSON on its first row), placeholder, label (when labelled)
    and one uint8 [N, C, H, W] column per distinct teacher geometry (`geometries`), all cut from a
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
    cut = {name: cut_geometry(s, geometry, shard) for name, geometry in geometries.items()}
    labels_ = s.labels
    if augment:
        v = int(augment["views"])
        params = sample_params(keys, augment)  # [N, V, 5]
        for name, geometry in geometries.items():
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
        for name, g in geometries.items():
            out[name] = np.zeros((1, g["channels"], *g["size"]), np.uint8)
        if source.label_column is not None:
            out["label"] = np.zeros(1, np.int64)
        if augment:
            out["aug"] = np.zeros((1, 5), np.float32)
    skipped = np.full(len(out["sample_key"]), "", dtype=object)
    if s.skipped:
        skipped[0] = json.dumps(s.skipped)
    out["skipped"] = skipped
    return out


def shard_dataset(shards: list[InputShard], read, decode_cpus: float | None = None, **kwargs: Any):
    """The one read step of generation, training and the benchmarks: a Ray Dataset with one read
    task per input shard, in the order of `shards`. Each task calls `read(batch, shards={its
    shard}, **kwargs)` with a one-row batch naming its shard, and `decode_cpus` CPUs (default
    runtime.READ_TASK_CPUS): fractional, so read tasks never take every CPU of a small machine.

    Each task's row carries its own shard, not the arguments the map of every shard: an
    ImageFolder shard lists its files, and the whole list (1.28M files for ImageNet) would
    otherwise ride with every task."""
    import pickle

    import ray.data

    from kdpipe import runtime

    def task(batch: dict[str, np.ndarray], **task_kwargs: Any):
        return read_own_shard(batch, read, **task_kwargs)

    task.__name__ = task.__qualname__ = read.__name__  # Ray's task name: MapBatches(<the read step>)
    items = [{"shard_id": s.shard_id, SHARD_COLUMN: pickle.dumps(s)} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(task, batch_size=1, num_cpus=decode_cpus or runtime.READ_TASK_CPUS, fn_kwargs=kwargs)


SHARD_COLUMN = "input_shard"  # shard_dataset's rows: the pickled InputShard each read task reads


def read_own_shard(batch: dict[str, np.ndarray], read, **kwargs: Any):
    """shard_dataset's task: `read` on the one shard its row carries."""
    import pickle

    shard: InputShard = pickle.loads(batch.pop(SHARD_COLUMN)[0])
    return read(batch, shards={shard.shard_id: shard}, **kwargs)
