"""Knowledge-distillation losses as pure functions of tensors (no Ray, no models, no state).

loss = alpha * T^2 * KL(p_teachers || q_student) + (1 - alpha) * CE(student, labels)

p_teachers is the weighted average of the teachers' distributions softmax(z_k / T) (an ensemble
of distributions, not of logits); q_student = softmax(s / T). The T^2 factor keeps the gradient
scale of the soft term independent of T (Hinton et al., 2015).

Top-k teachers (`topk_kd_kl`) store only k probabilities and their tail mass; teacher and student
are then compared over the same k + 1 bins (the k stored classes and one tail bin).

Per experiment (`distillation_loss` arguments, never baked into the cache):
  ensemble   "mean": the KL to the weighted average of the teachers' distributions;
             "sum": the weighted sum of one KL per teacher (each at its own temperature).
             Top-k labels always use "sum" (their supports differ per teacher).
  kind       "kl" (T^2 KL), "soft_ce" (T^2 cross-entropy to the soft targets: the KL plus the
             targets' entropy, same gradient) or "mse" (mean squared error between logits;
             full labels only; no temperature).
  weighting  "fixed" (the teacher weights), "confidence" (times each teacher's max probability
             on the sample) or "correctness" (only the teachers whose top class is the label;
             all of them on samples no teacher gets right). Weights are normalised per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.config import ENSEMBLES, KINDS, WEIGHTINGS


def teacher_distribution(teacher_logits: torch.Tensor, temperature: float,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions.

    teacher_logits: [B, K, C] (K teachers); weights: [K] (normalised here) or None for equal.
    Returns probabilities [B, C].
    """
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)  # [B, K, C]
    k = teacher_logits.shape[1]
    if weights is None:
        return probs.mean(dim=1)
    w = weights.to(probs.dtype).to(probs.device)
    if w.shape != (k,):
        raise ValueError(f"teacher weights have shape {tuple(w.shape)}, expected ({k},)")
    return torch.einsum("bkc,k->bc", probs, w / w.sum())


def kd_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(target || softmax(student / T)). [B, C], [B, C] -> scalar."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # xlogy: 0 * log 0 = 0 for classes the teachers give no mass.
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(dim=-1)
    return kl.mean() * temperature**2


def sample_weights(num_teachers: int, batch: int, weights: torch.Tensor | None, weighting: str,
                   top_prob: torch.Tensor | None = None, top_class: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample teacher weights [B, K], each row summing to 1.

    top_prob [B, K]: each teacher's largest probability (for "confidence"); top_class [B, K]: its
    top class (for "correctness", with labels [B])."""
    base = torch.ones(num_teachers) if weights is None else weights.detach().float().cpu()
    if base.shape != (num_teachers,):
        raise ValueError(f"teacher weights have shape {tuple(base.shape)}, expected ({num_teachers},)")
    device = top_prob.device if top_prob is not None else (top_class.device if top_class is not None else "cpu")
    w = base.to(device)[None, :].expand(batch, -1)
    if weighting == "confidence":
        w = w * top_prob.detach().float()
    elif weighting == "correctness":
        if labels is None:
            raise ValueError("teacher_weighting=correctness needs labels; use fixed or confidence for label-free data")
        right = (top_class == labels[:, None]).float()
        # A sample no teacher gets right keeps every teacher at its base weight.
        w = torch.where(right.sum(1, keepdim=True) > 0, w * right, w)
    elif weighting != "fixed":
        raise ValueError(f"teacher weighting {weighting!r}: use one of {WEIGHTINGS}")
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=1e-12), torch.full_like(w, 1.0 / num_teachers))


def _soft_term(log_q: torch.Tensor, p: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence of the student log-probabilities log_q from targets p (last dim summed)."""
    cross = -(p * log_q).sum(dim=-1)
    return cross if kind == "soft_ce" else cross + torch.xlogy(p, p).sum(dim=-1)


def full_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperatures: torch.Tensor,
                  w: torch.Tensor, ensemble: str, kind: str, temperature: float) -> torch.Tensor:
    """Per-sample distillation term [B] from full teacher logits [B, K, C]; w [B, K] sums to 1 per
    row; temperatures [K]. "mean" uses the run's `temperature` for the student and its T^2."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    z, s = teacher_logits.to(dtype), student_logits.to(dtype)
    t, w = temperatures.to(z.device, dtype), w.to(z.device, dtype)
    if kind == "mse":
        if ensemble == "mean":
            return ((s - torch.einsum("bkc,bk->bc", z, w)) ** 2).mean(dim=-1)
        return (((s[:, None, :] - z) ** 2).mean(dim=-1) * w).sum(dim=1)
    probs = F.softmax(z / t[None, :, None], dim=-1)  # [B, K, C], each teacher at its own T
    if ensemble == "mean":
        p = torch.einsum("bkc,bk->bc", probs, w)
        return _soft_term(F.log_softmax(s / temperature, dim=-1), p, kind) * temperature**2
    log_q = F.log_softmax(s[:, None, :] / t[None, :, None], dim=-1)  # student at each teacher's T
    return (_soft_term(log_q, probs, kind) * t[None, :] ** 2 * w).sum(dim=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, temperature: float, alpha: float,
                      weights: torch.Tensor | None = None,
                      teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      temperatures: list[float] | torch.Tensor | None = None, ensemble: str = "mean",
                      kind: str = "kl", weighting: str = "fixed", teacher_probs: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * (distillation term) + (1 - alpha) * CE.

    student_logits [B, C]; teacher_logits [B, K, C], or teacher_topk = (ids [B, K, k], probs
    [B, K, k], tail [B, K]) from top-k labels (probabilities already at each teacher's
    temperature; always the "sum" ensemble over k + 1 bins, see topk_kd_kl), or neither (plain
    supervised training); labels [B] or None (label-free distillation). weights [K] or None;
    temperatures: one per teacher or None (all `temperature`). Or teacher_probs [B, C]: the
    teachers' weighted mean distribution, each at its temperature, already formed (training's
    read step forms it once when the loss needs nothing else: the mean ensemble, fixed
    weighting, KL or soft CE, no temperature schedule); weights and temperatures are then in
    it, and the student is compared at `temperature`. Returns (loss, {"kd", "ce", "loss"} as
    detached scalar tensors for logging, on the loss's device).
    """
    if sum(t is not None for t in (teacher_logits, teacher_topk, teacher_probs)) > 1:
        raise ValueError("give one of teacher_logits, teacher_topk and teacher_probs")
    if teacher_probs is not None and not needs_only_the_mean_target(ensemble, kind, weighting):
        raise ValueError(f"teacher_probs (the ensemble formed when read) serve ensemble=mean, loss kl or soft_ce "
                         f"and fixed weighting, not {ensemble}/{kind}/{weighting}: pass the teachers' logits")
    has_teachers = teacher_logits is not None or teacher_topk is not None or teacher_probs is not None
    if not has_teachers and labels is None:
        raise ValueError("distillation_loss needs teacher logits, labels, or both")
    if ensemble not in ENSEMBLES or kind not in KINDS:
        raise ValueError(f"ensemble {ensemble!r} / loss {kind!r}: use {ENSEMBLES} / {KINDS}")
    parts: dict[str, torch.Tensor] = {}
    if has_teachers and alpha > 0:
        b = student_logits.shape[0]
        if teacher_topk is not None:
            if kind == "mse":
                raise ValueError("loss mse compares logits and needs full labels (labels.mode: full)")
            ids, probs, tail = teacher_topk
            k_teachers = ids.shape[1]
            w = sample_weights(k_teachers, b, weights, weighting, probs[..., 0], ids[..., 0], labels)
            temps = _temperatures(temperatures, k_teachers, temperature)
            rows = torch.stack([topk_kl_rows(student_logits, ids[:, i], probs[:, i], tail[:, i], float(temps[i]),
                                             kind) for i in range(k_teachers)], dim=1)  # [B, K]
            parts["kd"] = (rows * w).sum(dim=1).mean()
        elif teacher_probs is not None or _plain_mean(weights, weighting, temperatures, temperature, ensemble, kind):
            # One node for the whole loss: the same value as the general path would give.
            with_ce = labels is not None and alpha < 1
            fused = _target_kd_ce if teacher_probs is not None else _mean_kd_ce
            loss, kd, ce = fused(student_logits, teacher_probs if teacher_probs is not None else teacher_logits,
                                 labels if with_ce else None, temperature,
                                 1.0 if labels is None else alpha, 1 - alpha if with_ce else 0.0, kind)
            return loss, {"kd": kd.detach(), **({"ce": ce.detach()} if with_ce else {}), "loss": loss.detach()}
        else:
            k_teachers = teacher_logits.shape[1]
            top = F.softmax(teacher_logits.float(), dim=-1).max(dim=-1)
            w = sample_weights(k_teachers, b, weights, weighting, top.values, top.indices, labels)
            temps = _temperatures(temperatures, k_teachers, temperature)
            parts["kd"] = full_kd_terms(student_logits, teacher_logits, temps, w, ensemble, kind, temperature).mean()
    if labels is not None and (alpha < 1 or not has_teachers):
        parts["ce"] = F.cross_entropy(student_logits.float(), labels)
    if not has_teachers:
        loss = parts["ce"]
    elif labels is None:
        loss = parts["kd"] if "kd" in parts else student_logits.sum() * 0.0
    else:
        loss = alpha * parts.get("kd", 0.0) + (1 - alpha) * parts.get("ce", 0.0)
    # Detached tensors, not floats: a float() per step would wait for the GPU on every step.
    logged = {k: v.detach() for k, v in parts.items()}
    logged["loss"] = loss.detach()
    return loss, logged


def needs_only_the_mean_target(ensemble: str, kind: str, weighting: str) -> bool:
    """Does the distillation term depend on the teachers only through their weighted mean
    distribution (so it can be formed once, as teacher_probs)? Mean ensemble, KL or soft CE,
    fixed weighting (a temperature schedule is the caller's to rule out)."""
    return ensemble == "mean" and kind in ("kl", "soft_ce") and weighting == "fixed"


def _plain_mean(weights, weighting: str, temperatures, temperature: float, ensemble: str, kind: str) -> bool:
    """The common case: equal teacher weights, fixed weighting, one temperature, the mean
    ensemble and a KL or soft-CE term; _mean_kd_ce computes it in one fused node (the general
    path builds per-sample weights and per-teacher temperatures on every step)."""
    if not needs_only_the_mean_target(ensemble, kind, weighting):
        return False
    if weights is not None and not bool(torch.all(torch.as_tensor(weights) == torch.as_tensor(weights).flatten()[0])):
        return False
    return temperatures is None or len(temperatures) == 0 or \
        bool(torch.all(torch.as_tensor(temperatures, dtype=torch.float32) == float(temperature)))


class _TargetKDCE(torch.autograd.Function):
    """w_kd * T^2 KL (or soft CE) of softmax(s / T) from a target distribution p, plus w_ce *
    cross-entropy with the labels (when given), batch means, in one autograd node with its
    gradient written out:
        d/ds = w_kd * T * (softmax(s / T) - p) / B + w_ce * (softmax(s) - onehot(labels)) / B
    (p sums to 1). Autograd would retrace division, the two log-softmaxes, the KL, the means and
    the weighted sum: here the step of a small student on cached labels costs little more than a
    plain one. Returns (loss, kd, ce); kd and ce are detached, ce is 0 without labels. The
    target is data and gets no gradient."""

    @staticmethod
    def forward(ctx, s, p, labels, temperature: float, w_kd: float, w_ce: float, kl: bool):
        dtype = torch.promote_types(torch.promote_types(s.dtype, p.dtype), torch.float32)
        b, sf, p = s.shape[0], s.to(dtype), p.to(dtype)
        log_q = F.log_softmax(sf / temperature, dim=-1)
        cross = (p * log_q).sum().neg_()
        kd = (cross + torch.xlogy(p, p).sum() if kl else cross) * (temperature**2 / b)
        log_r = ce = None
        if labels is not None:
            log_r = F.log_softmax(sf, dim=-1)
            ce = log_r.gather(1, labels.long()[:, None]).sum().neg_() / b
        loss = kd * w_kd + ce * w_ce if ce is not None else kd * w_kd
        ctx.save_for_backward(log_q, p, log_r, labels)
        ctx.scales = (w_kd * temperature / b, w_ce / b)
        ctx.in_dtype = s.dtype
        kd = kd.detach()
        ce = ce.detach() if ce is not None else torch.zeros((), dtype=dtype, device=s.device)
        ctx.mark_non_differentiable(kd, ce)  # else autograd would make them outputs that need a gradient
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad, _kd, _ce):
        log_q, p, log_r, labels = ctx.saved_tensors
        kd_scale, ce_scale = ctx.scales
        g = log_q.exp().sub_(p).mul_(kd_scale)
        if log_r is not None:
            r = log_r.exp()
            r[torch.arange(len(r), device=r.device), labels.long()] -= 1.0
            g.add_(r, alpha=ce_scale)
        return g.mul_(grad).to(ctx.in_dtype), None, None, None, None, None, None


def _target_kd_ce(student_logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None,
                  temperature: float, w_kd: float, w_ce: float, kind: str):
    """(loss, kd, ce) of _TargetKDCE for a target distribution [B, C]. A target that carries a
    gradient (not kdpipe's case: cached labels, or teachers run under no_grad) takes autograd's
    path instead, with the same values."""
    if target.requires_grad:
        dtype = torch.promote_types(torch.promote_types(student_logits.dtype, target.dtype), torch.float32)
        log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        kd = _soft_term(log_q, target.to(dtype), kind).mean() * temperature**2
        ce = F.cross_entropy(student_logits.to(dtype), labels) if labels is not None else None
        loss = kd * w_kd + ce * w_ce if ce is not None else kd * w_kd
        return loss, kd.detach(), (ce.detach() if ce is not None else torch.zeros((), dtype=dtype))
    return _TargetKDCE.apply(student_logits, target, labels, float(temperature), float(w_kd), float(w_ce),
                             kind == "kl")


def _mean_kd_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                temperature: float, w_kd: float, w_ce: float, kind: str):
    """_target_kd_ce to the mean of the teachers' softmax(z / T), teacher_logits [B, K, C]."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1).mean(dim=1)
    return _target_kd_ce(student_logits, p, labels, temperature, w_kd, w_ce, kind)


def _temperatures(temperatures, k: int, default: float) -> torch.Tensor:
    if temperatures is None or len(temperatures) == 0:
        return torch.full((k,), float(default))
    t = torch.as_tensor(temperatures, dtype=torch.float32)
    if t.shape != (k,):
        raise ValueError(f"{len(t)} teacher temperatures for {k} teachers")
    return t


def topk_kd_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor,
               tail: torch.Tensor, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * batch mean of sum_k w_k KL(teacher_k || student) over each teacher's k + 1 bins.

    Bins of teacher k: its k stored classes, with probabilities topk_probs, and one tail bin with
    its tail mass. The student's bins: softmax(student / T) at the same ids, and the rest of its
    mass in the tail bin, taken in log space (logsumexp over the unstored classes) so that a
    confident student's tiny tail keeps finite gradients. When the ids cover every class there is
    no tail bin and the term is the full KL.

    student_logits [B, C]; topk_ids [B, K, k] or [B, k] (distinct ids per row); topk_probs: the
    teacher probabilities at T, shaped as topk_ids; tail [B, K] or [B]; weights [K] (normalised
    here) or None for equal. Returns a scalar. With full support (k = C) this differs from
    `kd_kl` of the averaged teachers by a constant (the ensemble's Jensen gap), with the same
    gradient; with one teacher it is equal.
    """
    if topk_ids.dim() == 2:
        topk_ids, topk_probs, tail = topk_ids[:, None], topk_probs[:, None], tail[:, None]
    num_teachers = topk_ids.shape[1]
    kl = torch.stack([topk_kl_rows(student_logits, topk_ids[:, i], topk_probs[:, i], tail[:, i], temperature)
                      for i in range(num_teachers)], dim=1)  # [B, K]
    if weights is None:
        return kl.mean(dim=1).mean()
    w = weights.to(kl.dtype).to(kl.device)
    if w.shape != (num_teachers,):
        raise ValueError(f"teacher weights have shape {tuple(w.shape)}, expected ({num_teachers},)")
    return (kl @ (w / w.sum())).mean()


def topk_kl_rows(student_logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor,
                 temperature: float, kind: str = "kl") -> torch.Tensor:
    """One top-k teacher: T^2 * KL (or soft cross-entropy) per row over its k + 1 bins.
    student_logits [B, C]; ids, probs [B, k]; tail [B]. Returns [B]."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, C]
    ids = ids.long()
    covered = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    no_tail = covered.all(dim=-1)  # [B]
    # Rows without a tail mask nothing, so logsumexp never sees only -inf (NaN gradients).
    masked = log_q.masked_fill(covered & ~no_tail[:, None], float("-inf"))
    log_q_tail = torch.logsumexp(masked, dim=-1)  # [B]
    p = probs.to(dtype)
    t = tail.to(dtype).clamp(min=0)  # value rounding can leave a tail of -1e-8
    cross = -(p * torch.gather(log_q, 1, ids)).sum(dim=-1) - torch.where(no_tail, torch.zeros_like(t), t * log_q_tail)
    if kind == "kl":
        cross = cross + torch.xlogy(p, p).sum(dim=-1) + torch.where(no_tail, torch.zeros_like(t), torch.xlogy(t, t))
    return cross * temperature**2
