"""The Ray Data batch predictor of a teacher.

`TeacherPredictor` is a plain callable class (Ray Data's actor-pool contract: load once in
`__init__`, label a batch in `__call__`), so it is testable without Ray. It takes one
`PredictorSettings`, the frozen message Ray pickles to every actor of the teacher's pool
(built from the config by kdpipe.generation.pipeline.predictor_settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdpipe.data.images import Preprocess
from kdpipe.teachers.checkpoints import load_teacher
from kdpipe.teachers.precision import resolve_precision

if TYPE_CHECKING:
    from kdpipe.testing.faults import Fault


def logits_column(name: str) -> str:
    return f"logits__{name}"


def mask_column(name: str) -> str:
    return f"labelled__{name}"


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


@dataclass(frozen=True)
class PredictorSettings:
    """What a teacher's actor needs to load its model and label batches.

    `column` is the uint8 pixel column [B, C, H, W] of the teacher's preprocessing geometry;
    `shard_ids` None labels every row, else only the rows of those input shards; `drop` the
    pixel columns no later teacher reads; `device` "auto" is CUDA when the actor has one;
    `precision` resolved (fp32 or bf16); `fault` test-only (kdpipe.testing.faults). Hashable:
    the dicts inside (storage options, a fault's parameters) are left out of the hash."""

    name: str
    arch: str
    checkpoint: str
    storage_options: dict[str, Any] | None = field(hash=False)
    num_classes: int
    preprocess: Preprocess
    column: str
    shard_ids: tuple[str, ...] | None = None
    num_threads: int = 1
    device: str = "auto"
    allow_import: bool = False
    fault: Fault | None = field(default=None, hash=False)
    precision: str = "fp32"
    drop: tuple[str, ...] = ()


class TeacherPredictor:
    """Ray Data actor: adds `logits__<name>` [B, C] float32 and `labelled__<name>` [B] bool.

    Reads its input from the uint8 column `column` (the pixels of its preprocessing geometry, shared with the
    teachers that use the same) and normalises it on its own device. Only rows whose `shard_id`
    is in `shard_ids` run through the teacher (others, and placeholder rows, get zeros and
    labelled=False), so one pass over the inputs serves teachers that miss different shards.
    The columns in `drop` (the pixel columns no later teacher reads) are left out of its output:
    images cross the object store into the teachers, and only labels come out of the last one.
    """

    def __init__(self, settings: PredictorSettings) -> None:
        s = settings
        torch.set_num_threads(max(1, s.num_threads))
        self.fault, self.calls = s.fault, 0  # test-only (kdpipe.testing.faults)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
        self.device = torch.device(device)
        self.name = s.name
        self.num_classes = s.num_classes
        self.shard_ids = None if s.shard_ids is None else set(s.shard_ids)
        self.preprocess, self.column = s.preprocess, s.column
        self.drop = tuple(s.drop)
        self.runner = TeacherRunner(load_teacher(s.name, s.arch, s.checkpoint, s.storage_options, s.num_classes,
                                                 s.preprocess.image_shape, s.allow_import),
                                    s.preprocess, self.device, s.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fault is not None:
            from kdpipe.testing import faults

            faults.teacher_call(self.fault, self.name, self.calls)
        x = batch[self.column]
        n = len(x)
        mask = ~batch["placeholder"] if "placeholder" in batch else np.ones(n, dtype=bool)
        if self.shard_ids is not None:
            mask &= np.isin(batch["shard_id"].astype(str), list(self.shard_ids))
        logits = np.zeros((n, self.num_classes), dtype=np.float32)
        if mask.any():
            logits[mask] = self.runner(x if mask.all() else x[mask])
        batch[logits_column(self.name)] = logits
        batch[mask_column(self.name)] = mask
        for column in self.drop:  # pixel columns no later teacher reads: not shipped on as output
            batch.pop(column, None)
        return batch


class FusedTeacherPredictor:
    """Ray Data actor for `ray.teacher_placement: fused`: every teacher in one actor, each batch
    run through all of them in turn on the actor's device (the columns of a chain of
    TeacherPredictor pools, from one stage). Images make no hop from pool to pool, and one
    actor process starts per slot instead of one per teacher."""

    def __init__(self, settings: tuple[PredictorSettings, ...]) -> None:
        self.members = [TeacherPredictor(s) for s in settings]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for member in self.members:
            batch = member(batch)
        return batch
