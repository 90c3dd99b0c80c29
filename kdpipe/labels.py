"""Soft-label math and the stored record: what a teacher's output becomes on disk.

Mode `full` keeps every logit z (float16 or float32). The soft label at the generation temperature
T is softmax(z / T), exact up to the storage dtype, and exact for any other T a student asks for,
so students may change temperature without regenerating. Rows are sorted by sample_key so the
bytes of a unit do not depend on Ray's execution order (two writers of a unit write the same file).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
KEY = "sample_key"
LOGITS = "logits"

_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) over the last axis, computed in float64. [..., C] -> [..., C]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def label_schema(num_classes: int, dtype: str) -> pa.Schema:
    return pa.schema([
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(LOGITS, pa.list_(_ARROW_DTYPES[dtype], num_classes), nullable=False),
    ])


def check_finite(logits: np.ndarray, keys: list[str], where: str) -> None:
    """Refuse NaN/Inf teacher outputs, naming the first bad sample: they would poison every student."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: teacher output for sample {keys[first]!r} is not finite "
            f"({int(bad.sum())} bad rows); check the checkpoint and the preprocessing"
        )


def labels_table(keys: list[str], logits: np.ndarray, dtype: str) -> pa.Table:
    """Rows sorted by key. keys: B strings; logits: [B, C]."""
    order = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")
    z = np.ascontiguousarray(np.asarray(logits)[order]).astype(dtype)
    num_classes = z.shape[1]
    values = pa.array(z.reshape(-1), type=_ARROW_DTYPES[dtype])
    return pa.Table.from_arrays(
        [pa.array([keys[i] for i in order], pa.string()), pa.FixedSizeListArray.from_arrays(values, num_classes)],
        schema=label_schema(num_classes, dtype),
    )


def table_logits(table: pa.Table) -> np.ndarray:
    """The logits column as float32 [B, C]."""
    col = table.column(LOGITS).combine_chunks()
    width = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    """Deterministic Parquet bytes for a unit (same table, same bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd",
                   write_statistics=[KEY], store_schema=True)
    return buf.getvalue()


def quality(logits: np.ndarray, temperature: float, labels: np.ndarray | None) -> dict[str, Any]:
    """Per-unit label-quality sums (add them up across units; divide by rows for means)."""
    p = softmax(logits, temperature)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
    q: dict[str, Any] = {"rows": int(len(p)), "entropy_sum": float(entropy.sum()),
                         "max_prob_sum": float(p.max(-1).sum())}
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
    labelled = sum(p.get("labelled_rows", 0) for p in parts)
    if labelled:
        out["teacher_accuracy"] = sum(p.get("correct", 0) for p in parts) / labelled
    return out
