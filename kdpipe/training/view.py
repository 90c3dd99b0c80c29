"""The training view: the student's rows (inputs joined with the chosen teachers' targets) formed
once, shuffled across the whole dataset, and streamed by every epoch in a new order.

Why: an input shard is often a single class (an ImageFolder class folder, a class-sorted tar or
Parquet file). Streaming shards, even in a random order through a local shuffle buffer, then gives
batches of one or two classes, and a student learns much worse than with a full permutation per
epoch. The view is one global shuffle, paid once: each of its files is a uniform random sample of
the dataset, so any batch cut from one has the class mix of random sampling, whatever the input
layout, and data larger than memory streams file by file (Ray Data spills the shuffle to disk).
Every epoch reads the files in a new order (seeded by train.seed and the epoch) through a local
shuffle buffer, so no epoch waits for the whole dataset before its first step, and the join
(checksums, Parquet decode, softmax) is not redone each epoch.

Layout, content-addressed by what shapes the rows (`view_key`): the dataset fingerprint, each
teacher's unit directory (its digest, the dataset fingerprint and its label settings), the join
plan (temperatures, top-k k, mean target, replayed views), the student's geometry:

    <cache_root>/views/<view key>/<write id>/*.parquet   written by Ray Data's write_parquet
    <cache_root>/views/<view key>/_manifest.json         written last: the files, rows, classes

Readers trust the manifest, never a listing. Two builders of one view each write their own
<write id> folder; the manifest written last names a complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kdpipe import runtime, storage
from kdpipe.data import inputs
from kdpipe.errors import CacheError
from kdpipe.training.join import JoinPlan, TeacherUnits, read_joined_shard

log = logging.getLogger("kdpipe")

VIEW_VERSION = 1
VIEWS_DIR = "views"
MANIFEST = "_manifest.json"
BLOCK_ROWS = 1024  # rows per block (view file) aimed at when the input shards are smaller
BLOCK_BYTES = 64 << 20  # and at most this many bytes per block


@dataclass(frozen=True)
class View:
    """A committed view: where its files are and what they hold."""

    directory: str  # URI of <cache_root>/views/<key>
    files: tuple[str, ...]  # URIs of its Parquet files, each a uniform random sample of the rows
    rows: int
    class_counts: tuple[int, ...]  # rows per class (label column); () for label-free data
    storage_options: dict[str, Any]


def view_key(fingerprint: str, units: tuple[TeacherUnits, ...] | list[TeacherUnits], plan: JoinPlan,
             geometry: dict[str, Any]) -> str:
    """The content address of a view: a hash of everything that shapes its rows."""
    body = {"version": VIEW_VERSION, "fingerprint": fingerprint, "plan": asdict(plan), "geometry": geometry,
            "units": [[u.teacher, u.directory, sorted((sid, r.get("sha256")) for sid, r in u.records.items())]
                      for u in units]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=list).encode()).hexdigest()[:20]


def block_count(rows: int, row_bytes: int, blocks: int, min_blocks: int = 1) -> int:
    """How many blocks (view files) should hold `rows` shuffled rows of about `row_bytes` bytes
    each, now in `blocks` (one per input shard): about BLOCK_ROWS rows each, none over
    BLOCK_BYTES, at least `min_blocks` (one per training worker), and never more than now.

    Every block costs every epoch a fetch, the deserialisation of its tensor columns and a
    concatenation into batches. With many small input shards (64 blocks of 112 rows, measured
    on 2 cores) that was ~5 % of a small student's epoch, and more on the side that carries the
    teachers' targets; blocks of ~1,000 rows made the epochs ~20 % faster."""
    wanted = max(math.ceil(rows / BLOCK_ROWS), math.ceil(rows * row_bytes / BLOCK_BYTES), min_blocks, 1)
    return max(1, min(blocks, wanted))


def coalesce(ds, blocks: int, wanted: int):
    """`ds` (`blocks` blocks) in `wanted` blocks when that is fewer (block_count), else as it is."""
    return ds.repartition(wanted) if wanted < blocks else ds


def read_view(directory: str, storage_options: dict[str, Any]) -> View | None:
    """The committed view in `directory`, or None when none is committed there."""
    fs, path = storage.filesystem(directory, storage_options)
    manifest_path = storage.join(path, MANIFEST)
    if not fs.exists(manifest_path):
        return None
    m = storage.read_json(fs, manifest_path)
    if m.get("version") != VIEW_VERSION or not m.get("files"):
        raise CacheError(f"training view {fs.unstrip_protocol(manifest_path)} is not a version-{VIEW_VERSION} "
                         "view manifest: delete the folder and rerun to rebuild it")
    return View(fs.unstrip_protocol(path), tuple(storage.join(fs.unstrip_protocol(path), f) for f in m["files"]),
                int(m["rows"]), tuple(m.get("class_counts") or ()), storage_options)


def ensure_view(cache_root: str, storage_options: dict[str, Any], fingerprint: str, source: inputs.SourceSpec,
                shards: list[inputs.InputShard], geometry: dict[str, Any], units: tuple[TeacherUnits, ...],
                plan: JoinPlan, decode_cpus: float | None = None, seed: int = 0, files: int | None = None) -> View:
    """The view of these inputs and targets: the committed one, or built now (one Ray Data pass:
    read and join each input shard, a global random shuffle, Parquet files on the cache's storage).
    files: how many files a new view is written in (block_count; None: one per input shard).
    The file count does not shape the rows, so it is not part of the view's key."""
    key = view_key(fingerprint, units, plan, geometry)
    directory = storage.join(cache_root, VIEWS_DIR, key)
    found = read_view(directory, storage_options)
    if found is not None:
        return found
    return build_view(directory, storage_options, source, shards, geometry, units, plan, decode_cpus, seed, files)


def build_view(directory: str, storage_options: dict[str, Any], source: inputs.SourceSpec,
               shards: list[inputs.InputShard], geometry: dict[str, Any], units: tuple[TeacherUnits, ...],
               plan: JoinPlan, decode_cpus: float | None = None, seed: int = 0, files: int | None = None) -> View:
    """Build and commit the view in `directory` (see the module docstring), in `files` files
    (None: one per input shard)."""
    from kdpipe.data.readers import shard_dataset

    started = time.time()
    fs, path = storage.filesystem(directory, storage_options)
    write_id = uuid.uuid4().hex[:12]
    out = storage.join(path, write_id)
    ds = shard_dataset(shards, read_joined_shard, decode_cpus, source=source, geometry=geometry, units=units,
                       plan=plan)
    # Each output block (file) a uniform random sample of the rows: one per input shard, or
    # `files` larger ones when the shards are small (block_count).
    ds = ds.random_shuffle(seed=seed, num_cpus=runtime.READ_TASK_CPUS)
    ds = coalesce(ds, len(shards), files or len(shards))
    fs.makedirs(out, exist_ok=True)
    ds.write_parquet(out, filesystem=None if storage.is_local(fs) else storage.pyarrow_filesystem(fs),
                     ray_remote_args={"num_cpus": runtime.READ_TASK_CPUS})
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.find(out) if p.endswith(".parquet"))
    rows, counts = _count_rows(fs, [storage.join(out, f) for f in files], plan.num_classes,
                               source.label_column is not None)
    manifest = {"version": VIEW_VERSION, "files": [f"{write_id}/{f}" for f in files], "rows": rows,
                "class_counts": counts, "created_at": time.time(), "shards": len(shards),
                "units": [u.teacher for u in units]}
    storage.write_json(fs, storage.join(path, MANIFEST), manifest)
    log.info("training view %s: %d rows in %d files, built in %.1f s", fs.unstrip_protocol(path), rows, len(files),
             time.time() - started)
    return read_view(fs.unstrip_protocol(path), storage_options)


def _count_rows(fs, paths: list[str], num_classes: int, labelled: bool) -> tuple[int, list[int]]:
    """(rows, rows per class) of the view's files, from their metadata and label columns: once,
    when the view is built, reading the files in parallel (an object store answers each in the
    time of a request, not of its bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def count(p: str) -> tuple[int, np.ndarray]:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            labels = pf.read(columns=["label"]).column("label").to_numpy() if labelled else np.zeros(0, np.int64)
            return pf.metadata.num_rows, np.bincount(labels, minlength=num_classes)[:num_classes]

    rows, counts = 0, np.zeros(num_classes, np.int64)
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        for n, per_class in pool.map(count, paths):
            rows, counts = rows + n, counts + per_class
    return rows, counts.tolist() if labelled else []


def view_dataset(view: View, seed: int):
    """The view as a Ray Dataset whose every execution (epoch) reads the files in a new order,
    seeded by `seed` and the execution: one read task per file, at a fraction of a CPU (no
    metadata-sampling tasks at a whole CPU, which never start while training workers hold the
    CPUs of a small machine)."""
    import ray.data

    items = [{"file": f} for f in view.files]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order(seed=seed)
    return ds.map_batches(read_view_file, batch_size=1, num_cpus=runtime.READ_TASK_CPUS,
                          fn_kwargs={"storage_options": view.storage_options})


def read_view_file(batch: dict[str, np.ndarray], storage_options: dict[str, Any]):
    """One file of a view, as the Arrow table Ray Data wrote (tensor columns stay tensors)."""
    import pyarrow.parquet as pq

    assert len(batch["file"]) == 1, "view read tasks take one file each"
    uri = str(batch["file"][0])
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        raise CacheError(f"training view file {uri} is gone: delete its view folder "
                         f"({uri.rsplit('/', 2)[0]}) and rerun to rebuild it") from None


def expected_classes(class_counts: tuple[int, ...] | list[int], batch: int) -> float:
    """The mean number of distinct classes in a batch of `batch` rows drawn at random (without
    replacement) from a dataset with `class_counts` rows per class:
    sum over classes of 1 - C(N - n_c, b) / C(N, b)."""
    n = int(sum(class_counts))
    b = min(int(batch), n)
    if b <= 0:
        return 0.0
    total = 0.0
    for c in class_counts:
        if c <= 0:
            continue
        if n - c < b:
            total += 1.0
            continue
        log_none = (math.lgamma(n - c + 1) - math.lgamma(n - c - b + 1)) - (math.lgamma(n + 1) - math.lgamma(n - b + 1))
        total += 1.0 - math.exp(log_none)
    return total
