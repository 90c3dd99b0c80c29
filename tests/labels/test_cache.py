"""`kdpipe cache ls | show | verify | gc` on a real generated cache (real Ray, real files)."""

from __future__ import annotations

import copy
import json

import pytest

from kdpipe import storage
from kdpipe.cli import main
from kdpipe.generation import generate
from kdpipe.labels import cache

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cache_cfg(ray_cluster, digits_cfg, tmp_path_factory):
    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path_factory.mktemp("cache-cli"))
    cfg.teachers = cfg.teachers[:2]  # mlp, cnn (checkpoints stay where digits_cfg made them)
    generate.generate(cfg, progress=False)
    return cfg


def run(capsys, cfg, *argv):
    code = main(["cache", *argv, "--workdir", cfg.workdir, "--root", cfg.cache.root])
    return code, capsys.readouterr().out


def test_ls_and_show(cache_cfg, capsys):
    code, out = run(capsys, cache_cfg, "ls", "--json")
    listing = json.loads(out)
    assert code == 0 and {e["teacher"] for e in listing["caches"]} == {"mlp", "cnn"}
    assert all(e["latest"] and e["complete"] and e["rows"] == 899 and e["bytes"] > 0 for e in listing["caches"])
    code, out = run(capsys, cache_cfg, "show", "cnn")
    assert code == 0 and "accuracy" in out and "T=5.0" in out and "(latest)" in out
    code, out = run(capsys, cache_cfg, "show", "cnn", "--json")
    shown = json.loads(out)["caches"][0]
    assert shown["quality"]["rows"] == 899 and 0 < shown["quality"]["teacher_accuracy"] <= 1
    with pytest.raises(SystemExit):
        main(["cache", "nope"])


def test_show_unknown_teacher_names_it(cache_cfg, capsys):
    code = main(["cache", "show", "ghost@1234", "--root", cache_cfg.cache.root])
    assert code == 2 and "'ghost@1234'" in capsys.readouterr().err


def test_verify_finds_corruption_and_missing_parts(cache_cfg, capsys):
    code, out = run(capsys, cache_cfg, "verify")
    assert code == 0 and "0 with faults" in out
    fs, root = storage.filesystem(cache_cfg.cache.root)
    ref = cache.read_ref(fs, root, "cnn")
    directory = fs._strip_protocol(ref["manifest"].rsplit("/", 1)[0])
    manifest = cache.read_manifest(fs, directory)
    first, second = manifest["units"][0], manifest["units"][1]
    p1, p2 = storage.join(directory, first["part"]), storage.join(directory, second["part"])
    saved = {p1: fs.cat_file(p1), p2: fs.cat_file(p2)}
    try:
        fs.pipe_file(p1, saved[p1][: len(saved[p1]) // 2])  # truncated
        fs.rm(p2)
        code, out = run(capsys, cache_cfg, "verify", "cnn", "--json")
        report = json.loads(out)
        assert code == 1 and not report["ok"]
        faults = "\n".join(report["caches"][0]["faults"])
        assert f"unit {first['shard_id']}" in faults and "checksum" in faults
        assert f"unit {second['shard_id']}" in faults and "missing" in faults
    finally:
        for p, data in saved.items():
            fs.pipe_file(p, data)
    assert run(capsys, cache_cfg, "verify", "cnn")[0] == 0


def test_unknown_schema_version_is_refused(cache_cfg, capsys):
    fs, root = storage.filesystem(cache_cfg.cache.root)
    ref = cache.read_ref(fs, root, "mlp")
    path = fs._strip_protocol(ref["manifest"])
    original = fs.cat_file(path)
    try:
        manifest = json.loads(original)
        manifest["schema_version"] = 99
        fs.pipe_file(path, json.dumps(manifest).encode())
        with pytest.raises(ValueError, match=r"schema version 99 is not supported"):
            cache.read_manifest(fs, path.rsplit("/", 1)[0])
        code, out = run(capsys, cache_cfg, "verify", "mlp")
        assert code == 1 and "schema version 99" in out
    finally:
        fs.pipe_file(path, original)


def test_gc_removes_only_unreferenced_caches(cache_cfg, capsys):
    cfg = copy.deepcopy(cache_cfg)
    cfg.labels.temperature = 2.0
    cfg.teachers = cfg.teachers[:1]
    generate.generate(cfg, progress=False)  # mlp's ref moves to the T=2 labels
    code, out = run(capsys, cfg, "gc", "--older-than", "0s", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and len(plan["removed"]) == 1 and plan["kept"] == 2
    fs, _ = storage.filesystem(cfg.cache.root)
    assert fs.exists(plan["removed"][0])  # dry run removes nothing
    code, out = run(capsys, cfg, "gc", "--older-than", "7d")
    assert "removed 0 cache(s)" in out  # too young
    code, out = run(capsys, cfg, "gc", "--older-than", "0s")
    assert code == 0 and not fs.exists(plan["removed"][0])
    code, out = run(capsys, cfg, "verify")
    assert code == 0 and "2 cache(s) checked, 0 with faults" in out
