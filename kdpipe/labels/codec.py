"""The stored record: a unit's bytes as Parquet or as a WebDataset tar.

Rows are sorted by sample_key so the bytes of a unit do not depend on Ray's execution order (two
writers of a unit write the same file). Units are Parquet (one row per sample, fixed-size lists)
or WebDataset tar files (one member group per sample: `<key>.cls` and `<key>.logits.npy` or
`<key>.topk.npy`, see `webdataset_bytes`).
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.errors import CacheError, InputError
from kdpipe.labels.softlabels import (
    AUG,
    KEY,
    LOG_Z,
    LOGITS,
    TOPK_IDS,
    TOPK_VALUES,
    topk_arrays,
    topk_id_dtype,
)

_ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def label_schema(num_classes: int, dtype: str) -> pa.Schema:
    return pa.schema([
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(LOGITS, pa.list_(_ARROW_DTYPES[dtype], num_classes), nullable=False),
    ])


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


def topk_schema(k: int, num_classes: int, dtype: str) -> pa.Schema:
    """sample_key, topk_values [k] (dtype), topk_ids [k] (int16/int32), log_z (float32)."""
    ids = pa.from_numpy_dtype(topk_id_dtype(num_classes))
    return pa.schema([
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(TOPK_VALUES, pa.list_(_ARROW_DTYPES[dtype], k), nullable=False),
        pa.field(TOPK_IDS, pa.list_(ids, k), nullable=False),
        pa.field(LOG_Z, pa.float32(), nullable=False),
    ])


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


WDS_PAYLOAD = {"full": "logits.npy", "topk": "topk.npy"}


_WDS_ESCAPE = re.compile(r"[%./\x00-\x1f\x7f]")


_WDS_UNESCAPE = re.compile(r"%([0-9A-F]{2})")


def wds_key(sample_key: str) -> str:
    """Reversible escape of a sample key for a tar member name: '%', '.', '/' and control
    characters become %XX (upper-case hex), so the name has no dot before the extension."""
    if not sample_key:
        raise InputError("an empty sample key cannot name a WebDataset sample")
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
        raise InputError(f"a WebDataset unit needs distinct sample keys, got {len(keys) - len(set(keys))} duplicates")
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
                raise CacheError(f"unexpected or repeated member {member.name!r} in a WebDataset unit")
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
            raise CacheError(f"sample {unwds_key(name)!r} has members {sorted(sample)}: a unit needs "
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
        raise CacheError(f"unit holds {rows['mode']} labels, its manifest says {mode}")
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
