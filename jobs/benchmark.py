"""Ray job entry point: kdpipe's benchmark suite on the cluster it runs in.

    kdpipe submit benchmark jobs/configs/digits.yaml --wait          # `kdpipe bench all` on the cluster
    ray job submit --working-dir . -- python jobs/benchmark.py student --repeats 3 --json
With a config file first (what `kdpipe submit` passes), it joins the config's Ray cluster
(`--set ray.address=auto`) and runs `kdpipe bench all --json` in <workdir>/bench, keeping the
result in <workdir>/bench/result.json; otherwise its arguments are those of `kdpipe bench`
(storage, stream, student, quality, regenerate, load, all).
"""

import sys

from kdpipe.cli import main, run_command


def run(argv: list[str]) -> int:
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        return main(["bench", *argv])
    return run_command("benchmark", lambda: _run_all(argv))  # a bad config: its message, exit 2


def _run_all(argv: list[str]) -> int:
    from kdpipe import runtime, storage
    from kdpipe.config import load_config

    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    cfg = load_config(argv[0], overrides)
    runtime.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)  # every benchmark then runs on this cluster
    bench = storage.join(cfg.workdir, "bench")  # the result stays there too, written after every part
    return main(["bench", "all", "--workdir", bench, "--out", storage.join(bench, "result.json"), "--json"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
