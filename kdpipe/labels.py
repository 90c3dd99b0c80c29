"""Soft-label math and the stored record: what a teacher's output becomes on disk.

Mode `full` keeps every logit z (float16 or float32). The soft label at the generation temperature
T is softmax(z / T), exact up to the storage dtype, and exact for any other T a student asks for,
so students may change temperature without regenerating. Rows are sorted by sample_key so the
bytes of a unit do not depend on Ray's execution order (two writers of a unit write the same file).

Mode `topk` keeps the k largest logits, their class ids and log_z = logsumexp(z / T) over all C
classes (see `topk_arrays`, and `retemper_topk` for what is exact at another temperature).

Units are Parquet (one row per sample, fixed-size lists) or WebDataset tar files (one member group
per sample: `<key>.cls` and `<key>.logits.npy` or `<key>.topk.npy`, see `webdataset_bytes`).
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
KEY = "sample_key"
LOGITS = "logits"
AUG = "aug"  # float32 [5] per row in units with augmented views (images.AUG_FIELDS; zeros = plain view)

_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


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


def labels_table(keys: list[str], logits: np.ndarray, dtype: str, aug: np.ndarray | None = None) -> pa.Table:
    """Rows sorted by key. keys: B strings; logits: [B, C]; aug: view params [B, 5] or None."""
    order = _key_order(keys)
    z = np.ascontiguousarray(np.asarray(logits)[order]).astype(dtype)
    num_classes = z.shape[1]
    values = pa.array(z.reshape(-1), type=_ARROW_DTYPES[dtype])
    table = pa.Table.from_arrays(
        [pa.array([keys[i] for i in order], pa.string()), pa.FixedSizeListArray.from_arrays(values, num_classes)],
        schema=label_schema(num_classes, dtype),
    )
    return _with_aug(table, aug, order)


def _with_aug(table: pa.Table, aug: np.ndarray | None, order: np.ndarray) -> pa.Table:
    if aug is None:
        return table
    flat = pa.array(np.ascontiguousarray(np.asarray(aug, np.float32)[order]).reshape(-1), pa.float32())
    return table.append_column(pa.field(AUG, pa.list_(pa.float32(), 5), nullable=False),
                               pa.FixedSizeListArray.from_arrays(flat, 5))


def table_aug(table: pa.Table) -> np.ndarray | None:
    """The view params float32 [B, 5] of a unit table, or None when it has no augmented views."""
    if AUG not in table.column_names:
        return None
    col = table.column(AUG).combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, 5)


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


# --- top-k mode ------------------------------------------------------------------------------
#
# A row holds the k largest logits z_(1) >= ... >= z_(k) (value dtype), their class ids and
# log_z = logsumexp(z / T) over all C classes (float32). At the generation temperature T:
#   exact (up to the value dtype): p_i = exp(z_i / T - log_z) for the k stored classes, hence
#       the covered mass sum_i p_i and the tail mass 1 - sum_i p_i (spread over C - k classes);
#   unknown: how the tail mass is split between the C - k unstored classes.
# At another temperature T' the stored logits still give exact *ratios* p_i / p_j, but the
# normaliser sum_c exp(z_c / T') depends on the unstored tail logits: see `retemper_topk`.

TOPK_VALUES = "topk_values"
TOPK_IDS = "topk_ids"
LOG_Z = "log_z"


def topk_id_dtype(num_classes: int) -> np.dtype:
    """int16 when every class id fits (C <= 32767), else int32."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def topk_schema(k: int, num_classes: int, dtype: str) -> pa.Schema:
    """sample_key, topk_values [k] (dtype), topk_ids [k] (int16/int32), log_z (float32)."""
    ids = pa.from_numpy_dtype(topk_id_dtype(num_classes))
    return pa.schema([
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(TOPK_VALUES, pa.list_(_ARROW_DTYPES[dtype], k), nullable=False),
        pa.field(TOPK_IDS, pa.list_(ids, k), nullable=False),
        pa.field(LOG_Z, pa.float32(), nullable=False),
    ])


def topk_arrays(logits: np.ndarray, k: int, temperature: float, dtype: str) -> dict[str, np.ndarray]:
    """The top-k record of teacher logits z [B, C] at temperature T, rows in input order.

    Returns topk_values [B, k] (dtype, descending), topk_ids [B, k] (`topk_id_dtype(C)`; ties go to
    the lower class id, as argmax) and log_z [B] float32 = logsumexp(z / T) over all C classes,
    computed in float64 from the float32 logits.
    """
    z = np.asarray(logits, dtype=np.float32)
    num_classes = z.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k labels need 1 <= k <= num_classes, got k={k} for {num_classes} "
                         f"classes: set labels.k to at most {num_classes}")
    # A full stable sort, not argpartition: ties are then broken the same way on every machine.
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    scaled = z.astype(np.float64) / temperature
    top = scaled.max(axis=1)
    log_z = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
    return {TOPK_VALUES: np.take_along_axis(z, ids, axis=1).astype(dtype),
            TOPK_IDS: ids.astype(topk_id_dtype(num_classes)),
            LOG_Z: log_z.astype(np.float32)}


def _key_order(keys: list[str]) -> np.ndarray:
    """Row order sorting the keys (stable), as `labels_table` sorts them."""
    return np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")


def topk_table(keys: list[str], logits: np.ndarray, k: int, temperature: float, dtype: str,
               aug: np.ndarray | None = None) -> pa.Table:
    """Top-k rows sorted by key. keys: B strings; logits: [B, C] at generation temperature T."""
    order = _key_order(keys)
    arrays = topk_arrays(np.asarray(logits)[order], k, temperature, dtype)
    num_classes = np.asarray(logits).shape[1]
    schema = topk_schema(k, num_classes, dtype)
    table = pa.Table.from_arrays([
        pa.array([keys[i] for i in order], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(arrays[TOPK_VALUES].reshape(-1)), k),
        pa.FixedSizeListArray.from_arrays(pa.array(arrays[TOPK_IDS].reshape(-1)), k),
        pa.array(arrays[LOG_Z], pa.float32()),
    ], schema=schema)
    return _with_aug(table, aug, order)


def table_topk(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float32 [B, k], ids int64 [B, k], log_z float32 [B]) from a top-k table."""
    def column(name: str, dtype: type) -> np.ndarray:
        col = table.column(name).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat, dtype=dtype).reshape(-1, col.type.list_size)

    log_z = np.asarray(table.column(LOG_Z).to_numpy(), dtype=np.float32)
    return column(TOPK_VALUES, np.float32), column(TOPK_IDS, np.int64), log_z


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
        raise ValueError(f"labels hold k={v.shape[1]} classes, more than num_classes={num_classes}")
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


# --- WebDataset units ------------------------------------------------------------------------
#
# One tar member group per sample, sorted by sample key:
#   <wds_key(key)>.cls         the teacher's top-1 class id as ASCII text (e.g. b"7")
#   <wds_key(key)>.logits.npy  full mode: the logits [C] (float16/float32), an .npy file
#   <wds_key(key)>.topk.npy    top-k mode: one 0-d structured .npy record with little-endian
#                              fields topk_values (value dtype, (k,)), topk_ids (int16/int32, (k,))
#                              and log_z (float32): the same three fields as a Parquet row.
# WebDataset takes a sample's key as the member name up to the first dot of its base name, so
# keys are percent-escaped (`wds_key`). Headers are fixed (mtime 0, uid/gid 0, empty names,
# mode 0o644) so a unit's bytes depend only on its contents.

WDS_PAYLOAD = {"full": "logits.npy", "topk": "topk.npy"}
_WDS_ESCAPE = re.compile(r"[%./\x00-\x1f\x7f]")
_WDS_UNESCAPE = re.compile(r"%([0-9A-F]{2})")


def wds_key(sample_key: str) -> str:
    """Reversible escape of a sample key for a tar member name: '%', '.', '/' and control
    characters become %XX (upper-case hex), so the name has no dot before the extension."""
    if not sample_key:
        raise ValueError("an empty sample key cannot name a WebDataset sample")
    return _WDS_ESCAPE.sub(lambda m: f"%{ord(m.group()):02X}", sample_key)


def unwds_key(name: str) -> str:
    """Inverse of `wds_key`."""
    return _WDS_UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array(array, order="C"), allow_pickle=False)  # keeps 0-d
    return buf.getvalue()


def _topk_records(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The structured records [B] of a top-k unit (see the format note above)."""
    values, ids = np.asarray(arrays[TOPK_VALUES]), np.asarray(arrays[TOPK_IDS])
    k = values.shape[1]
    dtype = np.dtype([(TOPK_VALUES, values.dtype.newbyteorder("<"), (k,)),
                      (TOPK_IDS, ids.dtype.newbyteorder("<"), (k,)), (LOG_Z, "<f4")])
    records = np.empty(len(values), dtype=dtype)
    records[TOPK_VALUES], records[TOPK_IDS], records[LOG_Z] = values, ids, arrays[LOG_Z]
    return records


def _wds_payloads(arrays: dict[str, np.ndarray], mode: str) -> tuple[list[bytes], np.ndarray]:
    """Per-row payload bytes and top-1 class ids [B], rows in input order."""
    if mode == "full":
        logits = np.asarray(arrays[LOGITS])
        if logits.ndim != 2 or logits.dtype not in (np.float16, np.float32):
            raise ValueError(f"full WebDataset units take logits [B, C] as float16/float32, got "
                             f"{logits.dtype} {logits.shape}: cast to the label dtype first")
        return [_npy_bytes(row) for row in logits], logits.argmax(axis=1)
    if mode == "topk":
        records = _topk_records(arrays)
        return [_npy_bytes(records[i:i + 1].reshape(())) for i in range(len(records))], \
            records[TOPK_IDS][:, 0]
    raise ValueError(f"unknown label mode {mode!r}: use one of {sorted(WDS_PAYLOAD)}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def webdataset_bytes(keys: list[str], arrays: dict[str, np.ndarray], mode: str) -> bytes:
    """Deterministic tar bytes of a unit, samples sorted by key.

    keys: B distinct strings. arrays, rows in the order of keys: mode "full": {"logits": [B, C]};
    mode "topk": {"topk_values": [B, k], "topk_ids": [B, k], "log_z": [B]} as `topk_arrays` gives;
    either with "aug" [B, 5] (view params, an `aug.npy` member per sample) in units with views.
    """
    aug = arrays.get(AUG)
    if len(set(keys)) != len(keys):
        raise ValueError(f"a WebDataset unit needs distinct sample keys, got {len(keys) - len(set(keys))} duplicates")
    payloads, top1 = _wds_payloads(arrays, mode)
    if len(payloads) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(payloads)} rows of labels")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in _key_order(keys):
            name = wds_key(keys[i])
            _add_member(tar, f"{name}.cls", str(int(top1[i])).encode())
            _add_member(tar, f"{name}.{WDS_PAYLOAD[mode]}", payloads[i])
            if aug is not None:
                _add_member(tar, f"{name}.{AUG}.npy", _npy_bytes(np.asarray(aug[i], np.float32)))
    return buf.getvalue()


def _tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """Member groups of a tar unit, in stored order: escaped key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            name, dot, ext = member.name.partition(".")
            sample = samples.setdefault(name, {})
            if not member.isfile() or not dot or "/" in name or ext in sample:
                raise ValueError(f"unexpected or repeated member {member.name!r} in a WebDataset unit")
            sample[ext] = tar.extractfile(member).read()
    return samples


def _unit_mode(samples: dict[str, dict[str, bytes]]) -> str | None:
    """The label mode of a unit whose every sample has exactly a .cls and that mode's payload."""
    if not samples:
        return None
    first = set(next(iter(samples.values())))
    extra = {f"{AUG}.npy"} & first  # units with augmented views carry the view params of every row
    mode = next((m for m, ext in WDS_PAYLOAD.items() if first == {"cls", ext} | extra), None)
    for name, sample in samples.items():
        if mode is None or set(sample) != {"cls", WDS_PAYLOAD[mode]} | extra:
            raise ValueError(f"sample {unwds_key(name)!r} has members {sorted(sample)}: a unit needs "
                             f"'cls' and one of {sorted(WDS_PAYLOAD.values())}, the same for every sample")
    return mode


def read_webdataset_unit(data: bytes) -> dict[str, Any]:
    """Read a unit written by `webdataset_bytes`, samples in stored (key) order.

    Returns {"keys": B strings, "mode": "full" | "topk" (None when empty), "cls": int64 [B]} plus
    "logits" [B, C] (full) or "topk_values" [B, k], "topk_ids" [B, k], "log_z" [B] (topk), in their
    stored dtypes.
    """
    samples = _tar_samples(data)
    mode = _unit_mode(samples)
    out: dict[str, Any] = {"keys": [unwds_key(name) for name in samples], "mode": mode,
                           "cls": np.array([int(s["cls"]) for s in samples.values()], dtype=np.int64)}
    if mode is None:
        return out
    rows = np.stack([np.load(io.BytesIO(s[WDS_PAYLOAD[mode]]), allow_pickle=False)
                     for s in samples.values()])
    if mode == "full":
        out[LOGITS] = rows
    else:
        out.update({name: np.ascontiguousarray(rows[name]) for name in (TOPK_VALUES, TOPK_IDS, LOG_Z)})
    if f"{AUG}.npy" in next(iter(samples.values())):
        out[AUG] = np.stack([np.load(io.BytesIO(s[f"{AUG}.npy"]), allow_pickle=False) for s in samples.values()])
    return out


# --- A unit as bytes, in either format and mode ---------------------------------------------------

EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}


def encode_unit(keys: list[str], logits: np.ndarray, mode: str, k: int, temperature: float, dtype: str,
                fmt: str, row_group_size: int, aug: np.ndarray | None = None) -> bytes:
    """A unit's file: full logits or the top-k record of logits [B, C], as Parquet or a tar;
    with `aug` [B, 5], each row's view params (units with augmented views)."""
    if fmt == "parquet":
        table = (labels_table(keys, logits, dtype, aug) if mode == "full"
                 else topk_table(keys, logits, k, temperature, dtype, aug))
        return parquet_bytes(table, row_group_size)
    arrays = ({LOGITS: np.asarray(logits).astype(dtype)} if mode == "full"
              else topk_arrays(logits, k, temperature, dtype))
    if aug is not None:
        arrays[AUG] = np.asarray(aug, np.float32)
    return webdataset_bytes(keys, arrays, mode)


def decode_unit(data: bytes, mode: str, fmt: str) -> dict[str, Any]:
    """Rows of a unit, sorted by key: {"keys"} plus "logits" float32 [B, C] (full) or
    "topk_values" float32 [B, k], "topk_ids" int64 [B, k], "log_z" float32 [B] (topk), and
    "aug" float32 [B, 5] in units with augmented views."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        out: dict[str, Any] = {"keys": table.column(KEY).to_pylist()}
        if mode == "full":
            out[LOGITS] = table_logits(table)
        else:
            out[TOPK_VALUES], out[TOPK_IDS], out[LOG_Z] = table_topk(table)
        aug = table_aug(table)
        if aug is not None:
            out[AUG] = aug
        return out
    rows = read_webdataset_unit(data)
    if rows["keys"] and rows["mode"] != mode:
        raise ValueError(f"unit holds {rows['mode']} labels, its manifest says {mode}")
    out = {"keys": rows["keys"]}
    if mode == "full":
        out[LOGITS] = np.asarray(rows.get(LOGITS, np.zeros((0, 0))), dtype=np.float32)
    else:
        out[TOPK_VALUES] = np.asarray(rows.get(TOPK_VALUES, np.zeros((0, 0))), dtype=np.float32)
        out[TOPK_IDS] = np.asarray(rows.get(TOPK_IDS, np.zeros((0, 0))), dtype=np.int64)
        out[LOG_Z] = np.asarray(rows.get(LOG_Z, np.zeros(0)), dtype=np.float32)
    if AUG in rows:
        out[AUG] = np.asarray(rows[AUG], dtype=np.float32)
    return out


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

