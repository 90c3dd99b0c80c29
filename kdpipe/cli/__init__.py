"""The `kdpipe` command: demo | generate | train.

Every command takes a YAML config (the demo's is built in) and `--set section.key=value`
overrides. With `--json` a command prints exactly one JSON object on stdout; logs, Ray's output
and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

from kdpipe import __version__
from kdpipe.config import Config, ConfigError, load_config, parse_duration, resolve_paths


def _add_config_args(p: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        p.add_argument("config", help="YAML config file (see jobs/configs/)")
    else:
        p.add_argument("--config", default=None, help="YAML config file (default: the built-in demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set labels.temperature=2 (repeatable)")
    p.add_argument("--workdir", default=None, help="shortcut for --set workdir=DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdpipe",
        description="Offline knowledge distillation: run teachers once with Ray Data, cache their soft "
                    "labels on object storage, stream them into Ray Train students.",
    )
    parser.add_argument("--version", action="version", version=f"kdpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="end to end on the built-in digits: teachers, labels, students",
                       description="Train three teachers on the built-in digits, label the data with one Ray "
                                   "Data pass, then train a student alone and distilled with Ray Train. "
                                   "A second run reuses the checkpoints and the cached labels.")
    _add_config_args(p, config_required=False)
    p = sub.add_parser("generate", help="label the inputs with every teacher into the cache",
                       description="Run every teacher in the config over data.train with Ray Data and "
                                   "commit their soft labels to cache.root. Committed units are reused.")
    _add_config_args(p, config_required=True)
    p = sub.add_parser("train", help="train a student from cached labels with Ray Train",
                       description="Train train.student on data.train with the cached soft labels of "
                                   "train.teachers (no teacher is run), and evaluate on data.holdout.")
    _add_config_args(p, config_required=True)
    p.add_argument("--no-distill", action="store_true", help="train on labels alone (the baseline)")
    p = sub.add_parser("regenerate", help="relabel only what changed (teachers, inputs); move the latest refs",
                       description="Compare the current teachers (checkpoint digests; a `registry` file if the "
                                   "config names one) and input shards with the cache, print the plan (which "
                                   "units are missing or stale and why), label only those, then move "
                                   "refs/<teacher>.json. Nothing changed: nothing runs. A second regenerate on "
                                   "the same cache yields while the first holds its lease.")
    _add_config_args(p, config_required=True)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--every", default=None, metavar="DURATION",
                   help="repeat on a schedule, e.g. 30m, 6h, 1d (re-reads the config each cycle)")
    p.add_argument("--cycles", type=int, default=0, help="with --every: stop after N cycles (default: run forever)")
    p = sub.add_parser("export", help="export a trained student to TorchScript / ONNX (optionally int8)",
                       description="Export the latest checkpoint of a run (<train.storage_path>/RUN) to "
                                   "TorchScript and ONNX, with normalisation built in, and check each "
                                   "exported model's held-out accuracy against the trained one.")
    _add_config_args(p, config_required=True)
    p.add_argument("--run", required=True, help="run name (printed by `kdpipe train`)")
    p.add_argument("--formats", default="torchscript,onnx", help="comma-separated: torchscript,onnx")
    p.add_argument("--int8", action="store_true", help="also a dynamically int8-quantised TorchScript model")

    from kdpipe.cli import submit

    submit.add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks, figures measured side by side in one run",
                           description="Benchmarks. storage: bytes per sample per teacher for each label "
                                       "mode and format, and what top-k loses (KL to the full distribution).")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = bench_sub.add_parser("storage", help="bytes per sample per teacher for full and top-k labels")
    p.add_argument("--rows", type=int, default=10_000, help="synthetic samples per configuration")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = bench_sub.add_parser(
        "stream", help="student input stream from object storage vs local files (samples/s, ratio)",
        description="Stream the student's inputs (PNG in Parquet, joined with three teachers' cached labels) "
                    "from an object store and from local files, alternating; print samples/s and the ratio. "
                    "Without --remote it starts a throwaway SeaweedFS S3 server on 127.0.0.1 (needs the "
                    "test extra). Credentials for --remote come from the environment.")
    p.add_argument("--remote", default=None, help="e.g. s3://bucket/prefix (written to, then left in place)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL for S3-compatible stores")
    p.add_argument("--copies", type=int, default=4, help="copies of the 1,797 digits (default 4)")
    p.add_argument("--upsample", type=int, default=4, help="image side = 8 x upsample (default 32 px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = bench_sub.add_parser(
        "student", help="student samples/s: cached labels vs plain training vs teachers in memory",
        description="Train the demo's student on the same Ray Train path three ways, alternating: labels only, "
                    "distilled from three teachers' cached labels, and distilled with the teachers in memory "
                    "(online). Prints samples/s (median, min-max), cached/plain and cached/online.")
    p.add_argument("--workdir", default=None, help="where data, teachers and cache live (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--copies", type=int, default=8,
                   help="train on this many copies of the digits' 899 training rows, each with its own keys and "
                        "labels, so that an epoch lasts long enough to time (default 8: 7,192 rows)")
    p.add_argument("--paired-epochs", type=int, default=13,
                   help="epochs of each paired run (a cached pass and a plain pass every epoch; default 13)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the demo config (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = bench_sub.add_parser(
        "quality", help="held-out accuracy over seeds: alone, distilled, online, top-3",
        description="On the built-in digits with the demo's settings, train the student per seed alone, distilled "
                    "from full cached labels, distilled online (teachers in memory) and from top-3 labels; print "
                    "mean, spread and the paired differences.")
    p.add_argument("--workdir", default=None, help="where data, teachers and cache live (default: a temporary folder)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default 0,1,2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the demo config (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    suite = {
        "all": ("every figure (P1-P7) with its goal, in one run (about 10 minutes on 2 cores at size 1)",
                "Run the whole benchmark suite: P1 generation vs a plain PyTorch loop, P2 three teachers in one "
                "pass vs three passes, P3 student throughput cached/plain/online (and P5, time to the first step), "
                "P4 label storage, P6 regeneration after one teacher changes, P7 actor scaling; then a table of "
                "the goals. Each figure alternates its sides and reports the median with min and max."),
        "generate": ("P1: Ray Data teacher labelling vs a plain PyTorch inference loop",
                     "P1: one teacher over the same preprocessed inputs, same device and batch size: the plain loop, "
                     "the Ray Data labelling stage, and the whole generate() path from the input shards."),
        "teachers": ("P2: three teachers in one pass vs three separate passes",
                     "P2: seconds to label every row with three teachers in one generate() pass (decode once) "
                     "against one pass per teacher."),
        "scale": ("P7: labelling throughput with 1, 2, 4 ... actors",
                  "P7: the labelling stage with more and more actors; speed-up and efficiency per actor."),
        "regenerate": ("P6: regeneration after one of three teachers changes vs a full generation",
                       "P6: teacher forward passes and seconds of `kdpipe regenerate` after one checkpoint of three "
                       "changes, against a full generation into an empty cache; three torchvision teachers over "
                       "size x 512 synthetic 64 px images (the fixed start-up weighs less as --size grows)."),
        "load": ("generation over 20k and 100k small images: peak memory of the driver and workers",
                 "Generate labels for synthetic 8x8 images at two sizes and sample the resident memory of the "
                 "driver and every Ray worker: the peaks should not grow with the dataset."),
    }
    for name, (text, description) in suite.items():
        p = bench_sub.add_parser(name, help=text, description=description)
        p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
        if name == "load":
            p.add_argument("--rows", default="20000,100000", help="comma-separated dataset sizes (default 20000,100000)")
        else:
            p.add_argument("--size", type=float, default=1.0, help="scale the inputs (default 1)")
            p.add_argument("--repeats", type=int, default=2 if name in ("all", "regenerate") else 3)
            p.add_argument("--setup", choices=("auto", "small", "large"), default=None,
                           help="teachers and images: small (resnet18 & co at 64 px, the CPU default) or large "
                                "(resnet50, vit_b_16, convnext_tiny at 224 px, the CUDA default); default auto, "
                                "or $KDPIPE_BENCH_SETUP")
        if name == "all":
            p.add_argument("--only", default=",".join(_SUITE_PARTS),
                           help="comma-separated parts, run in this order (default: all)")
            p.add_argument("--out", default=None, metavar="PATH",
                           help="also write the result as JSON here (a path or URI) after every part, so that "
                                "a run cut short keeps the figures it measured")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p = bench_sub.add_parser(
        "show", help="print a saved `bench all` result (--out, or a benchmark job's result.json) as its table",
        description="Print the tables and the goals of a `kdpipe bench all` result saved as JSON (by --out, or by "
                    "jobs/benchmark.py in <workdir>/bench/result.json), whole or cut short; storage credentials "
                    "for a URI come from the environment.")
    p.add_argument("result", help="the JSON file: a path or URI")
    p.add_argument("--json", action="store_true", help="print the JSON object itself")

    cache = sub.add_parser("cache", help="inspect, verify and clean the soft-label cache",
                           description="List, show, verify and garbage-collect committed soft labels. The cache "
                                       "is cache.root of the config (default: the demo's).")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for name, text in (("ls", "list teachers, digests, datasets, sizes, times, and which is latest"),
                       ("show", "print a cache's manifest and label-quality figures (reads no shard)"),
                       ("verify", "re-read every unit: checksums, counts, keys, probability sums; exit 1 on faults"),
                       ("gc", "remove caches no ref points to")):
        p = cache_sub.add_parser(name, help=text, description=text)
        _add_config_args(p, config_required=False)
        p.add_argument("--root", default=None, help="cache root URI (overrides cache.root)")
        if name in ("show", "verify"):
            p.add_argument("teacher", nargs="?", default=None,
                           help="TEACHER (its latest labels) or TEACHER@DIGEST; default: every cache")
        if name == "gc":
            p.add_argument("--older-than", default="7d", help="only caches older than this (e.g. 0s, 12h, 7d)")
            p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.workdir:
        overrides.insert(0, f"workdir={args.workdir}")
    if getattr(args, "root", None):
        overrides.append(f"cache.root={args.root}")
    return resolve_paths(load_config(args.config, overrides))


_RESULTS = None  # where results go: the process's real stdout (see _stdout_for_results_only)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    out = _RESULTS or sys.stdout
    print(json.dumps(obj, default=float) if args.json else text, file=out, flush=True)


@contextlib.contextmanager
def _stdout_for_results_only():
    """Point file descriptor 1 at stderr while a command runs, so that whatever Ray or a library
    prints (e.g. the raylet's worker-count warnings, which reach the driver's stdout) lands among
    the diagnostics, and stdout carries only the result (`--json` stays parseable)."""
    global _RESULTS
    try:
        redirect = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # stdout replaced (e.g. captured): leave it be
        redirect = False
    if not redirect:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _RESULTS = os.fdopen(os.dup(saved), "w")
    try:
        yield
    finally:
        sys.stdout.flush()
        _RESULTS.close()
        _RESULTS = None
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="kdpipe: %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)
    with _stdout_for_results_only():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "bench" and args.bench_command == "stream":
            return _bench_stream(args)
        if args.command == "bench" and args.bench_command in ("student", "quality"):
            return _bench_student(args)
        if args.command == "bench" and args.bench_command == "show":
            from kdpipe import storage
            from kdpipe.bench import suite as bench_suite

            result = storage.read_json(*storage.filesystem(args.result))
            if not isinstance(result, dict) or not {"machine", "parts", "goals"} <= set(result):
                raise ValueError(f"{args.result}: not a `kdpipe bench all` result (one written by --out or by "
                                 "jobs/benchmark.py); other benchmarks print their own tables")
            _emit(args, result, bench_suite.format_all(result))
            return 1 if result.get("errors") else 0
        if args.command == "bench" and args.bench_command in ("all", "generate", "teachers", "scale", "regenerate", "load"):
            return _bench_suite(args)
        if args.command == "bench":
            from kdpipe.bench.footprint import format_storage, storage_figures

            figures = storage_figures(args.rows, args.temperature)
            _emit(args, {"storage": figures, "rows": args.rows, "temperature": args.temperature},
                  format_storage(figures, args.rows, args.temperature))
            return 0
        if args.command == "submit":  # validates its config itself and handles its own errors
            from kdpipe.cli import submit

            return submit.run(args, _emit)
        cfg = _config(args)
        return _run(args, cfg)
    except (ConfigError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"kdpipe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # storage.StorageUnreachable and the like: the message says what to do
        print(f"kdpipe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from kdpipe.storage import NO_CREDENTIALS_HINT, missing_credentials

        if not missing_credentials(e):
            raise
        print(f"kdpipe {args.command}: error: {NO_CREDENTIALS_HINT}", file=sys.stderr)
        return 2


def _bench_stream(args: argparse.Namespace) -> int:
    import tempfile

    from kdpipe.bench.streaming import format_stream, stream_throughput
    from kdpipe.testing import s3local

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        server = None
        if args.remote is None:
            server = s3local.start(f"{tmp}/s3", "KDPIPEBENCHKEY", "kdpipe-bench-secret-0123456789", "bench")
            remote, options = "s3://bench/stream", server.options
        else:
            remote = args.remote
            options = {"client_kwargs": {"endpoint_url": args.endpoint}} if args.endpoint else {}
        try:
            result = stream_throughput(f"{tmp}/local", remote, options, args.copies, 3, args.upsample, args.repeats)
        finally:
            if server is not None:
                server.stop()
    if server is not None:
        result["remote_uri"] = "SeaweedFS S3 on 127.0.0.1 (weed mini)"
    _emit(args, result, format_stream(result))
    return 0


_SUITE_PARTS = ("p1", "p2", "p3", "p4", "p6", "p7")


def _bench_suite(args: argparse.Namespace) -> int:
    import tempfile

    from kdpipe.bench import labelling as g
    from kdpipe.bench import loading
    from kdpipe.bench import suite as bench_suite

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        workdir = args.workdir or tmp
        command = args.bench_command
        if getattr(args, "setup", None):
            os.environ[g.SETUP_ENV] = args.setup
        if command == "all":
            parts = tuple(p.strip().lower() for p in args.only.split(",") if p.strip())
            result = bench_suite.run_all(workdir, args.size, args.repeats, parts,
                                         say=lambda text: print(text, file=sys.stderr), out_path=args.out)
            text = bench_suite.format_all(result)
            if result["errors"]:  # the figures that did come are still printed; the exit status says some failed
                _emit(args, result, text)
                print(f"kdpipe bench all: {', '.join(result['errors'])} failed (see above); the other figures "
                      "are in the result", file=sys.stderr)
                return 1
        elif command == "generate":
            result = g.generation_throughput(workdir, args.size, args.repeats)
            text = g.format_generation(result)
        elif command == "teachers":
            result = g.multi_teacher_pass(workdir, args.size, args.repeats)
            text = g.format_multi_teacher(result)
        elif command == "scale":
            result = g.actor_scaling(workdir, args.size, args.repeats)
            text = g.format_actor_scaling(result)
        elif command == "regenerate":
            result = bench_suite.regeneration_cost(workdir, args.repeats, args.size)
            text = bench_suite.format_regeneration(result)
        else:
            sizes = tuple(int(v) for v in args.rows.split(",") if v.strip())
            result = loading.load_figures(workdir, sizes)
            text = loading.format_load(result)
    _emit(args, result, text)
    return 0


def _bench_student(args: argparse.Namespace) -> int:
    import tempfile

    from kdpipe.bench import student as b

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        workdir = args.workdir or tmp
        if args.bench_command == "student":
            result = b.student_throughput(workdir, args.repeats, args.epochs, args.overrides, args.copies,
                                          args.paired_epochs)
            text = b.format_throughput(result)
        else:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
            result = b.quality(workdir, seeds, args.overrides)
            text = b.format_quality(result)
    _emit(args, result, text)
    return 0


def _regenerate(args: argparse.Namespace, cfg: Config, progress: bool) -> int:
    from kdpipe.generation import regenerate

    def say(text: str) -> None:
        print(text, file=sys.stderr)

    if args.every is None:
        result = regenerate.regenerate(cfg, dry_run=args.dry_run, progress=progress, say=say)
        _emit(args, result, f"regenerate: {result['status']} ({result['seconds']:.1f} s"
                            + (f", {result['teacher_forward_passes']} teacher forward passes" if "generate" in result
                               else "") + ")")
        return 0
    every = parse_duration(args.every)
    results = regenerate.run_every(lambda: _config(args), every, args.cycles, args.dry_run, progress, say)
    _emit(args, {"cycles": results}, "\n".join(f"cycle {r['cycle']}: {r['status']}" for r in results))
    return 1 if any(r["status"] == "failed" for r in results) else 0


def _export_text(record: dict) -> str:
    if not record:
        return ""
    lines = [f"\nexported (trained model held-out accuracy {record.get('trained_holdout_accuracy', float('nan')):.4f}):"]
    for fmt, m in record["models"].items():
        lines.append(f"  {fmt:<16} accuracy {m.get('holdout_accuracy', float('nan')):.4f}  "
                     f"max |logit diff| {m.get('max_abs_logit_diff', float('nan')):.1e}  {m['path']}")
    return "\n".join(lines)


def _run(args: argparse.Namespace, cfg: Config) -> int:
    from kdpipe.data import digits

    progress = not args.quiet
    if args.command == "cache":
        from kdpipe.cli.cache import run_cache_command

        return run_cache_command(args, cfg, _emit)
    if args.command == "demo":
        from kdpipe.demo import format_table, run_demo

        print(f"kdpipe demo: workdir {cfg.workdir} (cache {cfg.cache.root})", file=sys.stderr)
        result = run_demo(cfg, progress=progress)
        _emit(args, result.to_dict(), format_table(result, cfg))
        return 0
    d = cfg.data
    if d.builtin:
        digits.ensure_builtin(d)
    if args.command == "generate":
        from kdpipe.generation.generate import generate

        report = generate(cfg, progress=progress)
        lines = [f"{'teacher':<14}{'digest':<18}{'units':>7}{'new':>6}{'rows labelled':>15}  accuracy"]
        for name, r in report.teachers.items():
            acc = r.quality.get("teacher_accuracy", float("nan"))
            lines.append(f"{name:<14}{r.digest:<18}{r.units_total:>7}{r.units_written:>6}{r.rows_labelled:>15}  {acc:.4f}")
        lines.append(f"cache: {report.cache_root}  ({report.teacher_forward_passes} teacher forward passes)")
        _emit(args, report.to_dict(), "\n".join(lines))
        return 0
    if args.command == "train":
        from kdpipe.training.trainer import train_student

        rep = train_student(cfg, distill=not args.no_distill)
        obj = {"run": rep.run, "storage": rep.storage, "teachers": rep.teachers,
               "holdout_accuracy": rep.holdout_accuracy, "history": rep.history, "seconds": rep.seconds,
               "export": rep.export}
        _emit(args, obj, f"student {cfg.train.student} ({'distilled from ' + ', '.join(rep.teachers) if rep.teachers else 'alone'}): "
                         f"held-out accuracy {rep.holdout_accuracy:.4f}\nrun {rep.run}: {rep.storage} "
                         "(checkpoints, metrics.jsonl, tensorboard/, curves.png)" + _export_text(rep.export))
        return 0
    if args.command == "regenerate":
        return _regenerate(args, cfg, progress)
    if args.command == "export":
        from kdpipe import storage
        from kdpipe.training import export

        x, y = export.holdout_pixels(cfg)
        record = export.export_student(storage.join(cfg.train.storage_path, args.run), cfg.cache.storage_options,
                                       x, y, tuple(f for f in args.formats.split(",") if f), args.int8,
                                       cfg.allow_import)
        _emit(args, record, _export_text(record).strip())
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
