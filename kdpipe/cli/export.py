"""`kdpipe export`: a trained student as TorchScript / ONNX, each checked on the held-out data."""

from __future__ import annotations

import argparse

from kdpipe.cli import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a trained student to TorchScript / ONNX (optionally int8)",
                              description="Export the latest checkpoint of a run (<train.storage_path>/RUN) to "
                                          "TorchScript and ONNX, with normalisation built in, and check each "
                                          "exported model's held-out accuracy against the trained one.")
    common.add_config_args(p, config_required=True)
    p.add_argument("--run", required=True, help="run name (printed by `kdpipe train`)")
    p.add_argument("--formats", default="torchscript,onnx", help="comma-separated: torchscript,onnx")
    p.add_argument("--int8", action="store_true", help="also a dynamically int8-quantised TorchScript model")
    return p


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    cfg = common.config_with_data(args)  # a bad config fails before the imports
    from kdpipe import storage
    from kdpipe.training import export

    x, y = export.holdout_pixels(cfg)
    record = export.export_student(storage.join(cfg.train.storage_path, args.run), cfg.cache.storage_options,
                                   x, y, tuple(f for f in args.formats.split(",") if f), args.int8,
                                   cfg.allow_import)
    emit(args, record, format_export(record).strip())
    return 0


def format_export(record: dict) -> str:
    """The exported models of `record` (export_student's, or a training run's `export`), one a line."""
    if not record:
        return ""
    lines = [f"\nexported (trained model held-out accuracy {record.get('trained_holdout_accuracy', float('nan')):.4f}):"]
    for fmt, m in record["models"].items():
        lines.append(f"  {fmt:<16} accuracy {m.get('holdout_accuracy', float('nan')):.4f}  "
                     f"max |logit diff| {m.get('max_abs_logit_diff', float('nan')):.1e}  {m['path']}")
    return "\n".join(lines)
