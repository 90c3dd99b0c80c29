"""`kdpipe generate`: label the inputs with every teacher of the config, into the cache."""

from __future__ import annotations

import argparse

from kdpipe.cli import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="label the inputs with every teacher into the cache",
                              description="Run every teacher in the config over data.train with Ray Data and "
                                          "commit their soft labels to cache.root. Committed units are reused.")
    common.add_config_args(p, config_required=True)
    return p


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    cfg = common.config_with_data(args)  # a bad config fails before the imports
    from kdpipe.generation.generate import generate

    report = generate(cfg, progress=not args.quiet)
    lines = [f"{'teacher':<14}{'digest':<18}{'units':>7}{'new':>6}{'rows labelled':>15}  accuracy"]
    for name, r in report.teachers.items():
        acc = r.quality.get("teacher_accuracy", float("nan"))
        lines.append(f"{name:<14}{r.digest:<18}{r.units_total:>7}{r.units_written:>6}{r.rows_labelled:>15}  {acc:.4f}")
    lines.append(f"cache: {report.cache_root}  ({report.teacher_forward_passes} teacher forward passes)")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0
