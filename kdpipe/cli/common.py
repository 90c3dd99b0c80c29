"""What every `kdpipe` command shares: the config arguments, the config they load, and a stdout
that carries only the result (`emit`), whatever Ray and the libraries print meanwhile."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kdpipe.config import Config, load_config, resolve_paths

Emit = Callable[[argparse.Namespace, dict, str], None]

# The grammar of kdpipe.config.parse_duration, for the help of every flag that takes a duration.
DURATION_HELP = "seconds, or numbers with s, m, h, d or w, combinable: 90, 30m, 1h30m, 7d, 2w"


def add_config_args(p: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        p.add_argument("config", help="YAML config file (see jobs/configs/)")
    else:
        p.add_argument("--config", default=None, help="YAML config file (default: the built-in demo config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set labels.temperature=2 (repeatable)")
    p.add_argument("--workdir", default=None, help="shortcut for --set workdir=DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def config(args: argparse.Namespace, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config named by the command's arguments (add_config_args), `--workdir` first, then the
    `--set` overrides, then `overrides` (a command's own flags, e.g. `cache --root`)."""
    ordered = ([f"workdir={args.workdir}"] if args.workdir else []) + list(args.overrides) + list(overrides)
    return resolve_paths(load_config(args.config, ordered))


def config_with_data(args: argparse.Namespace) -> Config:
    """`config(args)`, with the built-in dataset written first if the config names one and it is missing."""
    from kdpipe.data import digits

    cfg = config(args)
    if cfg.data.builtin:
        digits.ensure_builtin(cfg.data)
    return cfg


_RESULTS = None  # where results go: the process's real stdout (see stdout_for_results_only)


def emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    """Print a command's result: `obj` as one JSON line with --json, else `text`."""
    out = _RESULTS or sys.stdout
    print(json.dumps(obj, default=float) if args.json else text, file=out, flush=True)


def _writes_to_fd(stream, fd: int) -> bool:
    """Does `stream` write to file descriptor `fd`? Not when it was replaced (e.g. captured by a
    test): then the redirections here leave it be."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def stdout_for_results_only() -> Iterator[None]:
    """Point file descriptor 1 at stderr while a command runs, so that whatever Ray or a library
    prints (e.g. the raylet's worker-count warnings, which reach the driver's stdout) lands among
    the diagnostics, and stdout carries only the result (`--json` stays parseable)."""
    global _RESULTS
    if not _writes_to_fd(sys.stdout, 1):
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


# Lines Ray prints on a healthy run that tell a user nothing they can act on. Each is matched
# whole and kept out of the terminal (Ray's own log files still have them).
RAY_NOISE = (
    # Ray Data passes its actor pools' arguments by reference and lets the actors restart; Ray
    # core then logs this at ERROR level once per teacher actor (ray-project/ray#53727). kdpipe's
    # actors take their arguments from that same reference again on a restart.
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
               rb"store and max_restarts > 0"),
    # The raylet's count of worker processes against its startup concurrency (the CPU count):
    # kdpipe's fractional-CPU read tasks and its actors make many workers on purpose, and keep
    # them warm (runtime.workers_soft_limit).
    re.compile(rb"\(raylet\).* PYTHON worker processes have been started on node: .* maximum expected startup "
               rb"concurrency"),
)


def _pump(source: int, sink, noise: tuple[re.Pattern, ...]) -> None:
    """Copy `source` to `sink`, dropping whole lines that match `noise`. A progress bar's frame
    (ended by a carriage return, not a newline) passes at once."""
    pending = b""
    while chunk := os.read(source, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in noise))
        if b"\r" in pending:
            cut = pending.rindex(b"\r") + 1
            out, pending = out + pending[:cut], pending[cut:]
        if out:
            sink.write(out)
    if pending and not any(p.search(pending) for p in noise):
        sink.write(pending)
    os.close(source)


@contextlib.contextmanager
def stderr_without_ray_noise(noise: tuple[re.Pattern, ...] = RAY_NOISE) -> Iterator[None]:
    """Send file descriptor 2 through a filter that drops RAY_NOISE while a command runs: Ray's
    core writes those lines from C++, past Python's logging. Everything else (tracebacks,
    progress bars, kdpipe's own lines) passes unchanged."""
    if not _writes_to_fd(sys.stderr, 2):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sink = os.fdopen(os.dup(saved), "wb", buffering=0)
    pump = threading.Thread(target=_pump, args=(read_end, sink, noise), name="kdpipe-stderr", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump drains it and ends
        os.close(saved)
        pump.join(timeout=5)  # a child process still holding the pipe keeps the pump (a daemon) alive
        if not pump.is_alive():
            sink.close()


def say(text: str) -> None:
    """A progress line for the person watching: stderr, never the results' stdout."""
    print(text, file=sys.stderr)
