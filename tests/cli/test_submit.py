"""`kdpipe submit`: staging, quoting and refusals without a cluster; then real jobs on a real Ray
head started with `ray start` (its own ports and temp dir, stopped by process id, never `ray stop`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from kdpipe import cli
from kdpipe.cli import submit
from kdpipe.errors import ConfigError, StorageMissing

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DIGITS_YAML = os.path.join(ROOT, "jobs", "configs", "digits.yaml")


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def closed_address() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def write_config(path, cfg_text: str) -> str:
    path.write_text(cfg_text)
    return str(path)


# --- No cluster -----------------------------------------------------------------------------------


def test_help_names_the_command_and_its_options():
    parser = argparse.ArgumentParser(prog="kdpipe")
    sub = parser.add_subparsers(dest="command")
    text = submit.add_parser(sub).format_help()
    assert "usage: kdpipe submit" in text and "JOB" in text and "CONFIG" in text
    for option in ("--address", "--set", "--wait", "--json", "--runtime-env"):
        assert option in text


def test_staged_working_dir_ships_kdpipe_the_job_and_the_config(tmp_path):
    import yaml

    extra = submit.load_runtime_env(os.path.join(ROOT, "infra", "runtime_env.yaml"))
    assert "working_dir" not in extra and "excludes" not in extra
    staging = tmp_path / "stage"
    staging.mkdir()
    env = submit.stage_runtime_env(str(staging), submit.find_job_file("train"), DIGITS_YAML, extra)
    assert (staging / "kdpipe" / "__init__.py").is_file() and (staging / "kdpipe" / "cli" / "__init__.py").is_file()
    assert (staging / "jobs" / "train.py").is_file() and os.listdir(staging / "jobs") == ["train.py"]
    with open(DIGITS_YAML) as f:
        assert (staging / "config.yaml").read_text() == f.read()
    assert not [d for d, _, _ in os.walk(staging) if d.endswith("__pycache__")]
    assert env["working_dir"] == str(staging) and env["env_vars"]["PYTHONPATH"] == "."
    assert "excludes" not in env
    with open(os.path.join(ROOT, "infra", "runtime_env.yaml")) as f:
        assert env.get("pip") == yaml.safe_load(f).get("pip")  # the file's pip list travels


def test_runtime_env_keeps_its_own_pythonpath_after_ours(tmp_path):
    env = submit.stage_runtime_env(str(tmp_path), submit.find_job_file("generate"), DIGITS_YAML,
                                   {"env_vars": {"PYTHONPATH": "/opt/lib", "OMP_NUM_THREADS": 1}})
    assert env["env_vars"] == {"PYTHONPATH": ".:/opt/lib", "OMP_NUM_THREADS": "1"}


def test_entrypoint_is_shell_quoted():
    overrides = ["train.teachers=[cnn, wide_cnn]", "workdir=/data/my runs", "train.name=$(touch /tmp/x);'"]
    entry = submit.build_entrypoint("/somewhere/jobs/train.py", overrides)
    assert entry.startswith("python jobs/train.py config.yaml --set ray.address=auto ")
    assert shlex.split(entry) == ["python", "jobs/train.py", "config.yaml", "--set", "ray.address=auto",
                                  "--set", overrides[0], "--set", overrides[1], "--set", overrides[2]]


def test_job_names_and_paths(tmp_path):
    assert submit.find_job_file("generate").name == "generate.py"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "sweep.py").write_text("print('hi')\n")
    assert submit.find_job_file(str(jobs / "sweep.py")) == jobs / "sweep.py"
    with pytest.raises(ConfigError, match="unknown job 'generat'"):
        submit.find_job_file("generat")
    with pytest.raises(StorageMissing, match="does not exist"):
        submit.find_job_file(str(jobs / "missing.py"))


def test_secret_looking_storage_options_are_refused():
    from kdpipe.config import load_config

    with pytest.raises(ConfigError) as e:
        submit.check_no_secrets(load_config(None, [
            "cache.storage_options={key: AKIAEXAMPLE, secret: s3cr3t, client_kwargs: {endpoint_url: 'http://x'}}"]))
    msg = str(e.value)
    assert "cache.storage_options.key" in msg and "cache.storage_options.secret" in msg
    assert "environment" in msg and "s3cr3t" not in msg and "AKIAEXAMPLE" not in msg
    with pytest.raises(ValueError, match=r"data\.storage_options\.client_kwargs\.aws_secret_access_key"):
        submit.check_no_secrets(load_config(None, ["data.storage_options={client_kwargs: {aws_secret_access_key: x}}"]))
    with pytest.raises(ValueError, match=r"data\.storage_options\.token"):
        submit.check_no_secrets(load_config(None, ["data.storage_options={token: /home/me/key.json}"]))
    with pytest.raises(ValueError, match="runtime env env_vars.AWS_SECRET_ACCESS_KEY"):
        submit.check_no_secrets(load_config(None), {"env_vars": {"AWS_SECRET_ACCESS_KEY": "x", "PYTHONPATH": "."}})
    # Endpoints, flags and empty values are not credentials.
    submit.check_no_secrets(load_config(None, [
        "cache.storage_options={anon: false, key: null, client_kwargs: {endpoint_url: 'http://127.0.0.1:9000'}}"]),
        {"env_vars": {"PYTHONPATH": ".", "OMP_NUM_THREADS": "1"}})


def test_relative_paths_are_named():
    from kdpipe.config import load_config

    assert submit.relative_paths(load_config(None)) == ["workdir"]  # the demo's default: kdpipe-demo
    assert submit.relative_paths(load_config(None, ["workdir=/shared/kd", "cache.root=cache"])) == ["cache.root"]
    assert submit.relative_paths(load_config(None, ["workdir=s3://bucket/kd"])) == []


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.resolve_address(None) == "http://head:8265"
    assert submit.resolve_address("http://other:8265") == "http://other:8265"


def test_bad_config_key_fails_before_any_submission(tmp_path, capsys):
    # The address has no cluster: only a failure before connecting names the config key.
    assert cli.main(["submit", "--address", closed_address(), "generate", DIGITS_YAML,
                     "--set", "labels.temprature=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'labels.temprature'" in err and "cannot reach" not in err


def test_secrets_in_the_config_fail_before_any_submission(tmp_path, capsys):
    cfg = write_config(tmp_path / "s3.yaml", "cache:\n  root: s3://bucket/cache\n  storage_options:\n"
                                             "    key: AKIAEXAMPLE\n    secret: not-for-the-cluster\n")
    assert cli.main(["submit", "--address", closed_address(), "generate", cfg]) == 2
    err = capsys.readouterr().err
    assert "refusing to submit credentials" in err and "cache.storage_options.secret" in err
    assert "not-for-the-cluster" not in err and "cannot reach" not in err


def test_missing_runtime_env_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "runtime_env.yaml"
    assert cli.main(["submit", "--address", closed_address(), "generate", DIGITS_YAML,
                     "--runtime-env", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"kdpipe submit: error: runtime env file (--runtime-env) '{missing}' does not exist" in err
    assert "Traceback" not in err and "cannot reach" not in err


def test_no_cluster_exits_2_naming_the_address(tmp_path, capsys):
    address = closed_address()
    cfg = write_config(tmp_path / "c.yaml", f"workdir: {tmp_path}\n")
    assert cli.main(["submit", "--address", address, "generate", cfg]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster's Jobs API at '{address}'" in err and "--address" in err


# --- A real cluster -------------------------------------------------------------------------------

HEAD_SECRET = "kdpipe-head-only-secret-8e1f"  # in the head's environment only
SUBMITTER_SECRET = "kdpipe-submitter-secret-42aa"  # in the submitting shell's environment only


def _free_worker_ports(width: int = 200) -> tuple[int, int]:
    """A window of free ports outside Ray's default worker range (10002-19999, which the test
    session's own Ray uses) and below the kernel's ephemeral range."""
    for _ in range(50):
        lo = random.randrange(20000, 30000 - width)
        try:
            for port in range(lo, lo + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return lo, lo + width - 1
        except OSError:
            continue
    raise RuntimeError("no free window of worker ports in 20000-30000")


def _processes_of(temp_dir: str) -> list[int]:
    """This head's process ids: those whose command line names its temp dir, and their descendants
    (dashboard modules, agents, workers, job drivers). Read from /proc (Linux)."""
    cmdlines, children = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdlines[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid for pid, cmd in cmdlines.items() if temp_dir in cmd]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found.discard(os.getpid())
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_head(temp_dir: str, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s` (gcs_server lingers ~15 s on SIGTERM)."""
    pids = _processes_of(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as users do (`ray start --head`), with its own ports and temp dir, so it
    runs beside the test session's in-process Ray. `ray stop` would kill every Ray on the machine,
    so the finaliser stops only the processes of this head."""
    from kdpipe import runtime

    ray_exe = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="kdsub-", dir="/tmp")  # short: socket paths are length-limited
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node_manager, object_manager = free_ports(9)
    lo, hi = _free_worker_ports()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", KDPIPE_TEST_SECRET=HEAD_SECRET,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))  # the jobs' `python`
    cmd = [ray_exe, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           "--object-store-memory=400000000",
           f"--system-config={json.dumps({'num_workers_soft_limit': runtime.workers_soft_limit(2)})}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", f"--min-worker-port={lo}", f"--max-worker-port={hi}"]
    log_path = os.path.join(temp_dir, "ray-start.log")
    address = f"http://127.0.0.1:{dashboard}"
    try:
        with open(log_path, "w") as log:  # not a pipe: the daemons it leaves behind would hold it open
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120).returncode
        if rc != 0:
            with open(log_path) as f:
                pytest.fail(f"`ray start --head` failed ({rc}):\n{f.read()[-3000:]}")
        deadline = time.time() + 60
        while True:
            try:  # the Jobs API answers once the dashboard's job module is up
                submit.connect(address).list_jobs()
                break
            except (ConnectionError, RuntimeError):
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def kdpipe_submit(*argv: str, timeout: float = 240, background: bool = False):
    """`kdpipe submit ...` in a subprocess (a Popen when `background`), from a shell that holds a
    storage secret of its own."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_SECRET_ACCESS_KEY": SUBMITTER_SECRET}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "kdpipe.cli", "submit", *argv]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.ray
@pytest.mark.timeout(600)  # ~110 s alone on 2 cores; 250 s+ beside other Ray sessions
def test_generate_then_train_on_a_real_cluster(ray_head, tmp_path):
    from kdpipe import config, storage
    from kdpipe.data import digits
    from kdpipe.demo import ensure_teachers
    from kdpipe.labels import cache

    cfg = config.resolve_paths(config.load_config(None, [
        f"workdir={tmp_path / 'work'}", "data.num_shards=4", "teachers.0.train_epochs=3",
        "teachers.1.train_epochs=3", "teachers.2.train_epochs=3", "train.num_workers=1"]))
    digits.ensure_builtin(cfg.data)
    ensure_teachers(cfg, progress=False)
    cfg_path = write_config(tmp_path / "digits-cluster.yaml", config.dump_config(cfg))

    gen = kdpipe_submit("--address", ray_head, "generate", cfg_path, "--wait", "--json")
    assert gen.returncode == 0, gen.stderr[-4000:]
    result = json.loads(gen.stdout)
    assert result["status"] == "SUCCEEDED" and result["job"] == "generate", result
    assert result["entrypoint"] == "python jobs/generate.py config.yaml --set ray.address=auto"
    assert all(name in gen.stderr for name in ("mlp", "wide_cnn", "teacher forward passes"))  # the job's logs
    fs, root = storage.filesystem(cfg.cache.root)
    for name in ("mlp", "cnn", "wide_cnn"):
        ref = cache.read_ref(fs, root, name)
        assert ref is not None, name
        manifest = cache.read_manifest(fs, cache.unit_dir(root, name, ref["digest"], ref["fingerprint"],
                                                          ref["label_hash"]))
        assert manifest is not None and manifest["rows"] == 899, name

    # Two jobs at once: a student, and one that fails on the cluster (no labels in that cache; the
    # config itself is valid here, so it is submitted).
    bad_job = kdpipe_submit("--address", ray_head, "train", cfg_path, "--set", f"cache.root={tmp_path / 'empty'}",
                            "--set", "train.epochs=1", "--wait", "--json", background=True)
    try:
        train = kdpipe_submit("--address", ray_head, "train", cfg_path, "--set", "train.epochs=1", "--wait", "--json")
        stdout, stderr = bad_job.communicate(timeout=240)
    finally:
        if bad_job.poll() is None:
            bad_job.kill()
            bad_job.wait()
    bad = subprocess.CompletedProcess(bad_job.args, bad_job.returncode, stdout, stderr)
    assert train.returncode == 0, train.stderr[-4000:]
    assert json.loads(train.stdout)["status"] == "SUCCEEDED"
    runs = [d for d in os.listdir(cfg.train.storage_path) if os.path.exists(
        os.path.join(cfg.train.storage_path, d, "metrics.jsonl"))]
    assert len(runs) == 1, os.listdir(cfg.train.storage_path)

    assert bad.returncode == 1, bad.stderr[-4000:]
    failed = json.loads(bad.stdout)
    assert failed["status"] == "FAILED" and failed["driver_exit_code"] == 2, failed
    assert "has no labels" in bad.stderr and "kdpipe generate" in bad.stderr

    # Secrets: nothing the submitter or the head holds appears in what the cluster stores.
    client = submit.connect(ray_head)
    for out in (gen, train, bad):
        assert SUBMITTER_SECRET not in out.stdout + out.stderr and HEAD_SECRET not in out.stdout + out.stderr
    for sid in (result["submission_id"], failed["submission_id"]):
        info = client.get_job_info(sid)
        assert info.metadata == {"kdpipe_job": "generate" if sid == result["submission_id"] else "train",
                                 "config": "digits-cluster.yaml"}
        assert set(info.runtime_env["env_vars"]) == {"PYTHONPATH"}
        stored = json.dumps({"metadata": info.metadata, "runtime_env": info.runtime_env,
                             "entrypoint": info.entrypoint, "message": info.message})
        assert "AWS_SECRET_ACCESS_KEY" not in stored
        assert SUBMITTER_SECRET not in stored and HEAD_SECRET not in stored


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_submit_a_job_file_without_wait_prints_the_id(ray_head, tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "hello.py").write_text(
        "import os, sys\nimport kdpipe\nprint('hello from', kdpipe.__file__, sys.argv[1:])\n"
        f"print('head secret visible:', os.environ.get('KDPIPE_TEST_SECRET') == {HEAD_SECRET!r})\n")
    cfg = write_config(tmp_path / "c.yaml", f"workdir: {tmp_path}\n")
    out = kdpipe_submit("--address", ray_head, str(jobs / "hello.py"), cfg, "--set", "train.epochs=1", timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    sid = out.stdout.strip()
    assert sid.startswith("raysubmit_") and "ray job logs" in out.stderr
    client = submit.connect(ray_head)
    deadline = time.time() + 60
    while not client.get_job_status(sid).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(sid)) == "SUCCEEDED", client.get_job_logs(sid)
    assert client.get_job_info(sid).metadata == {"kdpipe_job": "hello", "config": "c.yaml"}
    # The job imported the shipped kdpipe (its working dir), not the one installed here.
    logs = client.get_job_logs(sid)
    assert "hello from" in logs and "_ray_pkg_" in logs and os.path.dirname(os.path.dirname(cli.__file__)) not in logs
    assert "['config.yaml', '--set', 'ray.address=auto', '--set', 'train.epochs=1']" in logs
    # Credentials reach jobs from the cluster's own environment, not from the submission.
    assert "head secret visible: True" in logs
    assert HEAD_SECRET not in json.dumps(client.get_job_info(sid).runtime_env)
