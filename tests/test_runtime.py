"""Resource sizing: every plan fits the cluster it was sized for (Ray waits forever otherwise)."""

from __future__ import annotations

import pytest

from kdpipe.runtime import READ_TASK_CPUS, plan_teacher_pools, plan_train_worker_cpus


def _total(plans):
    return sum(p.num_cpus * p.pool_size for p in plans)


def test_laptop_three_teachers_leave_room_for_reads():
    plans = plan_teacher_pools(2, 0, [(n, None, 0.0, None) for n in ("a", "b", "c")])
    assert all(p.pool_size == 1 and 0 < p.num_cpus < 1 for p in plans)
    assert _total(plans) + READ_TASK_CPUS <= 2


def test_big_node_gets_whole_cpu_actors():
    plans = plan_teacher_pools(16, 0, [(n, None, 0.0, None) for n in ("a", "b", "c")])
    assert all(p.num_cpus == 1.0 and p.pool_size == 3 and p.threads == 1 for p in plans)
    assert _total(plans) + READ_TASK_CPUS <= 16


def test_gpu_teachers_share_the_gpus():
    plans = plan_teacher_pools(16, 4, [("a", None, 1.0, None), ("b", None, 0.5, None)])
    assert plans[0].num_gpus == 1.0 and plans[0].pool_size == 2
    assert plans[1].num_gpus == 0.5 and plans[1].pool_size == 4
    assert sum(p.num_gpus * p.pool_size for p in plans) <= 4


@pytest.mark.parametrize("gpus, requests, sizes", [
    (8, [("a", None, 1.0, None), ("b", None, 1.0, None), ("c", None, 1.0, None)], [3, 3, 2]),
    # a CPU-only teacher takes no GPU share; a fixed-size pool takes its GPUs first
    (8, [("a", None, 1.0, None), ("cpu", None, 0.0, None), ("b", None, 1.0, 2)], [6, None, 2]),
    (3, [("a", None, 0.5, None), ("b", None, 1.0, None)], [4, 1]),
])
def test_gpu_teachers_leave_no_gpu_over(gpus, requests, sizes):
    plans = plan_teacher_pools(32, gpus, requests)
    assert [p.pool_size if p.num_gpus else None for p in plans] == sizes
    used = sum(p.num_gpus * p.pool_size for p in plans)
    assert used == gpus
    assert all(used + p.num_gpus > gpus for p in plans if p.num_gpus)  # no teacher's actor still fits


def test_gpu_teachers_that_cannot_all_run_at_once_are_refused():
    """Images flow through every teacher's pool at once: two one-GPU teachers on one GPU would
    wait forever for each other's GPU."""
    with pytest.raises(ValueError, match=r"teachers \['a', 'b'\] need 2 GPUs at once .* has 1: .*fractional"):
        plan_teacher_pools(8, 1, [("a", None, 1.0, None), ("b", None, 1.0, None)])
    plans = plan_teacher_pools(8, 1, [("a", None, 0.5, None), ("b", None, 0.5, None)])
    assert [p.pool_size for p in plans] == [1, 1]


def test_explicit_requests_win():
    (plan,) = plan_teacher_pools(8, 0, [("a", 2.0, 0.0, 2)])
    assert (plan.num_cpus, plan.pool_size, plan.threads) == (2.0, 2, 2)


@pytest.mark.parametrize("cpus, gpus, request_", [(2, 0, ("big", None, 1.0, None)), (2, 0, ("big", 4.0, 0.0, 1))])
def test_impossible_request_fails_naming_teacher(cpus, gpus, request_):
    with pytest.raises(ValueError, match="teacher 'big'.*wait forever"):
        plan_teacher_pools(cpus, gpus, [request_])


def test_train_workers_fit_with_reads():
    assert 2 * plan_train_worker_cpus(2, 2, None) + READ_TASK_CPUS <= 2
    assert plan_train_worker_cpus(32, 2, None) == 4.0
    assert plan_train_worker_cpus(2, 2, 0.3) == 0.3


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_starts_where_the_dashboards_packages_are_missing(tmp_path):
    """A bare Ray (a GPU image with only the slim offline bundle: no aiohttp_cors, opencensus ...)
    has no dashboard; kdpipe's local Ray must start and run tasks there all the same."""
    import os
    import subprocess
    import sys
    import tempfile

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "aiohttp_cors.py").write_text(  # what a package that is not installed raises
        'raise ModuleNotFoundError("No module named \'aiohttp_cors\'", name="aiohttp_cors")\n')
    ray_tmp = tempfile.mkdtemp(prefix="kdbare-", dir="/tmp")  # short: Ray's socket paths are length-limited
    code = ("import ray; from kdpipe import runtime; "
            "import ray._private.utils as u; assert u.get_dashboard_dependency_error() is not None; "
            "assert runtime.ensure_ray(None, 1, dashboard=True); print('sum', ray.get(ray.remote(lambda x: x + 1).options(num_cpus=0.5).remote(41)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]),
           "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sum 42" in out.stdout
