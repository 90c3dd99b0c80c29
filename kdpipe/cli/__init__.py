"""The `kdpipe` command: demo | generate | train | regenerate | export | submit | bench | cache.

Every command takes a YAML config (the demo's is built in) and `--set section.key=value`
overrides. With `--json` a command prints exactly one JSON object on stdout; logs, Ray's output
and progress bars go to stderr.

Each command is a module of this package with `add_parser(subparsers)` and
`run(args, emit) -> int`; COMMANDS lists them in the order `kdpipe --help` shows them. A command
imports torch and Ray inside its `run`, so that `kdpipe --help` and argument errors stay instant.

Exit status: what the command returns; 2 for a KdpipeError (bad input, an unusable store or
cluster: its message, no traceback) and for missing storage credentials; anything else is a bug
and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from kdpipe import __version__
from kdpipe.cli import bench, cache, demo, export, generate, regenerate, submit, train
from kdpipe.cli.common import emit, stderr_without_ray_noise, stdout_for_results_only
from kdpipe.errors import user_error

COMMANDS = (demo, generate, train, regenerate, export, submit, bench, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdpipe",
        description="Offline knowledge distillation: run teachers once with Ray Data, cache their soft "
                    "labels on object storage, stream them into Ray Train students.",
    )
    parser.add_argument("--version", action="version", version=f"kdpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(command_module=command)  # not `run`: export has --run
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="kdpipe: %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)
    with stderr_without_ray_noise(), stdout_for_results_only():
        return run_command(args.command, lambda: args.command_module.run(args, emit))


def run_command(name: str, command: Callable[[], int]) -> int:
    """`command()`'s exit status, or 2 with `kdpipe NAME: error: ...` on stderr when it raises a
    KdpipeError (also one carried out of a Ray task or training worker) or finds no storage
    credentials (botocore's and google-auth's own errors, not ours). Any other exception is a
    bug: it propagates with its traceback."""
    try:
        return command()
    except Exception as e:
        from kdpipe import storage

        if storage.missing_credentials(e):
            message = storage.NO_CREDENTIALS_HINT
        elif user_error(e) is not None:
            message = str(user_error(e))
        else:
            raise
        print(f"kdpipe {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
