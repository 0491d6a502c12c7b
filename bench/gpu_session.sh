#!/usr/bin/env bash
# Everything only a GPU can show, in one call of at most 10 minutes (the lent H100/H200 runs one
# command at a time): kernel correctness on hardware, the no-sync test, attention timings and
# eager-vs-compiled steps of the Wan 2.1 1.3B architecture. Results land in $OUT (or
# bench/results/ when OUT is unset); copy them to bench/results/ and commit them.
#
# The lent machine has torch and triton but not diffusers/omegaconf: download their wheels here
# first (see the device tool's README: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl diffusers==0.42.0 omegaconf antlr4-python3-runtime==4.9.3
# imageio imageio-ffmpeg`), then run with `.whl` carried:
#     bash bench/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
PY=${PY:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_session_device.txt"

step() {  # step SECONDS NAME COMMAND...: one step, its log in $OUT, never longer than SECONDS
    local seconds=$1 name=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout "$seconds" "$@" >"$OUT/gpu_session_$name.log" 2>&1
    echo "   exit $?; last lines:"
    tail -n 5 "$OUT/gpu_session_$name.log"
}

# 1. Kernels against the float64 reference on the GPU, GPU-only tests (sync debug mode included).
step 180 tests $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_compile.py tests/test_psa_budget.py \
    -m "gpu or not slow" -k "gpu or cuda or kernel or steady_state"
# 2. PSA planning (the estimate on its Triton kernel): budget mode against quantile and threshold.
step 50 psa_planning $PY bench/psa_planning.py --device cuda --tokens 32768 --out "$OUT/psa_planning_gpu.json"
# 3. Attention: dense SDPA, FlexAttention, torch and Triton backends at 16K-75K tokens.
step 130 attention $PY bench/attention_gpu.py --budget-s 100 --out "$OUT/attention_gpu.json"
# 4. One denoising step of Wan 2.1 1.3B at 480p per processor, eager and compiled.
step 200 wan_e2e $PY bench/wan_e2e_gpu.py --steps 3 --warmup 2 --compile --out "$OUT/wan_e2e_gpu.json"
ls -la "$OUT"
