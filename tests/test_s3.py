"""The pipeline on a real S3-compatible server (SeaweedFS on 127.0.0.1, signatures checked):
inputs, teacher checkpoints and the label cache live in the bucket; credentials, interrupted
uploads, the cache commands and the streaming benchmark."""

from __future__ import annotations

import copy
import json

import pytest
import s3fs

from kdpipe import config, storage
from kdpipe.data import digits
from kdpipe.generation import generate
from kdpipe.labels import cache, upkeep

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def s3_cfg(ray_cluster, s3_server, digits_cfg):
    workdir = f"s3://{s3_server['bucket']}/run"
    cfg = config.resolve_paths(config.load_config(None, [f"workdir={workdir}", "data.num_shards=4", "train.epochs=1"]))
    cfg.data.storage_options = cfg.cache.storage_options = s3_server["options"]
    d = cfg.data
    digits.ensure_builtin(d)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server["options"])
    for local, remote in zip(digits_cfg.teachers, cfg.teachers, strict=True):
        fs.put(local.checkpoint, remote.checkpoint)
    return cfg


def test_generate_on_s3_reuses_units_and_keeps_secrets_out(s3_cfg, s3_server):
    first = generate.generate(s3_cfg, progress=False)
    assert first.teacher_forward_passes == 3 * 899
    assert all(r.directory.startswith("s3://") for r in first.teachers.values())
    again = generate.generate(s3_cfg, progress=False)
    assert again.teacher_forward_passes == 0

    fs, root = storage.filesystem(s3_cfg.cache.root, s3_cfg.cache.storage_options)
    for entry in upkeep.list_caches(fs, root):
        assert upkeep.verify_cache(fs, fs._strip_protocol(entry["directory"])) == []
        manifest = fs.cat_file(storage.join(fs._strip_protocol(entry["directory"]), cache.MANIFEST)).decode()
        assert s3_server["secret"] not in manifest and s3_server["key"] not in manifest

    # Training from the bucket: tests/test_s3_inputs.py, once per input format.


def test_wrong_secret_fails_clearly_without_leaking_it(s3_cfg, s3_server):
    cfg = copy.deepcopy(s3_cfg)
    wrong = {**s3_server["options"], "secret": "not-the-secret-abcdef"}
    cfg.data.storage_options = cfg.cache.storage_options = wrong
    with pytest.raises(PermissionError, match=r"access to 's3://kdpipe-test/run/.*' was denied.*credentials") as e:
        generate.generate(cfg, progress=False)
    text = str(e.value) + json.dumps(getattr(e.value, "args", []), default=str)
    assert "not-the-secret-abcdef" not in text and s3_server["secret"] not in text


def test_interrupted_upload_is_never_visible(s3_server):
    """A writer killed in the middle of a (multipart) upload leaves no object under the final name:
    a unit's part file is either whole or absent, and its record is written only after it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"s3://{s3_server['bucket']}/interrupted/part-x.parquet"
    script = ("import sys, json; from kdpipe import storage\n"
              "fs, path = storage.filesystem(sys.argv[1], json.loads(sys.argv[2]))\n"
              "storage.write_bytes(fs, path, b'x' * (600 * 2**20))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, uri, json.dumps(s3_server["options"])])
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server["options"])
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        uploads = fs.call_s3("list_multipart_uploads", Bucket=s3_server["bucket"]).get("Uploads", [])
        if any(u["Key"] == "interrupted/part-x.parquet" for u in uploads):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the upload finished before it could be interrupted"
    fs.invalidate_cache()
    assert not fs.exists(uri)


def test_stream_benchmark_reads_the_same_samples_from_both_sides(ray_cluster, s3_server, tmp_path):
    from kdpipe.bench import streaming

    result = streaming.stream_throughput(str(tmp_path / "local"), f"s3://{s3_server['bucket']}/bench",
                                            s3_server["options"], copies=1, teachers=2, upsample=2, repeats=1)
    assert result["local"]["rows"] == result["remote"]["rows"] == 1797
    assert result["local"]["samples_per_s"] > 0 and result["remote"]["samples_per_s"] > 0
    assert result["ratio_remote_to_local"] == result["remote"]["samples_per_s"] / result["local"]["samples_per_s"]
    assert "1797 samples (16x16 PNG in Parquet)" in streaming.format_stream(result)


def test_cache_commands_with_credentials_from_environment_and_profile(s3_cfg, s3_server, tmp_path):
    """`kdpipe cache` on the bucket as a user runs it: credentials from AWS_* variables, then from
    a named profile; a wrong secret exits 2 naming the URI. No secret reaches the output."""
    import os
    import subprocess
    import sys

    generate.generate(s3_cfg, progress=False)  # the cache exists (reused if already committed)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(RAY_AUTH_MODE="disabled", AWS_ENDPOINT_URL=s3_server["endpoint"], AWS_DEFAULT_REGION="us-east-1",
                AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    root = s3_cfg.cache.root

    def run(env, *args):
        out = subprocess.run([sys.executable, "-m", "kdpipe.cli", "cache", *args, "--root", root],
                             capture_output=True, text=True, timeout=120, env=env)
        assert s3_server["secret"] not in out.stdout + out.stderr
        return out

    env = {**base, "AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]}
    verified = run(env, "verify")
    assert verified.returncode == 0, verified.stderr[-2000:]

    creds = tmp_path / "credentials"
    creds.write_text(f"[kdtest]\naws_access_key_id = {s3_server['key']}\n"
                     f"aws_secret_access_key = {s3_server['secret']}\n")
    listed = run({**base, "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_PROFILE": "kdtest"}, "ls", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert {e["teacher"] for e in json.loads(listed.stdout)["caches"] if e["latest"]} == {"mlp", "cnn", "wide_cnn"}

    missing = run(base, "ls")  # no credentials anywhere
    assert missing.returncode == 2 and "no storage credentials were found" in missing.stderr
    assert "Traceback" not in missing.stderr

    denied = run({**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-000"}, "ls")
    assert denied.returncode == 2 and f"access to '{root}" in denied.stderr and "denied" in denied.stderr
    assert "wrong-secret-000" not in denied.stdout + denied.stderr
