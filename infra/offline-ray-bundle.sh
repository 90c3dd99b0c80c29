#!/usr/bin/env bash
# Builds a slim offline bundle of Ray and the few packages a CUDA Python 3.12 image usually lacks,
# for a GPU host that has PyTorch but no package index (infra/gpu-bench.sh runs kdpipe's benchmarks
# there). PYTHON_VERSION (default 3.12) is the host's Python. Output: DIR (default .gpu/) with
#   ray-slim.tar.xz   the ray wheel unpacked without ray/jars, rllib, serve, llm (~30 MiB)
#   *.whl             jsonschema & co, pydantic, tensorboardX, webdataset (~3.5 MiB)
# On the host:  mkdir -p /tmp/site && tar -C /tmp/site -xJf DIR/ray-slim.tar.xz &&
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl &&
#   export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH
# Seen working: Ray Data GPU actor pool + Ray Train GPU worker on an H100 host with torch 2.11, py3.12.
set -euo pipefail
out=${1:-.gpu}
ray_version=${RAY_VERSION:-$(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
plat=(--only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/w" "ray==$ray_version"
mkdir -p "$work/x"
unzip -q "$work"/w/ray-*.whl -d "$work/x"
rm -rf "$work"/x/ray/{jars,rllib,serve,llm}
tar -C "$work/x" -cf - . | xz -T0 -6 > "$out/ray-slim.tar.xz"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" \
  jsonschema jsonschema-specifications referencing rpds-py pydantic annotated-types \
  typing-inspection tensorboardX webdataset braceexpand
# pydantic pins its core exactly: fetch the one it names
core=$(unzip -p "$out"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core *\(==[^ ;]*\).*/\1/p' | head -n1)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" "pydantic-core$core"
du -sh "$out"
