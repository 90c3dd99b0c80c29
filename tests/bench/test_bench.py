"""The storage benchmark's figures are computed from real encoded units; the student benchmark's data."""

from __future__ import annotations

import numpy as np
import pytest

from kdpipe.bench import footprint
from kdpipe.labels import softlabels


def test_storage_figures_shape_and_ordering():
    figures = footprint.storage_figures(rows=300)
    by = {(f["classes"], f["format"], f["mode"], f["k"]): f for f in figures}
    full = by[(1000, "parquet", "full", None)]
    top10 = by[(1000, "parquet", "topk", 10)]
    assert top10["bytes_per_sample"] < full["bytes_per_sample"] / 10
    kls = [by[(1000, "parquet", "topk", k)]["kl_full_to_stored"] for k in (5, 10, 20)]
    assert kls[0] > kls[1] > kls[2] > 0 and full["kl_full_to_stored"] == 0
    assert by[(10, "parquet", "topk", 10)]["kl_full_to_stored"] == 0  # k = C keeps everything


def test_topk_kl_against_direct_formula():
    z = footprint.teacher_like_logits(50, 8, seed=1)
    p = softlabels.softmax(z, 2.0)
    ids = np.argsort(-p, axis=1)[:, :3]
    q = np.full_like(p, 0.0)
    for i in range(50):
        kept = p[i, ids[i]]
        q[i] = (1 - kept.sum()) / 5
        q[i, ids[i]] = kept
    expected = (p * np.log(p / q)).sum(1).mean()
    assert np.isclose(footprint.topk_kl(z, 3, 2.0), expected, rtol=1e-10)


def test_student_benchmark_copies_keep_rows_and_give_each_copy_its_own_keys(tmp_path):
    """P3 trains on copies of the digits' training split: every copy has the source's pixels and
    labels under keys of its own (so each copy gets labels of its own), written once."""
    import pyarrow.parquet as pq

    from kdpipe import config
    from kdpipe.bench import student
    from kdpipe.data import digits

    cfg = config.resolve_paths(config.load_config(None, [f"workdir={tmp_path}", "data.num_shards=2"]))
    digits.ensure_builtin(cfg.data)
    c = student.with_copies(cfg, 3)
    assert c.data.builtin is None and c.data.train.endswith("bench-train-x3") and cfg.data.builtin == "digits"
    src = sorted((tmp_path / "data" / "train").glob("*.parquet"))
    out = sorted((tmp_path / "bench-train-x3").glob("*.parquet"))
    assert len(src) == 2 and len(out) == 6
    source = pq.read_table(src[0]).to_pydict()
    for n in range(3):
        copy = pq.read_table(tmp_path / "bench-train-x3" / f"{src[0].stem}-copy{n:03d}.parquet").to_pydict()
        assert copy["sample_key"] == [f"{k}~{n}" for k in source["sample_key"]]
        assert copy["image"] == source["image"] and copy["label"] == source["label"]
    stamp = out[0].stat().st_mtime_ns
    assert student.with_copies(cfg, 3).data.train == c.data.train and out[0].stat().st_mtime_ns == stamp
    assert student.with_copies(cfg, 1) is cfg


def test_student_benchmark_trains_on_the_gpus_where_there_are_some():
    """One DDP rank per whole GPU (NCCL takes no two ranks on one device); none on a CPU cluster.
    The overrides must be real config keys with the values the trainer reads."""
    from kdpipe import config
    from kdpipe.bench import student

    assert student.device_placement(0) == {} and student.device_placement(0.5) == {}
    for gpus, workers in ((1, 1), (8.0, 8)):
        placement = student.device_placement(gpus)
        cfg = config.load_config(None, [f"train.{k}={str(v).lower()}" for k, v in placement.items()])
        assert cfg.train.use_gpu is True and cfg.train.num_workers == workers


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_bench_all_goes_on_after_a_failed_part_and_keeps_what_it_measured(tmp_path):
    """`kdpipe bench all --out`: the result is written after every part; a part that fails (here P6,
    whose scratch folder is a file) is named, with its error, and the other parts' figures stay."""
    import json
    import os
    import subprocess
    import sys

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the benchmark wants a folder\n")
    out = tmp_path / "results" / "all.json"
    run = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "all", "--only", "p4,p6", "--size", "0.1",
                          "--repeats", "1", "--workdir", str(blocked), "--out", str(out), "--json"],
                         capture_output=True, text=True, timeout=220, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert "p6 failed" in run.stderr
    saved = json.loads(out.read_text())
    assert json.loads(run.stdout) == saved
    assert saved["parts"] == ["p4", "p6"] and "p6" not in saved and set(saved["errors"]) == {"p6"}
    assert "not-a-folder" in saved["errors"]["p6"]
    assert saved["p4"]["rows"] == 1000 and saved["p4"]["figures"]
    (p4,) = [g for g in saved["goals"] if g["figure"].startswith("P4")]
    assert p4["met"] is True and 0 < p4["value"] <= 48
    # `kdpipe bench show` prints the saved result's tables: the failure named, and (a run cut
    # short, as a time limit leaves it) the parts it never reached.
    show = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "show", str(out)], capture_output=True,
                          text=True, timeout=60)
    assert show.returncode == 1 and "P4 top-10 bytes/sample/teacher" in show.stdout
    assert "[P6," in show.stdout and "FAILED: NotADirectoryError" in show.stdout
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({**saved, "errors": {}}))
    show = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "show", str(cut)], capture_output=True,
                          text=True, timeout=60)
    assert show.returncode == 0 and "not measured (the run ended before them): P6" in show.stdout
    other = tmp_path / "storage.json"
    other.write_text(json.dumps({"storage": [], "rows": 10}))
    show = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "show", str(other)], capture_output=True,
                          text=True, timeout=60)
    assert show.returncode == 2 and f"{other}: not a `kdpipe bench all` result" in show.stderr
    unknown = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "all", "--only", "p4,p5"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "benchmark parts ['p5'] (--only): use some of p1, p2" in unknown.stderr


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_driver_benchmark_measures_cpu_memory_requests_and_bytes(ray_cluster, tmp_path):
    """`kdpipe bench driver`'s figures at a tiny size, through the real generation path: every
    row labelled by every teacher, the driver's CPU and memory measured, the cache's requests and
    bytes counted; the same inputs and teachers are reused across the modes."""
    from kdpipe.bench import driver

    r = driver.driver_figures(str(tmp_path), sizes=(600, 1200), shards=3, classes=40, teachers=2, k=5,
                              modes=("topk",))
    assert [(x["rows"], x["labelled"]) for x in r["runs"]] == [(600, 1200), (1200, 2400)]
    for x in r["runs"]:
        assert x["driver_cpu_s"] > 0 and x["driver_peak_rss_mib"] > 100 and x["mib_written"] > 0
        # 2 teachers x 3 shards: a part and a record per unit, then a manifest and a ref per teacher
        assert x["requests_by_kind"]["put"] == 2 * (2 * 3 + 2)
    assert r["size_ratio"] == 2 and r["growth"]["topk"]["requests"] == 1.0
    assert "top-5" in driver.format_driver(r)
    assert len(list(tmp_path.glob("linear-40-*.pt"))) == 2 and len(list(tmp_path.glob("inputs-*"))) == 2
