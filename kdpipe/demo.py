"""`kdpipe demo`: the whole path on the built-in digits, on a laptop, with no arguments.

1. write the digits as Parquet input shards (train / held-out) under the workdir;
2. train three different teachers (plain PyTorch, once: checkpoints are kept and reused);
3. generate their soft labels with one Ray Data pass into the cache (reused when committed);
4. train the student twice with Ray Train: on labels alone, and distilled from the cached labels;
5. report held-out accuracy of every model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdpipe import storage
from kdpipe.config import Config, TeacherConfig, preprocess_for
from kdpipe.data import digits, inputs, readers
from kdpipe.generation import generate
from kdpipe.teachers import checkpoints
from kdpipe.teachers.models import build_model
from kdpipe.training import plots, trainer

log = logging.getLogger("kdpipe")


@dataclass
class DemoResult:
    teachers: dict[str, float]
    teachers_trained: list[str]
    student_alone: float
    student_distilled: float
    teacher_forward_passes: int
    cache_root: str
    runs: dict[str, str]
    seconds: float
    figures: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to one pixel (teacher-side augmentation; zero padding)."""
    padded = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + h, dx:dx + w]


def fit_classifier(arch: str, x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, seed: int,
                   lr: float = 3e-3, batch_size: int = 64, augment: bool = False,
                   progress: str | None = None, allow_import: bool = False) -> torch.nn.Module:
    """Plain supervised PyTorch training on in-memory data (how the demo makes its teachers).
    x: [N, *input_shape] float32; y: [N] int64."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, tuple(x.shape[1:]), allow_import)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in tqdm(range(epochs), desc=progress or f"train {arch}", unit="epoch", disable=progress is None):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            xb = _shift(xt[idx], gen) if augment else xt[idx]
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())


def ensure_teachers(cfg: Config, progress: bool = True) -> list[str]:
    """Train every configured teacher whose checkpoint is missing; returns the names trained."""
    d = cfg.data
    trained = []
    missing: list[TeacherConfig] = []
    for t in cfg.teachers:
        fs, path = storage.filesystem(t.checkpoint, cfg.cache.storage_options)
        if not fs.exists(path):
            missing.append(t)
    if not missing:
        return trained
    source = inputs.source_spec(d)
    splits: dict = {}  # teachers with the same preprocessing share the decoded arrays
    for t in missing:
        pre = preprocess_for(cfg, t.name)
        if pre not in splits:
            splits[pre] = (readers.load_split(d.train, source, pre)[1:], readers.load_split(d.holdout, source, pre)[1:])
        (x, y), (xh, yh) = splits[pre]
        if y is None or yh is None:
            raise ValueError(f"teacher {t.name!r}: training a teacher needs labels; data.label_column is null")
        model = fit_classifier(t.arch, x, y, d.num_classes, t.train_epochs, t.train_seed,
                               progress=f"teacher {t.name}" if progress else None, allow_import=cfg.allow_import)
        metrics = {"holdout_accuracy": accuracy(model, xh, yh), "train_rows": len(y), "holdout_rows": len(yh)}
        checkpoints.save_checkpoint(model, t.checkpoint, cfg.cache.storage_options, t.arch, d.num_classes, metrics)
        log.info("teacher %s: held-out accuracy %.4f -> %s", t.name, metrics["holdout_accuracy"], t.checkpoint)
        trained.append(t.name)
    return trained


def run_demo(cfg: Config, progress: bool = True) -> DemoResult:
    """The demo end to end. `cfg` must have its paths resolved (config.resolve_paths)."""
    started = time.time()
    d = cfg.data
    if d.builtin:
        digits.ensure_builtin(d)
    trained = ensure_teachers(cfg, progress)
    report = generate.generate(cfg, progress=progress)
    alone = trainer.train_student(cfg, distill=False, progress=progress)
    distilled = trainer.train_student(cfg, distill=True, progress=progress)
    teacher_acc = {name: float(r.metrics.get("holdout_accuracy", float("nan")))
                   for name, r in report.teachers.items()}
    figures = {"comparison": storage.join(cfg.train.storage_path, "demo-comparison.png"),
               "curves": storage.join(cfg.train.storage_path, "demo-curves.png")}
    accuracies = {f"teacher {n}": a for n, a in teacher_acc.items()}
    accuracies[f"student {cfg.train.student} alone"] = alone.holdout_accuracy
    accuracies[f"student {cfg.train.student} distilled"] = distilled.holdout_accuracy
    plots.write_comparison(accuracies, figures["comparison"], cfg.cache.storage_options,
                           "kdpipe demo: held-out accuracy")
    plots.write_curves(distilled.history, figures["curves"], cfg.cache.storage_options,
                       f"student {cfg.train.student}: distilled (solid) vs alone (dashed)",
                       others={"alone": alone.history})
    return DemoResult(
        teachers=teacher_acc, teachers_trained=trained,
        student_alone=alone.holdout_accuracy, student_distilled=distilled.holdout_accuracy,
        teacher_forward_passes=report.teacher_forward_passes, cache_root=cfg.cache.root,
        runs={"alone": alone.storage, "distilled": distilled.storage},
        seconds=round(time.time() - started, 1), figures=figures,
    )


def format_table(result: DemoResult, cfg: Config) -> str:
    rows = [(f"teacher {name}", acc) for name, acc in result.teachers.items()]
    rows += [(f"student {cfg.train.student} alone", result.student_alone),
             (f"student {cfg.train.student} distilled", result.student_distilled)]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'model':<{width}}held-out accuracy", "-" * (width + 17)]
    lines += [f"{name:<{width}}{acc:.4f}" for name, acc in rows]
    gain = (result.student_distilled - result.student_alone) * 100
    lines += ["", f"distillation gain: {gain:+.2f} points",
              f"teacher forward passes this run: {result.teacher_forward_passes}"
              + ("  (labels reused from the cache)" if result.teacher_forward_passes == 0 else ""),
              f"workdir:     {cfg.workdir}",
              f"cache:       {result.cache_root}",
              f"checkpoints: {result.runs['alone']}", f"             {result.runs['distilled']}",
              f"figures:     {result.figures['comparison']}", f"             {result.figures['curves']}",
              f"took {result.seconds:.0f} s"]
    return "\n".join(lines)
