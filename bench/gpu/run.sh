#!/usr/bin/env bash
# The one GPU run of the fused KD kernels (issue 14): install, GPU tests, benchmark matrix, profile.
#
# Where: the H200 machine (Python 3.12 `python3`, torch 2.11 + CUDA 13, triton 3.6, no network), from the
# repository root, with the ignored folder .whl/ carried (liger-kernel and setuptools wheels, downloaded here by
# the pip line in docs/kernels.md "GPU run"). Results go to $OUT (or the first argument):
#   gpu_env.txt        GPU name, driver, torch / CUDA / triton versions
#   gpu_tests.log      pytest -m gpu (every divergence, masks, domain sums, padded teacher vocabulary,
#                      soft-cap, bf16 and fp32, int64 offsets, all three variants; Liger vs our JSD)
#   gpu_kd_loss.jsonl  the benchmark rows (bench/gpu/kd_loss_matrix.py documents the schema)
#   gpu_bench.log      its progress lines
#   gpu_profile.txt    CUDA kernel time tables at the headline shape (where the time goes)
#   gpu_summary.md     the results as a markdown table (bench/gpu/summarize.py)
#   gpu_run.log        this script's timeline
#
# Time budget: 8 minutes in all (the device tool's call limit is 10, device time 15 with start-up):
#   install ~20 s | tests <= TESTS_S (180 s; 58 tests, mostly Triton compiles and float64 references) |
#   benchmark: what is left minus a margin (~255 s); the matrix starts no new shape after its budget (60 s
#   less) and the profile takes ~20 s.
#
# CPU rehearsal (no GPU): `PY=.venv/bin/python bash bench/gpu/run.sh --dry-run /tmp/gpu-dry` collects the GPU
# tests (--collect-only) and runs the matrix at tiny shapes under the Triton interpreter; nothing is installed.
set -u
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; export TRITON_INTERPRET=1; fi
OUT="${OUT:-${1:-bench/results/gpu}}"
PY="${PY:-python3}"
TOTAL_S="${TOTAL_S:-480}"
TESTS_S="${TESTS_S:-180}"
MARGIN_S=25
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[run.sh +$((SECONDS - T0))s] $*" | tee -a "$OUT/gpu_run.log"; }
log "start: OUT=$OUT dry_run=$DRY_RUN python=$($PY -c 'import sys; print(sys.version.split()[0])')"

# 0. what this machine is
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} >"$OUT/gpu_env.txt"
cat "$OUT/gpu_env.txt" | tee -a "$OUT/gpu_run.log"

# 1. install: the carried wheels, then the project without dependencies (keeps the machine's torch)
if [ "$DRY_RUN" = 0 ]; then
    if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/liger_kernel-*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        log "liger-kernel wheel installed into /tmp/site"
    else
        log "no .whl/liger_kernel-*.whl carried: the liger provider will be skipped"
    fi
    BUILD_SITE=""
    if ls .whl/setuptools-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/build-site \
            .whl/setuptools-*.whl && BUILD_SITE=/tmp/build-site
    fi
    # no network: no build isolation; the C++ sampler extension is not needed for the kernels
    if PYTHONPATH="${BUILD_SITE:+$BUILD_SITE:}${PYTHONPATH:-}" DDK_FAST_BUILD_EXT=0 \
        $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/gpu_run.log" 2>&1; then
        log "installed: pip install --no-deps -e ."
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        log "pip install -e . failed (see above); running from the checkout with PYTHONPATH=$PWD"
    fi
fi
$PY -c "import ddk_fast, liger_kernel" >/dev/null 2>&1 && log "liger_kernel imports" ||
    log "liger_kernel does not import (the liger provider will say why)"

# 2. GPU tests (the benchmark's pytest-benchmark GPU test is left to step 3)
# -v: one line per test as it finishes, so a log cut by the timeout still says what passed
TEST_ARGS=(-m gpu tests bench/bench_kd_loss.py -k "not test_kd_loss_gpu" -p no:cacheprovider -v -rs
    --durations=20)
if [ "$DRY_RUN" = 1 ]; then TEST_ARGS+=(--collect-only); fi
log "pytest ${TEST_ARGS[*]} (timeout ${TESTS_S}s)"
# default blocks in the tests (the tuner's candidates get their own test), so ~50 tests compile one config each
DDK_FAST_KD_AUTOTUNE=0 timeout "$TESTS_S" $PY -m pytest "${TEST_ARGS[@]}" >"$OUT/gpu_tests.log" 2>&1
log "tests exit code $? (124 = timed out); last lines:"
tail -n 5 "$OUT/gpu_tests.log" | tee -a "$OUT/gpu_run.log"

# 3. benchmark matrix in what is left (the matrix starts no new shape after its budget; the last shape and
#    the profile run past it by up to ~60 s)
LEFT=$((TOTAL_S - (SECONDS - T0) - MARGIN_S))
BUDGET=$((LEFT - 60))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
MATRIX_ARGS=(--out "$OUT" --budget-s "$BUDGET")
if [ "$DRY_RUN" = 1 ]; then MATRIX_ARGS+=(--dry-run --plan 1 --reps 3); fi
log "benchmark: python -m bench.gpu.kd_loss_matrix ${MATRIX_ARGS[*]} (timeout ${LEFT}s)"
timeout "$LEFT" $PY -m bench.gpu.kd_loss_matrix "${MATRIX_ARGS[@]}" >"$OUT/gpu_bench.log" 2>&1
log "benchmark exit code $? (124 = timed out: rows written so far are kept)"
tail -n 3 "$OUT/gpu_bench.log" | tee -a "$OUT/gpu_run.log"

# 4. summary table
$PY -m bench.gpu.summarize "$OUT/gpu_kd_loss.jsonl" >"$OUT/gpu_summary.md" 2>&1
log "done in $((SECONDS - T0)) s"
cat "$OUT/gpu_summary.md"
