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

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.errors import ConfigError
from kdpipe.training.choices import ENSEMBLES, KINDS, WEIGHTINGS


@dataclass(frozen=True)
class LossOptions:
    """A run's choice of distillation term: distillation_loss's keyword arguments of that name
    (temperatures: one per teacher, or None for all at the step's temperature)."""

    temperatures: tuple[float, ...] | None = None
    ensemble: str = "mean"
    kind: str = "kl"
    weighting: str = "fixed"

    def kwargs(self) -> dict[str, object]:
        return {"temperatures": self.temperatures, "ensemble": self.ensemble, "kind": self.kind,
                "weighting": self.weighting}


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
    has_teachers = _check(teacher_logits, teacher_topk, teacher_probs, labels, ensemble, kind, weighting)
    parts: dict[str, torch.Tensor] = {}
    if has_teachers and alpha > 0:
        b = student_logits.shape[0]
        if teacher_topk is not None:
            if kind == "mse":
                raise ConfigError("loss mse compares logits and needs full labels (labels.mode: full)")
            ids, probs, tail = teacher_topk
            k_teachers = ids.shape[1]
            w = sample_weights(k_teachers, b, weights, weighting, probs[..., 0], ids[..., 0], labels)
            temps = _temperatures(temperatures, k_teachers, temperature)
            rows = torch.stack([topk_kl_rows(student_logits, ids[:, i], probs[:, i], tail[:, i], float(temps[i]),
                                             kind) for i in range(k_teachers)], dim=1)  # [B, K]
            parts["kd"] = (rows * w).sum(dim=1).mean()
        elif (plan := _fused_plan(teacher_logits, labels, temperature, alpha, weights, teacher_topk, temperatures,
                                  ensemble, kind, weighting, teacher_probs)) is not None:
            # One node for the whole loss: the same value as the general path would give.
            target, with_ce, w_kd, w_ce = plan
            loss, kd, ce = _target_kd_ce(student_logits, target, labels if with_ce else None, temperature, w_kd, w_ce,
                                         kind)
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


def distillation_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, temperature: float, alpha: float,
                      weights: torch.Tensor | None = None,
                      teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      temperatures: list[float] | torch.Tensor | None = None, ensemble: str = "mean",
                      kind: str = "kl", weighting: str = "fixed", teacher_probs: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The gradient of distillation_loss (same arguments) with respect to student_logits, and
    its logged parts, formed directly, without autograd, when the loss is the common one (the
    teachers' mean distribution, KL or soft CE, plus cross-entropy): the caller then runs
    student_logits.backward(grad). None in every other case: use distillation_loss.

    Each tensor op costs microseconds of dispatch (a kernel launch on a GPU) whatever its
    size, and a small student's whole step is a few hundred of them: through autograd this loss
    took ~4x the ops of plain cross-entropy, and an autograd.Function around the same ops still
    paid for its node and saved tensors on every step."""
    _check(teacher_logits, teacher_topk, teacher_probs, labels, ensemble, kind, weighting)
    plan = _fused_plan(teacher_logits, labels, temperature, alpha, weights, teacher_topk, temperatures,
                       ensemble, kind, weighting, teacher_probs)
    if plan is None or plan[0].requires_grad:
        return None
    target, with_ce, w_kd, w_ce = plan
    with torch.no_grad():
        grad, values = fused_kd_ce_grad(student_logits.detach(), target, labels if with_ce else None,
                                        temperature, w_kd, w_ce, kind)
    loss, kd, ce = values.unbind()
    return grad, {"kd": kd, **({"ce": ce} if with_ce else {}), "loss": loss}


def _check(teacher_logits, teacher_topk, teacher_probs, labels, ensemble: str, kind: str, weighting: str) -> bool:
    """distillation_loss's argument checks; returns whether any teacher signal was given."""
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
    return has_teachers


def _fused_plan(teacher_logits, labels, temperature: float, alpha: float, weights, teacher_topk, temperatures,
                ensemble: str, kind: str, weighting: str, teacher_probs):
    """(target distribution [B, C], with cross-entropy?, w_kd, w_ce) when the loss is the
    fused one (see _plain_mean), else None."""
    if teacher_topk is not None or alpha <= 0:
        return None
    if teacher_probs is not None:
        target = teacher_probs
    elif teacher_logits is not None and _plain_mean(weights, weighting, temperatures, temperature, ensemble, kind):
        target = _mean_target(teacher_logits, temperature)
    else:
        return None
    with_ce = labels is not None and alpha < 1
    return target, with_ce, (1.0 if labels is None else float(alpha)), (1 - float(alpha) if with_ce else 0.0)


def needs_only_the_mean_target(ensemble: str, kind: str, weighting: str) -> bool:
    """Does the distillation term depend on the teachers only through their weighted mean
    distribution (so it can be formed once, as teacher_probs)? Mean ensemble, KL or soft CE,
    fixed weighting (a temperature schedule is the caller's to rule out)."""
    return ensemble == "mean" and kind in ("kl", "soft_ce") and weighting == "fixed"


def _plain_mean(weights, weighting: str, temperatures, temperature: float, ensemble: str, kind: str) -> bool:
    """The common case: equal teacher weights, fixed weighting, one temperature, the mean
    ensemble and a KL or soft-CE term; fused_kd_ce_grad forms it in a few ops (the general
    path builds per-sample weights and per-teacher temperatures on every step)."""
    if not needs_only_the_mean_target(ensemble, kind, weighting):
        return False
    if weights is not None and not bool(torch.all(torch.as_tensor(weights) == torch.as_tensor(weights).flatten()[0])):
        return False
    return temperatures is None or len(temperatures) == 0 or \
        bool(torch.all(torch.as_tensor(temperatures, dtype=torch.float32) == float(temperature)))


@functools.lru_cache(maxsize=32)
def _fused_constants(b: int, temperature: float, w_kd: float, w_ce: float, kl: bool, with_ce: bool,
                     dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_kd_ce_grad's per-shape constants, made once: the matrix taking the step's raw sums
    (sum p log q, sum of the labels' log r, then sum p log p for KL) to (loss, kd, ce), and a
    column of -1 that subtracts the one-hot labels from softmax(s)."""
    kk = temperature * temperature / b
    kd = [-kk, 0.0, kk] if kl else [-kk, 0.0]
    ce = [0.0, -1.0 / b, 0.0] if kl else [0.0, -1.0 / b]
    rows = [[w_kd * d + w_ce * c for d, c in zip(kd, ce, strict=True)], kd, ce]
    if not with_ce:  # no labels: the sums are (sum p log q[, sum p log p]) and ce is 0
        rows = [[r[0]] + r[2:] for r in rows]
    mix = torch.tensor(rows, dtype=dtype, device=device)
    minus_one = torch.full((b, 1), -1.0, dtype=dtype, device=device) if with_ce else None
    return mix, minus_one


def fused_kd_ce_grad(s: torch.Tensor, p: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                     w_kd: float, w_ce: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w_kd * T^2 KL (kind "kl", or soft CE "soft_ce") of softmax(s / T) from a target
    distribution p, plus w_ce * cross-entropy with the labels (when given), batch means:
    (its gradient with respect to s, in s's dtype; [loss, kd, ce] in float32 or wider, ce 0
    without labels). No autograd (call it under no_grad):
        d/ds = w_kd * T * (softmax(s / T) - p) / B + w_ce * (softmax(s) - onehot(labels)) / B
    (p sums to 1). The three raw sums go through one small matrix to (loss, kd, ce)."""
    dtype = torch.promote_types(torch.promote_types(s.dtype, p.dtype), torch.float32)
    b, in_dtype, kl = s.shape[0], s.dtype, kind == "kl"
    s = s if s.dtype == dtype else s.to(dtype)
    p = p if p.dtype == dtype else p.to(dtype)
    with_ce = labels is not None
    mix, minus_one = _fused_constants(b, float(temperature), float(w_kd), float(w_ce), kl, with_ce, dtype, s.device)
    log_q = torch.log_softmax(s * (1.0 / temperature), dim=-1)
    sums = [torch.dot(p.reshape(-1), log_q.reshape(-1))]
    grad = log_q.exp_().sub_(p).mul_(w_kd * temperature / b)  # log_q is spent here
    if with_ce:
        idx = labels.reshape(-1, 1)
        idx = idx if idx.dtype == torch.int64 else idx.long()
        log_r = torch.log_softmax(s, dim=-1)
        sums.append(log_r.gather(1, idx).sum())
        grad.add_(log_r.exp_().scatter_add_(1, idx, minus_one), alpha=w_ce / b)
    if kl:
        sums.append(torch.xlogy(p, p).sum())
    values = torch.mv(mix, torch.stack(sums))  # without labels the matrix's ce row is 0
    return (grad if grad.dtype == in_dtype else grad.to(in_dtype)), values


class _TargetKDCE(torch.autograd.Function):
    """fused_kd_ce_grad's loss in one autograd node, its gradient formed in the forward and the
    backward one multiplication. Returns (loss, kd, ce); kd and ce are detached. The target is
    data and gets no gradient. (Training calls fused_kd_ce_grad directly, see
    distillation_grad: no node at all.)"""

    @staticmethod
    def forward(ctx, s, p, labels, temperature: float, w_kd: float, w_ce: float, kind: str):
        grad, values = fused_kd_ce_grad(s, p, labels, temperature, w_kd, w_ce, kind)
        loss, kd, ce = values.unbind()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kd, ce)  # else autograd would make them outputs that need a gradient
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _kd, _ce):
        (grad,) = ctx.saved_tensors
        # not in place: a second backward (retain_graph) must find it intact
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


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
    return _TargetKDCE.apply(student_logits, target, labels, float(temperature), float(w_kd), float(w_ce), kind)


def _mean_target(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean of the teachers' softmax(z / T), teacher_logits [B, K, C] -> [B, C]."""
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    return F.softmax(teacher_logits.to(dtype) / temperature, dim=-1).mean(dim=1)


def _mean_kd_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                temperature: float, w_kd: float, w_ce: float, kind: str):
    """_target_kd_ce to the mean of the teachers' softmax(z / T), teacher_logits [B, K, C]."""
    return _target_kd_ce(student_logits, _mean_target(teacher_logits, temperature), labels, temperature, w_kd, w_ce,
                         kind)


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
