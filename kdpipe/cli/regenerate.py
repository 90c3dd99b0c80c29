"""`kdpipe regenerate`: relabel only what changed (teachers, inputs) and move the latest refs,
once or on a schedule."""

from __future__ import annotations

import argparse

from kdpipe.cli import common
from kdpipe.config import parse_duration


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "regenerate", help="relabel only what changed (teachers, inputs); move the latest refs",
        description="Compare the current teachers (checkpoint digests; a `registry` file if the config names "
                    "one) and input shards with the cache, print the plan (which units are missing or stale "
                    "and why), label only those, then move refs/<teacher>.json. Nothing changed: nothing runs. "
                    "A second regenerate on the same cache yields while the first holds its lease.")
    common.add_config_args(p, config_required=True)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--every", default=None, metavar="DURATION",
                   help=f"repeat on a schedule, every DURATION ({common.DURATION_HELP}); re-reads the config "
                        "each cycle")
    p.add_argument("--cycles", type=int, default=0, help="with --every: stop after N cycles (default: run forever)")
    return p


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    every = None if args.every is None else parse_duration(args.every)  # typos fail before any work
    cfg = common.config_with_data(args)
    from kdpipe.generation import regenerate

    progress = not args.quiet
    if every is None:
        result = regenerate.regenerate(cfg, dry_run=args.dry_run, progress=progress, say=common.say)
        work = f", {result['teacher_forward_passes']} teacher forward passes" if "generate" in result else ""
        emit(args, result, f"regenerate: {result['status']} ({result['seconds']:.1f} s{work})")
        return 0
    results = regenerate.run_every(lambda: common.config(args), every, args.cycles, args.dry_run, progress,
                                   common.say)
    emit(args, {"cycles": results}, "\n".join(f"cycle {r['cycle']}: {r['status']}" for r in results))
    return 1 if any(r["status"] == "failed" for r in results) else 0
