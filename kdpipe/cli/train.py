"""`kdpipe train`: a student from the cached soft labels, with Ray Train (no teacher runs)."""

from __future__ import annotations

import argparse

from kdpipe.cli import common
from kdpipe.cli.export import format_export


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a student from cached labels with Ray Train",
                              description="Train train.student on data.train with the cached soft labels of "
                                          "train.teachers (no teacher is run), and evaluate on data.holdout.")
    common.add_config_args(p, config_required=True)
    p.add_argument("--no-distill", action="store_true", help="train on labels alone (the baseline)")
    return p


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    cfg = common.config_with_data(args)  # a bad config fails before the imports
    from kdpipe.training.trainer import train_student

    rep = train_student(cfg, distill=not args.no_distill, progress=not args.quiet)
    obj = {"run": rep.run, "storage": rep.storage, "teachers": rep.teachers,
           "holdout_accuracy": rep.holdout_accuracy, "history": rep.history, "seconds": rep.seconds,
           "export": rep.export}
    taught = f"distilled from {', '.join(rep.teachers)}" if rep.teachers else "alone"
    emit(args, obj, f"student {cfg.train.student} ({taught}): held-out accuracy {rep.holdout_accuracy:.4f}\n"
                    f"run {rep.run}: {rep.storage} (checkpoints, metrics.jsonl, tensorboard/, curves.png)"
                    + format_export(rep.export))
    return 0
