#!/usr/bin/env bash
# Run the measured benchmarks on a GPU machine that has torch + triton but maybe not diffusers.
# Usage (from the repo root): examples/gpu_bench.sh OUTDIR "e2e --model wan2.1-t2v-1.3b --resolution 480p" ...
# Each quoted argument after OUTDIR is one `turbocompile bench` invocation; results land in OUTDIR as
# <n>.json / <n>.md / <n>.log. Wheels carried in .whl/ (diffusers, importlib_metadata) are installed first.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
i=0
for args in "$@"; do
  i=$((i + 1))
  echo "=== turbocompile bench $args"
  # shellcheck disable=SC2086
  python3 -m turbocompile.cli bench $args --json "$out/$i.json" --markdown "$out/$i.md" 2>&1 | tee "$out/$i.log" | tail -40
done
