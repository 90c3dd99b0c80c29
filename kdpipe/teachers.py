"""Teachers: checks before any work starts, the teacher digest, and the Ray Data batch predictor.

`inspect_teacher` runs in the driver before the pipeline starts, so a missing checkpoint, a
checkpoint for another architecture or a class-count mismatch fails in seconds with a message
naming the teacher and the file. It builds the model on the meta device: no weights are
materialised and no forward pass is computed, however large the teacher.

`TeacherPredictor` is a plain callable class (Ray Data's actor-pool contract: load once in
`__init__`, label a batch in `__call__`), so it is testable without Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdpipe import storage
from kdpipe.config import PRECISIONS
from kdpipe.images import Preprocess
from kdpipe.models import build_model


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    arch: str
    checkpoint: str
    checkpoint_sha256: str
    digest: str  # hash of checkpoint bytes, architecture, class count, preprocessing (and precision)
    num_classes: int
    metrics: dict[str, Any]  # what the checkpoint says about itself (e.g. held-out accuracy)


def read_checkpoint_bytes(name: str, uri: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = storage.filesystem(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"teacher {name!r}: checkpoint {uri!r} does not exist; "
            "set teachers[].checkpoint to a saved state_dict (or run `kdpipe demo` to train the built-in ones)"
        ) from None
    except PermissionError as e:
        raise storage.access_denied(uri, e) from None


def parse_checkpoint(name: str, uri: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata). Accepts a bare state_dict or kdpipe's {"state_dict": ..., ...}.
    Loaded with weights_only=True: a checkpoint cannot run code."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad files
        raise ValueError(f"teacher {name!r}: checkpoint {uri!r} cannot be loaded safely: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return obj["state_dict"], meta
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"teacher {name!r}: checkpoint {uri!r} holds no state_dict")


def _fit_state_dict(name: str, uri: str, arch: str, model: torch.nn.Module,
                    state_dict: dict[str, torch.Tensor], assign: bool) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"teacher {name!r}: checkpoint {uri!r} does not fit architecture {arch!r} "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "check teachers[].arch"
        )


def inspect_teacher(name: str, arch: str, checkpoint: str, storage_options: dict[str, Any] | None,
                    num_classes: int, input_shape: tuple[int, ...], preprocessing: dict[str, Any],
                    allow_import: bool = False, precision: str = "fp32") -> TeacherInfo:
    """Validate a teacher without running it and compute its digest. `precision` (resolved:
    fp32 or bf16) is part of the digest when it is not fp32: bf16 labels are other labels."""
    data = read_checkpoint_bytes(name, checkpoint, storage_options)
    state_dict, meta = parse_checkpoint(name, checkpoint, data)
    with torch.device("meta"):
        model = build_model(arch, num_classes, input_shape, allow_import)
    meta_sd = {k: torch.empty_like(v, device="meta") for k, v in state_dict.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(meta_sd)), sorted(set(meta_sd) - expected)
    if missing or unexpected:
        raise ValueError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check teachers[].arch")
    # Run the checkpoint's own tensor shapes through the graph: its class count, not the config's.
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, meta_sd, (torch.empty(2, *input_shape, device="meta"),))
    except RuntimeError as e:
        raise ValueError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r} "
                         f"with inputs {list(input_shape)}: {e}") from e
    if out.shape[-1] != num_classes:
        raise ValueError(
            f"teacher {name!r} gives {out.shape[-1]} classes, the dataset has {num_classes}: "
            f"set data.num_classes or use a checkpoint trained for {num_classes} classes ({checkpoint})"
        )
    try:
        model.load_state_dict(meta_sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r}: {e}") from e
    sha = storage.sha256_bytes(data)
    body = {"checkpoint_sha256": sha, "arch": arch, "num_classes": num_classes,
            "input_shape": list(input_shape), "preprocessing": preprocessing}
    if precision != "fp32":
        body["precision"] = precision
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    metrics = meta.get("metrics", {}) if isinstance(meta.get("metrics"), dict) else {}
    return TeacherInfo(name, arch, checkpoint, sha, digest, num_classes, metrics)


def load_teacher(name: str, arch: str, checkpoint: str, storage_options: dict[str, Any] | None,
                 num_classes: int, input_shape: tuple[int, ...], allow_import: bool = False) -> torch.nn.Module:
    """The teacher in eval mode on the CPU, weights loaded (weights_only=True)."""
    data = read_checkpoint_bytes(name, checkpoint, storage_options)
    state_dict, _ = parse_checkpoint(name, checkpoint, data)
    model = build_model(arch, num_classes, input_shape, allow_import)
    try:
        _fit_state_dict(name, checkpoint, arch, model, state_dict, assign=False)
    except RuntimeError as e:
        raise ValueError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r}: {e}") from e
    return model.eval()


def save_checkpoint(model: torch.nn.Module, uri: str, storage_options: dict[str, Any] | None,
                    arch: str, num_classes: int, metrics: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "arch": arch, "num_classes": num_classes,
                "metrics": metrics}, buf)
    fs, path = storage.filesystem(uri, storage_options)
    storage.write_bytes(fs, path, buf.getvalue())


def logits_column(name: str) -> str:
    return f"logits__{name}"


def mask_column(name: str) -> str:
    return f"labelled__{name}"


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """"auto" is bf16 autocast where the teacher runs on a GPU and fp32 on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"teacher precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


class TeacherRunner:
    """A teacher's forward pass from uint8 [N, C, H, W] to float32 logits, as generation runs it
    (and as the benchmarks' plain loop runs it, so both sides compute the same): the uint8 batch
    crosses to the device, is normalised there, and runs under inference mode; with precision
    "bf16" under bf16 autocast, and on a GPU in channels-last memory format for image models."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, device: torch.device | str,
                 precision: str = "fp32") -> None:
        self.device = torch.device(device)
        self.preprocess = preprocess
        self.precision = resolve_precision(precision, self.device.type == "cuda")
        self.channels_last = self.device.type == "cuda" and len(preprocess.image_shape) == 3
        model = model.to(self.device).eval()
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inp = torch.from_numpy(np.ascontiguousarray(x))
            if self.device.type == "cuda":
                inp = inp.pin_memory()
            inp = self.preprocess.normalise(inp.to(self.device, non_blocking=True))
            if self.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out = self.model(inp)
            return out.float().cpu().numpy()


class TeacherPredictor:
    """Ray Data actor: adds `logits__<name>` [B, C] float32 and `labelled__<name>` [B] bool.

    Reads its input from the uint8 column `view` (its preprocessing geometry, shared with the
    teachers that use the same) and normalises it on its own device. Only rows whose `shard_id`
    is in `shard_ids` run through the teacher (others, and placeholder rows, get zeros and
    labelled=False), so one pass over the inputs serves teachers that miss different shards.
    The columns in `drop` (the image views no later teacher reads) are left out of its output:
    images cross the object store into the teachers, and only labels come out of the last one.
    """

    def __init__(self, name: str, arch: str, checkpoint: str, storage_options: dict[str, Any] | None,
                 num_classes: int, preprocess: Preprocess, view: str, shard_ids: list[str] | None,
                 num_threads: int = 1, device: str = "auto", allow_import: bool = False, fault=None,
                 precision: str = "fp32", drop: list[str] | tuple[str, ...] = ()) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.fault, self.calls = fault, 0  # test-only (kdpipe.faults)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.name = name
        self.num_classes = num_classes
        self.shard_ids = None if shard_ids is None else set(shard_ids)
        self.preprocess, self.view = preprocess, view
        self.drop = tuple(drop)
        self.runner = TeacherRunner(load_teacher(name, arch, checkpoint, storage_options, num_classes,
                                                 preprocess.image_shape, allow_import),
                                    preprocess, self.device, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fault is not None:
            from kdpipe import faults

            faults.teacher_call(self.fault, self.name, self.calls)
        x = batch[self.view]
        n = len(x)
        mask = ~batch["placeholder"] if "placeholder" in batch else np.ones(n, dtype=bool)
        if self.shard_ids is not None:
            mask &= np.isin(batch["shard_id"].astype(str), list(self.shard_ids))
        logits = np.zeros((n, self.num_classes), dtype=np.float32)
        if mask.any():
            logits[mask] = self.runner(x if mask.all() else x[mask])
        batch[logits_column(self.name)] = logits
        batch[mask_column(self.name)] = mask
        for column in self.drop:  # image views no later teacher reads: not shipped on as output
            batch.pop(column, None)
        return batch
