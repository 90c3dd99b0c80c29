"""Soft-label math: what a teacher's output becomes, and what a student reads back.

Mode `full` keeps every logit z (float16 or float32). The soft label at the generation temperature
T is softmax(z / T), exact up to the storage dtype, and exact for any other T a student asks for,
so students may change temperature without regenerating.

Mode `topk` keeps the k largest logits, their class ids and log_z = logsumexp(z / T) over all C
classes (see `topk_arrays`, and `retemper_topk` for what is exact at another temperature).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdpipe.errors import CacheError, ConfigError, InputError

SCHEMA_VERSION = 1


KEY = "sample_key"


LOGITS = "logits"


AUG = "aug"  # float32 [5] per row in units with augmented views (images.AUG_FIELDS; zeros = plain view)


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) over the last axis, computed in float64. [..., C] -> [..., C]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_probs(logits: np.ndarray, temperatures: list[float], weights: list[float]) -> np.ndarray:
    """The teachers' weighted mean distribution sum_k w_k softmax(z_k / T_k) / sum_k w_k, from
    logits [..., K, C], as float32 [..., C]: the whole target of the mean-ensemble loss, formed
    once when the student's data is read (losses.distillation_loss's teacher_probs)."""
    e = softmax(np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64)[:, None], 1.0)
    w = np.asarray(weights, np.float64)
    return np.tensordot(e, w / w.sum(), axes=([-2], [0])).astype(np.float32)


def check_finite(logits: np.ndarray, keys: list[str], where: str) -> None:
    """Refuse NaN/Inf teacher outputs, naming the first bad sample: they would poison every student."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{where}: teacher output for sample {keys[first]!r} is not finite "
            f"({int(bad.sum())} bad rows); check the checkpoint and the preprocessing"
        )


def check_storable(logits: np.ndarray, keys: list[str], where: str, dtype: str, temperature: float,
                   topk: bool) -> None:
    """Refuse labels that would be stored non-finite, naming the first bad sample: a NaN/Inf
    teacher output (check_finite), a logit beyond the stored dtype's range (float16 holds
    |z| <= 65504: a logit of 81,000 would be stored as Inf), and, for top-k labels, a
    log-partition logsumexp(z / T) beyond float32's. Checked on the values as they are written."""
    check_finite(logits, keys, where)
    z = np.asarray(logits)
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(z.astype(dtype)).all(axis=-1)
        if bad.any():
            what = f"a logit of {float(np.abs(z[int(np.flatnonzero(bad)[0])]).max()):.6g} is beyond {dtype}'s range"
        elif topk:
            # log_z = max(z / T) + log(sum exp(z / T - max)) lies within log(C) of max(z / T), so it
            # leaves float32's range exactly when that maximum does: no softmax needed here (the
            # encoding computes log_z right after).
            bad = ~np.isfinite((z.max(axis=-1).astype(np.float64) / temperature).astype(np.float32))
            what = f"its log-partition at T={temperature:g} is beyond float32's range"
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        fix = "set labels.dtype: float32, or " if dtype != "float32" else ""
        raise InputError(f"{where}: the labels of sample {keys[first]!r} would be stored as Inf ({what}; "
                         f"{int(bad.sum())} bad rows): {fix}check the teacher's checkpoint and preprocessing")


def quality(logits: np.ndarray, temperature: float, labels: np.ndarray | None,
            k: int | None = None) -> dict[str, Any]:
    """Per-unit label-quality sums (add them up across units; divide by rows for means), from
    the teacher's full logits [B, C]; with `k`, also the mass the top-k classes cover at T."""
    p = softmax(logits, temperature)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
    q: dict[str, Any] = {"rows": int(len(p)), "entropy_sum": float(entropy.sum()),
                         "max_prob_sum": float(p.max(-1).sum())}
    if k is not None:
        q["topk_mass_sum"] = float(np.sort(p, axis=-1)[:, -k:].sum())
    if labels is not None:
        q["correct"] = int((np.asarray(logits).argmax(-1) == np.asarray(labels)).sum())
        q["labelled_rows"] = int(len(labels))
    return q


def summarize_quality(parts: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(p["rows"] for p in parts)
    out: dict[str, Any] = {"rows": rows}
    if rows:
        out["mean_entropy"] = sum(p["entropy_sum"] for p in parts) / rows
        out["mean_max_prob"] = sum(p["max_prob_sum"] for p in parts) / rows
    if rows and all("topk_mass_sum" in p for p in parts):
        out["mean_topk_mass"] = sum(p["topk_mass_sum"] for p in parts) / rows
    labelled = sum(p.get("labelled_rows", 0) for p in parts)
    if labelled:
        out["teacher_accuracy"] = sum(p.get("correct", 0) for p in parts) / labelled
    return out


TOPK_VALUES = "topk_values"


TOPK_IDS = "topk_ids"


LOG_Z = "log_z"


def topk_id_dtype(num_classes: int) -> np.dtype:
    """int16 when every class id fits (C <= 32767), else int32."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def topk_arrays(logits: np.ndarray, k: int, temperature: float, dtype: str) -> dict[str, np.ndarray]:
    """The top-k record of teacher logits z [B, C] at temperature T, rows in input order.

    Returns topk_values [B, k] (dtype, descending), topk_ids [B, k] (`topk_id_dtype(C)`; ties go to
    the lower class id, as argmax) and log_z [B] float32 = logsumexp(z / T) over all C classes,
    computed in float64 from the float32 logits.
    """
    z = np.asarray(logits, dtype=np.float32)
    num_classes = z.shape[1]
    if not 1 <= k <= num_classes:
        raise ConfigError(f"top-k labels need 1 <= k <= num_classes, got k={k} for {num_classes} "
                         f"classes: set labels.k to at most {num_classes}")
    # A full stable sort, not argpartition: ties are then broken the same way on every machine.
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    scaled = z.astype(np.float64) / temperature
    top = scaled.max(axis=1)
    log_z = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return {TOPK_VALUES: np.take_along_axis(z, ids, axis=1).astype(dtype),
            TOPK_IDS: ids.astype(topk_id_dtype(num_classes)),
            LOG_Z: log_z.astype(np.float32)}


def topk_probs(values: np.ndarray, log_z: np.ndarray, temperature: float) -> np.ndarray:
    """Stored probabilities at the generation temperature, float64. [B, k], [B] -> [B, k]."""
    v = np.asarray(values, dtype=np.float64)
    return np.exp(v / temperature - np.asarray(log_z, dtype=np.float64)[:, None])


def tail_mass(values: np.ndarray, log_z: np.ndarray, temperature: float) -> np.ndarray:
    """Mass outside the k stored classes at the generation temperature, float64. -> [B].

    Clipped to [0, 1]: value rounding can make the stored probabilities sum slightly above 1.
    """
    return np.clip(1.0 - topk_probs(values, log_z, temperature).sum(axis=1), 0.0, 1.0)


def retemper_topk(values: np.ndarray, log_z: np.ndarray, temperature: float,
                  new_temperature: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities and tail mass at a student's temperature T' from labels made at T.

    values [B, k], log_z [B] -> (probs [B, k], tail [B]), float64.

    Exact: at T' == T (the stored probabilities and tail); for k == C at any T'; and for any T' if
    the C - k unstored logits are equal. Otherwise approximate: the tail is treated as C - k
    classes sharing one logit, chosen so that they hold exactly the stored tail mass at T (the
    maximum-entropy completion of the stored distribution), and that completed distribution is
    re-tempered. This keeps the exact ratios between the k stored classes and lets the tail grow
    with T' as a true tail does. For T' > T it over-estimates the tail (and under-estimates it for
    T' < T); keeping the tail mass fixed at its value at T errs by at least as much the other way.
    The shared logit never exceeds the k-th stored logit, so the top-k stays the top-k.
    """
    v = np.asarray(values, dtype=np.float64)
    scaled = v / new_temperature
    rest = num_classes - v.shape[1]
    if rest < 0:
        raise CacheError(f"labels hold k={v.shape[1]} classes, more than num_classes={num_classes}")
    if rest == 0:  # the whole distribution is stored: plain softmax at T'
        return softmax(v, new_temperature), np.zeros(len(v))
    with np.errstate(divide="ignore"):  # an empty tail has log mass -inf, and stays empty
        log_tail = np.log(tail_mass(values, log_z, temperature))
    # One tail class at T: exp(z_tail / T - log_z) = tail / rest.
    z_tail_over_t = log_tail - np.log(rest) + np.asarray(log_z, dtype=np.float64)
    log_tail_new = np.log(rest) + z_tail_over_t * (temperature / new_temperature)  # unnormalised
    top = scaled.max(axis=1)
    log_topk = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    log_norm = np.logaddexp(log_topk, log_tail_new)
    return np.exp(scaled - log_norm[:, None]), np.exp(log_tail_new - log_norm)


def student_targets(rows: dict[str, Any], mode: str, k: int, gen_temperature: float, temperature: float,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 [B, k], probs float32 [B, k], tail float32 [B]) at the student's temperature.

    Full rows give exact top-k bins at any temperature; top-k rows are exact at the generation
    temperature and use `retemper_topk`'s completion at any other."""
    if mode == "full":
        p = softmax(rows[LOGITS], temperature)
        ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
        probs = np.take_along_axis(p, ids, axis=1)
        return ids, probs.astype(np.float32), np.clip(1 - probs.sum(1), 0, 1).astype(np.float32)
    values, ids = rows[TOPK_VALUES][:, :k], rows[TOPK_IDS][:, :k]
    if temperature == gen_temperature:
        probs = topk_probs(values, rows[LOG_Z], temperature)
        tail = np.clip(1 - probs.sum(1), 0, 1)
    else:
        probs, tail = retemper_topk(values, rows[LOG_Z], gen_temperature, temperature, num_classes)
    return ids, probs.astype(np.float32), tail.astype(np.float32)
