"""The `kdpipe` command as a user runs it: a real subprocess, a real local Ray, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FAST = ["--set", "train.epochs=6", "--set", "teachers.0.train_epochs=5", "--set", "teachers.1.train_epochs=5",
        "--set", "teachers.2.train_epochs=5"]


def kdpipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "kdpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("command", [[], ["demo"], ["generate"], ["train"], ["regenerate"], ["bench", "student"]])
def test_help(command):
    out = kdpipe(*command, "--help", timeout=60)
    assert out.returncode == 0 and "usage: kdpipe" in out.stdout
    assert "--set" in out.stdout or not command


def test_unknown_key_exits_2_naming_it(tmp_path):
    out = kdpipe("demo", "--workdir", str(tmp_path), "--set", "labels.temprature=3", timeout=60)
    assert out.returncode == 2
    assert "unknown config key 'labels.temprature'" in out.stderr


def test_generate_with_missing_checkpoint_fails_fast(tmp_path):
    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "digits.yaml")
    out = kdpipe("generate", cfg, "--workdir", str(tmp_path), timeout=120)
    assert out.returncode == 2
    assert "teacher 'mlp': checkpoint" in out.stderr and str(tmp_path / "cache" / "checkpoints" / "mlp.pt") in out.stderr


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_demo_end_to_end_then_reuses_cache(tmp_path):
    first = kdpipe("demo", "--json", "--workdir", str(tmp_path), *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)  # stdout: the one JSON object, whatever else was printed
    # one line per epoch on stderr while each student trains (`kdpipe train` prints the same)
    for student in ("alone", "distilled"):
        epochs = [line for line in first.stderr.splitlines() if line.startswith(f"{student} epoch ")]
        assert [line.split("  ")[0] for line in epochs] == [f"{student} epoch {e}/6" for e in range(1, 7)], \
            first.stderr[-3000:]
        assert all(part in epochs[-1] for part in ("loss", "held-out", "samples/s", "0:00 left"))
    for noise in ("core_worker.cc", "PYTHON worker processes", "Progress bars disabled"):  # Ray's, said to no one
        assert noise not in first.stderr, first.stderr[-3000:]
    assert set(result["teachers"]) == {"mlp", "cnn", "wide_cnn"}
    assert all(acc > 0.85 for acc in result["teachers"].values()), result
    assert result["teachers_trained"] == ["mlp", "cnn", "wide_cnn"]
    assert result["teacher_forward_passes"] == 3 * 899  # every training row, once per teacher
    assert result["student_alone"] > 0.8 and result["student_distilled"] > 0.8, result
    assert result["cache_root"] == str(tmp_path / "cache")
    assert (tmp_path / "cache" / "refs" / "cnn.json").exists()
    for figure in result["figures"].values():  # the comparison and the curves, as PNG
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # A config file describing the same data and teachers finds everything committed: the
    # scheduled regeneration has nothing to do (and starts no Ray).
    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "digits.yaml")
    refs = (tmp_path / "cache" / "refs" / "cnn.json").read_bytes()
    dry = kdpipe("regenerate", cfg, "--json", "--dry-run", "--workdir", str(tmp_path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = json.loads(dry.stdout)["plan"]
    assert plan["up_to_date"] and plan["units_to_label"] == 0 and "up to date: nothing to do" in dry.stderr
    again = kdpipe("regenerate", cfg, "--json", "--quiet", "--workdir", str(tmp_path), "--every", "1s", "--cycles", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [c["status"] for c in json.loads(again.stdout)["cycles"]] == ["up-to-date", "up-to-date"]
    assert (tmp_path / "cache" / "refs" / "cnn.json").read_bytes() == refs  # nothing moved
