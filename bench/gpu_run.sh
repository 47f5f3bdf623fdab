#!/usr/bin/env bash
# The one GPU call: build, the GPU tests, every benchmark, all results as JSON (and logs) under $OUT.
# Made for a GPU host with torch, Triton and nvcc already installed and no network:
#
#   OUT=/path/to/out bash bench/gpu_run.sh
#
# Each step has its own time limit (about 9.5 minutes in all, within one 10-minute device call) and the
# script goes on after a failed step, so one failure does
# not cost the rest of the run; $OUT/steps.json records every step's status and duration. Copy
# $OUT/*.json into bench/results/ (tev_cuda, decode_cuda, mlra_<gpu>) and run
# `python bench/report.py --readme README.md --docs docs/benchmarks.md` to regenerate the README and docs tables from them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export MLRA_AUTOTUNE=${MLRA_AUTOTUNE:-0}  # one config per kernel: minutes go to measuring, not compiling
steps=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "==> $name" | tee -a "$OUT/run.log"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/$name.log" | tee -a "$OUT/run.log"
    steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

step device 20 nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv
step build 180 env TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)" \
    python -m pip install --no-build-isolation --no-deps -e .
# The compile gates are CPU-side checks (cubins without a GPU); here the kernels run for real.
step gpu-tests 100 python -m pytest -q -x -p no:cacheprovider tests/ops tests/nn tests/models/test_gpt2.py \
    --ignore=tests/ops/mlra/test_kernel_compile.py --ignore=tests/ops/mlra/test_decode_kernel_compile.py \
    --junitxml="$OUT/gpu-tests.xml"
step bench-tev 45 python bench/bench_tev.py --device cuda --max-elems 1e9 --out "$OUT"
step bench-decode 60 python bench/bench_decode.py --device cuda --out "$OUT"
step bench-mlra 170 python bench/bench_mlra.py --models small --T 2048 8192 --dtypes bf16 --out-dir "$OUT"

printf '[%s]\n' "$(IFS=,; echo "${steps[*]}")" >"$OUT/steps.json"
cat "$OUT/steps.json"
