#!/usr/bin/env bash
# `kdpipe bench all` on one CUDA host that has PyTorch but no package index: the GPU figures of the
# README's Performance table, in one command that fits a short lease.
#
#   where pip works:   bash infra/offline-ray-bundle.sh .gpu   # Ray (slim), webdataset & co, ~33 MiB
#   on the GPU host:   bash infra/gpu-bench.sh .gpu OUT_DIR               # from the repository's root
#
# It unpacks the bundle into $KDPIPE_SITE (default /tmp/site) and runs kdpipe from this checkout,
# on the image's own torch, torchvision, pyarrow, fsspec, scikit-learn and pyyaml (nothing else is
# installed). The suite runs with the large setup (ResNet-50, ViT-B/16, ConvNeXt-T at 224 px, bf16
# autocast, channels-last; the student on the GPU) under a time limit, and OUT_DIR gets:
#   gpu.txt         the GPU (nvidia-smi), Python, torch, CUDA and Ray versions
#   bench-all.json  the result, rewritten after every part: a run cut short keeps what it measured
#   bench-all.txt   the result as a table (once every part has run; `kdpipe bench show` prints
#                   the JSON's, whole or cut short, and this script does at its end)
#   bench-all.log   progress, warnings and any part's traceback
# Settings: BENCH_PARTS (default p1,p2,p3,p6,p7,p4: the order they run in), BENCH_SIZE (1),
# BENCH_REPEATS (2), BENCH_LIMIT_S (540: the suite is interrupted then; its JSON stays). On 2 CPU cores the
# small setup takes ~10 min, P3 half of it.
# Tried on a CPU with a bundle built for its Python and a venv of the image's packages only.
set -euo pipefail
bundle=${1:-.gpu}
out=${2:-${OUT:-bench-gpu}}
site=${KDPIPE_SITE:-/tmp/site}
[ -f "$bundle/ray-slim.tar.xz" ] || { echo "gpu-bench: no $bundle/ray-slim.tar.xz; build it with infra/offline-ray-bundle.sh $bundle" >&2; exit 2; }
mkdir -p "$site" "$out"
started=$(date +%s)
tar -C "$site" -xJf "$bundle/ray-slim.tar.xz"
python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "$bundle"/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
echo "gpu-bench: installed in $(( $(date +%s) - started )) s" >&2
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
  python3 -c 'import sys, torch, ray; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, torch.cuda.is_available(), "| ray", ray.__version__)'
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
rc=0
timeout --signal=INT --kill-after=60 "${BENCH_LIMIT_S:-540}" \
  python3 -m kdpipe.cli bench all --setup large --only "${BENCH_PARTS:-p1,p2,p3,p6,p7,p4}" \
    --size "${BENCH_SIZE:-1}" --repeats "${BENCH_REPEATS:-2}" --out "$out/bench-all.json" \
  > "$out/bench-all.txt" 2> "$out/bench-all.log" || rc=$?
[ "$rc" = 0 ] || { echo "gpu-bench: exit $rc (124: the time limit); the log's end:"; tail -n 30 "$out/bench-all.log"; }
[ -f "$out/bench-all.json" ] && python3 -m kdpipe.cli bench show "$out/bench-all.json" || true
echo "gpu-bench: $(( $(date +%s) - started )) s in all"
exit "$rc"
