#!/usr/bin/env bash
# Timing rows on one GPU (written for the H200 device machine; whole script < 8 minutes):
# the BraTS-config SegResNet (blocks_down 1,2,2,4, init_filters 16, 4 in, 3 out, random weights, 4.7 M params)
# quantized from one synthetic 4 x 128^3 volume at W2A2 (first/last layer W8, float input) by
#   ours (eq_default, 200 ADMM iterations/layer), Brevitas GPTQ, Brevitas learned rounding (200 iterations/layer).
# Each method runs in its own process under its own time limit, so one slow method cannot eat the others' time.
# Output: one JSON per method + a log in $OUT (the device tool's output folder) or benchmarks/out/.
#
# The GPU machine has NO package registry; its python3 (3.12, x86_64) already has torch, numpy, accelerate,
# tqdm, matplotlib, packaging, sympy, setuptools, typing-extensions. The rest comes as wheels from .whl/ at the
# repo root (ignored by git). Fill it ONCE on a machine with PyPI, from the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl monai==1.6.1 brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3 \
#       fire==0.7.1 termcolor==3.3.0 nibabel==5.4.2 pytorch-ignite==0.5.5
#
# (all pure-Python wheels, about 6.3 MB; keep one version of each). Then run it on the device machine with
# .whl carried, e.g. the device tool's  run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=540).
# Overrides: SIZE=96 (volume side), ITERS=200 (ours), LR_ITERS=200 (learned rounding), SETTING=W2A2,
# LIMIT_OURS / LIMIT_GPTQ / LIMIT_LR (seconds per method).
set -u
cd "$(dirname "$0")/.."

SIZE=${SIZE:-128}
ITERS=${ITERS:-200}
LR_ITERS=${LR_ITERS:-200}
SETTING=${SETTING:-W2A2}
LIMIT_OURS=${LIMIT_OURS:-170}
LIMIT_GPTQ=${LIMIT_GPTQ:-110}
LIMIT_LR=${LIMIT_LR:-140}
RESULTS=${OUT:-benchmarks/out}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: fill it first (see the top of this script)" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 3; }
export PYTHONPATH=/tmp/site:$PWD

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, monai, brevitas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| monai', monai.__version__, '| brevitas', brevitas.__version__)"
} 2>&1 | tee "$RESULTS/gpu_timing.log"

run_one() {  # method limit
    local method=$1 limit=$2
    echo "== $method (limit ${limit}s)" | tee -a "$RESULTS/gpu_timing.log"
    timeout -k 5 "$limit" python3 benchmarks/compare.py timing --device cuda --size "$SIZE" --setting "$SETTING" \
        --iterations "$ITERS" --lr_iterations "$LR_ITERS" --methods "$method" \
        --out "$RESULTS/timing_${method}.json" 2>&1 | grep -v -i "warn" | tee -a "$RESULTS/gpu_timing.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "$method: stopped at the ${limit}s limit (not finished)" | tee -a "$RESULTS/gpu_timing.log"
    return 0
}

SECONDS=0
run_one eq_default "$LIMIT_OURS"
run_one brevitas_gptq "$LIMIT_GPTQ"
run_one brevitas_learned_round "$LIMIT_LR"
echo "total ${SECONDS}s" | tee -a "$RESULTS/gpu_timing.log"
