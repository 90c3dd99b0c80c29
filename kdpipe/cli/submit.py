"""`kdpipe submit`: send a kdpipe job (jobs/<job>.py) to a Ray cluster through Ray's Jobs API.

The job's runtime environment is staged in a temporary folder and uploaded as its working_dir:
the installed kdpipe package source, the one entry point and the config (as `config.yaml`), with
PYTHONPATH=. so the job imports the shipped kdpipe whatever the nodes have installed. The config
is validated here first, so a typo fails in a second rather than after a cluster round trip.

Credentials never travel with a job: the entrypoint, runtime env and metadata are stored in the
cluster's job table and shown on its dashboard. Storage credentials reach the job from the
cluster's own environment (the nodes' env, a Kubernetes Secret, an instance role); a config or
runtime env that carries secret-looking keys is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kdpipe
from kdpipe.cli.common import Emit
from kdpipe.config import Config, load_config, read_yaml_mapping
from kdpipe.errors import ClusterUnreachable, ConfigError, StorageMissing

JOBS = ("generate", "train", "regenerate", "benchmark")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_NAME = "config.yaml"  # the config's name inside the job's working dir
# Key names (of storage_options, at any depth) and env var names that hold credentials.
_SECRET = re.compile(r"(^|[_\-.])(key|secret|token|password|passwd|credentials?|connection_string)($|[_\-.])",
                     re.IGNORECASE)
_RAY_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's client lets these win over its argument


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `submit` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "submit", help="send a kdpipe job to a Ray cluster (Ray Jobs API)",
        description="Submit jobs/JOB.py with CONFIG to a Ray cluster through Ray's Jobs API. The job's "
                    "working dir ships the installed kdpipe source, the entry point and the config "
                    "(validated here first); the job connects with ray.address=auto. Credentials are "
                    "never shipped: the job reads them from the cluster's environment (nodes' env, "
                    "Kubernetes Secret, instance role), and secret-looking storage_options are refused. "
                    "Exit codes: 0 submitted (or, with --wait, SUCCEEDED); 1 FAILED or STOPPED; "
                    "2 bad arguments or config, or no cluster at the address.",
        epilog="example: kdpipe submit --address http://HEAD:8265 generate CONFIG --wait")
    p.add_argument("job", metavar="JOB",
                   help=f"one of {', '.join(JOBS)} (jobs/JOB.py), or a path to a jobs/*.py entry point")
    p.add_argument("config", metavar="CONFIG", help="YAML config file (see jobs/configs/)")
    p.add_argument("--address", default=None,
                   help=f"Ray Jobs API (dashboard) URL; default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                        f"else {DEFAULT_ADDRESS}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, passed on to the job (repeatable)")
    p.add_argument("--workdir", default=None, help="shortcut for --set workdir=DIR (a path the cluster sees)")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="YAML runtime env (e.g. infra/runtime_env.yaml) whose pip, env_vars and other keys "
                        "are merged in; its working_dir and excludes are ignored")
    p.add_argument("--submission-id", default=None, help="a fixed submission id (default: Ray picks one)")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs to stderr until it ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


# --- Pure helpers ---------------------------------------------------------------------------------


def find_job_file(job: str) -> Path:
    """The entry point for JOB: a path to a .py file, or jobs/JOB.py next to the installed kdpipe
    (a checkout or editable install), else in the current directory."""
    if job.endswith(".py"):
        path = Path(job)
        if not path.is_file():
            raise StorageMissing(f"job file {job!r} does not exist")
        return path
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}: use one of {', '.join(JOBS)} or a path to a jobs/*.py file")
    dirs = list(dict.fromkeys([Path(kdpipe.__file__).resolve().parent.parent / "jobs", Path.cwd() / "jobs"]))
    for d in dirs:
        if (d / f"{job}.py").is_file():
            return d / f"{job}.py"
    raise StorageMissing(f"jobs/{job}.py not found in {', '.join(map(str, dirs))}: run kdpipe submit from a "
                         "kdpipe checkout, or give the entry point's path")


def secret_keys(options: Any, prefix: str) -> list[str]:
    """Dotted paths of secret-looking keys with a value, at any depth of a storage_options mapping."""
    found: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            path = f"{prefix}.{k}"
            if _SECRET.search(str(k)) and v not in (None, "", {}, []):
                found.append(path)
            else:
                found.extend(secret_keys(v, path))
    elif isinstance(options, list):
        for i, v in enumerate(options):
            found.extend(secret_keys(v, f"{prefix}.{i}"))
    return found


def check_no_secrets(cfg: Config, runtime_env: dict[str, Any] | None = None) -> None:
    """Raise ConfigError naming every credential the config's storage_options or the runtime env's
    env_vars would carry to the cluster."""
    found = secret_keys(cfg.data.storage_options, "data.storage_options")
    found += secret_keys(cfg.cache.storage_options, "cache.storage_options")
    env = (runtime_env or {}).get("env_vars") or {}
    found += [f"runtime env env_vars.{k}" for k in env if _SECRET.search(str(k))]
    if found:
        raise ConfigError(
            f"refusing to submit credentials to the cluster ({', '.join(found)}): a job's config, "
            "entrypoint and runtime env are stored in the cluster and shown on its dashboard. Remove them "
            "and give the cluster the credentials instead: the nodes' environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS), a Kubernetes Secret or an instance role "
            "(see infra/README.md)")


def load_runtime_env(path: str | None) -> dict[str, Any]:
    """A runtime env YAML file as a dict (its working_dir and excludes dropped: we stage our own)."""
    if path is None:
        return {}
    env = read_yaml_mapping(path, "runtime env file (--runtime-env)")
    return {k: v for k, v in env.items() if k not in ("working_dir", "excludes")}


def stage_runtime_env(directory: str, job_file: str | Path, config_path: str,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill `directory` with kdpipe/ (the installed package source), jobs/<job>.py and config.yaml;
    return the runtime env that ships it as the working dir, merged with `extra` (pip, env_vars, ...)."""
    package = os.path.dirname(os.path.abspath(kdpipe.__file__))
    shutil.copytree(package, os.path.join(directory, "kdpipe"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    os.makedirs(os.path.join(directory, "jobs"), exist_ok=True)
    shutil.copyfile(job_file, os.path.join(directory, "jobs", Path(job_file).name))
    shutil.copyfile(config_path, os.path.join(directory, CONFIG_NAME))
    env = {k: v for k, v in (extra or {}).items() if k not in ("working_dir", "excludes")}
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    # "." first: the shipped kdpipe wins over any kdpipe installed on the nodes.
    other = env_vars.get("PYTHONPATH", "")
    env_vars["PYTHONPATH"] = "." if other in ("", ".") else f".:{other}"
    env.update(working_dir=directory, env_vars=env_vars)
    return env


def build_entrypoint(job_file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The shell command the cluster runs in the job's working dir."""
    argv = ["python", f"jobs/{Path(job_file).name}", CONFIG_NAME, "--set", "ray.address=auto"]
    for o in overrides:
        argv += ["--set", o]
    return shlex.join(argv)


def relative_paths(cfg: Config) -> list[str]:
    """Config keys holding relative local paths: on the cluster they land in the job's temporary
    working dir, which nothing else sees."""
    def relative(p: str) -> bool:
        return bool(p) and "://" not in p and not os.path.isabs(os.path.expanduser(p))
    keys = [("data.train", cfg.data.train), ("data.holdout", cfg.data.holdout),
            ("cache.root", cfg.cache.root), ("train.storage_path", cfg.train.storage_path)]
    found = [k for k, v in keys if relative(v)]
    if relative(cfg.workdir) and any(not v for _, v in keys):
        found.insert(0, "workdir")
    found += [f"teachers.{i}.checkpoint" for i, t in enumerate(cfg.teachers) if relative(t.checkpoint)]
    return found


def resolve_address(address: str | None) -> str:
    if address:
        return address
    for var in _RAY_ADDRESS_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return DEFAULT_ADDRESS


# --- Talking to the cluster -----------------------------------------------------------------------


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's JobSubmissionClient lets $RAY_ADDRESS override the address it is given; we resolved
    the precedence ourselves (--address first), so hide those variables while it connects."""
    saved = {v: os.environ.pop(v) for v in _RAY_ADDRESS_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str):
    """A JobSubmissionClient for `address`; ClusterUnreachable (naming it) when nothing answers there."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_env():
            return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise ClusterUnreachable(f"the Ray cluster at {address!r} refused the connection: {e}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterUnreachable(
            f"cannot reach a Ray cluster's Jobs API at {address!r} ({e}): start one (`ray start --head`, "
            "`ray up infra/cluster.yaml`) or point --address (or RAY_ADDRESS) at its dashboard, "
            f"e.g. {DEFAULT_ADDRESS}") from None


def follow(client, submission_id: str, out=None, poll_s: float = 1.0):
    """Copy the job's logs to `out` (stderr) as they come; return its JobInfo once it has ended."""
    import asyncio

    out = out or sys.stderr
    written = 0  # characters already copied, so the polling fallback does not repeat them

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log socket dropped (aiohttp, RuntimeError...): poll instead
        print(f"kdpipe submit: log stream interrupted ({e}); polling", file=sys.stderr)
    while True:
        info = client.get_job_info(submission_id)
        logs = client.get_job_logs(submission_id)
        if len(logs) > written:
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


# --- The command ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, emit: Emit) -> int:
    """`kdpipe submit`; `emit(args, obj, text)` prints the result (kdpipe.cli.common.emit). Bad
    arguments, a bad config and no cluster at the address raise a KdpipeError (the CLI exits 2)."""
    overrides = ([f"workdir={args.workdir}"] if args.workdir else []) + list(args.overrides)
    job_file = find_job_file(args.job)
    if not os.path.isfile(args.config):
        raise StorageMissing(f"config file {args.config!r} does not exist")
    cfg = load_config(args.config, ["ray.address=auto", *overrides])  # exactly what the job will load
    extra = load_runtime_env(args.runtime_env)
    check_no_secrets(cfg, extra)
    for key in relative_paths(cfg):
        print(f"kdpipe submit: warning: {key} is a relative path: on the cluster it resolves inside the "
              "job's temporary working dir; use an absolute path on a shared filesystem or a bucket URI",
              file=sys.stderr)
    address = resolve_address(args.address)
    client = connect(address)
    job = Path(job_file).stem
    entrypoint = build_entrypoint(job_file, overrides)
    metadata = {"kdpipe_job": job, "config": os.path.basename(args.config)}
    with tempfile.TemporaryDirectory(prefix="kdpipe-submit-") as staging:
        runtime_env = stage_runtime_env(staging, job_file, args.config, extra)
        from ray.exceptions import RayError

        try:
            submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                              submission_id=args.submission_id, metadata=metadata)
        except (RuntimeError, ValueError, RayError) as e:  # e.g. a submission id already used, a bad runtime env
            raise ConfigError(f"the cluster at {address} refused the job: {e}") from None
        except OSError as e:  # requests' connection errors: the head went away since connect()
            raise ClusterUnreachable(f"the Ray cluster at {address!r} stopped answering while the job was "
                                     f"submitted ({e}); check it and submit again") from None
    result = {"submission_id": submission_id, "address": address, "job": job, "entrypoint": entrypoint}
    if not args.wait:
        print(f"kdpipe submit: {job} submitted to {address}; follow it with `ray job logs --address "
              f"{address} --follow {submission_id}`", file=sys.stderr)
        emit(args, result, submission_id)
        return 0
    print(f"kdpipe submit: {job} submitted to {address} as {submission_id}; streaming its logs "
          "(Ctrl-C stops following, not the job)", file=sys.stderr)
    return _wait(client, address, submission_id, args, result, emit)


def _wait(client, address: str, submission_id: str, args: argparse.Namespace, result: dict[str, Any],
          emit: Emit) -> int:
    """Follow the job to its end: 0 if it SUCCEEDED, 1 if not, 130 when the user stops following."""
    try:
        info = follow(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nkdpipe submit: stopped following; {submission_id} keeps running (`ray job stop "
              f"--address {address} {submission_id}` stops it)", file=sys.stderr)
        return 130
    except OSError as e:  # requests' connection errors: the head went away
        raise ClusterUnreachable(f"lost the Ray cluster at {address!r} while following {submission_id} ({e}); "
                                 f"the job may still run: `ray job status --address {address} "
                                 f"{submission_id}`") from None
    status = str(info.status)
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    result.update(status=status, message=info.message or "", driver_exit_code=info.driver_exit_code,
                  seconds=seconds)
    emit(args, result, f"{submission_id} {status}: {info.message or ''}".rstrip())
    return 0 if status == "SUCCEEDED" else 1
