"""`kdpipe bench driver`: what generation costs its driver as the dataset grows.

Synthetic 8x8 PNG images in Parquet input shards, `classes` classes, `teachers` linear teachers
(random weights, one per seed), labelled through the normal generation path with full float16
labels and with top-k labels, at two or more sizes, each into an empty cache. Per run: samples
per second, the driver's CPU seconds (this process, every thread: the commit loop and Ray Data's
executor), its peak resident memory, and the storage requests and bytes the driver made on the
cache (kdpipe.testing.counting). The driver CPU per sample and teacher should not grow with the
dataset, and a driver that carries no labels would spend a small fraction of it.
"""

from __future__ import annotations

import copy
import os
import resource
import time
from typing import Any

from kdpipe import config, runtime, storage
from kdpipe.bench.loading import RssSampler, synthetic_config, write_inputs
from kdpipe.generation import generate
from kdpipe.testing.counting import counting_requests

MODES = ("full", "topk")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(workdir: str, rows: int, shards: int, classes: int, teachers: int) -> config.Config:
    """The inputs (written once per size) and the linear teachers (once per class count) of a run."""
    data_root = storage.join(workdir, f"inputs-{rows}-{shards}")
    if not os.path.exists(data_root):
        write_inputs(data_root, rows, -(-rows // shards))
    return synthetic_config(workdir, data_root, {f"t{i}": ("linear", f"linear-{classes}-{i}.pt") for i in range(teachers)}, classes)


def driver_run(workdir: str, rows: int, mode: str, shards: int = 100, classes: int = 1000, teachers: int = 3,
               k: int = 10) -> dict[str, Any]:
    """One generation into an empty cache; its wall time, driver CPU and memory, storage traffic."""
    cfg = copy.deepcopy(_config(workdir, rows, shards, classes, teachers))
    cfg.cache.root = storage.join(workdir, f"cache-{rows}-{mode}-{time.time_ns()}")
    cfg.labels.mode, cfg.labels.k = mode, (k if mode == "topk" else cfg.labels.k)
    os.makedirs(cfg.cache.root, exist_ok=True)
    started, cpu = time.perf_counter(), _cpu_seconds()
    with RssSampler(period=0.25) as rss, counting_requests(cfg.cache.root) as fs:
        report = generate.generate(cfg, progress=False)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    sample_teachers = report.teacher_forward_passes
    return {"rows": rows, "mode": mode, "k": k if mode == "topk" else None, "classes": classes,
            "teachers": teachers, "shards": shards, "seconds": seconds, "samples_per_s": rows / seconds,
            "labelled": sample_teachers, "driver_cpu_s": cpu,
            "driver_cpu_us_per_sample_teacher": cpu / max(1, sample_teachers) * 1e6,
            "driver_peak_rss_mib": rss.driver_peak / 2**20, "requests": fs.total,
            "requests_by_kind": dict(fs.requests), "mib_written": fs.bytes_written / 2**20}


def driver_figures(workdir: str, sizes: tuple[int, ...] = (100_000, 200_000), shards: int = 100,
                   classes: int = 1000, teachers: int = 3, k: int = 10,
                   modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """driver_run for every size and mode, and how each figure grew from the smallest size to the largest."""
    runtime.ensure_ray(None, None)
    runs = [driver_run(workdir, n, mode, shards, classes, teachers, k) for n in sizes for mode in modes]
    growth = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        small, large = mine[0], mine[-1]
        growth[mode] = {key: large[key] / max(1e-9, small[key]) for key in
                        ("driver_cpu_s", "driver_cpu_us_per_sample_teacher", "driver_peak_rss_mib", "requests",
                         "mib_written")}
    return {"runs": runs, "growth": growth, "size_ratio": sizes[-1] / sizes[0]}


def format_driver(r: dict[str, Any]) -> str:
    first = r["runs"][0]
    lines = [f"generation's driver: synthetic 8x8 images, {first['classes']} classes, {first['teachers']} linear "
             f"teachers, {first['shards']} input shards; each run into an empty cache",
             f"{'rows':>8} {'labels':<8}{'samples/s':>10}{'driver CPU s':>13}{'us/sample-teacher':>19}"
             f"{'driver MiB':>11}{'requests':>10}{'MiB written':>12}"]
    for x in r["runs"]:
        labels = "full" if x["mode"] == "full" else f"top-{x['k']}"
        lines.append(f"{x['rows']:>8} {labels:<8}{x['samples_per_s']:>10.0f}{x['driver_cpu_s']:>13.1f}"
                     f"{x['driver_cpu_us_per_sample_teacher']:>19.1f}{x['driver_peak_rss_mib']:>11.0f}"
                     f"{x['requests']:>10}{x['mib_written']:>12.1f}")
    for mode, g in r["growth"].items():
        lines.append(f"{r['size_ratio']:.0f}x the rows, {mode}: driver CPU x{g['driver_cpu_s']:.2f} "
                     f"(per sample-teacher x{g['driver_cpu_us_per_sample_teacher']:.2f}), driver peak memory "
                     f"x{g['driver_peak_rss_mib']:.2f}, requests x{g['requests']:.2f}, bytes x{g['mib_written']:.2f}")
    return "\n".join(lines)
