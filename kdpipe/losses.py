"""Knowledge-distillation losses as pure functions of tensors (no Ray, no models, no state).

loss = alpha * T^2 * KL(p_teachers || q_student) + (1 - alpha) * CE(student, labels)

p_teachers is the weighted average of the teachers' distributions softmax(z_k / T) (an ensemble
of distributions, not of logits); q_student = softmax(s / T). The T^2 factor keeps the gradient
scale of the soft term independent of T (Hinton et al., 2015).
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
                      weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * T^2 * KL(ensemble || student) + (1 - alpha) * CE.

    student_logits [B, C]; teacher_logits [B, K, C] or None (plain supervised training);
    labels [B] or None (label-free distillation: the KL term alone).
    Returns (loss, {"kd": ..., "ce": ..., "loss": ...}) with the parts as floats for logging.
    """
    if teacher_logits is None and labels is None:
        raise ValueError("distillation_loss needs teacher logits, labels, or both")
    parts: dict[str, torch.Tensor] = {}
    if teacher_logits is not None and alpha > 0:
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
