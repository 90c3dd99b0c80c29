"""The KD losses against the formula computed directly in float64 (and against F.kl_div)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.losses import distillation_loss, kd_kl, teacher_distribution


def reference_loss(s, t, y, T, alpha, w):
    """alpha*T^2*KL(sum_k w_k softmax(t_k/T) || softmax(s/T)) + (1-alpha)*CE, in float64 numpy."""
    s, t = s.double().numpy(), t.double().numpy()

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    p = np.einsum("bkc,k->bc", softmax(t / T), w)
    q = softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    logp = np.log(softmax(s))
    ce = -logp[np.arange(len(y)), y.numpy()].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_distillation_loss_matches_float64_reference(k, T, alpha):
    g = torch.Generator().manual_seed(k * 100 + int(T * 10) + int(alpha * 7))
    b, c = 16, 10
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    t = torch.randn(b, k, c, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, c, (b,), generator=g)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    loss, parts = distillation_loss(s, t, y, T, alpha, w)
    expected = reference_loss(s, t, y, T, alpha, w.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert parts["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kd_term_equals_torch_kl_div_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(32, 7, generator=g), torch.randn(32, 1, 7, generator=g)
    T = 3.0
    p = teacher_distribution(t, T)
    ours = kd_kl(s, p, T)
    theirs = F.kl_div(F.log_softmax(s / T, -1), p, reduction="batchmean") * T * T
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_equal_weights_average_distributions_not_logits():
    t = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])  # two confident teachers that disagree
    p = teacher_distribution(t, 1.0)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5]]), atol=1e-4)
    skewed = teacher_distribution(t, 1.0, torch.tensor([3.0, 1.0]))
    assert skewed[0, 0].item() == pytest.approx(0.75, abs=1e-3)


def test_label_free_and_supervised_only():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    kd_only, parts = distillation_loss(s, t, None, 2.0, 0.5)
    assert set(parts) == {"kd", "loss"} and kd_only.item() == pytest.approx(parts["kd"])
    ce_only, parts = distillation_loss(s, None, y, 2.0, 0.5)
    assert ce_only.item() == pytest.approx(F.cross_entropy(s, y).item())
    with pytest.raises(ValueError):
        distillation_loss(s, None, None, 2.0, 0.5)


def test_loss_is_zero_when_student_matches_single_teacher_and_alpha_is_one():
    s = torch.randn(4, 6)
    loss, _ = distillation_loss(s, s[:, None, :].clone(), None, 4.0, 1.0)
    assert abs(loss.item()) < 1e-5


def test_gradient_flows_to_student_only():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 3, 6, requires_grad=True)
    loss, _ = distillation_loss(s, t.detach(), torch.tensor([0, 1, 2, 3]), 4.0, 0.7)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_topk_path_with_full_support_equals_full_kl_for_one_teacher():
    g = torch.Generator().manual_seed(5)
    s, t, y = torch.randn(6, 5, generator=g), torch.randn(6, 1, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    T = 3.0
    p = F.softmax(t / T, -1)
    ids = torch.argsort(p, dim=-1, descending=True)
    bins = (ids, torch.gather(p, 2, ids), torch.zeros(6, 1))
    full, _ = distillation_loss(s, t, y, T, 0.7)
    topk, parts = distillation_loss(s, None, y, T, 0.7, teacher_topk=bins)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)
    assert set(parts) == {"kd", "ce", "loss"}
