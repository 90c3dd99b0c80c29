"""Student-side benchmarks, every figure measured side by side in one run.

throughput (`kdpipe bench student`): samples/s of the same student on the same Ray Train path
    (same workers, data, batch size, epochs) trained three ways, `repeats` rounds, the order
    turning each round (none always runs first or after the heaviest):
      plain    supervised, labels only (the reference);
      cached   distilled from three teachers' cached soft labels (kdpipe's way);
      online   distilled with the three teachers in memory, run on every batch (the baseline).
    The training split is the digits' 899 training rows `copies` times over, each copy with keys of
    its own (and so cached labels of its own): one pass over 899 rows lasts 0.1-0.3 s on 2 cores,
    mostly Ray Data's per-epoch start and the step's fixed costs, too short to time. A run's rate
    is the median of its per-epoch rates after the first epoch (rank 0's rows / its epoch time,
    times the world size); Ray Train's worker start-up is left out for every mode, and each run
    starts once the previous run's workers have released their CPUs.
    Runs minutes apart meet different spells of a shared machine (on 2 cores, a run's rate moves
    by 10-20 % from one run to the next, every mode alike), so the cached/plain goal is scored on
    paired runs as well: one Ray Train run that, every epoch, makes a pass over the cached-label
    data and a pass of plain supervised steps over the same inputs without labels joined (the
    order turning each epoch; `train_student(paired_plain=True)`), with the same workers, model,
    batch size and iterator. A paired run's figure is its cached rate over its plain rate, each
    side's rows over its seconds on an even number of epochs after the first (so each side ran
    first equally often); the scored figure is the median over the paired runs.
    The same runs give the time from the call to the first training step (P5: a cache hit vs
    plain training).

quality (`kdpipe bench quality`): held-out accuracy on the built-in digits over several student
    seeds, with the demo's settings: alone, distilled from full cached labels, distilled online
    (the same teachers in memory, same settings, no augmentation) and distilled from top-k labels
    with k = 3; mean, standard deviation, min and max, and the paired differences per seed.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from kdpipe import config, runtime, storage
from kdpipe.bench.stats import summary
from kdpipe.data import digits
from kdpipe.demo import ensure_teachers
from kdpipe.generation import generate
from kdpipe.training import trainer

MODES = ("plain", "cached", "online")


def _prepared(workdir: str, overrides: list[str]) -> config.Config:
    """The demo config in `workdir` with the digits written and the teachers trained."""
    cfg = config.resolve_paths(config.load_config(None, [f"workdir={workdir}", *overrides]))
    digits.ensure_builtin(cfg.data)
    ensure_teachers(cfg, progress=False)
    return cfg


def with_copies(cfg: config.Config, copies: int) -> config.Config:
    """`cfg` training on its data.train `copies` times over: the Parquet shards rewritten under
    <workdir>/bench-train-x<copies> with each copy's sample keys suffixed "~<n>" (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if copies <= 1:
        return cfg
    d = cfg.data
    if d.format != "parquet":
        raise ValueError(f"benchmark copies of the training data need data.format=parquet, not {d.format!r}")
    fs, src = storage.filesystem(d.train, d.storage_options)
    dest = storage.join(cfg.workdir, f"bench-train-x{copies}")
    _, dest_path = storage.filesystem(dest, d.storage_options)
    done = storage.join(dest_path, "_copies.json")
    if not fs.exists(done):
        for path in sorted(p for p in fs.find(src) if p.endswith(".parquet")):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            keys = table.column(d.key_column).to_pylist()
            stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
            for n in range(copies):
                out = table.set_column(table.schema.get_field_index(d.key_column), d.key_column,
                                       pa.array([f"{k}~{n}" for k in keys]))
                storage.write_bytes(fs, storage.join(dest_path, f"{stem}-copy{n:03d}.parquet"),
                                    digits.parquet_bytes(out))
        storage.write_json(fs, done, {"source": d.train, "copies": copies})
    c = copy.deepcopy(cfg)
    c.data.builtin, c.data.train = None, dest
    return c


def _settle(timeout: float = 30.0) -> None:
    """Wait until every CPU of the cluster is free again (the previous run's workers gone)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + timeout
    while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < total - 1e-6:
        time.sleep(0.2)


def _fit(cfg: config.Config, mode: str, run: str) -> dict[str, Any]:
    _settle()
    c = copy.deepcopy(cfg)
    c.train.online = mode == "online"
    rep = trainer.train_student(c, distill=mode != "plain", run_name=run, paired_plain=mode == "paired")
    later = [h for h in rep.history if h["epoch"] > 0] or rep.history
    world = later[0].get("world_size", c.train.num_workers)
    rates = [h["samples_per_s"] * world for h in later]
    out = {"samples_per_s": statistics.median(rates), "holdout_accuracy": rep.holdout_accuracy,
           "seconds": rep.seconds, "seconds_to_first_step": rep.seconds_to_first_step}
    if mode == "paired":
        # Each side's rate over the run (rows / seconds), on an even number of epochs after the
        # first: each side ran first in half of them (the first pass of an epoch is the slower).
        timed = later[:len(later) // 2 * 2] or later
        cached = sum(h["rows"] for h in timed) / sum(h["train_s"] for h in timed)
        plain = sum(h["plain_rows"] for h in timed) / sum(h["plain_train_s"] for h in timed)
        out.update(samples_per_s=cached * world, plain_samples_per_s=plain * world, ratio=cached / plain,
                   epoch_ratios=[h["samples_per_s"] / h["plain_samples_per_s"] for h in timed])
    return out



def device_placement(gpus: float) -> dict[str, Any]:
    """Where the benchmark's student trains (train.* values): on a cluster with GPUs, one DDP rank
    per whole GPU (NCCL takes no two ranks on one device), each on its GPU; else the config's CPU ranks."""
    return {"use_gpu": True, "num_workers": int(gpus)} if gpus >= 1 else {}


def student_throughput(workdir: str, repeats: int = 3, epochs: int = 4, overrides: list[str] = (),
                       copies: int = 8, paired_epochs: int = 13) -> dict[str, Any]:
    """Samples/s of plain, cached and online training and of paired runs (`paired_epochs`
    epochs each), `repeats` rounds, the order turning each round; on `copies` copies of the
    digits' training split."""
    cfg = _prepared(workdir, [f"train.epochs={epochs}", *overrides])
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)
    named = {o.split("=", 1)[0].strip() for o in overrides}
    for key, value in device_placement(runtime.cluster_cpus_gpus()[1]).items():
        if f"train.{key}" not in named:  # the caller's own overrides win
            setattr(cfg.train, key, value)
    cfg = with_copies(cfg, copies)
    gen = generate.generate(cfg, progress=False)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in (*MODES, "paired")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for r in range(repeats):
        order = [*MODES, "paired"]
        for mode in order[r % len(order):] + order[:r % len(order)]:
            c = cfg
            if mode == "paired":
                c = copy.deepcopy(cfg)
                c.train.epochs = paired_epochs
            runs[mode].append(_fit(c, mode, f"bench-{stamp}-{mode}-{r}"))
    out: dict[str, Any] = {"repeats": repeats, "epochs": epochs, "paired_epochs": paired_epochs, "copies": copies,
                           "student": cfg.train.student,
                           "teachers": [t.name for t in cfg.teachers], "workers": cfg.train.num_workers,
                           "batch_size_per_worker": cfg.train.batch_size, "rows": gen.teachers[cfg.teachers[0].name].quality["rows"],
                           "teacher_forward_passes_for_cache": gen.teacher_forward_passes}
    for mode in MODES:
        out[mode] = summary([r["samples_per_s"] for r in runs[mode]])
        # P5 from the same runs: call to first optimiser step (cache lookup, join, worker start-up)
        out[mode]["seconds_to_first_step"] = summary([r["seconds_to_first_step"] for r in runs[mode]])
    out["cached_over_plain_separate"] = out["cached"]["median"] / out["plain"]["median"]
    out["cached_over_plain_separate_each"] = [c["samples_per_s"] / p["samples_per_s"]
                                              for c, p in zip(runs["cached"], runs["plain"], strict=True)]
    paired = runs["paired"]
    out["paired"] = {"cached": summary([r["samples_per_s"] for r in paired]),
                     "plain": summary([r["plain_samples_per_s"] for r in paired]),
                     "ratio": summary([r["ratio"] for r in paired]),
                     "epoch_ratio": summary([v for r in paired for v in r["epoch_ratios"]])}
    out["cached_over_plain"] = out["paired"]["ratio"]["median"]  # the scored figure (see the module's doc)
    out["cached_over_online"] = out["cached"]["median"] / out["online"]["median"]
    return out


def format_throughput(r: dict[str, Any]) -> str:
    lines = [f"student {r['student']} on Ray Train ({r['workers']} workers x batch {r['batch_size_per_worker']}), "
             f"{r['rows']} rows ({r.get('copies', 1)} copies of the digits' training split), {r['epochs']} epochs; "
             f"median of {r['repeats']} runs (min-max), the order turning each round, per-epoch rates after the first",
             f"{'mode':<8}{'samples/s':>11}  {'min-max':>15}"]
    for mode, text in (("plain", "labels only"), ("cached", f"{len(r['teachers'])} teachers' cached labels"),
                       ("online", f"{len(r['teachers'])} teachers in memory")):
        m = r[mode]
        lines.append(f"{mode:<8}{m['median']:>11.0f}  {m['min']:>7.0f}-{m['max']:<7.0f} {text}")
    lines.append(f"cached / plain, separate runs: {r['cached_over_plain_separate']:.2f}  (per round "
                 f"{', '.join(f'{v:.2f}' for v in r['cached_over_plain_separate_each'])})")
    p = r["paired"]
    lines.append(f"paired runs ({r['repeats']} x {r['paired_epochs']} epochs, each a cached pass and a plain pass, "
                 f"same workers): cached {p['cached']['median']:.0f} samples/s, plain {p['plain']['median']:.0f}")
    lines.append(f"cached / plain:  {r['cached_over_plain']:.2f}  (goal >= 0.95; per paired run "
                 f"{', '.join(f'{v:.2f}' for v in p['ratio']['each'])}; single epochs "
                 f"{p['epoch_ratio']['min']:.2f}-{p['epoch_ratio']['max']:.2f})")
    lines.append(f"cached / online: {r['cached_over_online']:.2f}x speed-up")
    lines.append("seconds from the call to the first training step (P5 reuse), median (min-max):")
    for mode in MODES:
        f = r[mode]["seconds_to_first_step"]
        lines.append(f"  {mode:<8}{f['median']:>6.2f} s  {f['min']:.2f}-{f['max']:.2f}")
    return "\n".join(lines)


QUALITY_MODES = ("alone", "distilled", "online", "topk3")


def quality(workdir: str, seeds: tuple[int, ...] = (0, 1, 2), overrides: list[str] = ()) -> dict[str, Any]:
    """Held-out accuracy per student seed for the four modes (teachers and data fixed)."""
    cfg = _prepared(workdir, list(overrides))
    topk = copy.deepcopy(cfg)
    topk.labels.mode, topk.labels.k = "topk", 3
    generate.generate(cfg, progress=False)
    generate.generate(topk, progress=False)
    acc: dict[str, list[float]] = {m: [] for m in QUALITY_MODES}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in seeds:
        for mode in QUALITY_MODES:
            c = copy.deepcopy(topk if mode == "topk3" else cfg)
            c.train.seed, c.train.online = seed, mode == "online"
            rep = trainer.train_student(c, distill=mode != "alone", run_name=f"quality-{stamp}-{mode}-{seed}")
            acc[mode].append(rep.holdout_accuracy)
    out: dict[str, Any] = {"seeds": list(seeds), "student": cfg.train.student, "epochs": cfg.train.epochs,
                           "teachers": [t.name for t in cfg.teachers]}
    for mode, values in acc.items():
        out[mode] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "each": values}
    for name, a, b in (("distilled_minus_alone", "distilled", "alone"), ("offline_minus_online", "distilled", "online"),
                       ("topk3_minus_full", "topk3", "distilled")):
        diffs = [(x - y) * 100 for x, y in zip(acc[a], acc[b], strict=True)]
        out[name] = {"mean_points": statistics.mean(diffs), "each_points": diffs}
    return out


def format_quality(r: dict[str, Any]) -> str:
    lines = [f"student {r['student']} on the digits, {r['epochs']} epochs, seeds {r['seeds']}: held-out accuracy",
             f"{'mode':<11}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}"]
    for mode in QUALITY_MODES:
        m = r[mode]
        lines.append(f"{mode:<11}{m['mean']:>8.4f}{m['std']:>8.4f}{m['min']:>8.4f}{m['max']:>8.4f}")
    d = {k: r[k]["mean_points"] for k in ("distilled_minus_alone", "offline_minus_online", "topk3_minus_full")}
    lines += [f"distilled - alone:  {d['distilled_minus_alone']:+.2f} points (goal > 0)",
              f"offline - online:   {d['offline_minus_online']:+.2f} points (goal within 0.5)",
              f"top-3 - full:       {d['topk3_minus_full']:+.2f} points (goal within 1)"]
    return "\n".join(lines)
