"""The KD losses against the formula computed directly in float64 (and against F.kl_div)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.training.losses import distillation_loss, kd_kl, teacher_distribution


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
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


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
    assert set(parts) == {"kd", "loss"} and kd_only.item() == pytest.approx(parts["kd"].item())
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


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_sum_ensemble_with_per_teacher_temperatures_matches_reference():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(12, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(12, 3, 6, generator=g, dtype=torch.float64) * 4
    w, temps = np.array([1.0, 2.0, 3.0]), [1.0, 2.0, 5.0]
    loss, _ = distillation_loss(s, t, None, 4.0, 1.0, torch.tensor(w), temperatures=temps, ensemble="sum")
    expected = 0.0
    for k, T in enumerate(temps):
        p, q = _np_softmax(t[:, k].numpy() / T), _np_softmax(s.numpy() / T)
        expected += w[k] / w.sum() * T * T * (p * np.log(p / q)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_is_kl_plus_target_entropy_and_mse_compares_logits():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randn(10, 2, 5, generator=g, dtype=torch.float64)
    T = 3.0
    kl, _ = distillation_loss(s, t, None, T, 1.0)
    ce, _ = distillation_loss(s, t, None, T, 1.0, kind="soft_ce")
    p = _np_softmax(t.numpy() / T).mean(1)
    assert (ce - kl).item() == pytest.approx(T * T * -(p * np.log(p)).sum(-1).mean(), rel=1e-6)
    mse, _ = distillation_loss(s, t, None, T, 1.0, kind="mse")
    assert mse.item() == pytest.approx(((s.numpy() - t.numpy().mean(1)) ** 2).mean(), rel=1e-9)
    mse_sum, _ = distillation_loss(s, t, None, T, 1.0, kind="mse", ensemble="sum")
    assert mse_sum.item() == pytest.approx(((s.numpy()[:, None] - t.numpy()) ** 2).mean(), rel=1e-9)
    s2 = s.clone().requires_grad_(True)
    distillation_loss(s2, t, None, T, 1.0, kind="soft_ce")[0].backward()
    s3 = s.clone().requires_grad_(True)
    distillation_loss(s3, t, None, T, 1.0)[0].backward()
    assert torch.allclose(s2.grad, s3.grad)  # same gradient as the KL


def test_confidence_and_correctness_weighting_per_sample():
    # Sample 0: teacher A is confident and right, B unsure and wrong. Sample 1: nobody is right.
    t = torch.tensor([[[6.0, 0.0, 0.0], [0.0, 0.3, 0.0]],
                      [[0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    probs = F.softmax(t, -1)
    from kdpipe.training.losses import sample_weights

    conf = sample_weights(2, 2, None, "confidence", probs.max(-1).values, probs.argmax(-1), y)
    top = probs.max(-1).values
    assert torch.allclose(conf, (top / top.sum(1, keepdim=True)).float())
    right = sample_weights(2, 2, torch.tensor([1.0, 3.0]), "correctness", None, probs.argmax(-1), y)
    assert right.tolist() == [[1.0, 0.0], [0.25, 0.75]]  # row 1: nobody right -> base weights
    with pytest.raises(ValueError, match="correctness needs labels"):
        sample_weights(2, 2, None, "correctness", None, probs.argmax(-1), None)
    # The loss under correctness weighting on sample 0 is teacher A's term alone.
    s = torch.randn(2, 3, dtype=torch.float64)
    only_a, _ = distillation_loss(s[:1], t[:1, :1], y[:1], 2.0, 1.0)
    weighted, _ = distillation_loss(s[:1], t[:1], y[:1], 2.0, 1.0, ensemble="sum", weighting="correctness")
    assert weighted.item() == pytest.approx(only_a.item(), rel=1e-9)


def test_topk_labels_with_per_teacher_temperatures_and_no_mse():
    g = torch.Generator().manual_seed(9)
    s, z = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 2, 5, generator=g, dtype=torch.float64)
    temps = [1.5, 4.0]
    p = torch.stack([F.softmax(z[:, k] / temps[k], -1) for k in range(2)], 1)
    ids = torch.argsort(p, -1, descending=True)
    bins = (ids, torch.gather(p, 2, ids), torch.zeros(6, 2, dtype=torch.float64))
    topk, _ = distillation_loss(s, None, None, 9.0, 1.0, teacher_topk=bins, temperatures=temps)
    full, _ = distillation_loss(s, z, None, 9.0, 1.0, temperatures=temps, ensemble="sum")
    assert topk.item() == pytest.approx(full.item(), rel=1e-9)  # full support: the same KLs
    with pytest.raises(ValueError, match="mse compares logits"):
        distillation_loss(s, None, None, 2.0, 1.0, teacher_topk=bins, kind="mse")


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_fast_mean_path_equals_the_general_path(kind):
    """Equal weights, one temperature, fixed weighting take a fused path; it must give the
    general path's loss and gradients (forced here by per-sample weighting that is uniform)."""
    from kdpipe.training import losses

    g = torch.Generator().manual_seed(3)
    s = torch.randn(32, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(32, 3, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (32,), generator=g)
    assert losses._plain_mean(None, "fixed", None, 4.0, "mean", kind)
    assert losses._plain_mean(torch.tensor([2.0, 2.0, 2.0]), "fixed", [4.0, 4.0, 4.0], 4.0, "mean", kind)
    assert not losses._plain_mean(torch.tensor([1.0, 2.0, 2.0]), "fixed", None, 4.0, "mean", kind)
    assert not losses._plain_mean(None, "fixed", [4.0, 2.0, 4.0], 4.0, "mean", kind)
    fast, _ = distillation_loss(s, z, y, 4.0, 0.7, kind=kind)
    (g_fast,) = torch.autograd.grad(fast, s)
    w = losses.sample_weights(3, 32, None, "fixed")
    general = 0.7 * losses.full_kd_terms(s, z, torch.full((3,), 4.0), w, "mean", kind, 4.0).mean() \
        + 0.3 * F.cross_entropy(s, y)
    (g_general,) = torch.autograd.grad(general, s)
    # (the general path's weights are float32 thirds: agreement to ~1e-7 relative)
    assert torch.allclose(fast, general, rtol=1e-6, atol=0), (fast, general)
    assert torch.allclose(g_fast, g_general, rtol=1e-6, atol=1e-9), (g_fast - g_general).abs().max()


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_fused_mean_gradient_is_the_derivative_of_its_loss(kind):
    """The fused path writes its gradient out by hand (KD term alone, and KD plus cross-entropy):
    torch.autograd.gradcheck compares it with finite differences of its forward (float64), and a
    bf16 student gets a bf16 gradient."""
    from kdpipe.training import losses

    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 3, 7, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 7, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda x: losses._mean_kd_ce(x, z, None, 3.0, 1.0, 0.0, kind)[0], (s,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda x: losses._mean_kd_ce(x, z, y, 3.0, 0.7, 0.3, kind)[0], (s,),
                                    eps=1e-6, atol=1e-7)
    # the loss parts it returns are the terms it sums
    loss, kd, ce = losses._mean_kd_ce(s, z, y, 3.0, 0.7, 0.3, kind)
    assert torch.allclose(loss, 0.7 * kd + 0.3 * ce) and torch.allclose(ce, F.cross_entropy(s, y))
    # parts for logging carry no graph: summed over an epoch they must not keep every step's graph
    assert loss.requires_grad and not kd.requires_grad and not ce.requires_grad
    for teachers in (z, None):
        _, parts = distillation_loss(s, teachers, y, 3.0, 0.7, kind=kind)
        assert parts and not any(v.requires_grad for v in parts.values()), parts
    half = s.detach().to(torch.bfloat16).requires_grad_()
    losses._mean_kd_ce(half, z.float(), None, 3.0, 1.0, 0.0, kind)[0].backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()
    # teachers' logits that carry a gradient (not kdpipe's case) fall back to autograd, same value
    zg = z.clone().requires_grad_()
    assert torch.allclose(losses._mean_kd_ce(s, zg, None, 3.0, 1.0, 0.0, kind)[0],
                          losses._mean_kd_ce(s, z, None, 3.0, 1.0, 0.0, kind)[0])


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_ensemble_formed_when_read_gives_the_general_paths_loss_and_gradient(kind):
    """Training's read step forms the teachers' weighted mean distribution once
    (softlabels.ensemble_probs, per-teacher temperatures and weights included); the loss from it
    equals the general path's from the logits, value and gradient, and it is K times smaller."""
    from kdpipe.labels import softlabels
    from kdpipe.training import losses

    g = torch.Generator().manual_seed(7)
    s = torch.randn(24, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(24, 3, 10, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 10, (24,), generator=g)
    weights, temps = [0.5, 1.0, 2.5], [2.0, 4.0, 3.0]
    probs = torch.from_numpy(softlabels.ensemble_probs(z.numpy(), temps, weights))
    assert probs.shape == (24, 10) and probs.dtype == torch.float32
    assert torch.allclose(probs.double().sum(-1), torch.ones(24, dtype=torch.float64), atol=1e-6)
    for labelled, alpha in ((True, 0.7), (False, 1.0)):
        fast, parts = distillation_loss(s, None, y if labelled else None, 4.0, alpha, kind=kind, teacher_probs=probs)
        (g_fast,) = torch.autograd.grad(fast, s)
        w = losses.sample_weights(3, 24, torch.tensor(weights), "fixed")
        general = losses.full_kd_terms(s, z, torch.tensor(temps), w, "mean", kind, 4.0).mean()
        if labelled:
            general = alpha * general + (1 - alpha) * F.cross_entropy(s, y)
        (g_general,) = torch.autograd.grad(general, s)
        # (the target is float32: agreement to ~1e-6)
        assert torch.allclose(fast, general, rtol=1e-5), (fast, general)
        assert torch.allclose(g_fast, g_general, rtol=1e-4, atol=1e-7), (g_fast - g_general).abs().max()
        assert set(parts) == ({"kd", "ce", "loss"} if labelled else {"kd", "loss"})
    with pytest.raises(ValueError, match="teacher_probs"):
        distillation_loss(s, None, y, 4.0, 0.7, kind="mse", teacher_probs=probs)
    with pytest.raises(ValueError, match="one of"):
        distillation_loss(s, z, y, 4.0, 0.7, teacher_probs=probs)


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_gradient_written_out_for_training_equals_autograds(kind):
    """Training steps on the common loss take distillation_grad: the gradient with respect to
    the student's logits and the logged parts, formed without autograd. They equal autograd's
    gradient of distillation_loss and its parts, from a formed target or from the teachers'
    logits, with and without labels; a bf16 student gets a bf16 gradient; every other loss
    (top-k, sum ensemble, per-sample weighting, unequal weights, no teachers) is left to autograd."""
    from kdpipe.training import losses

    g = torch.Generator().manual_seed(11)
    s = torch.randn(12, 10, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(12, 3, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (12,), generator=g)
    probs = losses._mean_target(z, 4.0)
    for teachers, formed in ((z, None), (None, probs)):
        for labelled, alpha in ((True, 0.8), (False, 1.0)):
            labels = y if labelled else None
            loss, parts = distillation_loss(s, teachers, labels, 4.0, alpha, kind=kind, teacher_probs=formed)
            (want,) = torch.autograd.grad(loss, s)
            got, got_parts = losses.distillation_grad(s, teachers, labels, 4.0, alpha, kind=kind, teacher_probs=formed)
            assert not got.requires_grad and got.dtype == s.dtype
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got - want).abs().max()
            assert set(got_parts) == set(parts) == ({"kd", "ce", "loss"} if labelled else {"kd", "loss"})
            for k in parts:
                assert torch.allclose(got_parts[k], parts[k], rtol=1e-9), (k, got_parts[k], parts[k])
    # the parts are the terms: ce is the cross-entropy and the loss their weighted sum
    _, p = losses.distillation_grad(s, z, y, 4.0, 0.8, kind=kind)
    assert torch.allclose(p["ce"], F.cross_entropy(s, y)) and torch.allclose(p["loss"], 0.8 * p["kd"] + 0.2 * p["ce"])
    half, _ = losses.distillation_grad(s.detach().to(torch.bfloat16), None, y, 4.0, 0.8, kind=kind,
                                       teacher_probs=probs.float())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    w = torch.tensor([1.0, 2.0, 2.0])
    ids = torch.topk(z, 3, dim=-1).indices
    topk = (ids, torch.softmax(z, -1).gather(-1, ids), 1 - torch.softmax(z, -1).gather(-1, ids).sum(-1))
    for args, kwargs in (((s, z, y, 4.0, 0.8), {"ensemble": "sum"}), ((s, z, y, 4.0, 0.8), {"weighting": "confidence"}),
                         ((s, z, y, 4.0, 0.8, w), {}), ((s, None, y, 4.0, 0.8), {"teacher_topk": topk}),
                         ((s, None, y, 4.0, 0.0), {}), ((s, z, y, 4.0, 0.8), {"kind": "mse"})):
        assert losses.distillation_grad(*args, **kwargs) is None, kwargs
    with pytest.raises(ValueError, match="one of"):
        losses.distillation_grad(s, z, y, 4.0, 0.7, teacher_probs=probs)
