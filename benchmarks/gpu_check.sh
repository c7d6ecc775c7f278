#!/usr/bin/env bash
# What to run on a CUDA machine (issue 24; docs/BENCHMARKS.md records what it printed): the CUDA tests, then
# benchmarks/vs_llamacpp.py on the GPU over SmolLM2's config at random weights (135m) and over a 1B-class model
# from the same config, side by side with llama-server built with CUDA where PEER holds one (else ours alone).
# Each step has its own time limit and its own log under OUT, so one failing step still leaves the others' results.
#
#   bash benchmarks/gpu_check.sh OUT [PEER] [CONFIG_DIR] [PROMPTS_JSON]
#       PEER: a folder laid out as `make peer` lays out .peer (bin/llama-server and the converters' sources)
#       CONFIG_DIR, PROMPTS_JSON: vs_llamacpp.py's --model-dir and --prompts (default: the packaged assets)
#       env: PYTHON (python3), ROUNDS (5), TEST_TIMEOUT (300 s), BENCH_TIMEOUT (300 s per model), SIZES (135m 1b),
#            EAGER_SIZES (135m: those sizes also run our servers without CUDA graphs, side by side),
#            BAIL (1: no benchmark after a failed test; 0: run them anyway),
#            DEVICE (cuda; DEVICE=cpu ADALORA_TEST_DEVICE=cpu is a dry run of this script on a machine without one)
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT [PEER] [CONFIG_DIR] [PROMPTS_JSON]}
PEER=${2:-.peer}
CONFIG=${3:-}
PROMPTS=${4:-}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
# the CPU halves of these tests are references only: PyTorch's kernels, no native build
status=0
ADALORA_NATIVE=0 timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 |
    tee "$OUT/test_cuda.log" | tail -5 || status=1
if [ "$status" != 0 ] && [ "${BAIL:-1}" = 1 ]; then
    grep -E "^(FAILED|ERROR)|Error" "$OUT/test_cuda.log" | head -20
    echo "a CUDA test failed: no benchmark (BAIL=0 runs them anyway)"
    exit $status
fi
peer=(--peer "$PEER")
[ -x "$PEER/bin/llama-server" ] || { peer+=(--no-peer); echo "no llama-server under $PEER: ours alone"; }
for size in ${SIZES:-135m 1b}; do
    args=(--device "$DEVICE" --random-weights "$size" --rounds "${ROUNDS:-5}" --ours float32 bfloat16 "${peer[@]}")
    case " ${EAGER_SIZES-135m} " in *" $size "*) args+=(--eager-too) ;; esac
    [ -n "$CONFIG" ] && args+=(--model-dir "$CONFIG")
    [ -n "$PROMPTS" ] && args+=(--prompts "$PROMPTS")
    timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/vs_llamacpp.py "${args[@]}" 2>&1 | grep -v "it/s]" |
        tee "$OUT/vs_llamacpp-$size.log" | tail -12 || status=1
    cp benchmarks/results/vs_llamacpp-"$DEVICE"-random-"$size".json "$OUT/" 2>/dev/null
    for log in "$PEER"/work/*.log; do  # the end of each server's own log
        [ -f "$log" ] && { echo "== $size: $log"; tail -30 "$log"; } >>"$OUT/servers.log"
    done
done
exit $status
