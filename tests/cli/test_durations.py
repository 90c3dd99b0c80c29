"""`regenerate --every` and `cache gc --older-than` take one duration grammar
(kdpipe.config.parse_duration), described alike in their help. No Ray: gc runs on an empty cache
root, and regenerate's one cycle fails on the missing teacher checkpoints before any labelling."""

from __future__ import annotations

import json
import os

import pytest

from kdpipe import cli

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DIGITS_YAML = os.path.join(ROOT, "jobs", "configs", "digits.yaml")
GRAMMAR = "seconds, or numbers with s, m, h, d or w, combinable: 90, 30m, 1h30m, 7d, 2w"


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes


@pytest.mark.parametrize("argv, flag", [(["regenerate"], "--every DURATION"),
                                        (["cache", "gc"], "--older-than DURATION")])
def test_both_flags_describe_the_same_grammar(capsys, argv, flag):
    text = help_text(capsys, *argv)
    assert f"{flag} " in text and GRAMMAR in text


@pytest.mark.parametrize("duration", ["1h30m", "2w"])
def test_cache_gc_accepts(tmp_path, capsys, duration):
    assert cli.main(["cache", "gc", "--root", str(tmp_path / "cache"), "--older-than", duration, "--dry-run",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"dry_run": True, "removed": [], "kept": 0}


def test_cache_gc_rejects_5y(tmp_path, capsys):
    assert cli.main(["cache", "gc", "--root", str(tmp_path / "cache"), "--older-than", "5y", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "kdpipe cache: error: duration '5y'" in err and "1h30m" in err


@pytest.mark.slow
@pytest.mark.parametrize("duration", ["1h30m", "2w"])
def test_regenerate_every_accepts(tmp_path, capsys, duration):
    # One cycle runs (and fails: the teachers were never trained), so the duration was taken; with
    # --cycles 1 the schedule ends without waiting for the next cycle.
    code = cli.main(["regenerate", DIGITS_YAML, "--workdir", str(tmp_path), "--every", duration, "--cycles", "1",
                     "--dry-run", "--json", "--quiet"])
    out, err = capsys.readouterr()
    (cycle,) = json.loads(out)["cycles"]
    assert code == 1 and cycle["cycle"] == 1 and cycle["status"] == "failed", err[-3000:]
    assert "checkpoint" in cycle["error"] and "duration" not in err


def test_regenerate_every_rejects_5y_before_any_work(tmp_path, capsys):
    assert cli.main(["regenerate", DIGITS_YAML, "--workdir", str(tmp_path), "--every", "5y", "--cycles", "1"]) == 2
    err = capsys.readouterr().err
    assert "kdpipe regenerate: error: duration '5y'" in err and "1h30m" in err
    assert os.listdir(tmp_path) == []  # not even the built-in data was written
