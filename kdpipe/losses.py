"""Knowledge-distillation losses as pure functions of tensors (no Ray, no models, no state).

loss = alpha * T^2 * KL(p_teachers || q_student) + (1 - alpha) * CE(student, labels)

p_teachers is the weighted average of the teachers' distributions softmax(z_k / T) (an ensemble
of distributions, not of logits); q_student = softmax(s / T). The T^2 factor keeps the gradient
scale of the soft term independent of T (Hinton et al., 2015).

Top-k teachers (`topk_kd_kl`) store only k probabilities and their tail mass; teacher and student
are then compared over the same k + 1 bins (the k stored classes and one tail bin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, temperature: float, alpha: float,
                      weights: torch.Tensor | None = None,
                      teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * T^2 * KL(teachers || student) + (1 - alpha) * CE.

    student_logits [B, C]; teacher_logits [B, K, C] (the KL is to the weighted average of the
    teachers' distributions), or teacher_topk = (ids [B, K, k], probs [B, K, k], tail [B, K])
    from top-k labels (the weighted sum of per-teacher KLs over k + 1 bins, see topk_kd_kl),
    or neither (plain supervised training); labels [B] or None (label-free distillation).
    Returns (loss, {"kd": ..., "ce": ..., "loss": ...}) with the parts as floats for logging.
    """
    if teacher_topk is not None:
        if teacher_logits is not None:
            raise ValueError("give teacher_logits or teacher_topk, not both")
        teacher_logits = teacher_topk[1]  # only its presence matters below
    if teacher_logits is None and labels is None:
        raise ValueError("distillation_loss needs teacher logits, labels, or both")
    parts: dict[str, torch.Tensor] = {}
    if teacher_topk is not None and alpha > 0:
        parts["kd"] = topk_kd_kl(student_logits, *teacher_topk, temperature, weights)
    elif teacher_logits is not None and alpha > 0:
        parts["kd"] = kd_kl(student_logits, teacher_distribution(teacher_logits, temperature, weights), temperature)
    if labels is not None and (alpha < 1 or teacher_logits is None):
        parts["ce"] = F.cross_entropy(student_logits.float(), labels)
    if teacher_logits is None:
        loss = parts["ce"]
    elif labels is None:
        loss = parts["kd"]
    else:
        loss = alpha * parts.get("kd", 0.0) + (1 - alpha) * parts.get("ce", 0.0)
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged["loss"] = float(loss.detach())
    return loss, logged


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
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, C]
    b, num_teachers, _ = topk_ids.shape
    ids = topk_ids.long()
    log_q = log_q[:, None, :].expand(b, num_teachers, -1)  # [B, K, C]
    covered = torch.zeros_like(log_q, dtype=torch.bool).scatter_(2, ids, True)
    no_tail = covered.all(dim=-1)  # [B, K]
    # Rows without a tail mask nothing, so logsumexp never sees only -inf (NaN gradients).
    masked = log_q.masked_fill(covered & ~no_tail[..., None], float("-inf"))
    log_q_tail = torch.logsumexp(masked, dim=-1)  # [B, K]
    p = topk_probs.to(dtype)
    t = tail.to(dtype).clamp(min=0)  # value rounding can leave a tail of -1e-8
    kl = (torch.xlogy(p, p) - p * torch.gather(log_q, 2, ids)).sum(dim=-1)
    kl = kl + torch.where(no_tail, torch.zeros_like(t), torch.xlogy(t, t) - t * log_q_tail)  # [B, K]
    if weights is None:
        return kl.mean(dim=1).mean() * temperature**2
    w = weights.to(dtype).to(kl.device)
    if w.shape != (num_teachers,):
        raise ValueError(f"teacher weights have shape {tuple(w.shape)}, expected ({num_teachers},)")
    return (kl @ (w / w.sum())).mean() * temperature**2
