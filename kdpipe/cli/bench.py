"""`kdpipe bench ...`: the benchmarks, each measuring its figure against its reference in one run,
and `bench show` for a saved `bench all` result. The measuring lives in kdpipe.bench; here are
the flags and the tables."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from kdpipe.cli import common
from kdpipe.errors import ConfigError, StorageMissing

# The figures of `kdpipe bench all` that also run alone: name -> (help, description).
SUITE = {
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmarks, figures measured side by side in one run",
                                  description="Benchmarks. storage: bytes per sample per teacher for each label "
                                              "mode and format, and what top-k loses (KL to the full "
                                              "distribution).")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add_storage(benchmarks)
    _add_stream(benchmarks)
    _add_student(benchmarks)
    _add_quality(benchmarks)
    _add_parity(benchmarks)
    _add_driver(benchmarks)
    for name, (text, description) in SUITE.items():
        _add_suite_part(benchmarks, name, text, description)
    _add_show(benchmarks)
    return bench


def _add_storage(benchmarks) -> None:
    p = benchmarks.add_parser("storage", help="bytes per sample per teacher for full and top-k labels")
    p.add_argument("--rows", type=int, default=10_000, help="synthetic samples per configuration")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_stream(benchmarks) -> None:
    p = benchmarks.add_parser(
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


def _add_student(benchmarks) -> None:
    p = benchmarks.add_parser(
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


def _add_quality(benchmarks) -> None:
    p = benchmarks.add_parser(
        "quality", help="held-out accuracy over seeds: alone, distilled, online, top-3",
        description="On the built-in digits with the demo's settings, train the student per seed alone, distilled "
                    "from full cached labels, distilled online (teachers in memory) and from top-3 labels; print "
                    "mean, spread and the paired differences.")
    p.add_argument("--workdir", default=None, help="where data, teachers and cache live (default: a temporary folder)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default 0,1,2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the demo config (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_driver(benchmarks) -> None:
    p = benchmarks.add_parser(
        "driver", help="generation's driver at two dataset sizes: CPU, memory, storage requests and bytes",
        description="Label synthetic 8x8 images with linear teachers over many classes (full float16 labels and "
                    "top-k labels), at each size into an empty cache, and print samples/s, the driver's CPU "
                    "seconds and per sample and teacher, its peak memory, and the storage requests and bytes it "
                    "made on the cache, with how each grew from the smallest size to the largest.")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--rows", default="100000,200000", help="comma-separated dataset sizes (default 100000,200000)")
    p.add_argument("--shards", type=int, default=100, help="input shards at every size (default 100)")
    p.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--teachers", type=int, default=3, help="linear teachers (default 3)")
    p.add_argument("--k", type=int, default=10, help="k of the top-k labels (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _driver(args: argparse.Namespace, emit: common.Emit) -> int:
    sizes = _ints(args.rows, "--rows")
    if not sizes or min(sizes) < 1 or min(args.shards, args.classes, args.teachers, args.k) < 1 or args.k > args.classes:
        raise ConfigError("bench driver: --rows, --shards, --classes, --teachers and --k must be positive, "
                          "and --k at most --classes")
    from kdpipe.bench import driver

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        result = driver.driver_figures(args.workdir or tmp, sizes, args.shards, args.classes, args.teachers, args.k)
    emit(args, result, driver.format_driver(result))
    return 0


def _add_parity(benchmarks) -> None:
    p = benchmarks.add_parser(
        "parity", help="held-out accuracy of kdpipe's student vs a plain PyTorch loop, on class-sorted shards",
        description="On the built-in digits written as an ImageFolder (each input shard one class), train the "
                    "student per seed four ways with the same architecture, optimiser, global batch and epochs: "
                    "kdpipe alone and distilled (Ray Train on the cached labels), and a plain PyTorch loop alone "
                    "and distilled from the same teachers (rows in memory, a full random permutation every "
                    "epoch). Print the accuracies and the gaps kdpipe - plain, judged within 0.5 points.")
    p.add_argument("--workdir", default=None, help="where data, teachers and cache live, under <workdir>/parity "
                                                   "(default: a temporary folder)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every student (default: train.epochs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the demo config (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_suite_part(benchmarks, name: str, text: str, description: str) -> None:
    p = benchmarks.add_parser(name, help=text, description=description)
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
    if name == "all":  # the default parts are kdpipe.bench.suite.PARTS, read when the suite runs
        p.add_argument("--only", default=None, help="comma-separated parts, run in this order (default: all)")
        p.add_argument("--out", default=None, metavar="PATH",
                       help="also write the result as JSON here (a path or URI) after every part, so that "
                            "a run cut short keeps the figures it measured")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_show(benchmarks) -> None:
    p = benchmarks.add_parser(
        "show", help="print a saved `bench all` result (--out, or a benchmark job's result.json) as its table",
        description="Print the tables and the goals of a `kdpipe bench all` result saved as JSON (by --out, or by "
                    "jobs/benchmark.py in <workdir>/bench/result.json), whole or cut short; storage credentials "
                    "for a URI come from the environment.")
    p.add_argument("result", help="the JSON file: a path or URI")
    p.add_argument("--json", action="store_true", help="print the JSON object itself")


def run(args: argparse.Namespace, emit: common.Emit) -> int:
    command = args.bench_command
    if command == "storage":
        from kdpipe.bench.footprint import format_storage, storage_figures

        figures = storage_figures(args.rows, args.temperature)
        emit(args, {"storage": figures, "rows": args.rows, "temperature": args.temperature},
             format_storage(figures, args.rows, args.temperature))
        return 0
    if command == "stream":
        return _stream(args, emit)
    if command in ("student", "quality"):
        return _student(args, emit)
    if command == "parity":
        return _parity(args, emit)
    if command == "driver":
        return _driver(args, emit)
    if command == "show":
        return _show(args, emit)
    return _suite(args, emit)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers given to `flag`."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 0,1,2") from None


def _stream(args: argparse.Namespace, emit: common.Emit) -> int:
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
    emit(args, result, format_stream(result))
    return 0


def _student(args: argparse.Namespace, emit: common.Emit) -> int:
    seeds = _ints(args.seeds, "--seeds") if args.bench_command == "quality" else ()  # before the imports
    from kdpipe.bench import student as b

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        workdir = args.workdir or tmp
        if args.bench_command == "student":
            result = b.student_throughput(workdir, args.repeats, args.epochs, args.overrides, args.copies,
                                          args.paired_epochs)
            text = b.format_throughput(result)
        else:
            result = b.quality(workdir, seeds, args.overrides)
            text = b.format_quality(result)
    emit(args, result, text)
    return 0


def _parity(args: argparse.Namespace, emit: common.Emit) -> int:
    seeds = _ints(args.seeds, "--seeds")  # before the imports
    if not seeds:
        raise ConfigError(f"--seeds {args.seeds!r}: give at least one seed, e.g. 0,1,2")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs}: give 1 or more")
    from kdpipe import storage
    from kdpipe.bench import parity

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        result = parity.parity(storage.join(args.workdir or tmp, "parity"), seeds, args.overrides, args.epochs)
    emit(args, result, parity.format_parity(result))
    return 0


def _show(args: argparse.Namespace, emit: common.Emit) -> int:
    """`bench show`: exit 1 when the saved run had failed parts, as `bench all` itself did."""
    from kdpipe import storage

    try:
        result = storage.read_json(*storage.filesystem(args.result))
    except FileNotFoundError as e:
        if isinstance(e, StorageMissing):
            raise
        raise StorageMissing(f"{args.result}: no such file; give the JSON that `kdpipe bench all --out` or "
                             "jobs/benchmark.py wrote") from e
    if not isinstance(result, dict) or not {"machine", "parts", "goals"} <= set(result):
        raise ConfigError(f"{args.result}: not a `kdpipe bench all` result (one written by --out or by "
                          "jobs/benchmark.py); other benchmarks print their own tables")
    from kdpipe.bench import suite

    emit(args, result, suite.format_all(result))
    return 1 if result.get("errors") else 0


def _suite(args: argparse.Namespace, emit: common.Emit) -> int:
    """`bench all` and the parts of it that run alone (SUITE)."""
    command = args.bench_command
    sizes = _ints(args.rows, "--rows") if command == "load" else ()  # a typo fails before the imports
    from kdpipe.bench import labelling as g
    from kdpipe.bench import loading, suite

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        workdir = args.workdir or tmp
        if getattr(args, "setup", None):
            os.environ[g.SETUP_ENV] = args.setup
        if command == "all":
            parts = suite.PARTS if args.only is None else tuple(
                p.strip().lower() for p in args.only.split(",") if p.strip())
            result = suite.run_all(workdir, args.size, args.repeats, parts, say=common.say, out_path=args.out)
            text = suite.format_all(result)
            if result["errors"]:  # the figures that did come are still printed; the exit status says some failed
                emit(args, result, text)
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
            result = suite.regeneration_cost(workdir, args.repeats, args.size)
            text = suite.format_regeneration(result)
        else:
            result = loading.load_figures(workdir, sizes)
            text = loading.format_load(result)
    emit(args, result, text)
    return 0
