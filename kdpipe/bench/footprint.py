"""Benchmarks that print figures measured side by side in one run (`kdpipe bench ...`).

storage: bytes on disk per sample per teacher for each label mode and format (label payload
only: the key column is dropped, as every mode pays it alike), and the KL divergence between a
teacher's full distribution at T and what top-k keeps of it (the k stored probabilities exact,
the tail mass spread evenly over the other classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdpipe.labels import codec, softlabels


def teacher_like_logits(rows: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Logits shaped like a trained classifier's: one clear winner, a few plausible runners-up
    and a long flat tail (a Gumbel-ish spread), float32 [rows, num_classes]."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(rows, num_classes))
    winners = rng.integers(0, num_classes, rows)
    z[np.arange(rows), winners] += 8.0
    runners = rng.integers(0, num_classes, (rows, 3))
    z[np.arange(rows)[:, None], runners] += rng.uniform(2.0, 5.0, (rows, 3))
    return z.astype(np.float32)


def topk_kl(logits: np.ndarray, k: int, temperature: float) -> float:
    """Mean KL(p_full || p_topk) at T, where p_topk keeps the top-k probabilities and spreads the
    tail mass evenly over the remaining classes."""
    p = softlabels.softmax(logits, temperature)
    num_classes = p.shape[1]
    if k >= num_classes:
        return 0.0
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(p, ids, axis=1)
    q = np.repeat(((1.0 - kept.sum(1)) / (num_classes - k))[:, None], num_classes, axis=1)
    np.put_along_axis(q, ids, kept, axis=1)
    return float((p * (np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(q, 1e-300, None)))).sum(1).mean())


def _payload_bytes(keys: list[str], logits: np.ndarray, mode: str, k: int, temperature: float, fmt: str) -> int:
    if fmt == "webdataset":  # a tar's member names carry the keys; no column to drop
        return len(codec.encode_unit(keys, logits, mode, k, temperature, "float16", fmt, 1024))
    table = (codec.labels_table(keys, logits, "float16") if mode == "full"
             else codec.topk_table(keys, logits, k, temperature, "float16"))
    return len(codec.parquet_bytes(table.drop_columns([softlabels.KEY]), 1024))


def storage_figures(rows: int = 10_000, temperature: float = 4.0, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (classes, format, mode, k): bytes per sample per teacher and the top-k KL."""
    out = []
    for num_classes in (10, 1000):
        z = teacher_like_logits(rows, num_classes, seed)
        keys = [f"sample-{i:07d}" for i in range(rows)]
        for fmt in ("parquet", "webdataset"):
            for mode, k in [("full", num_classes)] + [("topk", k) for k in (5, 10, 20) if k <= num_classes]:
                size = _payload_bytes(keys, z, mode, k, temperature, fmt)
                out.append({"classes": num_classes, "format": fmt, "mode": mode,
                            "k": k if mode == "topk" else None, "dtype": "float16",
                            "bytes_per_sample": size / rows,
                            "kl_full_to_stored": 0.0 if mode == "full" else topk_kl(z, k, temperature)})
    return out


def format_storage(figures: list[dict[str, Any]], rows: int, temperature: float) -> str:
    lines = [f"label storage per sample per teacher ({rows} samples, float16, T={temperature}; "
             "Parquet without the key column)",
             f"{'classes':>7}  {'format':<10} {'mode':<8}{'bytes/sample':>13}  {'KL(full||stored)':>17}"]
    for f in figures:
        mode = "full" if f["mode"] == "full" else f"top-{f['k']}"
        lines.append(f"{f['classes']:>7}  {f['format']:<10} {mode:<8}{f['bytes_per_sample']:>13.1f}  "
                     f"{f['kl_full_to_stored']:>17.2e}")
    return "\n".join(lines)
