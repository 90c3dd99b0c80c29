"""`kdpipe bench load`: generation over many small images with bounded memory.

Writes `rows` synthetic 8x8 PNG images as Parquet input shards of `shard_rows` each, labels them
with one small teacher through the normal generation path, and samples the resident memory (RSS)
of the driver and of every Ray worker process every 0.5 s. Run at two sizes, the peaks should
not grow with the dataset: inputs stream shard by shard and only finished units' label rows are
ever held by the driver (one unit at a time per in-flight shard), never the whole dataset.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import config, storage
from kdpipe.data import images
from kdpipe.generation import generate
from kdpipe.teachers import checkpoints
from kdpipe.teachers.models import build_model


def write_inputs(root: str, rows: int, shard_rows: int, seed: int = 0) -> int:
    """`rows` random 8x8 grey PNG images with labels, `shard_rows` per Parquet file; returns shards."""
    rng = np.random.default_rng(seed)
    pngs = [images.encode_png(rng.integers(0, 17, (8, 8), dtype=np.uint8)) for _ in range(64)]
    os.makedirs(root, exist_ok=True)
    shards = 0
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        idx = rng.integers(0, len(pngs), n)
        table = pa.table({"sample_key": [f"s{start + i:08d}" for i in range(n)],
                          "image": [pngs[i] for i in idx], "label": (idx % 10).astype(np.int64)})
        pq.write_table(table, os.path.join(root, f"part-{shards:05d}.parquet"))
        shards += 1
    return shards


class RssSampler:
    """Peak RSS of this process and of every process whose command line starts with `ray::`."""

    def __init__(self, period: float = 0.5) -> None:
        import psutil

        self.psutil, self.period = psutil, period
        self.driver_peak = 0
        self.worker_peak = 0  # the largest single worker
        self.workers_total_peak = 0  # all workers together
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            sizes = []
            for p in self.psutil.process_iter(["cmdline", "memory_info"]):
                cmd = p.info.get("cmdline") or []
                if cmd and cmd[0].startswith("ray::") and p.info.get("memory_info") is not None:
                    sizes.append(p.info["memory_info"].rss)
            if sizes:
                self.worker_peak = max(self.worker_peak, max(sizes))
                self.workers_total_peak = max(self.workers_total_peak, sum(sizes))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_config(workdir: str, data_root: str, teachers: dict[str, tuple[str, str]], classes: int = 10,
                     overrides: list[str] = ()) -> config.Config:
    """The demo config over the synthetic inputs at `data_root` (write_inputs), with `classes`
    classes and the untrained 8x8 `teachers` ({name: (arch, checkpoint file name under
    `workdir`)}, each saved once, seeded by its position) at batch 1024."""
    cfg = config.resolve_paths(config.load_config(None, [
        f"workdir={workdir}", "data.builtin=null", f"data.train={data_root}", f"data.holdout={data_root}",
        f"data.num_classes={classes}", *(["data.class_names=[]"] if classes != 10 else []), "teachers=[]",
        *overrides]))
    cfg.teachers = []
    for i, (name, (arch, file)) in enumerate(teachers.items()):
        checkpoint = storage.join(workdir, file)
        if not os.path.exists(checkpoint):
            import torch

            torch.manual_seed(i)
            checkpoints.save_checkpoint(build_model(arch, classes, (1, 8, 8)), checkpoint, {}, arch, classes, {})
        cfg.teachers.append(config.TeacherConfig(name=name, arch=arch, checkpoint=checkpoint, batch_size=1024))
    return cfg


def load_run(workdir: str, rows: int, shard_rows: int = 1000, arch: str = "tiny_cnn") -> dict[str, Any]:
    """Generate labels for `rows` synthetic images; report time and peak RSS (MiB)."""
    data_root = storage.join(workdir, f"inputs-{rows}")
    shards = write_inputs(data_root, rows, shard_rows)
    cfg = synthetic_config(workdir, data_root, {"t": (arch, f"{arch}.pt")},
                           overrides=[f"cache.root={storage.join(workdir, f'cache-{rows}')}"])
    started = time.perf_counter()
    with RssSampler() as rss:
        report = generate.generate(cfg, progress=False)
    seconds = time.perf_counter() - started
    mib = 1024 * 1024
    return {"rows": rows, "shards": shards, "seconds": seconds, "rows_per_s": rows / seconds,
            "labelled": report.teacher_forward_passes,
            "driver_peak_rss_mib": rss.driver_peak / mib, "worker_peak_rss_mib": rss.worker_peak / mib,
            "workers_total_peak_rss_mib": rss.workers_total_peak / mib}


def load_figures(workdir: str, sizes: tuple[int, ...] = (20_000, 100_000), shard_rows: int = 1000) -> dict[str, Any]:
    from kdpipe import runtime

    runtime.ensure_ray(None, None)
    runs = [load_run(workdir, n, shard_rows) for n in sizes]
    small, large = runs[0], runs[-1]
    return {"runs": runs, "growth": {k: large[k] / small[k] for k in
                                     ("driver_peak_rss_mib", "worker_peak_rss_mib", "workers_total_peak_rss_mib")},
            "size_ratio": large["rows"] / small["rows"]}


def format_load(r: dict[str, Any]) -> str:
    lines = ["generation over synthetic 8x8 PNG images (1 teacher), peak resident memory in MiB",
             f"{'rows':>8}{'shards':>8}{'seconds':>9}{'rows/s':>9}{'driver':>9}{'worker max':>12}{'workers sum':>13}"]
    for x in r["runs"]:
        lines.append(f"{x['rows']:>8}{x['shards']:>8}{x['seconds']:>9.1f}{x['rows_per_s']:>9.0f}"
                     f"{x['driver_peak_rss_mib']:>9.0f}{x['worker_peak_rss_mib']:>12.0f}"
                     f"{x['workers_total_peak_rss_mib']:>13.0f}")
    g = r["growth"]
    lines.append(f"{r['size_ratio']:.0f}x the rows: driver peak x{g['driver_peak_rss_mib']:.2f}, largest worker "
                 f"x{g['worker_peak_rss_mib']:.2f}, all workers x{g['workers_total_peak_rss_mib']:.2f}")
    return "\n".join(lines)
