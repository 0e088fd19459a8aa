#!/usr/bin/env bash
# The attention measurements in one device call: GPU tests of the attention ops, the Gluon kernel's variant sweep
# against the Triton kernel, the prologue kernels one by one, and the ops against cuDNN at the two Wan shapes
# (every table in docs/kernels-attention.md comes from these commands).
# Usage, from the repo root: examples/attention_gpu_bench.sh OUT
set -uo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_sage_attention_gluon.py tests/test_attention_ops.py \
  tests/test_linear_stats_gluon.py 2>&1 \
  | tail -5 | tee "$out/gpu_tests.log"
repo=$(pwd)
cd /tmp || exit 1   # run the installed package, not the source tree's top-level kernels/ folder
timeout 300 python3 -m turbocompile.kernels.sage_attention_gluon --out "$out/variants" 2>&1 | tee "$out/variants.log" \
  | grep -v "^INFO"
timeout 200 python3 -m turbocompile.kernels.sla --prologue --out "$out/prologue" 2>&1 | tee "$out/prologue.log" \
  | grep -v "^INFO"
for shape in 1.3B@480p 14B@720p; do
  name=${shape//@/_}
  timeout 200 python3 -m turbocompile.kernels.sage_sla --bench --quick --only sage_sla --no-flex --topk 0.1 \
    --shapes "$shape" --profile --out "$out/sla_$name" 2>&1 | grep " ms \|^--" | tee "$out/sla_$name.log"
done
timeout 200 python3 -m turbocompile.kernels.sage_sla --bench --quick --only sage_attention --shapes 1.3B@480p \
  --out "$out/dense_1.3B_480p" 2>&1 | grep " ms " | tee "$out/dense_1.3B_480p.log"
cd "$repo" || exit 1
