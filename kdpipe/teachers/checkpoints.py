"""Teacher checkpoints: checks before any work starts, the teacher digest, loading and saving.

`inspect_teacher` runs in the driver before the pipeline starts, so a missing checkpoint, a
checkpoint for another architecture or a class-count mismatch fails in seconds with a message
naming the teacher and the file. It builds the model on the meta device: no weights are
materialised and no forward pass is computed, however large the teacher.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from kdpipe import storage
from kdpipe.errors import ConfigError, StorageMissing
from kdpipe.teachers.models import build_model


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
        raise StorageMissing(
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
        raise ConfigError(f"teacher {name!r}: checkpoint {uri!r} cannot be loaded safely: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return obj["state_dict"], meta
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ConfigError(f"teacher {name!r}: checkpoint {uri!r} holds no state_dict")


def _fit_state_dict(name: str, uri: str, arch: str, model: torch.nn.Module,
                    state_dict: dict[str, torch.Tensor], assign: bool) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
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
        raise ConfigError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check teachers[].arch")
    # Run the checkpoint's own tensor shapes through the graph: its class count, not the config's.
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, meta_sd, (torch.empty(2, *input_shape, device="meta"),))
    except RuntimeError as e:
        raise ConfigError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r} "
                         f"with inputs {list(input_shape)}: {e}") from e
    if out.shape[-1] != num_classes:
        raise ConfigError(
            f"teacher {name!r} gives {out.shape[-1]} classes, the dataset has {num_classes}: "
            f"set data.num_classes or use a checkpoint trained for {num_classes} classes ({checkpoint})"
        )
    try:
        model.load_state_dict(meta_sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ConfigError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r}: {e}") from e
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
        raise ConfigError(f"teacher {name!r}: checkpoint {checkpoint!r} does not fit architecture {arch!r}: {e}") from e
    return model.eval()


def save_checkpoint(model: torch.nn.Module, uri: str, storage_options: dict[str, Any] | None,
                    arch: str, num_classes: int, metrics: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "arch": arch, "num_classes": num_classes,
                "metrics": metrics}, buf)
    fs, path = storage.filesystem(uri, storage_options)
    storage.write_bytes(fs, path, buf.getvalue())
