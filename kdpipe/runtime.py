"""Ray start-up and resource sizing.

Ray waits forever, silently, when actors or train workers ask for more CPUs than the cluster
has free (on a 2-core laptop three 1-CPU teacher actors plus a read task is already too many).
Every request kdpipe makes is therefore sized here from `ray.cluster_resources()`, with
fractional CPUs when the machine is small; explicit config values win.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from kdpipe.errors import ConfigError

log = logging.getLogger("kdpipe")

# Share of the cluster's CPUs the teacher pools may reserve; the rest reads and decodes inputs.
TEACHER_CPU_SHARE = 0.6
READ_TASK_CPUS = 0.25


def ensure_ray(address: str | None, num_cpus: float | None = None, dashboard: bool = False) -> bool:
    """Connect to `address` or start a local Ray (with Ray's dashboard if `dashboard`, where its
    packages are installed). Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Worker logs stay in Ray's session folder unless asked for: remote errors still reach the
    # driver as exceptions with their tracebacks, and the terminal stays readable.
    # A command's local Ray lives as long as the command: its dashboard (Ray's job and state
    # APIs) costs ~2 s at start and ~10% of a core, so it starts only when asked for, and then
    # only where Ray's "default" extra is installed (None: a bare Ray, a GPU image with a slim
    # offline bundle say, runs without it instead of failing).
    kwargs: dict = {"include_dashboard": None if dashboard else False, "log_to_driver": os.environ.get("KDPIPE_RAY_LOGS") == "1",
                    "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = int(num_cpus) if num_cpus else None  # None: Ray counts (and respects cgroup limits)
        # Read tasks take a fraction of a CPU, so more workers run than there are CPUs. Ray keeps
        # only ~num_cpus idle workers alive; the rest would be killed and re-spawned (seconds of
        # imports each) on every epoch or pass. Measured: the student stream over 7k samples went
        # from 1.4k to 5.4k samples/s on 2 cores with the larger pool.
        local_train_defaults()
        ray.init(num_cpus=cpus, _system_config=local_system_config(cpus or os.cpu_count() or 1), **kwargs)
    _quiet_ray_data()
    return True


# Ray Train settings for a Ray that a command starts on this machine (read by Ray Train's
# controller from the driver's environment; a value already set wins).
LOCAL_TRAIN_ENV = {
    # Ray Train V2 takes reports and notices the end of a fit by polling the workers, every 2 s
    # by default: each checkpoint then costs ~2 s and each fit ~2-4 s more. Polling two local
    # workers four times a second costs nothing.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # The preemption watcher follows node draining (spot instances going away). The one node of
    # a local Ray is this machine: the watcher would only cost an actor's start (seconds of
    # imports) per fit, and an `E` line about its constructor arguments on the terminal.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def local_train_defaults() -> None:
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def workers_soft_limit(cpus: float) -> int:
    """Idle workers Ray keeps alive: enough for every fractional read task plus actors."""
    return int(cpus / READ_TASK_CPUS) + 4


def local_system_config(cpus: float) -> dict[str, int]:
    """Ray's system settings for a local Ray of `cpus` CPUs that a command (or the tests) starts."""
    return {"num_workers_soft_limit": workers_soft_limit(cpus)}


def _quiet_ray_data() -> None:
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # kdpipe turns Ray Data's bars off on purpose (it draws its own): not worth a warning.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("KDPIPE_RAY_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False


def cluster_cpus_gpus() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


@dataclass(frozen=True)
class ActorPlan:
    num_cpus: float
    num_gpus: float
    pool_size: int
    threads: int  # torch intra-op threads per actor


def plan_teacher_pools(cpus: float, gpus: float,
                       requests: list[tuple[str, float | None, float, int | None]]) -> list[ActorPlan]:
    """One plan per teacher from (name, num_cpus, num_gpus, pool_size) requests; None = size it.

    CPU-only: the teachers' actors reserve TEACHER_CPU_SHARE of the CPUs, the rest stays free
    for read tasks. A teacher's share becomes whole-CPU actors when it is >= 2 CPUs; below that
    (small machines) it is split into one fractional actor per core of the teacher's part of the
    machine, round(cpus / teachers): whole-CPU actors would leave cores idle there (on 2 cores,
    one 1-CPU actor computes on one core while decoding needs a fraction of the other).
    Measured by `kdpipe bench generate` (resnet18, 64 px, 2 cores): 2 actors x 1 thread label
    ~1.6x as fast as 1 actor x 1 thread, and ~1.35x as fast as 1 actor x 2 threads.
    Torch threads per sized CPU actor: the cores over all teachers' CPU actors (at least 1), so
    the actors keep every core busy (Ray books the reservations, it does not cap threads). With GPUs: one actor per
    requested GPU share, one CPU each when there are CPUs to spare; the GPUs no fixed-size pool
    takes are split among the GPU teachers sized here so that none is left over where an actor
    still fits (gpu_pool_sizes: 8 GPUs for 3 one-GPU teachers are 3 + 3 + 2 actors, not 2 + 2 + 2).
    """
    n = max(1, len(requests))
    budget = cpus * TEACHER_CPU_SHARE / n
    gpu_sizes = gpu_pool_sizes(gpus, requests)
    plans, sized = [], []
    for name, num_cpus, num_gpus, pool_size in requests:
        if num_gpus > gpus or (num_cpus or 0) > cpus:
            raise ConfigError(
                f"teacher {name!r} asks for num_gpus={num_gpus}, num_cpus={num_cpus} per actor but the "
                f"Ray cluster has {gpus:g} GPUs and {cpus:g} CPUs: Ray would wait forever; lower the request"
            )
        auto = False
        if num_gpus > 0:
            size = pool_size or gpu_sizes[name]
            cpu = num_cpus if num_cpus is not None else min(1.0, max(0.25, budget / size))
        elif num_cpus is not None:
            size = pool_size or max(1, int(budget // num_cpus))
            cpu = num_cpus
        elif budget >= 2:
            size = pool_size or int(budget)
            cpu = budget / size if pool_size else 1.0
            auto = True
        else:
            size = pool_size or max(1, round(cpus / n))
            cpu = max(0.05, round(budget / size, 2))
            auto = True
        plans.append(ActorPlan(num_cpus=float(cpu), num_gpus=float(num_gpus), pool_size=int(size),
                               threads=max(1, int(cpu))))
        sized.append(auto)
    demand = sum(p.num_gpus * p.pool_size for p in plans)
    if demand > gpus + 1e-9:  # every pool's actors run at once (images flow through all of them)
        raise ConfigError(
            f"teachers {[r[0] for r in requests if r[2] > 0]} need {demand:g} GPUs at once (one actor each at "
            f"least, or their pool sizes) but the Ray cluster has {gpus:g}: Ray would wait forever; give them "
            "fractional teachers[].num_gpus (e.g. 0.5 to share a GPU) or smaller pool sizes")
    cpu_actors = sum(p.pool_size for p in plans if p.num_gpus == 0)
    threads = max(1, int(cpus // cpu_actors)) if cpu_actors else 1
    return [replace(p, threads=max(p.threads, threads)) if auto else p for p, auto in zip(plans, sized, strict=True)]


def gpu_pool_sizes(gpus: float, requests: list[tuple[str, float | None, float, int | None]]) -> dict[str, int]:
    """Actors per GPU teacher whose pool size is not given, {name: size}: the GPUs left by the
    fixed-size GPU pools, an equal share each (at least one actor), then one more actor at a time
    to each teacher in turn while one still fits, so no GPU is left over that an actor could use.
    CPU-only teachers take no share."""
    sized = [(name, g) for name, _, g, size in requests if g > 0 and not size]
    if not sized:
        return {}
    free = gpus - sum(g * size for _, _, g, size in requests if g > 0 and size)
    sizes = {name: max(1, int(free / len(sized) / g + 1e-9)) for name, g in sized}
    left = free - sum(sizes[name] * g for name, g in sized)
    grown = True
    while grown:
        grown = False
        for name, g in sized:
            if g <= left + 1e-9:
                sizes[name] += 1
                left -= g
                grown = True
    return sizes


def plan_train_worker_cpus(cpus: float, num_workers: int, requested: float | None) -> float:
    """CPUs per training worker: what was asked, else an equal share of 80% of the cluster
    (at most 4), leaving room for the data pipeline's read tasks."""
    if requested is not None:
        return requested
    share = cpus * 0.8 / max(1, num_workers)
    return float(min(4.0, int(share))) if share >= 1 else max(0.1, round(share, 2))
