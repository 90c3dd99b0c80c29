"""`kdpipe demo`: the whole flow on the built-in digits, in one command."""

from __future__ import annotations

import argparse
import sys

from kdpipe.cli import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="end to end on the built-in digits: teachers, labels, students",
                              description="Train three teachers on the built-in digits, label the data with one "
                                          "Ray Data pass, then train a student alone and distilled with Ray "
                                          "Train. A second run reuses the checkpoints and the cached labels.")
    common.add_config_args(p, config_required=False)
    return p


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    cfg = common.config(args)  # a bad config fails before the imports
    from kdpipe.demo import format_table, run_demo

    print(f"kdpipe demo: workdir {cfg.workdir} (cache {cfg.cache.root})", file=sys.stderr)
    result = run_demo(cfg, progress=not args.quiet)
    emit(args, result.to_dict(), format_table(result, cfg))
    return 0
