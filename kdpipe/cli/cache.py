"""`kdpipe cache ls | show | verify | gc`: the cache inventory as a person or a script reads it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kdpipe import storage
from kdpipe.config import Config, parse_duration
from kdpipe.labels import cache, upkeep


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _select(entries: list[dict[str, Any]], spec: str | None) -> list[dict[str, Any]]:
    if spec is None:
        return entries
    name, _, digest = spec.partition("@")
    chosen = [e for e in entries if e["teacher"] == name and (e["digest"].startswith(digest) if digest else e["latest"])]
    if not chosen:
        known = sorted({f"{e['teacher']}@{e['digest']}" for e in entries})
        raise ValueError(f"no cache matches {spec!r}; known: {', '.join(known) or 'none'}")
    return chosen


def run_cache_command(args, cfg: Config, emit: Callable[[Any, dict[str, Any], str], None]) -> int:
    try:
        return _run(args, cfg, emit)
    except PermissionError as e:
        if cfg.cache.root in str(e):
            raise
        raise storage.access_denied(cfg.cache.root, e) from None


def _run(args, cfg: Config, emit: Callable[[Any, dict[str, Any], str], None]) -> int:
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    entries = upkeep.list_caches(fs, root)
    action = args.cache_command
    if action == "ls":
        lines = [f"{'teacher':<12}{'digest':<18}{'dataset':<18}{'labels':<22}{'rows':>7}{'size':>11}  "
                 f"{'created':<17}latest"]
        for e in entries:
            lab = e.get("labels") or {}
            mode = f"top-{lab['k']}" if lab.get("mode") == "topk" else lab.get("mode", "?")
            desc = f"{mode} T={lab.get('temperature', '?')} {lab.get('dtype', '')}"
            state = "yes" if e["latest"] else ("" if e["complete"] else "(incomplete)")
            lines.append(f"{e['teacher']:<12}{e['digest']:<18}{e['fingerprint']:<18}{desc:<22}"
                         f"{e.get('rows', 0):>7}{_size(e.get('bytes', 0)):>11}  {_when(e.get('created_at')):<17}{state}")
        lines.append(f"cache: {cfg.cache.root}")
        emit(args, {"cache_root": cfg.cache.root, "caches": entries}, "\n".join(lines))
        return 0
    if action == "show":
        chosen = _select([e for e in entries if e["complete"]], args.teacher)
        out = []
        for e in chosen:
            m = cache.read_manifest(fs, fs._strip_protocol(e["directory"]))
            q = m["quality"]
            out.append({"teacher": e["teacher"], "digest": e["digest"], "latest": e["latest"],
                        "directory": e["directory"], "dataset": m["dataset"], "labels": m["labels"],
                        "teacher_info": m["teacher"], "rows": m["rows"], "units": len(m["units"]),
                        "bytes": e["bytes"], "quality": q, "kdpipe_version": m["kdpipe_version"]})
        text = []
        for o in out:
            q, lab = o["quality"], o["labels"]
            text += [f"{o['teacher']}@{o['digest']}{'  (latest)' if o['latest'] else ''}",
                     f"  dataset        {o['dataset']['uri']}  fingerprint {o['dataset']['fingerprint']}",
                     f"  labels         {lab['mode']}, T={lab['temperature']}, {lab['dtype']}, {lab['num_classes']} classes, "
                     f"{lab['format']}, schema v{lab['schema_version']}",
                     f"  rows / units   {o['rows']} / {o['units']}  ({_size(o['bytes'])})",
                     f"  accuracy       {q.get('teacher_accuracy', float('nan')):.4f}  (on the labelled rows)",
                     f"  mean entropy   {q.get('mean_entropy', float('nan')):.4f} nats at T",
                     f"  mean max prob  {q.get('mean_max_prob', float('nan')):.4f} at T",
                     *([f"  top-{lab['k']} mass     {q['mean_topk_mass']:.4f} (mean probability the stored classes cover)"]
                       if "mean_topk_mass" in q else []),
                     f"  checkpoint     {o['teacher_info']['checkpoint']}", ""]
        emit(args, {"caches": out}, "\n".join(text).rstrip())
        return 0
    if action == "verify":
        chosen = _select(entries, args.teacher)
        report = []
        for e in chosen:
            faults = upkeep.verify_cache(fs, fs._strip_protocol(e["directory"]))
            report.append({"teacher": e["teacher"], "digest": e["digest"], "directory": e["directory"],
                           "ok": not faults, "faults": faults})
        text = [f"{'ok ' if r['ok'] else 'BAD'} {r['teacher']}@{r['digest']}  {r['directory']}"
                + "".join(f"\n    {f}" for f in r["faults"]) for r in report]
        bad = sum(not r["ok"] for r in report)
        text.append(f"{len(report)} cache(s) checked, {bad} with faults")
        emit(args, {"ok": bad == 0, "caches": report}, "\n".join(text))
        return 1 if bad else 0
    if action == "gc":
        doomed = upkeep.garbage(entries, parse_duration(args.older_than))
        if not args.dry_run:
            for e in doomed:
                fs.rm(fs._strip_protocol(e["directory"]), recursive=True)
        verb = "would remove" if args.dry_run else "removed"
        text = [f"{verb} {e['teacher']}@{e['digest']} {e['fingerprint']}-{e['label_hash']}  "
                f"({_size(e.get('bytes', 0))})" for e in doomed]
        text.append(f"{verb} {len(doomed)} cache(s), kept {len(entries) - len(doomed)}")
        emit(args, {"dry_run": args.dry_run, "removed": [e["directory"] for e in doomed],
                    "kept": len(entries) - len(doomed)}, "\n".join(text))
        return 0
    raise AssertionError(action)
