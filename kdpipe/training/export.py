"""Export a trained student for serving: TorchScript and ONNX, optionally with dynamic int8
quantisation, each checked against the trained model on the held-out split.

The exported module takes raw pixels as float32 [N, C, H, W] (0..255 for 8-bit images, after
the geometric preprocessing) and applies the run's normalisation itself, so a server needs
nothing from kdpipe. Files go to <run>/export/ with `export.json`: per format the path, the
held-out accuracy and the largest logit difference from the trained model.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch

from kdpipe import storage
from kdpipe.data.images import make_preprocess
from kdpipe.errors import ConfigError, StorageMissing
from kdpipe.teachers.models import build_model

FORMATS = ("torchscript", "onnx")


class Normalised(torch.nn.Module):
    """model((x * scale - mean) / std): the deployment module, normalisation included."""

    def __init__(self, model: torch.nn.Module, scale: float, mean: list[float], std: list[float], channels: int):
        super().__init__()
        self.model = model
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x * self.scale - self.mean) / self.std)


def latest_checkpoint(run_uri: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(checkpoint URI, state) of the newest checkpoint Ray Train wrote under the run."""
    fs, run = storage.filesystem(run_uri, storage_options)
    if not fs.exists(run):
        raise StorageMissing(f"run {run_uri!r} does not exist: check train.storage_path and the run name")
    candidates = sorted(p for p in fs.ls(run, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_"))
    for path in reversed(candidates):
        state_path = storage.join(path, "state.pt")
        if fs.exists(state_path):
            state = torch.load(io.BytesIO(fs.cat_file(state_path)), map_location="cpu", weights_only=True)
            return fs.unstrip_protocol(path), state
    raise StorageMissing(f"run {run_uri!r} holds no checkpoint with state.pt: was it trained to the end?")


def load_student(state: dict[str, Any], allow_import: bool = False) -> tuple[Normalised, tuple[int, ...]]:
    pre = state["preprocess"]
    model = build_model(state["arch"], int(state["num_classes"]), tuple(pre["image_shape"]), allow_import)
    model.load_state_dict(state["student"])
    shape = tuple(pre["image_shape"])
    return Normalised(model.eval(), pre["scale"], pre["mean"], pre["std"], shape[0]).eval(), shape


def export_student(run_uri: str, storage_options: dict[str, Any], x: np.ndarray | None, y: np.ndarray | None,
                   formats: tuple[str, ...] = FORMATS, int8: bool = False, allow_import: bool = False) -> dict[str, Any]:
    """Export the run's latest checkpoint; x: float32 raw pixels [N, C, H, W] and y [N] to check
    the exported models on (None: no check). Returns what export.json records."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"export formats {unknown}: use {', '.join(FORMATS)}")
    checkpoint, state = latest_checkpoint(run_uri, storage_options)
    module, shape = load_student(state, allow_import)
    fs, run = storage.filesystem(run_uri, storage_options)
    out_dir = storage.join(run, "export")
    example = torch.zeros(2, *shape)
    xt = torch.from_numpy(x) if x is not None else None
    with torch.no_grad():
        reference = module(xt).numpy() if xt is not None else None
    record: dict[str, Any] = {"checkpoint": checkpoint, "epoch": int(state["epoch"]), "arch": state["arch"],
                              "input": {"shape": ["N", *shape], "dtype": "float32", "preprocess": state["preprocess"]},
                              "models": {}}
    if reference is not None:
        record["trained_holdout_accuracy"] = float((reference.argmax(-1) == y).mean())
    variants = [("", module)]
    if int8:
        quantized = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
        variants.append(("-int8", quantized))
    with tempfile.TemporaryDirectory() as tmp:
        for suffix, net in variants:
            for fmt in formats:
                if fmt == "onnx" and suffix:
                    continue  # dynamic int8 modules do not export to ONNX; quantise with onnxruntime instead
                name = f"student{suffix}.{'pt' if fmt == 'torchscript' else 'onnx'}"
                local = os.path.join(tmp, name)
                run_exported = _export(net, example, fmt, local)
                entry: dict[str, Any] = {"path": storage.join(fs.unstrip_protocol(out_dir), name),
                                         "bytes": os.path.getsize(local)}
                if xt is not None:
                    logits = run_exported(x)
                    entry["holdout_accuracy"] = float((logits.argmax(-1) == y).mean())
                    entry["max_abs_logit_diff"] = float(np.abs(logits - reference).max())
                with open(local, "rb") as f:
                    storage.write_bytes(fs, storage.join(out_dir, name), f.read())
                record["models"][f"{fmt}{suffix}"] = entry
    storage.write_json(fs, storage.join(out_dir, "export.json"), record)
    return record


def _export(net: torch.nn.Module, example: torch.Tensor, fmt: str, path: str):
    """Write `net` to `path`; return a function that runs the written file on numpy inputs."""
    if fmt == "torchscript":
        with torch.no_grad():
            scripted = torch.jit.trace(net, example)
        scripted.save(path)
        loaded = torch.jit.load(path)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return loaded(torch.from_numpy(x)).numpy()
        return run
    import onnxruntime

    torch.onnx.export(net, (example,), path, input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"pixels": x.astype(np.float32)})[0]
    return run


def holdout_pixels(cfg, max_rows: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split as raw pixels (geometry applied, not normalised) and labels, capped."""
    from kdpipe.config import preprocess_for
    from kdpipe.data import inputs, readers

    pre = preprocess_for(cfg)
    raw = make_preprocess(list(pre.image_shape), pre.resize, 1.0, [], [])
    _, x, y = readers.load_split(cfg.data.holdout, inputs.source_spec(cfg.data), raw, max_rows)
    if y is None:
        raise ConfigError("the held-out split has no labels (data.label_column is null): exports cannot be checked")
    return x[:max_rows], y[:max_rows]


def to_json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True)
