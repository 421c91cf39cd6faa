#!/bin/bash
# Every check that needs a GPU, in one call on a lent card (run from the repository root):
#
#   bash bench/lent_gpu.sh          # writes its logs and the report under $OUT (or bench/out)
#
# 1. the card and the versions; 2. the GPU tests (tests/test_gpu.py, tests/test_gpu_torch.py,
# pytest-xdist where installed); 3. bench/gpu_check.py's timings (its report is rewritten after
# each case, so a cut-short run keeps what it measured); 4. bench/gpu_passes.py (each launch of
# the tensor-aware steps), bench/gpu_overhead.py (per-step host overhead) and
# bench/step_in_backward_memory.py --cuda; 5. bench/offload_gpt2.py (CPUOffload vs torch fused
# AdamW, torchao's and DeepSpeed's offload on GPT-2 small). Each part has its own time limit
# (seconds, from the environment: TESTS_S, CHECK_S, EXTRA_S, OFFLOAD_S) so that one slow part cannot
# starve the others; CHECK_ARGS: more gpu_check.py options (e.g. --optimizers LAMB --no-sweep);
# TESTS_K: a pytest -k expression selecting some of the GPU tests.
# Oracle wheels (lion-pytorch, pytorch-optimizer, schedulefree, torchao) in .whl/
# are installed first when present: the machine cannot reach a registry. Fill .whl/ here
# first with bench/fetch_wheels.sh; it is ignored by git: pass it in the device tool's
# `carry` (["./.whl"]). The default limits
# add up to 570 s, under the tool's 600 s a command.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import sys, cupy, numba, numpy, torch; print("python", sys.version.split()[0],
        "cupy", cupy.__version__, "torch", torch.__version__, "numba", numba.__version__,
        "numpy", numpy.__version__, "cpus", __import__("os").cpu_count())'
    date -u '+%Y-%m-%d %H:%M UTC'
} 2>&1 | tee "$OUT/card.txt"
workers=""
python3 -c 'import xdist' 2>/dev/null && workers="-n 8"
start=$(date +%s)
timeout "${TESTS_S:-200}" python3 -m pytest -q -rfEs -m gpu -p no:cacheprovider $workers \
    --durations=12 tests/test_gpu.py tests/test_gpu_torch.py tests/test_gpu_offload.py \
    ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
    | tee "$OUT/tests.log"
echo "tests: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.log"
start=$(date +%s)
timeout "${CHECK_S:-180}" python3 bench/gpu_check.py --no-tests --report "$OUT/gpu_report.md" \
    $CHECK_ARGS 2>&1 | tee "$OUT/check.log"
echo "gpu_check: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$OUT/check.log"
timeout "${EXTRA_S:-30}" python3 bench/gpu_passes.py 2>&1 | tee "$OUT/passes.log"
timeout "${EXTRA_S:-30}" python3 bench/gpu_overhead.py 2>&1 | tee "$OUT/overhead.log"
timeout "${EXTRA_S:-30}" python3 bench/step_in_backward_memory.py --cuda 2>&1 \
    | tee "$OUT/memory.log"
timeout "${OFFLOAD_S:-100}" python3 bench/offload_gpt2.py --json "$OUT/offload.json" 2>&1 \
    | tee "$OUT/offload.log"
exit 0
