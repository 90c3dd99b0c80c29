"""Cluster definitions in infra/: what `ray up` and `kubectl apply` would trip on, checked offline.

The launcher config goes through Ray's own preparation and schema (what `ray up` runs before any
cloud call). The KubeRay and Kubernetes manifests are checked for their kinds, pinned images that
match the installed Ray, `ray start` parameters that `ray start` accepts (the system config on the
head only), entry points and configs that exist and load, and credentials only by reference.
No Ray cluster is started.
"""

from __future__ import annotations

import pathlib
import re
import shlex
from urllib.parse import urlparse

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from kdpipe.config import load_config
from kdpipe.runtime import workers_soft_limit

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBE = INFRA / "kuberay"

MANIFESTS = {  # file -> (apiVersion, kind) of each document, in order
    "raycluster.yaml": [("ray.io/v1", "RayCluster")],
    "rayjob-generate.yaml": [("ray.io/v1", "RayJob")],
    "rayjob-train.yaml": [("ray.io/v1", "RayJob")],
    "cronjob-regenerate.yaml": [("v1", "ConfigMap"), ("batch/v1", "CronJob")],
    "secret-example.yaml": [("v1", "Secret")],
}
RAYJOBS = ["rayjob-generate.yaml", "rayjob-train.yaml"]
JOB_MANIFESTS = [*RAYJOBS, "cronjob-regenerate.yaml"]
RAY_IMAGE = "rayproject/ray"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "pip", "uv", "conda", "env_vars", "py_modules", "config"}


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def _doc(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _cluster_yaml() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def _ray_start(args: list[str]) -> dict:
    """`ray start`'s own option parsing (types included, nothing started): its parameters."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(args)).params


def _ray_start_args(command: str) -> list[str]:
    """The arguments of the `ray start` in a launcher command such as `ulimit ...; ray start ...`."""
    for part in re.split(r";|&&", command):
        words = shlex.split(part)
        if words[:2] == ["ray", "start"]:
            return words[2:]
    return []


def _kuberay_args(params: dict) -> list[str]:
    """rayStartParams as KubeRay passes them: `--key=value` pasted into a bash command line
    ("true" becomes a bare flag, "false" is dropped), then split by the shell."""
    # Kubernetes stores rayStartParams as map[string]string: an unquoted YAML number is refused.
    assert all(isinstance(v, str) for v in params.values()), f"quote every rayStartParams value: {params}"
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() == "true":
            flags.append(f"--{key}")
        elif value.lower() != "false":
            flags.append(f"--{key}={value}")
    return shlex.split(" ".join(flags))


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _unpinned(image: str) -> bool:
    """True when an image reference has no tag or digest, or the tag is `latest`."""
    if "@sha256:" in image:
        return False
    name = image.rsplit("/", 1)[-1]
    return ":" not in name or name.rsplit(":", 1)[1] in ("", "latest")


def _inline_secrets(doc) -> list[str]:
    """Env entries with a secret-looking name that carry a literal value instead of a reference."""
    bad = []
    for env in _walk(doc, "env"):
        for item in env or []:
            by_reference = "value" not in item and item.get("valueFrom", {}).get("secretKeyRef")
            if SECRET_NAME.search(item.get("name", "")) and not by_reference:
                bad.append(item["name"])
    return bad


def _cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", _doc("raycluster.yaml", "RayCluster")["spec"])]
    specs += [(n, _doc(n, "RayJob")["spec"]["rayClusterSpec"]) for n in RAYJOBS]
    return specs


def _entrypoint(name: str) -> list[str]:
    """The command a job manifest runs on the Ray cluster: `python jobs/<x>.py CONFIG ...`."""
    if name in RAYJOBS:
        return shlex.split(_doc(name, "RayJob")["spec"]["entrypoint"])
    command = _submit_container()["command"]
    return command[command.index("--") + 1:]


def _submit_container() -> dict:
    spec = _doc("cronjob-regenerate.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container


def _runtime_envs() -> dict[str, dict]:
    envs = {n: yaml.safe_load(_doc(n, "RayJob")["spec"]["runtimeEnvYAML"]) for n in RAYJOBS}
    (text,) = _doc("cronjob-regenerate.yaml", "ConfigMap")["data"].values()
    envs["cronjob-regenerate.yaml"] = yaml.safe_load(text)
    return envs


# ---------------------------------------------------------------- Ray cluster launcher (cluster.yaml)

def test_cluster_yaml_passes_rays_own_schema():
    validate_config(prepare_config(_cluster_yaml()))  # what `ray up` runs before calling the cloud


@pytest.mark.parametrize("path, typo", [
    ((), ("head_start_ray_commands", "head_start_ray_command")),
    (("available_node_types", "gpu"), ("min_workers", "min_worker")),
    (("docker",), ("pull_before_run", "pull_before_runs")),
])
def test_cluster_yaml_with_a_misspelled_key_fails_the_schema(path, typo):
    cfg = _cluster_yaml()
    node = cfg
    for key in path:
        node = node[key]
    good, bad = typo
    node[bad] = node.pop(good)
    with pytest.raises(jsonschema.ValidationError, match=bad):
        validate_config(prepare_config(cfg))


def test_cluster_yaml_gpu_workers_for_teachers_cpu_workers_for_decoding():
    cfg = _cluster_yaml()
    types = cfg["available_node_types"]
    gpu, cpu = types["gpu"]["resources"], types["cpu"]["resources"]
    assert gpu.get("GPU", 0) >= 1 and gpu.get("CPU", 0) >= 1
    assert cpu.get("GPU", 0) == 0 and cpu.get("CPU", 0) >= 16
    # kdpipe sizes teacher pools from the GPUs present when a job starts and refuses to start with none.
    assert types["gpu"]["min_workers"] >= 1
    assert cfg["head_node_type"] == "head" and types["head"]["resources"].get("GPU", 0) == 0
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_cluster_yaml_head_sets_workers_soft_limit_and_workers_do_not():
    cfg = _cluster_yaml()
    heads = [_ray_start(a) for a in map(_ray_start_args, cfg["head_start_ray_commands"]) if a]
    assert len(heads) == 1 and heads[0]["head"]
    largest = max(t["resources"].get("CPU", 0) for t in cfg["available_node_types"].values())
    assert heads[0]["system_config"]["num_workers_soft_limit"] >= workers_soft_limit(largest)
    workers = [_ray_start(a) for a in map(_ray_start_args, cfg["worker_start_ray_commands"]) if a]
    assert len(workers) == 1 and not workers[0]["head"]
    assert workers[0]["system_config"] is None  # `ray start` refuses system config on a non-head node


def test_cluster_yaml_installs_the_synced_checkout():
    cfg = _cluster_yaml()
    remote = [r for r, local in cfg["file_mounts"].items() if local == "."]
    assert remote, "file_mounts should sync the checkout ('.') to the nodes"
    assert any("pip install" in c and remote[0] in c for c in cfg["setup_commands"])
    assert ".venv" in cfg["rsync_exclude"] and ".git" in cfg["rsync_exclude"]


def test_ray_start_parsing_catches_a_misspelled_option():
    args = _ray_start_args("""ulimit -n 65536; ray start --head --system-config='{"a": 1}'""")
    assert _ray_start(args)["system_config"] == {"a": 1}
    with pytest.raises(click.NoSuchOption, match="system_config"):
        _ray_start(_kuberay_args({"system_config": "'{}'"}))
    # JSON without the shell quotes KubeRay needs: bash strips its double quotes.
    with pytest.raises(click.BadParameter, match="double quotes"):
        _ray_start(_kuberay_args({"system-config": '{"num_workers_soft_limit": 260}'}))


# ---------------------------------------------------------------- Kubernetes manifests (kuberay/)

def test_every_manifest_is_checked():
    assert sorted(p.name for p in KUBE.glob("*.yaml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_kinds(name):
    docs = _docs(name)
    assert [(d["apiVersion"], d["kind"]) for d in docs] == MANIFESTS[name]
    for d in docs:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])


@pytest.mark.parametrize("image, unpinned", [
    ("rayproject/ray:2.60.0-py311-gpu", False), ("rayproject/ray@sha256:" + "0" * 64, False),
    ("rayproject/ray", True), ("rayproject/ray:latest", True), ("localhost:5000/ray", True),
])
def test_unpinned_image_check(image, unpinned):
    assert _unpinned(image) == unpinned


@pytest.mark.parametrize("name", ["cluster.yaml", *JOB_MANIFESTS, "raycluster.yaml"])
def test_images_pinned_to_the_installed_ray(name):
    if name == "cluster.yaml":
        docker = _cluster_yaml()["docker"]
        images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    else:
        images = [i for d in _docs(name) for i in _walk(d, "image")]
    assert images
    for image in images:
        assert not _unpinned(image), f"{name}: pin {image!r} to a tag"
        if image.startswith(RAY_IMAGE + ":"):
            assert image.split(":", 1)[1].startswith(ray.__version__ + "-"), (
                f"{name}: {image!r} is not Ray {ray.__version__}, the Ray that submits")


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in _ray_cluster_specs()])
def test_ray_cluster_spec(name, spec):
    assert spec["rayVersion"] == ray.__version__
    head, groups = spec["headGroupSpec"], spec["workerGroupSpecs"]
    (head_container,) = head["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in head_container["ports"]] == [6379, 8265, 10001]

    def limits(group):
        (container,) = group["template"]["spec"]["containers"]
        return container["resources"]["limits"]

    largest = max(_cpus(limits(g)["cpu"]) for g in groups)
    params = _ray_start(_kuberay_args(head["rayStartParams"]))
    assert params["system_config"]["num_workers_soft_limit"] >= workers_soft_limit(largest)
    for group in groups:
        assert _ray_start(_kuberay_args(group["rayStartParams"]))["system_config"] is None, (
            f"{name}: group {group['groupName']}: system config belongs on the head only")
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    gpu = [g for g in groups if int(limits(g).get("nvidia.com/gpu", 0)) > 0]
    cpu = [g for g in groups if "nvidia.com/gpu" not in limits(g)]
    assert gpu and cpu, f"{name}: needs a GPU group for the teachers and a CPU group for decoding"
    for g in gpu:
        assert g["minReplicas"] >= 1, "kdpipe refuses to generate with no GPU present at the start"
        assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))
        (container,) = g["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits(g)["nvidia.com/gpu"]


@pytest.mark.parametrize("name, spec", [pytest.param(n, s, id=n) for n, s in _ray_cluster_specs()])
def test_ray_containers_get_storage_credentials_from_the_secret(name, spec):
    secret = _doc("secret-example.yaml", "Secret")["metadata"]["name"]
    containers = [c for d in (spec["headGroupSpec"], *spec["workerGroupSpecs"])
                  for c in d["template"]["spec"]["containers"]]
    for c in containers:
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        refs += [v["secretKeyRef"]["name"] for v in _walk(c.get("env", []), "valueFrom")
                 if "secretKeyRef" in v]
        assert secret in refs, f"{name}: container {c['name']} gets no credentials from {secret!r}"


@pytest.mark.parametrize("name", JOB_MANIFESTS)
def test_job_entrypoint_runs_an_existing_job_with_a_config_that_loads(name):
    argv = _entrypoint(name)
    assert argv[0] == "python" and argv[1].startswith("jobs/") and argv[1].endswith(".py")
    config = argv[2]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert (ROOT / config).is_file(), f"{name}: {config} does not exist"
    cfg = load_config(str(ROOT / config), sets)
    assert cfg.ray.address == "auto", f"{name}: the job must join the cluster it runs on"
    for uri in (cfg.cache.root, cfg.train.storage_path):
        assert urlparse(uri).scheme in ("s3", "gs"), f"{name}: {uri!r} is not shared by the nodes"
    assert (ROOT / argv[1]).is_file(), f"{name}: {argv[1]} does not exist"


def test_rayjobs_delete_their_cluster():
    for name in RAYJOBS:
        spec = _doc(name, "RayJob")["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec


def test_cronjob_submits_to_the_raycluster_and_waits():
    cron = _doc("cronjob-regenerate.yaml", "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    container = _submit_container()
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"] and "--no-wait" not in command
    address = urlparse(command[command.index("--address") + 1])
    cluster = _doc("raycluster.yaml", "RayCluster")["metadata"]["name"]
    assert (address.scheme, address.hostname, address.port) == ("http", f"{cluster}-head-svc", 8265)
    runtime_env = pathlib.PurePosixPath(command[command.index("--runtime-env") + 1])
    (mount,) = [m for m in container["volumeMounts"]
                if pathlib.PurePosixPath(m["mountPath"]) == runtime_env.parent]
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = _doc("cronjob-regenerate.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert runtime_env.name in configmap["data"]


@pytest.mark.parametrize("name, env", sorted(_runtime_envs().items()))
def test_job_runtime_env_ships_a_remote_release(name, env):
    assert set(env) <= RUNTIME_ENV_KEYS, f"{name}: unknown runtime_env keys {set(env) - RUNTIME_ENV_KEYS}"
    ray.runtime_env.RuntimeEnv(**env)  # Ray's own type checks
    # KubeRay's submitter pod and the CronJob's have no checkout: the code must be a remote archive.
    url = urlparse(env["working_dir"])
    assert url.scheme in ("https", "s3", "gs") and url.path.endswith(".zip"), env["working_dir"]
    assert env["env_vars"]["PYTHONPATH"] == "."
    secrets = [k for k in env["env_vars"] if SECRET_NAME.search(k)]
    assert not secrets, f"{name}: {secrets} would show in the dashboard; the pods get them from the Secret"
    assert _runtime_envs() == {n: env for n in _runtime_envs()}, "every job should run the same release"


def test_local_runtime_env_loads():
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS
    ray.runtime_env.RuntimeEnv(**env)
    assert env["working_dir"] == "." and ".venv" in env["excludes"]


# ---------------------------------------------------------------- secrets

def test_inline_secret_check_flags_literal_values():
    ref = {"secretKeyRef": {"name": "s", "key": "k"}}
    doc = {"spec": {"containers": [{"env": [
        {"name": "AWS_ACCESS_KEY_ID", "value": "x"},
        {"name": "AWS_DEFAULT_REGION", "value": "us-west-2"},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": ref},
        {"name": "GH_TOKEN", "value": "y", "valueFrom": ref},
    ]}]}}
    assert _inline_secrets(doc) == ["AWS_ACCESS_KEY_ID", "GH_TOKEN"]


@pytest.mark.parametrize("name", [n for n in MANIFESTS if n != "secret-example.yaml"])
def test_no_inline_secrets_in_manifests(name):
    for doc in _docs(name):
        assert _inline_secrets(doc) == [], f"{name}: use valueFrom.secretKeyRef or envFrom"


def test_secret_example_holds_placeholders_only():
    secret = _doc("secret-example.yaml", "Secret")
    assert "data" not in secret, "base64 `data` would hide real values; use stringData placeholders"
    values = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(values)
    for key, value in values.items():
        if SECRET_NAME.search(key):
            assert value == "REPLACE_ME", f"{key} should be a placeholder"


def test_no_credentials_anywhere_in_infra_or_job_configs():
    files = [*INFRA.rglob("*.yaml"), *INFRA.rglob("*.md"), *(ROOT / "jobs" / "configs").glob("*.yaml")]
    for f in files:
        text = f.read_text()
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{f}: an AWS access key id"
        # AWS secret keys: 40 base64 characters, mixed case (a lowercase git sha is fine).
        tokens = re.findall(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", text)
        assert not [t for t in tokens if t != t.lower() and t != t.upper()], f"{f}: a secret-like token"
    cfg = load_config(str(ROOT / "jobs" / "configs" / "cluster-s3.yaml"))
    for options in (cfg.data.storage_options, cfg.cache.storage_options):
        assert not {"key", "secret", "token"} & set(options)



def test_gpu_bench_script_passes_bash_and_uses_options_kdpipe_has():
    """infra/gpu-bench.sh runs once per GPU lease, with no second try: its shell must parse and
    every option it gives `kdpipe bench all` must be one the command accepts."""
    import subprocess
    import sys

    script, bundler = INFRA / "gpu-bench.sh", INFRA / "offline-ray-bundle.sh"
    for path in (script, bundler):
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, path
    assert '"$out/ray-slim.tar.xz"' in bundler.read_text() and '"$bundle/ray-slim.tar.xz"' in script.read_text()
    command = re.search(r"python3 -m kdpipe\.cli bench all (.*?)\n *>", script.read_text(), re.S).group(1)
    used = set(re.findall(r"(--[a-z][a-z-]*)", command))
    assert {"--setup", "--only", "--size", "--repeats", "--out"} <= used
    helped = subprocess.run([sys.executable, "-m", "kdpipe.cli", "bench", "all", "--help"], capture_output=True,
                            text=True, timeout=60)
    offered = set(re.findall(r"(--[a-z][a-z-]*)", helped.stdout))
    assert used <= offered, used - offered
    parts = re.search(r"BENCH_PARTS:-([a-z0-9,]+)", script.read_text()).group(1).split(",")
    from kdpipe.bench.suite import PARTS
    assert sorted(parts) == sorted(PARTS)
