"""Student-side benchmarks, every figure measured side by side in one run.

throughput (`kdpipe bench student`): samples/s of the same student on the same Ray Train path
    (same workers, data, batch size, epochs) trained three ways, alternating, `repeats` rounds:
      plain    supervised, labels only (the reference);
      cached   distilled from three teachers' cached soft labels (kdpipe's way);
      online   distilled with the three teachers in memory, run on every batch (the baseline).
    A run's rate is the median of its per-epoch rates after the first epoch (rank 0's rows / its
    epoch time, times the world size); Ray Train's worker start-up is left out for every mode.
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

from kdpipe import config, digits, generate, train
from kdpipe.demo import ensure_teachers

MODES = ("plain", "cached", "online")


def _prepared(workdir: str, overrides: list[str]) -> config.Config:
    """The demo config in `workdir` with the digits written and the teachers trained."""
    cfg = config.resolve_paths(config.load_config(None, [f"workdir={workdir}", *overrides]))
    digits.ensure_builtin(cfg.data)
    ensure_teachers(cfg, progress=False)
    return cfg


def _fit(cfg: config.Config, mode: str, run: str) -> dict[str, Any]:
    c = copy.deepcopy(cfg)
    c.train.online = mode == "online"
    rep = train.train_student(c, distill=mode != "plain", run_name=run)
    later = [h for h in rep.history if h["epoch"] > 0] or rep.history
    world = later[0].get("world_size", c.train.num_workers)
    rates = [h["samples_per_s"] * world for h in later]
    return {"samples_per_s": statistics.median(rates), "holdout_accuracy": rep.holdout_accuracy,
            "seconds": rep.seconds, "seconds_to_first_step": rep.seconds_to_first_step}


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": values}


def student_throughput(workdir: str, repeats: int = 3, epochs: int = 8, overrides: list[str] = ()) -> dict[str, Any]:
    """Samples/s of plain, cached and online training, alternating, `repeats` rounds."""
    cfg = _prepared(workdir, [f"train.epochs={epochs}", *overrides])
    gen = generate.generate(cfg, progress=False)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for r in range(repeats):
        for mode in MODES:
            runs[mode].append(_fit(cfg, mode, f"bench-{stamp}-{mode}-{r}"))
    out: dict[str, Any] = {"repeats": repeats, "epochs": epochs, "student": cfg.train.student,
                           "teachers": [t.name for t in cfg.teachers], "workers": cfg.train.num_workers,
                           "batch_size_per_worker": cfg.train.batch_size, "rows": gen.teachers[cfg.teachers[0].name].quality["rows"],
                           "teacher_forward_passes_for_cache": gen.teacher_forward_passes}
    for mode in MODES:
        out[mode] = _summary([r["samples_per_s"] for r in runs[mode]])
        # P5 from the same runs: call to first optimiser step (cache lookup, join, worker start-up)
        out[mode]["seconds_to_first_step"] = _summary([r["seconds_to_first_step"] for r in runs[mode]])
    out["cached_over_plain"] = out["cached"]["median"] / out["plain"]["median"]
    out["cached_over_online"] = out["cached"]["median"] / out["online"]["median"]
    per_round = [c["samples_per_s"] / p["samples_per_s"] for c, p in zip(runs["cached"], runs["plain"], strict=True)]
    out["cached_over_plain_each"] = per_round
    return out


def format_throughput(r: dict[str, Any]) -> str:
    lines = [f"student {r['student']} on Ray Train ({r['workers']} workers x batch {r['batch_size_per_worker']}), "
             f"{r['rows']} rows, {r['epochs']} epochs; median of {r['repeats']} alternating runs (min-max), "
             "per-epoch rates after the first epoch",
             f"{'mode':<8}{'samples/s':>11}  {'min-max':>15}"]
    for mode, text in (("plain", "labels only"), ("cached", f"{len(r['teachers'])} teachers' cached labels"),
                       ("online", f"{len(r['teachers'])} teachers in memory")):
        m = r[mode]
        lines.append(f"{mode:<8}{m['median']:>11.0f}  {m['min']:>7.0f}-{m['max']:<7.0f} {text}")
    lines.append(f"cached / plain:  {r['cached_over_plain']:.2f}  (goal >= 0.95; per round "
                 f"{', '.join(f'{v:.2f}' for v in r['cached_over_plain_each'])})")
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
            rep = train.train_student(c, distill=mode != "alone", run_name=f"quality-{stamp}-{mode}-{seed}")
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
