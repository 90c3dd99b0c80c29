"""`kdpipe cache ls | show | verify | gc`: the cache inventory as a person or a script reads it."""

from __future__ import annotations

import argparse
import time
from typing import Any

from kdpipe import storage
from kdpipe.cli import common
from kdpipe.config import Config, parse_duration
from kdpipe.errors import CacheError, KdpipeError, StorageMissing
from kdpipe.labels import cache, upkeep

ACTIONS = {"ls": "list teachers, digests, datasets, sizes, times, and which is latest",
           "show": "print a cache's manifest and label-quality figures (reads no shard)",
           "verify": "re-read every unit: checksums, counts, keys, probability sums; exit 1 on faults",
           "gc": "remove caches no ref points to"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    cache_parser = subparsers.add_parser("cache", help="inspect, verify and clean the soft-label cache",
                                         description="List, show, verify and garbage-collect committed soft "
                                                     "labels. The cache is cache.root of the config (default: "
                                                     "the demo's).")
    actions = cache_parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for name, text in ACTIONS.items():
        p = actions.add_parser(name, help=text, description=text)
        common.add_config_args(p, config_required=False)
        p.add_argument("--root", default=None, help="cache root URI (overrides cache.root)")
        if name in ("show", "verify"):
            p.add_argument("teacher", nargs="?", default=None,
                           help="TEACHER (its latest labels) or TEACHER@DIGEST; default: every cache")
        if name == "gc":
            p.add_argument("--older-than", default="7d", metavar="DURATION",
                           help=f"only caches older than DURATION ({common.DURATION_HELP}; default 7d)")
            p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    return cache_parser


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    """One action on the cache; exit 1 when `verify` finds faults. A store that denies access or
    lacks the root raises a KdpipeError naming the root."""
    older_than = parse_duration(args.older_than) if args.cache_command == "gc" else 0.0  # before any listing
    cfg = common.config(args, [f"cache.root={args.root}"] if args.root else [])
    try:
        fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
        entries = upkeep.list_caches(fs, root)
        if args.cache_command == "ls":
            return _ls(args, cfg, entries, emit)
        if args.cache_command == "show":
            return _show(args, fs, entries, emit)
        if args.cache_command == "verify":
            return _verify(args, fs, entries, emit)
        return _gc(args, fs, entries, older_than, emit)
    except (FileNotFoundError, PermissionError) as e:
        if isinstance(e, KdpipeError):  # already names what and where
            raise
        if isinstance(e, PermissionError):
            raise storage.access_denied(cfg.cache.root, e) from None
        raise StorageMissing(f"cache {cfg.cache.root!r}: {e}; check cache.root (or --root)") from e


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
        raise CacheError(f"no cache matches {spec!r}; known: {', '.join(known) or 'none'}")
    return chosen


def _ls(args: argparse.Namespace, cfg: Config, entries: list[dict[str, Any]], emit: common.Emit) -> int:
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


def _show(args: argparse.Namespace, fs, entries: list[dict[str, Any]], emit: common.Emit) -> int:
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


def _verify(args: argparse.Namespace, fs, entries: list[dict[str, Any]], emit: common.Emit) -> int:
    """Exit 1 when a cache has faults."""
    report = []
    for e in _select(entries, args.teacher):
        faults = upkeep.verify_cache(fs, fs._strip_protocol(e["directory"]))
        report.append({"teacher": e["teacher"], "digest": e["digest"], "directory": e["directory"],
                       "ok": not faults, "faults": faults})
    text = [f"{'ok ' if r['ok'] else 'BAD'} {r['teacher']}@{r['digest']}  {r['directory']}"
            + "".join(f"\n    {f}" for f in r["faults"]) for r in report]
    bad = sum(not r["ok"] for r in report)
    text.append(f"{len(report)} cache(s) checked, {bad} with faults")
    emit(args, {"ok": bad == 0, "caches": report}, "\n".join(text))
    return 1 if bad else 0


def _gc(args: argparse.Namespace, fs, entries: list[dict[str, Any]], older_than: float, emit: common.Emit) -> int:
    doomed = upkeep.garbage(entries, older_than)
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
