"""The CLI's exit status: a KdpipeError is the user's to fix (its message, exit 2, no traceback);
any other exception is a bug and keeps its traceback (exit 1). No Ray: the commands here fail
before any work, or are replaced by one that raises."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from kdpipe import cli, errors
from kdpipe.cli import cache, common

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DIGITS_YAML = os.path.join(ROOT, "jobs", "configs", "digits.yaml")


def kdpipe(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`python -m kdpipe.cli ARGS`, or `python -c CODE` when given."""
    argv = ["-c", code] if code else ["-m", "kdpipe.cli", *args]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_a_config_with_a_bad_key_exits_2_with_the_message_and_no_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"workdir: {tmp_path}\nlabels:\n  temprature: 3\n")
    out = kdpipe("generate", str(cfg))
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("kdpipe generate: error: unknown config key 'labels.temprature'")
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "data").exists()  # it failed before writing the built-in data


def test_a_bug_in_a_command_exits_1_with_its_traceback(tmp_path):
    # A command's run that hits a plain ValueError: the CLI used to turn those into exit 2.
    code = ("import sys; from kdpipe import cli; from kdpipe.cli import cache\n"
            "def run(args, emit):\n    raise ValueError('an internal slip')\n"
            f"cache.run = run; sys.exit(cli.main(['cache', 'ls', '--root', {str(tmp_path)!r}]))")
    out = kdpipe(code=code)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback (most recent call last)" in out.stderr and "ValueError: an internal slip" in out.stderr
    assert "kdpipe cache: error" not in out.stderr


@pytest.mark.parametrize("error", [RuntimeError, ValueError, FileNotFoundError, PermissionError, ConnectionError,
                                   KeyError])
def test_non_kdpipe_exceptions_propagate_from_main(monkeypatch, tmp_path, capsys, error):
    def run(args, emit):
        raise error("an internal slip")

    monkeypatch.setattr(cache, "run", run)
    with pytest.raises(error, match="an internal slip"):
        cli.main(["cache", "ls", "--root", str(tmp_path)])
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("error", [errors.ConfigError, errors.InputError, errors.CacheError, errors.StorageMissing,
                                   errors.StorageDenied, errors.StorageUnreachable])
def test_every_kdpipe_error_exits_2_with_its_message(monkeypatch, tmp_path, capsys, error):
    def run(args, emit):
        raise error(f"{error.__name__}: what to do")

    monkeypatch.setattr(cache, "run", run)
    assert cli.main(["cache", "ls", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"kdpipe cache: error: {error.__name__}: what to do\n"


def test_missing_storage_credentials_exit_2_with_the_hint(monkeypatch, tmp_path, capsys):
    class NoCredentialsError(Exception):  # botocore's name, raised by botocore, not kdpipe
        pass

    def run(args, emit):
        try:
            raise NoCredentialsError("Unable to locate credentials")
        except NoCredentialsError as e:
            raise OSError("s3fs gave up") from e

    monkeypatch.setattr(cache, "run", run)
    assert cli.main(["cache", "ls", "--root", str(tmp_path)]) == 2
    assert "kdpipe cache: error: no storage credentials were found" in capsys.readouterr().err


def test_an_unknown_cache_exits_2_naming_it(tmp_path, capsys):
    assert cli.main(["cache", "show", "ghost@1234", "--root", str(tmp_path / "cache")]) == 2
    assert "kdpipe cache: error: no cache matches 'ghost@1234'; known: none" in capsys.readouterr().err


def test_bench_show_of_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "result.json"
    assert cli.main(["bench", "show", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"kdpipe bench: error: {missing}: no such file" in err and "--out" in err


@pytest.mark.parametrize("argv, flag", [(["bench", "load", "--rows", "20k"], "--rows"),
                                        (["bench", "quality", "--seeds", "0,one"], "--seeds")])
def test_bench_lists_of_numbers_are_checked_naming_the_flag(tmp_path, capsys, argv, flag):
    assert cli.main([*argv, "--workdir", str(tmp_path)]) == 2
    assert f"kdpipe bench: error: {flag} " in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cache", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_the_benchmark_job_exits_2_on_a_bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ray:\n  adress: auto\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "benchmark.py"), str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "kdpipe benchmark: error: unknown config key 'ray.adress'" in out.stderr and "Traceback" not in out.stderr


# --- The command registry -------------------------------------------------------------------------


def test_every_command_module_adds_its_parser_and_runs():
    names = []
    for command in cli.COMMANDS:
        sub = argparse.ArgumentParser(prog="kdpipe").add_subparsers(dest="command")
        names.append(command.add_parser(sub).prog.removeprefix("kdpipe "))
        assert callable(command.run)
    assert names == [command.__name__.rsplit(".", 1)[1] for command in cli.COMMANDS]  # one module per command
    assert names == ["demo", "generate", "train", "regenerate", "export", "submit", "bench", "cache"]


def test_help_of_every_command_and_subcommand(capsys):
    for argv in [[name] for name in ("demo", "generate", "train", "regenerate", "export", "submit")] + [
            ["bench", b] for b in ("storage", "stream", "student", "quality", "all", "generate", "teachers", "scale",
                                   "regenerate", "load", "show", "parity")] + [["cache", a] for a in cache.ACTIONS]:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--help"])
        assert e.value.code == 0
        assert f"usage: kdpipe {' '.join(argv)}" in capsys.readouterr().out


def test_startup_imports_neither_torch_nor_ray():
    code = ("import sys, kdpipe.cli; kdpipe.cli.build_parser(); "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')])")
    out = kdpipe(code=code)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_emit_prints_text_or_one_json_object(capsys):
    common.emit(argparse.Namespace(json=False), {"a": 1}, "a is 1")
    common.emit(argparse.Namespace(json=True), {"a": 1.5}, "a is 1.5")
    text, line = capsys.readouterr().out.splitlines()
    assert text == "a is 1" and json.loads(line) == {"a": 1.5}


def test_a_kdpipe_error_carried_out_of_ray_is_found_and_a_bug_is_not():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from kdpipe.errors import CacheError, user_error

    cause = CacheError("teacher 'cnn' unit x: no committed labels")
    try:
        raise cause
    except CacheError as e:
        wrapped = RayTaskError("read_joined_shard", "Traceback ...", e)
    as_task = wrapped.as_instanceof_cause()  # what Ray raises in the driver: also a CacheError
    assert user_error(as_task) is cause and "Traceback" not in str(user_error(as_task))
    train = WorkerGroupError("rank 0 failed", {0: as_task})
    assert user_error(train) is cause
    assert user_error(WorkerGroupError("rank 0 failed", {0: ValueError("a bug")})) is None
    try:
        try:
            raise cause
        except CacheError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        assert user_error(e) is cause
