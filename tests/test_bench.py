"""The storage benchmark's figures are computed from real encoded units."""

from __future__ import annotations

import numpy as np

from kdpipe import bench, labels


def test_storage_figures_shape_and_ordering():
    figures = bench.storage_figures(rows=300)
    by = {(f["classes"], f["format"], f["mode"], f["k"]): f for f in figures}
    full = by[(1000, "parquet", "full", None)]
    top10 = by[(1000, "parquet", "topk", 10)]
    assert top10["bytes_per_sample"] < full["bytes_per_sample"] / 10
    kls = [by[(1000, "parquet", "topk", k)]["kl_full_to_stored"] for k in (5, 10, 20)]
    assert kls[0] > kls[1] > kls[2] > 0 and full["kl_full_to_stored"] == 0
    assert by[(10, "parquet", "topk", 10)]["kl_full_to_stored"] == 0  # k = C keeps everything


def test_topk_kl_against_direct_formula():
    z = bench.teacher_like_logits(50, 8, seed=1)
    p = labels.softmax(z, 2.0)
    ids = np.argsort(-p, axis=1)[:, :3]
    q = np.full_like(p, 0.0)
    for i in range(50):
        kept = p[i, ids[i]]
        q[i] = (1 - kept.sum()) / 5
        q[i, ids[i]] = kept
    expected = (p * np.log(p / q)).sum(1).mean()
    assert np.isclose(bench.topk_kl(z, 3, 2.0), expected, rtol=1e-10)
