#!/usr/bin/env bash
# One call of a 15-minute GPU lease: bash benchmarks/gpu_lease.sh CALL (1 to 4), on the GPU machine,
# from the checkout's root, each call carrying its part of .gpu_carry/ (benchmarks/gpu_carry.sh
# packs them here and prints the four calls). The calls follow one another within the machine's
# 30 s of warmth (it keeps /tmp/carry between them); DALI is installed once its last part arrives
# (call 4), so the plan puts issue 5's questions there and at the start:
#   1  e2e: SimCLR ResNet-50 fed by the PIL DataLoader (does the step wait for data?)
#   2  loss: the sweep at 2N = 16,384, D = 128, bf16 and fp32 (its GPU tests: gpu_suite.sh loss;
#      the kernels are unchanged since they passed on the H100)
#   3  the tests of the compiled kernels and of their callers: loss, fused augmentation, k-means,
#      trainer (run 6: 204 tests in 68 s with 8 processes; they found a test that pinned the CPU)
#   4  DALI's GPU tests and every loader's GPU-against-CPU pixels, DALI's decoder alone at three
#      hardware-decoder shares (is the H100's JPEG decoder in use?), the loaders' comparison (every
#      loader next to the PIL baseline), then e2e fed by DALI
# Each stage stops itself before the call's limit (the limits below, 815 s; with the machine's
# start, the calls' overhead and DALI's install about 900 s at worst, the lease's 900; run 6 held the
# machine 634 s for the same work). A reply with
# "warm": false means a fresh machine without the parts carried before (run 5: after 40 s between
# calls 1 and 2): carry them again before call 4 (gpu_env.sh counts the parts it has). Seen on the
# H100 of 2026-11-26 (run 4): the start 30 s, a call's overhead 7 s, installing DALI about 25 s,
# the loss tests 60 s, an e2e run 115 s, each loader of the comparison about 50 s (run 6: 30 s, the
# whole comparison with DALI's decoder about 190 s). The logs and
# the JSON records come back in $OUT (the data benchmark writes its record after each loader).
# Each call's timeout_s (its limits plus 10 s) is in the list benchmarks/gpu_carry.sh prints.
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
gpu_tests() {   # gpu_tests SECONDS PYTEST_ARG...: tests with the compiled kernels, stopped after SECONDS
    local seconds=$1
    shift
    timeout -k 5 "$seconds" env -u TRITON_INTERPRET python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 \
        | tee -a "$OUT/lease_call$call.log"
}
case $call in
    1) GPU_TESTS=0 E2E_LOADERS=pil E2E_TIMEOUT=150 suite 165 e2e ;;
    2) timeout -k 5 60 env -u TRITON_INTERPRET python3 benchmarks/loss.py --device cuda --sizes 16384 --dims 128 \
           --dtypes bfloat16 float32 --impls triton torch 2>&1 | tee -a "$OUT/lease_call$call.log" ;;
    # shellcheck disable=SC2086
    3) gpu_tests 120 $PYTEST_ARGS tests/test_losses.py tests/test_augment_fused.py tests/test_cluster.py \
           tests/test_train.py ;;
    4) gpu_tests 70 tests/test_data_dali.py tests/test_loaders.py::test_gpu_decoding_matches_the_cpu
       GPU_TESTS=0 LOADER_TIMEOUT=70 suite 250 data
       GPU_TESTS=0 E2E_LOADERS=dali E2E_TIMEOUT=140 suite 150 e2e ;;
esac
gpu_results
