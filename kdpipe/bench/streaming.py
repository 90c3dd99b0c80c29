"""`kdpipe bench stream`: the student's input stream (read, decode, join with cached labels of
three teachers) from an object store vs from local files, measured side by side.

Both sides hold the same bytes: the digits as Parquet with PNG bytes (upsampled), `copies`
times over, plus full soft labels of `teachers` synthetic teachers committed through the cache
API. Each repeat streams the whole dataset once per side, alternating, through the same Ray
Data path the student uses (`training.join.student_dataset`); the figure is samples per second, median
with min and max, and the ratio remote / local.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from kdpipe import config, storage
from kdpipe.data import digits, inputs, readers
from kdpipe.labels import cache, codec
from kdpipe.training.join import JoinPlan, TeacherUnits, student_dataset


def prepare(root: str, storage_options: dict[str, Any], copies: int, teachers: int, upsample: int,
            seed: int = 0) -> dict[str, Any]:
    """Write the inputs and the label units under `root`; return what student_dataset needs."""
    from sklearn.datasets import load_digits

    fs, base = storage.filesystem(root, storage_options)
    d = load_digits()
    for c in range(copies):
        digits.write_split(fs, storage.join(base, "train"), f"copy{c:03d}", np.arange(len(d.target)), d.images,
                           d.target, "parquet-png", 4, upsample)
    data = config.DataConfig(builtin=None, format="parquet", train=storage.join(root, "train"),
                             storage_options=storage_options, image_shape=[1, 8 * upsample, 8 * upsample])
    source = inputs.source_spec(data, check_holdout=False)
    shards = inputs.list_shards(data.train, source)
    rng = np.random.default_rng(seed)
    units = []
    for t in range(teachers):
        directory = storage.join(base, "cache", f"teacher{t}")
        records = {}
        for shard in shards:
            keys = readers.read_samples(shard, source).keys
            logits = rng.normal(size=(len(keys), 10)).astype(np.float32)
            payload = codec.encode_unit(keys, logits, "full", 10, 4.0, "float16", "parquet", 1024)
            records[shard.shard_id] = cache.write_unit(
                fs, directory, {"shard_id": shard.shard_id, "uri": shard.uri, "token": shard.token},
                payload, "parquet", keys, {})
        units.append(TeacherUnits(teacher=f"teacher{t}", directory=fs.unstrip_protocol(directory),
                                  storage_options=storage_options, mode="full", format="parquet", k=None,
                                  temperature=4.0, augment=None, records=records))
    pre = config.preprocess_for(config.Config(data=data, teachers=[]))
    return {"source": source, "shards": shards, "units": units, "pre": pre}


def _stream_once(side: dict[str, Any], batch_size: int) -> tuple[int, float]:
    ds = student_dataset(side["source"], side["shards"], side["pre"], side["units"],
                         JoinPlan(num_classes=10, temperatures=(4.0,) * len(side["units"])))
    started, rows = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        rows += len(batch["x"])
        assert batch["teacher_logits"].shape[1:] == (len(side["units"]), 10)
    return rows, time.perf_counter() - started


def stream_throughput(local_root: str, remote_root: str, remote_options: dict[str, Any], copies: int = 4,
                      teachers: int = 3, upsample: int = 4, repeats: int = 3, batch_size: int = 256) -> dict[str, Any]:
    """Samples/s of the student stream from `remote_root` and `local_root`, alternating."""
    from kdpipe import runtime

    runtime.ensure_ray(None, None)
    sides = {"local": prepare(local_root, {}, copies, teachers, upsample),
             "remote": prepare(remote_root, remote_options, copies, teachers, upsample)}
    for side in sides.values():  # warm-up: Ray workers started, imports done, on both sides
        _stream_once(side, batch_size)
    rates: dict[str, list[float]] = {"local": [], "remote": []}
    rows: dict[str, int] = {}
    for _ in range(repeats):
        for name, side in sides.items():
            n, seconds = _stream_once(side, batch_size)
            rows[name] = n
            rates[name].append(n / seconds)
    out: dict[str, Any] = {"copies": copies, "teachers": teachers, "image": [1, 8 * upsample, 8 * upsample],
                           "repeats": repeats, "remote_uri": remote_root}
    for name, values in rates.items():
        out[name] = {"rows": rows[name], "samples_per_s": statistics.median(values),
                     "min": min(values), "max": max(values), "each": values}
    out["ratio_remote_to_local"] = out["remote"]["samples_per_s"] / out["local"]["samples_per_s"]
    return out


def format_stream(result: dict[str, Any]) -> str:
    c, h, w = result["image"]
    lines = [f"student input stream: {result['local']['rows']} samples ({h}x{w} PNG in Parquet) joined with "
             f"{result['teachers']} teachers' full labels; median of {result['repeats']} (min-max)",
             f"{'source':<8}{'samples/s':>12}  {'min-max':>17}"]
    for name in ("local", "remote"):
        r = result[name]
        lines.append(f"{name:<8}{r['samples_per_s']:>12.0f}  {r['min']:>8.0f}-{r['max']:<8.0f}")
    lines.append(f"remote ({result['remote_uri']}) / local: {result['ratio_remote_to_local']:.2f}")
    return "\n".join(lines)
