"""Top-k soft labels against the full distribution, and the top-k KD loss against float64 formulas."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.labels import codec, softlabels
from kdpipe.training.losses import kd_kl, topk_kd_kl


def logits(b: int, c: int, seed: int = 0, scale: float = 4.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(b, c)) * scale).astype(np.float32)


# --- stored labels -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-3)])
def test_topk_roundtrip_matches_the_full_distribution(dtype, atol):
    rng = np.random.default_rng(1)
    keys = [f"k{i:03d}" for i in rng.permutation(40)]
    z, T, k = logits(40, 10, seed=2), 2.0, 4
    back = pq.read_table(io.BytesIO(codec.parquet_bytes(codec.topk_table(keys, z, k, T, dtype), 16)))
    assert back.schema == codec.topk_schema(k, 10, dtype)
    assert back.schema.field(softlabels.TOPK_IDS).type.list_size == k  # fixed-size lists
    assert back.column(softlabels.KEY).to_pylist() == sorted(keys)
    values, ids, log_z = codec.table_topk(back)
    assert values.dtype == np.float32 and ids.dtype == np.int64 and log_z.dtype == np.float32
    p_full = softlabels.softmax(z[np.argsort(keys)], T)
    expected_ids = np.argsort(-p_full, axis=1)[:, :k]
    assert (ids == expected_ids).all()
    assert (np.diff(values, axis=1) <= 0).all()
    p = softlabels.topk_probs(values, log_z, T)
    assert np.allclose(p, np.take_along_axis(p_full, expected_ids, 1), atol=atol)
    tail = softlabels.tail_mass(values, log_z, T)
    assert np.allclose(tail, 1 - np.take_along_axis(p_full, expected_ids, 1).sum(1), atol=k * atol)


def test_id_width_follows_the_class_count():
    assert codec.topk_schema(5, 32767, "float16").field(softlabels.TOPK_IDS).type.value_type == "int16"
    assert codec.topk_schema(5, 32768, "float16").field(softlabels.TOPK_IDS).type.value_type == "int32"


def test_log_z_is_computed_in_float64_over_all_classes():
    z = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)  # overflows a naive float32 exp
    a = softlabels.topk_arrays(z, 1, 1.0, "float32")
    assert a[softlabels.LOG_Z][0] == pytest.approx(1000 + np.log1p(np.exp(-1.0)), rel=1e-7)
    assert a[softlabels.TOPK_IDS].tolist() == [[0]]


def test_ties_go_to_the_lower_class_id_and_bad_k_is_refused():
    z = np.array([[1.0, 3.0, 3.0, 0.0]], dtype=np.float32)
    assert softlabels.topk_arrays(z, 2, 1.0, "float32")[softlabels.TOPK_IDS].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="k=5"):
        softlabels.topk_arrays(z, 5, 1.0, "float32")


def test_topk_bytes_are_deterministic():
    z = logits(30, 12, seed=3)
    keys = [f"s{i}" for i in range(30)][::-1]
    a = codec.parquet_bytes(codec.topk_table(keys, z, 3, 2.0, "float16"), 8)
    assert a == codec.parquet_bytes(codec.topk_table(keys, z, 3, 2.0, "float16"), 8)


def test_quality_reports_topk_mass():
    z = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    q = softlabels.quality(z, 1.0, np.array([0, 1, 1]), k=1)
    assert q["correct"] == 2 and q["topk_mass_sum"] == pytest.approx(q["max_prob_sum"])
    s = softlabels.summarize_quality([q, q])
    assert s["teacher_accuracy"] == pytest.approx(2 / 3)
    assert s["mean_topk_mass"] == pytest.approx(q["max_prob_sum"] / 3)
    assert "mean_topk_mass" not in softlabels.summarize_quality([softlabels.quality(z, 1.0, None)])


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("mode", ["full", "topk"])
def test_encode_decode_unit_roundtrip(mode, fmt):
    z = logits(25, 10, seed=7)
    keys = [f"k/{i}.x" for i in range(25)][::-1]
    data = codec.encode_unit(keys, z, mode, 4, 2.0, "float32", fmt, 8)
    rows = codec.decode_unit(data, mode, fmt)
    order = np.argsort(np.asarray(keys))
    assert rows["keys"] == sorted(keys)
    if mode == "full":
        assert np.allclose(rows[softlabels.LOGITS], z[order])
    else:
        assert rows[softlabels.TOPK_IDS].shape == (25, 4)
        p = softlabels.topk_probs(rows[softlabels.TOPK_VALUES], rows[softlabels.LOG_Z], 2.0)
        full = softlabels.softmax(z[order], 2.0)
        assert np.allclose(p, np.take_along_axis(full, rows[softlabels.TOPK_IDS], 1), atol=1e-6)
    ids, probs, tail = softlabels.student_targets(rows, mode, 3, 2.0, 2.0, 10)
    full = softlabels.softmax(z[order], 2.0)
    assert np.allclose(probs, np.take_along_axis(full, ids, 1), atol=1e-6)
    assert np.allclose(probs.sum(1) + tail, 1.0, atol=1e-6)


# --- another temperature ------------------------------------------------------------------------

def retempered(z, k, T, T_new):
    a = softlabels.topk_arrays(z, k, T, "float32")
    return softlabels.retemper_topk(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], T, T_new, z.shape[1]), a


def test_retemper_is_exact_at_the_generation_temperature_and_with_full_support():
    z = logits(20, 10, seed=4)
    (p, tail), a = retempered(z, 3, 2.0, 2.0)
    assert np.allclose(p, softlabels.topk_probs(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], 2.0), rtol=1e-12)
    assert np.allclose(tail, softlabels.tail_mass(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], 2.0), atol=1e-12)
    (p, tail), _ = retempered(z, 10, 2.0, 5.0)
    assert np.allclose(p, np.sort(softlabels.softmax(z, 5.0), axis=1)[:, ::-1], atol=1e-6)
    assert (tail == 0).all()


def test_retemper_is_exact_when_the_tail_logits_are_equal():
    z = np.full((1, 8), -1.0, dtype=np.float32)
    z[0, :3] = [4.0, 2.5, 1.0]
    (p, tail), _ = retempered(z, 3, 1.0, 4.0)
    full = softlabels.softmax(z, 4.0)
    assert np.allclose(p, full[:, :3], atol=1e-6)
    assert np.allclose(tail, full[:, 3:].sum(1), atol=1e-6)


@pytest.mark.parametrize("T, T_new", [(1.0, 4.0), (4.0, 1.0)])
def test_retemper_tail_is_bounded_by_the_fixed_tail_and_the_truth(T, T_new):
    z = logits(50, 100, seed=5)
    (p, tail), a = retempered(z, 5, T, T_new)
    true_tail = 1 - np.sort(softlabels.softmax(z, T_new), axis=1)[:, -5:].sum(1)
    fixed = softlabels.tail_mass(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], T)
    lo, hi = (fixed, tail) if T_new > T else (tail, fixed)
    assert (lo <= true_tail + 1e-9).all() and (true_tail <= hi + 1e-9).all()
    assert np.allclose(p.sum(1) + tail, 1.0)


# --- loss ---------------------------------------------------------------------------------------

def teacher_topk(t: torch.Tensor, k: int, T: float):
    """ids, probs, tail (float64 torch) of teacher logits t [B, K, C] via the stored record."""
    b, nt, c = t.shape
    a = softlabels.topk_arrays(t.reshape(b * nt, c).numpy(), k, T, "float32")
    p = softlabels.topk_probs(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], T)
    tail = softlabels.tail_mass(a[softlabels.TOPK_VALUES], a[softlabels.LOG_Z], T)
    return (torch.from_numpy(a[softlabels.TOPK_IDS].astype(np.int64)).reshape(b, nt, k),
            torch.from_numpy(p).reshape(b, nt, k), torch.from_numpy(tail).reshape(b, nt))


def reference_topk_kl(s, ids, p, tail, T, w):
    """T^2 * mean_b sum_k w_k KL over k+1 bins, directly from the formula in float64 numpy."""
    s, ids, p, tail = s.double().numpy(), ids.numpy(), p.double().numpy(), tail.double().numpy()
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    e = np.exp(s / T - (s / T).max(-1, keepdims=True))
    q = e / e.sum(-1, keepdims=True)
    total = 0.0
    for b in range(len(s)):
        for k in range(ids.shape[1]):
            qk = q[b, ids[b, k]]
            kl = (p[b, k] * np.log(p[b, k] / qk)).sum() + tail[b, k] * np.log(tail[b, k] / (1 - qk.sum()))
            total += w[k] * kl
    return T * T * total / len(s)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_topk_loss_matches_float64_reference(K, T):
    g = torch.Generator().manual_seed(K * 10 + int(T))
    s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(16, K, 10, generator=g, dtype=torch.float32) * 5
    ids, p, tail = teacher_topk(t, 4, T)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    ours = topk_kd_kl(s, ids, p, tail, T, w)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(reference_topk_kl(s, ids, p, tail, T, w.numpy()), rel=1e-12)
    if K == 1:  # [B, k] inputs mean one teacher
        assert topk_kd_kl(s, ids[:, 0], p[:, 0], tail[:, 0], T).item() == pytest.approx(ours.item(), rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_full_support_equals_kd_kl(T):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(16, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(16, 1, 6, generator=g, dtype=torch.float64) * 4
    full = torch.softmax(t[:, 0] / T, -1)
    ids = torch.argsort(full, dim=-1, descending=True)[:, None]
    p = torch.gather(full, 1, ids[:, 0])[:, None]
    ours = topk_kd_kl(s, ids, p, torch.zeros(16, 1, dtype=torch.float64), T)
    # Full KL in float64 (kd_kl itself computes in float32).
    log_q = torch.log_softmax(s / T, -1)
    reference = (full * (full.log() - log_q)).sum(-1).mean() * T * T
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    assert ours.item() == pytest.approx(kd_kl(s, full, T).item(), rel=1e-5)
    # A rounding tail of the teacher does not matter when the ids cover every class.
    again = topk_kd_kl(s, ids, p, torch.full((16, 1), 1e-7, dtype=torch.float64), T)
    assert again.item() == pytest.approx(ours.item(), rel=1e-12)


def test_full_support_ensemble_has_the_gradient_of_kd_kl_on_the_averaged_teachers():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 3, 5, generator=g, dtype=torch.float64) * 3
    w, T = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 2.0
    probs = torch.softmax(t / T, -1)
    ids = torch.arange(5).expand(8, 3, 5)
    topk_kd_kl(s, ids, probs, torch.zeros(8, 3, dtype=torch.float64), T, w).backward()
    ours = s.grad.clone()
    s.grad = None
    ensemble = torch.einsum("bkc,k->bc", probs, w / w.sum())
    log_q = torch.log_softmax(s / T, -1)
    ((ensemble * (ensemble.log() - log_q)).sum(-1).mean() * T * T).backward()
    assert torch.allclose(ours, s.grad, atol=1e-12)


@pytest.mark.parametrize("top_class_stored", [True, False])
def test_gradients_are_finite_for_a_confident_student(top_class_stored):
    s = torch.zeros(4, 10)
    s[:, 0] = 300.0  # softmax puts all float32 mass on class 0: 1 - sum would be exactly 0
    s.requires_grad_(True)
    first = 0 if top_class_stored else 1
    ids = torch.arange(first, first + 3).expand(4, 3)
    p = torch.tensor([0.5, 0.2, 0.1]).expand(4, 3)
    loss = topk_kd_kl(s, ids, p, torch.full((4,), 0.2), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 3, 10])
def test_loss_is_zero_when_teacher_and_student_coincide(k):
    s = torch.from_numpy(logits(8, 10, seed=9))
    ids, p, tail = teacher_topk(s[:, None], k, 2.0)
    assert abs(topk_kd_kl(s, ids, p.float(), tail.float(), 2.0).item()) < 1e-5


def test_bad_weights_are_refused():
    ids = torch.zeros(2, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        topk_kd_kl(torch.zeros(2, 3), ids, torch.ones(2, 2, 1), torch.zeros(2, 2), 1.0, torch.ones(3))
