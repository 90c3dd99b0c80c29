"""Input datasets: the three formats on any fsspec URI, input shards and fingerprints.

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
never by row order. Reading a shard's samples is `kdpipe.data.readers`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.data import images
from kdpipe.errors import InputError, StorageMissing

if TYPE_CHECKING:
    from kdpipe.config import DataConfig

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


@dataclass(frozen=True)
class SourceSpec:
    """How to read the inputs: built once on the driver from data.* (source_spec) and sent, pickled,
    to every read task. Frozen, so a task cannot change what the others read."""

    format: str  # data.format: parquet | webdataset | imagefolder
    storage_options: dict[str, Any] = field(hash=False)  # data.storage_options (never hashed: a dict)
    key_column: str  # parquet only
    image_column: str  # parquet only
    label_column: str | None  # None: label-free data
    pixel_shape: tuple[int, ...]  # [C, H, W] of pixel-list Parquet (data.pixel_shape or data.image_shape)
    class_names: tuple[str, ...]  # imagefolder: the class folders in label order; else display names
    num_classes: int
    on_bad_sample: str  # error | skip
    files_per_shard: int  # imagefolder: files per input shard


def source_spec(data: DataConfig, check_holdout: bool = True) -> SourceSpec:
    """How to read the inputs of `data`. For imagefolder without data.class_names, the class list
    is the train split's folders, and the held-out split must have the same ones."""
    names = list(data.class_names)
    if data.format == "imagefolder":
        names = _imagefolder_classes(data, check_holdout)
    return SourceSpec(format=data.format, storage_options=dict(data.storage_options),
                      key_column=data.key_column, image_column=data.image_column,
                      label_column=data.label_column, pixel_shape=tuple(data.pixel_shape or data.image_shape),
                      class_names=tuple(names), num_classes=int(data.num_classes),
                      on_bad_sample=data.on_bad_sample, files_per_shard=int(data.files_per_shard))


def _imagefolder_classes(data: DataConfig, check_holdout: bool) -> list[str]:
    """The class names of an ImageFolder dataset: data.class_names, else the train split's folders."""
    found = class_folders(data.train, data.storage_options)
    if check_holdout and data.holdout:
        held = class_folders(data.holdout, data.storage_options)
        if held != found:
            raise InputError(
                f"class folders differ between data.train ({data.train}) and data.holdout ({data.holdout}): "
                f"only in train {sorted(set(found) - set(held))}, only in held-out {sorted(set(held) - set(found))}; "
                "labels would mean different classes: make the folders match or set data.class_names")
    names = list(data.class_names) or found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise InputError(f"class folders {unknown[:5]} in {data.train} are not in data.class_names")
    if len(names) != data.num_classes:
        raise InputError(f"{data.train} has {len(names)} class folders {names[:5]}..., "
                         f"data.num_classes is {data.num_classes}: set data.num_classes={len(names)}")
    return names


def fingerprint(shards: list[InputShard], source: SourceSpec) -> str:
    """Dataset fingerprint: the sorted shard list (ids carry path + version) and what decides
    which samples, keys and labels come out of them. It names cache directories: the JSON hashed
    here must stay byte for byte what it was (lists, not tuples, are what it always held)."""
    what: dict[str, Any] = {"format": source.format, "key_column": source.key_column,
                            "image_column": source.image_column, "label_column": source.label_column}
    if source.format == "parquet":
        what["pixel_shape"] = list(source.pixel_shape)
    if source.format == "imagefolder":  # the folder order is the label; elsewhere names are display only
        what["class_names"] = list(source.class_names)
    body = json.dumps({"shards": sorted(s.shard_id for s in shards), "source": what}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _listing(uri: str, storage_options: dict[str, Any]) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    fs, root = storage.filesystem(uri, storage_options)
    try:
        found = fs.find(root, detail=True) if fs.exists(root) else None
    except PermissionError as e:
        raise storage.access_denied(uri, e, key="data.train / data.holdout", options="data.storage_options") from None
    except FileNotFoundError:  # fsspec's own: the bucket or folder went away while being listed
        found = None
    if found is None:
        raise StorageMissing(f"input dataset {uri!r} does not exist: check data.train / data.holdout")
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
                raise InputError(f"image {uri.rstrip('/')}/{rel} is not inside a class folder: ImageFolder "
                                 "datasets keep each class's images under <root>/<class>/")
            classes.add(rel.split("/", 1)[0])
    if not classes:
        raise InputError(f"input dataset {uri!r} holds no images in class folders (<root>/<class>/x.png)")
    return sorted(classes)


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in images.IMAGE_EXTENSIONS


def list_shards(uri: str, source: SourceSpec) -> list[InputShard]:
    """The input shards under `uri`, sorted by path; errors name the URI."""
    fmt = source.format
    fs, root, files = _listing(uri, source.storage_options)
    shards: list[InputShard] = []
    if fmt == "imagefolder":
        by_class: dict[str, list[str]] = {}
        for path in sorted(files):
            rel = path[len(root) + 1:]
            if _is_image(rel) and "/" in rel:
                by_class.setdefault(rel.split("/", 1)[0], []).append(path)
        for cls, paths in sorted(by_class.items()):
            step = source.files_per_shard
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
            if num_rows == 0 and source.on_bad_sample != "skip":
                raise InputError(f"input shard {fs.unstrip_protocol(path)!r} is empty: remove it from the dataset "
                                 "(or set data.on_bad_sample: skip to record it and go on)")
            relpath = path[len(root) + 1:]
            shards.append(InputShard(make_shard_id(relpath, token), fs.unstrip_protocol(path), num_rows, token))
    if not shards:
        what = {"parquet": ".parquet files", "webdataset": ".tar files", "imagefolder": "images"}[fmt]
        raise InputError(f"input dataset {uri!r} holds no {what} (data.format={fmt})")
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids), "shard ids collide"
    return shards


def _parquet_rows(fs, path: str) -> int:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except PermissionError as e:
        raise storage.access_denied(fs.unstrip_protocol(path), e, options="data.storage_options") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"input shard {fs.unstrip_protocol(path)!r} is not a readable Parquet file ({e}): "
                         "re-create or remove it") from e
