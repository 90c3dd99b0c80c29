"""Generation-side benchmarks, every figure measured side by side in one run: `repeats` rounds,
the sides alternating (their order turns each round), after a warm-up (Ray started, read
workers and imports warm, the plain model's first batch done); median with min and max.

throughput (P1): one teacher's labelling rate through Ray Data against a plain PyTorch loop
    (torch.inference_mode, the same model from teachers.load_teacher, the same preprocessed uint8
    inputs, batch size and normalisation, torch threads as the process gets them):
      stage     the labelling stage alone: the inputs already preprocessed in Ray's object store
                (generation's read step, materialised once), through the TeacherPredictor actor
                pool sized as generation sizes it;
      generate  the whole kdpipe.generation.generate.generate path from the input shards (read, decode,
                label, commit units and manifest) into a fresh cache root each time.
    Ray Data starts a new actor pool for every execution, so each stage / generate wall time
    pays the actors' start (process, torch and torchvision imports, checkpoint load: ~7-10 s on
    2 cores). `labelling` is the stage's rate from its first batch's start to its last batch's
    end (TimedPredictor stamps them in the actors): the rate a long run converges to, and the
    figure compared with the plain loop's throughput.

multi_teacher (P2): three teachers in one generate() call (each image read and decoded once,
    the three actor pools working at the same time) against three generate() calls with one
    teacher each, every run into a fresh cache root so that everything is labelled every time;
    the input-shard reads of every run are counted from Ray's state API.

actor_scaling (P7): the labelling stage with 1, 2, 4 ... actors (fractional CPUs, one torch
    thread each, labelling only once the whole pool is up): samples/s, speed-up and efficiency
    per actor relative to one actor.

Inputs are synthetic RGB images (smooth colour fields plus noise, PNG or JPEG bytes in Parquet); the
teachers are torchvision models with random weights saved as checkpoints (speed does not depend
on the weights).
"""

from __future__ import annotations

import copy
import io
import math
import os
import statistics
import time
from typing import Any

import numpy as np

from kdpipe import config, runtime, storage
from kdpipe.bench.stats import summary
from kdpipe.data import inputs, readers
from kdpipe.errors import ConfigError
from kdpipe.generation import generate, planning
from kdpipe.generation.pipeline import predictor_settings
from kdpipe.teachers.predictor import (
    PredictorSettings,
    TeacherPredictor,
    logits_column,
    mask_column,
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MULTI_TEACHERS = {"resnet18": "resnet18", "efficientnet_b0": "efficientnet_b0",
                  "mobilenet_v3_small": "mobilenet_v3_small"}


# What the benchmarks label by default: on a CPU, small teachers on 64 px images (the suite fits
# in minutes on 2 cores); on a CUDA host, teachers of realistic size on 224 px images, with more
# rows (x `rows`) so that the GPU's runs last seconds, not milliseconds, stored as JPEG like ImageNet.
CPU_SETUP = {"arch": "resnet18", "image_size": 64, "batch_size": 64, "teachers": MULTI_TEACHERS, "rows": 1,
             "image_format": "png"}
GPU_SETUP = {"arch": "resnet50", "image_size": 224, "batch_size": 256,
             "teachers": {"resnet50": "resnet50", "vit_b_16": "vit_b_16", "convnext_tiny": "convnext_tiny"},
             "rows": 8, "image_format": "jpeg"}


SETUPS = {"small": CPU_SETUP, "large": GPU_SETUP}
SETUP_ENV = "KDPIPE_BENCH_SETUP"  # small | large | auto (`kdpipe bench ... --setup`)


def setup(on_gpu: bool | None = None) -> dict[str, Any]:
    """The setup for this host (large on a CUDA host), unless $KDPIPE_BENCH_SETUP names one: the
    large one on a CPU (at a small --size) tries the GPU run's teachers before a GPU is lent."""
    chosen = os.environ.get(SETUP_ENV, "auto").strip().lower() or "auto"
    if chosen != "auto" and on_gpu is None:
        if chosen not in SETUPS:
            raise ConfigError(f"${SETUP_ENV}={chosen!r}: use small, large or auto")
        return SETUPS[chosen]
    return GPU_SETUP if (gpu() if on_gpu is None else on_gpu) else CPU_SETUP


# --- Inputs and teachers --------------------------------------------------------------------------


def synthetic_images(rows: int, size: int, seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """uint8 [rows, size, size, 3]: smooth colour fields (a coarse grid upsampled) with noise,
    so PNG compresses them about as much as small photographs. float32 throughout: at 224 px a
    float64 intermediate is 1.2 MB per image."""
    rng = np.random.default_rng(seed)
    cells = max(2, size // 8)
    coarse = rng.integers(0, 256, (rows, cells, cells, 3), dtype=np.uint8).astype(np.float32)
    rep = math.ceil(size / cells)
    noisy = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)[:, :size, :size]
    noise = rng.standard_normal(noisy.shape, dtype=np.float32)
    noise *= np.float32(12.0)
    noisy += noise
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


def _shard_bytes(first: int, count: int, size: int, seed: int, shard: int, image_format: str) -> bytes:
    """One input shard's Parquet bytes: `count` synthetic images from key img-<first>, their
    pixels seeded by (seed, shard) so that any process writes the same shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.data import images

    encode = images.encode_png if image_format == "png" else images.encode_jpeg
    pixels = synthetic_images(count, size, (seed, shard))
    targets = np.random.default_rng((seed, shard, 1)).integers(0, 10, count)
    table = pa.table({"sample_key": pa.array([f"img-{first + i:06d}" for i in range(count)]),
                      "image": pa.array([encode(p) for p in pixels], pa.binary()),
                      "label": pa.array(targets.astype(np.int64))})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# Pixels above which the shards are made in parallel processes (about 400 images at 224 px): at
# 224 px one image cost ~12 ms to make and encode as PNG in one process (5-6 ms of pixels before
# float32, 6-7 ms of PNG), so 16k of them (P1 on a GPU host) took ~3 min alone.
PARALLEL_PIXELS = 20_000_000


def write_inputs(uri: str, rows: int, size: int, shards: int, seed: int = 0, image_format: str = "png") -> None:
    """`rows` RGB size x size images (PNG or JPEG) in `shards` Parquet files under `uri`
    (sample_key, image, label columns); large sets are made by one process per core."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    if image_format not in ("png", "jpeg"):
        raise ConfigError(f"image_format {image_format!r}: use png or jpeg")
    fs, root = storage.filesystem(uri, {})
    counts = [len(idx) for idx in np.array_split(np.arange(rows), shards)]
    jobs = [(sum(counts[:s]), n, size, seed, s, image_format) for s, n in enumerate(counts)]
    workers = min(shards, os.cpu_count() or 1)

    def write(shard: int, data: bytes) -> None:
        storage.write_bytes(fs, storage.join(root, f"part-{shard:05d}.parquet"), data)

    if rows * size * size < PARALLEL_PIXELS or workers < 2:
        for s, job in enumerate(jobs):
            write(s, _shard_bytes(*job))
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # spawn: Ray's threads may run here
        for s, data in enumerate(pool.map(_shard_bytes, *zip(*jobs, strict=True))):
            write(s, data)


def prepare(workdir: str, name: str, rows: int, size: int, shards: int, teachers: dict[str, str],
            batch_size: int, image_format: str | None = None) -> config.Config:
    """Inputs under <workdir>/<name>/inputs and random-init checkpoints of `teachers`
    ({name: torchvision or built-in arch}) under <workdir>/checkpoints (written once, shared);
    returns the resolved config (cache root <workdir>/<name>/cache, replaced per run)."""
    from kdpipe.teachers.checkpoints import save_checkpoint
    from kdpipe.teachers.models import build_model

    base = storage.join(workdir, name)
    write_inputs(storage.join(base, "inputs"), rows, size, shards, image_format=image_format or setup()["image_format"])
    fs, _ = storage.filesystem(workdir, {})
    tcfgs = []
    for tname, arch in teachers.items():
        ckpt = storage.join(workdir, "checkpoints", f"{tname}-{size}.pt")
        if not fs.exists(ckpt):
            save_checkpoint(build_model(arch, 10, (3, size, size)), ckpt, {}, arch, 10, {})
        # On a GPU host the teachers share the GPU (and run at their auto precision: bf16).
        tcfgs.append(config.TeacherConfig(name=tname, arch=arch, checkpoint=ckpt, batch_size=batch_size,
                                          num_gpus=1.0 / len(teachers) if gpu() else 0.0))
    data = config.DataConfig(builtin=None, format="parquet", train=storage.join(base, "inputs"),
                             image_shape=[3, size, size], scale=1.0 / 255.0, mean=list(IMAGENET_MEAN),
                             std=list(IMAGENET_STD), num_classes=10)
    cfg = config.Config(workdir=workdir, data=data, cache=config.CacheConfig(root=storage.join(base, "cache")),
                        teachers=tcfgs)
    return config.resolve_paths(cfg)



def _order(sides: list[str], r: int) -> list[str]:
    """The sides in round r's order: rotated each round, so none always runs first."""
    k = r % len(sides)
    return sides[k:] + sides[:k]


# --- The three ways of labelling ------------------------------------------------------------------


def _inputs(cfg: config.Config) -> tuple[dict[str, Any], list[inputs.InputShard], dict[str, dict[str, Any]]]:
    source = inputs.source_spec(cfg.data, check_holdout=False)
    shards = inputs.list_shards(cfg.data.train, source)
    geometries = {p.pixels_column(): p.geometry() for p in (config.preprocess_for(cfg, t.name) for t in cfg.teachers)}
    return source, shards, geometries


def preprocessed(cfg: config.Config):
    """Generation's read step (readers.read_teacher_inputs, one task per input shard) materialised in
    Ray's object store: the labelling stage's input, uint8 pixel columns."""

    source, shards, geometries = _inputs(cfg)
    ds = readers.shard_dataset(shards, readers.read_teacher_inputs, cfg.data.decode_cpus, source=source,
                               geometries=geometries)
    return ds.materialize()


def local_pixels(cfg: config.Config, teacher: str) -> tuple[list[str], np.ndarray]:
    """The same uint8 view, read in this process: (keys, x [N, C, H, W])."""
    source, shards, geometries = _inputs(cfg)
    view = config.preprocess_for(cfg, teacher).pixels_column()
    keys, xs = [], []
    for s in shards:
        rows = readers.read_teacher_inputs({"shard_id": np.asarray([s.shard_id], dtype=object)}, source,
                                   {s.shard_id: s}, {view: geometries[view]})
        keys += list(rows["sample_key"])
        xs.append(rows[view])
    return keys, np.concatenate(xs)


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def load_model(cfg: config.Config, teacher: str):
    """The teacher as the plain loop runs it: a TeacherRunner on the device and at the precision
    the teacher's actors use (a GPU with bf16 autocast when there is one, else the CPU, fp32)."""
    from kdpipe.teachers.checkpoints import load_teacher
    from kdpipe.teachers.predictor import TeacherRunner

    t = next(t for t in cfg.teachers if t.name == teacher)
    pre = config.preprocess_for(cfg, teacher)
    model = load_teacher(t.name, t.arch, t.checkpoint, cfg.cache.storage_options, cfg.data.num_classes,
                         pre.image_shape)
    return TeacherRunner(model, pre, "cuda" if t.num_gpus > 0 else "cpu", config.teacher_precision(t))


def plain_loop(runner, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """The reference: logits float32 [N, C] of uint8 x [N, C, H, W], batch by batch, and seconds
    (on a GPU, up to the last batch's logits back on the host)."""
    out = []
    started = time.perf_counter()
    for i in range(0, len(x), batch_size):
        out.append(runner(x[i:i + batch_size]))
    return np.concatenate(out), time.perf_counter() - started


class TimedPredictor:
    """TeacherPredictor (composed, unchanged) that also stamps each batch with the wall-clock
    seconds its labelling started and ended (`t_start`, `t_end` [B] float64) and those its actor's
    __init__ started and ended (`t_init`, `t_ready`), so the driver can tell the actor's start-up
    (process and imports, then loading the teacher) from its labelling."""

    def __init__(self, settings: PredictorSettings) -> None:
        self.init = [time.time()]
        self.predictor = TeacherPredictor(settings)
        self.init.append(time.time())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        out = self.predictor(batch)
        n = len(out["sample_key"])
        out["t_start"], out["t_end"] = np.full(n, started), np.full(n, time.time())
        out["t_init"], out["t_ready"] = np.full(n, self.init[0]), np.full(n, self.init[1])
        return out


def label_stage(mat, cfg: config.Config, teacher: str, plan: runtime.ActorPlan,
                wait_for_actors: bool = False) -> dict[str, Any]:
    """Run the teacher's actor pool over the materialised views as generation does (the same
    predictor_settings, batch size, pool and resources; TimedPredictor around the predictor).

    Returns rows, seconds (the execution's wall time, actor start included), startup_s (until
    the first batch started labelling; process_s of it until an actor's __init__ began, load_s
    from then until the last actor was ready), labelling_s (first batch start to last batch end: the
    actors' labelling span) and the logits by sample key. `wait_for_actors`: no batch starts
    before the whole pool is up (for comparing pool sizes: otherwise the first actor up takes
    several bundles alone)."""
    import ray.data

    t = next(t for t in cfg.teachers if t.name == teacher)
    settings = predictor_settings(cfg, t, plan, drop=[config.preprocess_for(cfg, teacher).pixels_column()])
    ds = mat.map_batches(
        TimedPredictor,
        fn_constructor_kwargs={"settings": settings},
        batch_size=t.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.pool_size),
        num_cpus=plan.num_cpus,
    )
    if wait_for_actors:
        ds.context.wait_for_min_actors_s = 600
    keys, logits, t_start, t_end, t_init, t_ready, calls = [], [], [], [], [], [], set()
    wall, started = time.time(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        labelled = batch[mask_column(teacher)]
        keys += list(batch["sample_key"][labelled])
        logits.append(batch[logits_column(teacher)][labelled])
        t_start.append(batch["t_start"].min())
        t_end.append(batch["t_end"].max())
        # one (start, end) pair per predictor call: the actors' busy time
        calls.update(zip(batch["t_start"].tolist(), batch["t_end"].tolist(), strict=True))
        t_init.append(batch["t_init"].min())
        t_ready.append(batch["t_ready"].max())
    seconds = time.perf_counter() - started
    first, last = (min(t_start), max(t_end)) if t_start else (wall, wall)
    init, ready = (min(t_init), max(t_ready)) if t_init else (wall, wall)
    return {"rows": len(keys), "seconds": seconds, "startup_s": first - wall, "labelling_s": last - first,
            "process_s": init - wall, "load_s": ready - init, "busy_s": sum(b - a for a, b in calls),
            "keys": keys, "logits": np.concatenate(logits) if logits else np.zeros((0, cfg.data.num_classes))}


def generate_into(cfg: config.Config, cache_root: str) -> dict[str, Any]:
    """kdpipe.generation.generate.generate into a fresh cache root: rows labelled per teacher, seconds."""
    c = copy.deepcopy(cfg)
    c.cache.root = cache_root
    started = time.perf_counter()
    report = generate.generate(c, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": {n: t.rows_labelled for n, t in report.teachers.items()},
            "units": {n: t.units_written for n, t in report.teachers.items()}}


def _plan(cfg: config.Config) -> list[runtime.ActorPlan]:
    cpus, gpus = runtime.cluster_cpus_gpus()
    return runtime.plan_teacher_pools(cpus, gpus, [(t.name, t.num_cpus, t.num_gpus, t.pool_size)
                                                   for t in cfg.teachers])


def _max_diff(keys_a: list[str], a: np.ndarray, keys_b: list[str], b: np.ndarray) -> float:
    pos = {k: i for i, k in enumerate(keys_b)}
    idx = np.asarray([pos[k] for k in keys_a], dtype=np.int64)
    return float(np.abs(a - b[idx]).max()) if len(idx) else 0.0


READ_TASK = "MapBatches(read_teacher_inputs)"  # Ray Data's name for generation's read tasks


def read_tasks(windows: list[tuple[float, float]], at_least: int = 0, wait_s: float = 15.0) -> list[int] | None:
    """Per (since, until) wall-clock window, the read tasks (readers.read_teacher_inputs calls, one input
    shard each, retries included) created in it, from Ray's state API. Task events reach the API
    a second or so late: wait (up to `wait_s`) for `at_least` in all and two equal counts in a
    row. None where the API cannot be reached (no dashboard)."""
    import ray
    from ray.util.state import list_tasks
    from ray.util.state.exception import RayStateApiException

    deadline, counts = time.monotonic() + wait_s, None
    while True:
        try:
            tasks = list_tasks(address=ray.get_runtime_context().gcs_address, filters=[("name", "=", READ_TASK)],
                               limit=10_000, detail=True, raise_on_missing_output=False)
        except (ConnectionError, RayStateApiException):
            return None
        created = [t.creation_time_ms or 0 for t in tasks]
        previous, counts = counts, [sum(1 for c in created if a * 1000 <= c <= b * 1000) for a, b in windows]
        if (sum(counts) >= at_least and counts == previous) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


# --- P1 -------------------------------------------------------------------------------------------


def generation_throughput(workdir: str, size: float = 1, repeats: int = 3, arch: str | None = None,
                          image_size: int | None = None, batch_size: int | None = None,
                          shards: int = 8) -> dict[str, Any]:
    """One teacher's samples/s: plain PyTorch loop, the Ray Data labelling stage, the whole
    generate() path; alternating, `repeats` rounds. `size` scales the rows (size x 2048: at 512
    the labelling span of 2 CPU actors is about a second, and the skew of their start-up is
    most of it). The stage's labelling starts once its whole pool is up: its rate is the
    steady state, and the start-up is reported apart (and paid by generate()'s wall time)."""
    import torch

    runtime.ensure_ray(None, None)
    d = setup()
    arch, image_size, batch_size = arch or d["arch"], image_size or d["image_size"], batch_size or d["batch_size"]
    rows = max(shards, int(2048 * size * d["rows"]))
    cfg = prepare(workdir, "p1", rows, image_size, shards, {arch: arch}, batch_size, d["image_format"])
    (plan,) = _plan(cfg)
    # Warm-up: Ray started, read workers up (the materialising pass), the driver's imports, the
    # plain model's first batches. Actor start-up is not warmed: every execution starts its pool.
    mat = preprocessed(cfg)
    keys, x = local_pixels(cfg, arch)
    runner = load_model(cfg, arch)
    plain_loop(runner, x[:2 * batch_size], batch_size)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "stage": [], "generate": []}
    last: dict[str, Any] = {}
    for r in range(repeats):
        for side in _order(list(runs), r):
            if side == "plain":
                last["plain"], seconds = plain_loop(runner, x, batch_size)
                runs[side].append({"rows": len(last["plain"]), "seconds": seconds})
            elif side == "stage":
                last["stage"] = label_stage(mat, cfg, arch, plan, wait_for_actors=True)
                run = {k: last["stage"][k] for k in ("rows", "seconds", "startup_s", "process_s", "load_s",
                                                     "labelling_s")}
                run["busy"] = last["stage"]["busy_s"] / (run["labelling_s"] * plan.pool_size)
                runs[side].append(run)
            else:
                res = generate_into(cfg, storage.join(workdir, "p1", f"cache-{r}"))
                runs[side].append({"rows": res["rows"][arch], "seconds": res["seconds"], "units": res["units"][arch]})
    out: dict[str, Any] = {
        "arch": arch, "image": [3, image_size, image_size], "image_format": d["image_format"], "rows": rows,
        "shards": shards, "batch_size": batch_size,
        "repeats": repeats, "cluster_cpus": runtime.cluster_cpus_gpus()[0], "plain_torch_threads": torch.get_num_threads(),
        "plan": {"actors": plan.pool_size, "num_cpus": plan.num_cpus, "threads": plan.threads},
        # the same teacher on both sides: its logits by sample key, last round
        "max_abs_logit_diff": _max_diff(last["stage"]["keys"], last["stage"]["logits"], keys, last["plain"])}
    out.update(_throughput_figures(runs))
    return out


def _throughput_figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """generation_throughput's figures from its runs per side (plain, stage, generate): each side's
    summaries, the stage's start-up and busy share, generate()'s fixed cost, the ratios to plain."""
    out: dict[str, Any] = {}
    for side, values in runs.items():
        out[side] = {"rows": [v["rows"] for v in values], "seconds": summary([v["seconds"] for v in values]),
                     "samples_per_s": summary([v["rows"] / v["seconds"] for v in values])}
    stage = runs["stage"]
    for key in ("startup_s", "process_s", "load_s", "busy"):  # busy: share of the span the actors labelled
        out["stage"][key] = summary([v[key] for v in stage])
    # generate()'s fixed cost: its wall time less its rows at the stage's labelling rate (same round)
    out["generate"]["fixed_s"] = summary([g["seconds"] - g["rows"] * st["labelling_s"] / st["rows"]
                                           for g, st in zip(runs["generate"], stage, strict=True)])
    out["stage"]["labelling_samples_per_s"] = summary([v["rows"] / v["labelling_s"] for v in stage])
    out["generate"]["units"] = [v["units"] for v in runs["generate"]]
    plain = [v["rows"] / v["seconds"] for v in runs["plain"]]
    figures = {"labelling": [v["rows"] / v["labelling_s"] for v in stage],
               "stage": [v["rows"] / v["seconds"] for v in stage],
               "generate": [v["rows"] / v["seconds"] for v in runs["generate"]]}
    for name, values in figures.items():
        out[f"{name}_over_plain"] = statistics.median(values) / statistics.median(plain)
        out[f"{name}_over_plain_each"] = [a / b for a, b in zip(values, plain, strict=True)]
    return out


def _line(name: str, m: dict[str, Any], text: str, digits: int = 1) -> str:
    return f"{name:<12}{m['median']:>10.{digits}f}  {m['min']:>8.{digits}f}-{m['max']:<8.{digits}f} {text}"


def format_generation(r: dict[str, Any]) -> str:
    c, h, w = r["image"]
    p = r["plan"]
    lines = [f"teacher labelling: {r['arch']} on {r['rows']} RGB {h}x{w} {r.get('image_format', 'png').upper()} images in {r['shards']} Parquet shards, "
             f"batch {r['batch_size']}, {r['cluster_cpus']:g} CPUs; median of {r['repeats']} alternating rounds (min-max)",
             f"{'side':<12}{'samples/s':>10}  {'min-max':>17}"]
    lines += [
        _line("plain", r["plain"]["samples_per_s"], f"PyTorch loop, {r['plain_torch_threads']} torch threads"),
        _line("labelling", r["stage"]["labelling_samples_per_s"],
              f"Ray Data stage, {p['actors']} actor(s) x {p['num_cpus']:g} CPU, {p['threads']} torch thread(s): "
              "first batch start to last batch end"),
        _line("stage", r["stage"]["samples_per_s"], "the same, wall time: actor start-up included"),
        _line("generate", r["generate"]["samples_per_s"], "generate(): read + decode + label + commit, wall time"),
    ]
    st = {k: r["stage"][k]["median"] for k in ("startup_s", "process_s", "load_s", "busy")}
    lines.append(f"stage: actors busy {st['busy']:.0%} of the labelling span; actor start-up {st['startup_s']:.1f} s "
                 f"(process and imports {st['process_s']:.1f} s, teacher load {st['load_s']:.1f} s)")
    lines.append(f"generate(): fixed cost {r['generate']['fixed_s']['median']:.1f} s (wall time less its rows "
                 "at the stage's labelling rate)")
    for name, goal in (("labelling", "  (goal >= 0.85)"), ("stage", ""), ("generate", "")):
        each = ", ".join(f"{v:.2f}" for v in r[f"{name}_over_plain_each"])
        lines.append(f"{name + ' / plain:':<20}{r[f'{name}_over_plain']:.2f}{goal}  per round {each}")
    lines.append(f"rows labelled per run: plain {r['plain']['rows']}, stage {r['stage']['rows']}, "
                 f"generate {r['generate']['rows']}; max |logit difference| {r['max_abs_logit_diff']:.1e}")
    return "\n".join(lines)


# --- P2 -------------------------------------------------------------------------------------------


def _single(cfg: config.Config, teacher: str) -> config.Config:
    c = copy.deepcopy(cfg)
    c.teachers = [t for t in c.teachers if t.name == teacher]
    return c


def multi_teacher_pass(workdir: str, size: float = 1, repeats: int = 2, teachers: dict[str, str] | None = None,
                       image_size: int | None = None, batch_size: int | None = None,
                       shards: int = 8) -> dict[str, Any]:
    """Seconds to label every row with `teachers` ({name: arch}, default the three of
    MULTI_TEACHERS): one generate() call (one pass) against one call per teacher (separate),
    alternating, `repeats` rounds, every run into a fresh cache root; and the input-shard reads
    of every run. `size` scales the rows (size x 256)."""
    runtime.ensure_ray(None, None, dashboard=True)  # read_tasks: Ray's state API answers through the dashboard
    d = setup()
    teachers = dict(teachers or d["teachers"])
    image_size, batch_size = image_size or d["image_size"], batch_size or d["batch_size"]
    rows = max(shards, int(256 * size * d["rows"]))
    cfg = prepare(workdir, "p2", rows, image_size, shards, teachers, batch_size)
    preprocessed(cfg)  # warm-up: Ray started, read workers up, the inputs in the page cache
    planning.inspect_teachers(cfg)  # and the driver's imports, every architecture
    singles = {name: _single(cfg, name) for name in teachers}
    plans = {"one_pass": _plan(cfg), "separate": [_plan(c)[0] for c in singles.values()]}
    runs: dict[str, list[dict[str, Any]]] = {"one_pass": [], "separate": []}
    for r in range(repeats):
        for side in _order(list(runs), r):
            since = time.time()
            if side == "one_pass":
                res = generate_into(cfg, storage.join(workdir, "p2", f"one-{r}"))
                seconds, per_teacher = res["seconds"], {}
                labelled, units = res["rows"], res["units"]
            else:
                per_teacher, labelled, units = {}, {}, {}
                for name, c in singles.items():
                    res = generate_into(c, storage.join(workdir, "p2", f"sep-{r}-{name}"))
                    per_teacher[name] = res["seconds"]
                    labelled.update(res["rows"])
                    units.update(res["units"])
                seconds = sum(per_teacher.values())
            runs[side].append({"seconds": seconds, "per_teacher": per_teacher, "labelled": labelled, "units": units,
                               "window": (since, time.time())})
    # Shard reads per run, counted once at the end (Ray reports task events late).
    order = [(side, i) for side in runs for i in range(repeats)]
    counts = read_tasks([runs[side][i]["window"] for side, i in order],
                        at_least=repeats * shards * (1 + len(teachers)))
    for k, (side, i) in enumerate(order):
        runs[side][i]["read_tasks"] = None if counts is None else counts[k]
    out: dict[str, Any] = {"teachers": teachers, "image": [3, image_size, image_size], "rows": rows, "shards": shards,
                           "batch_size": batch_size, "repeats": repeats, "cluster_cpus": runtime.cluster_cpus_gpus()[0],
                           "plans": {side: [{"actors": p.pool_size, "num_cpus": p.num_cpus, "threads": p.threads}
                                            for p in ps] for side, ps in plans.items()}}
    for side, values in runs.items():
        out[side] = {"seconds": summary([v["seconds"] for v in values]),
                     "labelled": [v["labelled"] for v in values], "units": [v["units"] for v in values],
                     "read_tasks": [v["read_tasks"] for v in values]}
    out["separate"]["per_teacher_seconds"] = {name: summary([v["per_teacher"][name] for v in runs["separate"]])
                                              for name in teachers}
    out["one_over_separate"] = out["one_pass"]["seconds"]["median"] / out["separate"]["seconds"]["median"]
    out["one_over_separate_each"] = [a["seconds"] / b["seconds"]
                                     for a, b in zip(runs["one_pass"], runs["separate"], strict=True)]
    return out


def format_multi_teacher(r: dict[str, Any]) -> str:
    c, h, w = r["image"]
    names = ", ".join(r["teachers"])
    lines = [f"{len(r['teachers'])} teachers ({names}) over {r['rows']} RGB {h}x{w} images in {r['shards']} shards, "
             f"{r['cluster_cpus']:g} CPUs; median of {r['repeats']} alternating rounds (min-max)",
             f"{'mode':<12}{'seconds':>10}  {'min-max':>17}"]
    reads = {side: r[side]["read_tasks"][-1] for side in ("one_pass", "separate")}
    n = len(r["teachers"])
    lines.append(_line("one pass", r["one_pass"]["seconds"], f"one generate() with {n} teachers; "
                       f"{reads['one_pass']} shard reads", 2))
    lines.append(_line("separate", r["separate"]["seconds"], f"{n} generate() calls, one teacher each; "
                       f"{reads['separate']} shard reads", 2))
    for name, m in r["separate"]["per_teacher_seconds"].items():
        lines.append(_line(f"  {name}"[:12], m, name, 2))
    each = ", ".join(f"{v:.2f}" for v in r["one_over_separate_each"])
    lines.append(f"one pass / separate: {r['one_over_separate']:.2f}  (goal <= 0.8; per round {each})")
    return "\n".join(lines)


# --- P7 -------------------------------------------------------------------------------------------


def actor_plan(cpus: float, actors: int) -> runtime.ActorPlan:
    """`actors` CPU actors sharing the teachers' share of `cpus`, one torch thread each."""
    share = cpus * runtime.TEACHER_CPU_SHARE / actors
    return runtime.ActorPlan(num_cpus=min(1.0, max(0.05, round(share, 2))), num_gpus=0.0, pool_size=actors, threads=1)


def gpu_actor_plan(cpus: float, gpus: float, actors: int) -> runtime.ActorPlan:
    """`actors` actors sharing the GPUs (fractional), with the CPUs left for decoding."""
    return runtime.ActorPlan(num_cpus=max(0.05, round(cpus * runtime.TEACHER_CPU_SHARE / actors, 2)),
                             num_gpus=gpus / actors, pool_size=actors, threads=1)


def actor_scaling(workdir: str, size: float = 1, repeats: int = 2, arch: str | None = None,
                  image_size: int | None = None, batch_size: int | None = None, shards: int = 16,
                  actors: list[int] | None = None) -> dict[str, Any]:
    """Labelling-stage samples/s with 1, 2, 4 ... actors (default: powers of two up to twice the
    CPUs), alternating, `repeats` rounds; speed-up and efficiency per actor against 1 actor.
    `size` scales the rows (size x 384)."""
    runtime.ensure_ray(None, None)
    cpus, gpus = runtime.cluster_cpus_gpus()
    counts = sorted(set(actors or [2 ** i for i in range(8) if 2 ** i <= max(2, 2 * cpus)
                                   and (not gpus or 2 ** i <= 4 * gpus)]))  # a GPU: up to 4 actors each
    d = setup()
    arch, image_size = arch or d["arch"], image_size or d["image_size"]
    batch_size = batch_size or d["batch_size"] // 2
    rows = max(shards, int(384 * size * d["rows"]))
    cfg = prepare(workdir, "p7", rows, image_size, shards, {arch: arch}, batch_size)

    def actor_plan_for(n: int) -> runtime.ActorPlan:  # on a GPU host the actors share its GPUs
        return gpu_actor_plan(cpus, gpus, n) if cfg.teachers[0].num_gpus > 0 else actor_plan(cpus, n)

    mat = preprocessed(cfg)  # warm-up: Ray started, read workers up; every run starts its actors
    load_model(cfg, arch)  # and the driver's imports
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    for r in range(repeats):
        for n in _order(counts, r):
            res = label_stage(mat, cfg, arch, actor_plan_for(n), wait_for_actors=True)
            runs[n].append({k: res[k] for k in ("rows", "seconds", "startup_s", "labelling_s")})
    out: dict[str, Any] = {"arch": arch, "image": [3, image_size, image_size], "rows": rows, "shards": shards,
                           "batch_size": batch_size, "repeats": repeats, "cluster_cpus": cpus, "runs": []}
    base = None
    for n, values in runs.items():
        rate = summary([v["rows"] / v["labelling_s"] for v in values])
        base = base or rate["median"]
        plan = actor_plan_for(n)
        out["runs"].append({"actors": n, "num_cpus": plan.num_cpus, "threads": plan.threads,
                            "rows": [v["rows"] for v in values], "samples_per_s": rate,
                            "wall_samples_per_s": summary([v["rows"] / v["seconds"] for v in values]),
                            "startup_s": summary([v["startup_s"] for v in values]),
                            "speedup": rate["median"] / base, "efficiency": rate["median"] / base / n})
    return out


def format_actor_scaling(r: dict[str, Any]) -> str:
    c, h, w = r["image"]
    lines = [f"actor scaling: {r['arch']} on {r['rows']} RGB {h}x{w} images, batch {r['batch_size']}, "
             f"{r['cluster_cpus']:g} CPUs, one torch thread per actor; labelling span (all actors up), "
             f"median of {r['repeats']} alternating rounds (min-max)",
             f"{'actors':>6} {'CPU each':>9}{'samples/s':>11}  {'min-max':>15}{'speed-up':>10}{'efficiency':>11}"
             f"{'wall/s':>8}{'start s':>8}"]
    for run in r["runs"]:
        m = run["samples_per_s"]
        lines.append(f"{run['actors']:>6} {run['num_cpus']:>9.2f}{m['median']:>11.1f}  {m['min']:>7.1f}-{m['max']:<7.1f}"
                     f"{run['speedup']:>10.2f}{run['efficiency']:>11.2f}{run['wall_samples_per_s']['median']:>8.1f}"
                     f"{run['startup_s']['median']:>8.1f}")
    return "\n".join(lines)
