"""Training parity (`kdpipe bench parity`): does a student trained through kdpipe learn as well
as the same student trained by a plain PyTorch loop, when the input shards are sorted by class?

An ImageFolder input shard is one class folder. A training stream that reads shards with only a
local shuffle gives batches of one or two classes, and the student comes out points worse than
with a full random permutation per epoch. Here the built-in digits are written as an ImageFolder
(one class per shard) and, per student seed, four students with the same architecture,
initialisation (torch.manual_seed(seed) before build_model, as the Ray Train workers do),
optimiser (Adam, train.lr, train.weight_decay), global batch (train.batch_size x
train.num_workers) and epochs are trained:

    kdpipe alone       trainer.train_student(distill=False)
    kdpipe distilled   trainer.train_student(distill=True), from the cached full labels
    plain alone        `plain_fit`: the same decoded rows in memory, a full randperm every epoch
    plain distilled    `plain_fit` with the same teachers' logits, computed once in this process,
                       and losses.distillation_loss with the run's alpha, temperature and ensemble

The figures are the held-out accuracies and the two gaps kdpipe - plain (alone, distilled), in
points, each judged against TOLERANCE_POINTS; with the per-epoch batch-mix metrics of the kdpipe
runs (mean distinct labels per batch, and what random batches would give) when the training loop
reports them. Only `train_student` is called on the kdpipe side, so the figure follows whatever
stream the trainer uses.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe import config, runtime
from kdpipe.config import Config, preprocess_for
from kdpipe.data import digits, inputs, readers
from kdpipe.demo import accuracy, ensure_teachers
from kdpipe.errors import ConfigError
from kdpipe.generation import generate
from kdpipe.teachers.checkpoints import load_teacher
from kdpipe.teachers.models import build_model
from kdpipe.training import losses, trainer
from kdpipe.training.losses import LossOptions

TOLERANCE_POINTS = 0.5  # |kdpipe - plain| in points of held-out accuracy counted as parity
SIDES = ("kdpipe_alone", "plain_alone", "kdpipe_distilled", "plain_distilled")
# The plain loop runs on one thread: the digits' students are small enough that more threads only
# wait on each other (on a busy 2-core machine a step took 100x longer with 2), and it is what each
# of the default two Ray Train workers gets on 2 cores. Threads change speed, not what is learnt.
PLAIN_THREADS = 1
MIX_METRICS = ("batch_classes", "batch_classes_random")  # per-epoch metrics, when the loop reports them


@dataclass(frozen=True)
class PlainDistill:
    """The distillation term of the plain loop: losses.distillation_loss's arguments besides the
    student's logits and the labels."""

    teacher_logits: torch.Tensor  # [N, K, C]: every training row, K teachers
    temperature: float
    alpha: float
    weights: torch.Tensor | None  # [K], None for equal
    loss: LossOptions
    use_labels: bool = True  # False: label-free distillation (no cross-entropy term)


def plain_fit(arch: str, num_classes: int, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int,
              lr: float, weight_decay: float, seed: int, distill: PlainDistill | None = None) -> torch.nn.Module:
    """The reference: a plain PyTorch loop over rows in memory, a full random permutation every
    epoch. x: [N, *image_shape] float32 (preprocessed); y: [N] int64. Cross-entropy, or with
    `distill` the distillation loss to the teachers' logits of the same rows."""
    torch.manual_seed(seed)  # the initial weights, as kdpipe's workers draw them
    model = build_model(arch, num_classes, tuple(x.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=order)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            out = model(xt[idx])
            if distill is None:
                loss = F.cross_entropy(out, yt[idx])
            else:
                d = distill
                labels = yt[idx] if d.use_labels else None
                loss, _ = losses.distillation_loss(out, d.teacher_logits[idx], labels, d.temperature, d.alpha,
                                                   d.weights, **d.loss.kwargs())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def check_comparable(cfg: Config) -> None:
    """Refuse settings the plain loop does not mirror (it would not be the same training)."""
    tr = cfg.train
    if cfg.data.label_column is None:
        raise ConfigError("bench parity needs labels (held-out accuracy): data.label_column is null")
    if tr.augment != "none":
        raise ConfigError(f"bench parity compares training without augmentation: train.augment={tr.augment!r}, "
                          "use none")
    if tr.alpha_end not in (None, tr.alpha) or tr.temperature_end not in (None, tr.temperature):
        raise ConfigError("bench parity compares a constant alpha and temperature: unset train.alpha_end and "
                          "train.temperature_end")
    if tr.alpha == 0:
        raise ConfigError("bench parity trains distilled students: train.alpha=0 ignores the teachers")
    for spec in teacher_names(cfg):
        if config.labels_for(cfg, spec).mode != "full":
            raise ConfigError(f"bench parity compares full labels: teacher {spec!r} has labels.mode=topk; "
                              "use labels.mode=full")


def teacher_names(cfg: Config) -> list[str]:
    """The teachers the distilled students learn from (train.teachers, else all configured)."""
    names = list(cfg.train.teachers) or [t.name for t in cfg.teachers]
    configured = {t.name for t in cfg.teachers}
    for name in names:
        if name not in configured:
            raise ConfigError(f"bench parity runs each teacher in memory from its configured checkpoint: "
                              f"train.teachers has {name!r}, configured are {sorted(configured)}")
    return names


def plain_distill(cfg: Config, teacher_logits: torch.Tensor) -> PlainDistill:
    """The distillation term of cfg.train as the kdpipe run plans it (trainer.plan_distillation;
    full labels, so the plan's loss and weights need no cached units)."""
    tr = cfg.train
    plan = trainer.plan_distillation(cfg, teacher_names(cfg), [])
    weights = torch.tensor(plan.weights) if plan.weights else None
    return PlainDistill(teacher_logits, tr.temperature, tr.alpha, weights, plan.loss, tr.use_labels)


def teacher_logits(cfg: Config, source: inputs.SourceSpec, keys: list[str]) -> torch.Tensor:
    """[N, K, C] float32: each chosen teacher's logits on the training rows `keys` (in that
    order), each teacher on its own preprocessing, run once."""
    d, out = cfg.data, []
    by_name = {t.name: t for t in cfg.teachers}
    inputs_by_preprocess: dict[Any, np.ndarray] = {}  # teachers with the same preprocessing share one read
    for name in teacher_names(cfg):
        t = by_name[name]
        pre = preprocess_for(cfg, name)
        if pre not in inputs_by_preprocess:
            rows, inputs_by_preprocess[pre], _ = readers.load_split(d.train, source, pre)
            assert rows == keys, "load_split read the training rows in another order"
        x = inputs_by_preprocess[pre]
        model = load_teacher(name, t.arch, t.checkpoint, cfg.cache.storage_options, d.num_classes,
                             pre.image_shape, cfg.allow_import)
        with torch.no_grad():
            out.append(model(torch.from_numpy(x)).float())
    return torch.stack(out, dim=1)


def prepared(workdir: str, overrides: list[str] | tuple[str, ...], epochs: int | None) -> Config:
    """The demo config on the digits as an ImageFolder in `workdir`, the teachers trained and
    their labels generated (the demo's sequence; both reused when present)."""
    extra = [f"train.epochs={epochs}"] if epochs is not None else []
    cfg = config.resolve_paths(config.load_config(None, [f"workdir={workdir}", "data.format=imagefolder",
                                                         *overrides, *extra]))
    check_comparable(cfg)
    if cfg.data.builtin:
        digits.ensure_builtin(cfg.data)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard)
    ensure_teachers(cfg, progress=False)
    generate.generate(cfg, progress=False)
    return cfg


def mixing(history: list[dict[str, Any]]) -> dict[str, float]:
    """The mean over epochs of each batch-mix metric the run's history has ({} when none)."""
    out = {}
    for key in MIX_METRICS:
        values = [h[key] for h in history if h.get(key) is not None]
        if values:
            out[key] = statistics.mean(values)
    return out


def classes_per_shard(shards: list[inputs.InputShard], y: np.ndarray) -> float | None:
    """Mean distinct labels per input shard (load_split reads shards in order), or None when the
    shards' row counts are not known up front or do not add up to the rows read."""
    counts = [s.num_rows for s in shards]
    if any(c is None for c in counts) or sum(counts) != len(y):
        return None
    bounds = np.cumsum([0, *counts])
    return float(np.mean([len(np.unique(y[a:b])) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a while, then set back."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def parity(workdir: str, seeds: tuple[int, ...] = (0, 1, 2), overrides: list[str] | tuple[str, ...] = (),
           epochs: int | None = None) -> dict[str, Any]:
    """Held-out accuracy of the four students per seed, the gaps and the kdpipe runs' batch mix."""
    cfg = prepared(workdir, overrides, epochs)
    tr, d = cfg.train, cfg.data
    source = inputs.source_spec(d)
    shards = inputs.list_shards(d.train, source)
    keys, x, y = readers.load_split(d.train, source, preprocess_for(cfg))
    _, xh, yh = readers.load_split(d.holdout, source, preprocess_for(cfg))
    distill = plain_distill(cfg, teacher_logits(cfg, source, keys))
    batch = tr.batch_size * tr.num_workers
    acc: dict[str, list[float]] = {side: [] for side in SIDES}
    mix: dict[str, list[dict[str, float]]] = {"kdpipe_alone": [], "kdpipe_distilled": []}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed, c.train.online = seed, False
        for kind in ("alone", "distilled"):
            rep = trainer.train_student(c, distill=kind == "distilled", run_name=f"parity-{stamp}-{kind}-{seed}")
            acc[f"kdpipe_{kind}"].append(rep.holdout_accuracy)
            mix[f"kdpipe_{kind}"].append(mixing(rep.history))
        for kind, term in (("alone", None), ("distilled", distill)):
            with torch_threads(PLAIN_THREADS):
                model = plain_fit(tr.student, d.num_classes, x, y, tr.epochs, batch, tr.lr, tr.weight_decay, seed,
                                  term)
                acc[f"plain_{kind}"].append(accuracy(model, xh, yh))
    out: dict[str, Any] = {
        "seeds": list(seeds), "student": tr.student, "epochs": tr.epochs, "workers": tr.num_workers,
        "batch_size_per_worker": tr.batch_size, "global_batch": batch, "lr": tr.lr, "alpha": tr.alpha,
        "temperature": tr.temperature, "teachers": teacher_names(cfg), "data_format": d.format,
        "train_rows": len(y), "holdout_rows": len(yh), "input_shards": len(shards),
        "classes_per_shard": classes_per_shard(shards, y),
        **summarise(acc)}
    if any(m for runs in mix.values() for m in runs):
        out["mixing"] = {side: {key: [m.get(key) for m in runs] for key in MIX_METRICS} for side, runs in mix.items()}
    return out


def summarise(acc: dict[str, list[float]]) -> dict[str, Any]:
    """{"sides": mean and each accuracy per side, "gaps": kdpipe - plain in points, alone and
    distilled, with per-seed values and the verdict against TOLERANCE_POINTS}."""
    sides = {side: {"mean": statistics.mean(v), "each": list(v)} for side, v in acc.items()}
    gaps = {}
    for kind in ("alone", "distilled"):
        k, p = acc[f"kdpipe_{kind}"], acc[f"plain_{kind}"]
        points = (statistics.mean(k) - statistics.mean(p)) * 100
        gaps[kind] = {"points": points, "each_points": [(a - b) * 100 for a, b in zip(k, p, strict=True)],
                      "within": abs(points) <= TOLERANCE_POINTS}
    return {"sides": sides, "gaps": gaps, "tolerance_points": TOLERANCE_POINTS}


def format_parity(r: dict[str, Any]) -> str:
    """The table of a `parity` result: per side the mean and per-seed accuracies, then the gaps."""
    shards = f"{r['input_shards']} input shards"
    if r.get("classes_per_shard") is not None:
        shards += f", {r['classes_per_shard']:.1f} classes per shard"
    lines = [f"student {r['student']} on the digits ({r['data_format']}, {shards}; {r['train_rows']} training rows, "
             f"{r['holdout_rows']} held out), {r['epochs']} epochs, global batch {r['global_batch']} "
             f"({r['workers']} workers x {r['batch_size_per_worker']}), teachers {', '.join(r['teachers'])}",
             f"{'held-out accuracy':<18}{'mean':>8}  " + "".join(f"{'seed ' + str(s):>9}" for s in r["seeds"])]
    for side in SIDES:
        m = r["sides"][side]
        lines.append(f"{side.replace('_', ' '):<18}{m['mean']:>8.4f}  " + "".join(f"{v:>9.4f}" for v in m["each"]))
    tol = r["tolerance_points"]
    for kind, g in r["gaps"].items():
        verdict = f"within {tol:g}" if g["within"] else f"NOT within {tol:g}"
        each = ", ".join(f"{v:+.2f}" for v in g["each_points"])
        lines.append(f"kdpipe - plain, {kind + ':':<11}{g['points']:+6.2f} points ({verdict}; per seed {each})")
    for side, metrics in r.get("mixing", {}).items():
        text = "; ".join(f"{key} {', '.join('-' if v is None else f'{v:.2f}' for v in values)}"
                         for key, values in metrics.items() if any(v is not None for v in values))
        if text:
            lines.append(f"{side.replace('_', ' ')} batch mix, mean per epoch per seed: {text}")
    return "\n".join(lines)
