#!/usr/bin/env bash
# One call of a 15-minute GPU lease: bash benchmarks/gpu_lease.sh CALL (1 to 4), on the GPU machine,
# from the checkout's root, each call carrying its part of .gpu_carry/ (benchmarks/gpu_carry.sh
# packs them here and prints the four calls). The calls follow one another within the machine's
# 30 s of warmth (it keeps /tmp/carry between them) and split the suite so that the stages that
# need DALI run once its last part has arrived:
#   1  loss: its GPU tests and the sweep at 2N = 4,096 / 16,384 / 65,536, D = 128, fp32 and bf16
#   2  augment: its GPU tests and both recipes' benchmarks
#   3  e2e fed by the PIL DataLoader (no DALI needed)
#   4  data (every loader next to the PIL baseline), then e2e fed by DALI
# Each stage stops itself before the call's limit (the limits below, 875 s in all with the
# machine's start, within the lease's 900; on the H100 of 2026-11-26 the start took 30 s, call 1
# 90 s, the augmentation tests 50 s); the logs and the JSON records come back in $OUT. Each call's
# timeout_s (its limits plus 10 s) is in the list benchmarks/gpu_carry.sh prints.
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?usage: gpu_lease.sh CALL (1-4)}
case $call in 1|2|3|4) ;; *) echo "gpu_lease.sh: CALL is 1, 2, 3 or 4, got '$call'" >&2; exit 2 ;; esac
: "${OUT:?gpu_lease.sh runs on the GPU machine, where the device tool sets OUT}"
# shellcheck source=/dev/null
source benchmarks/gpu_env.sh
suite() {   # suite SECONDS STAGE...: gpu_suite.sh's stages, stopped after SECONDS
    local seconds=$1
    shift
    timeout -k 5 "$seconds" bash benchmarks/gpu_suite.sh python3 "$@" 2>&1 | tee -a "$OUT/lease_call$call.log"
}
case $call in
    1) LOSS_ARGS="--sizes 4096 16384 65536 --dims 128 --dtypes float32 bfloat16 --impls triton torch" suite 120 loss ;;
    2) suite 120 augment ;;
    3) GPU_TESTS=0 E2E_LOADERS=pil E2E_TIMEOUT=150 suite 165 e2e ;;
    4) GPU_TESTS=0 LOADER_TIMEOUT=80 suite 250 data
       GPU_TESTS=0 E2E_LOADERS=dali E2E_TIMEOUT=150 suite 170 e2e ;;
esac
gpu_results
