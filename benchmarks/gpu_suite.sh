#!/usr/bin/env bash
# GPU suite. Run from anywhere: bash benchmarks/gpu_suite.sh [python] [stage ...]
# Stages: loss augment train data e2e methods pretext clustering (default: all, in that order).
# Leaves JSON under benchmarks/results/ and logs under $LOGS (default benchmarks/results/logs/).
# Environment: SAMPLE (default ../shared/data/imagenet-sample), PYTEST_ARGS (e.g. "-n 8" where
# pytest-xdist is installed), GPU_TESTS=0 (the benchmarks without the stages' tests), LOSS_ARGS (the
# loss benchmark's sweep, default the full one), LOADER_TIMEOUT (seconds each loader of stage data may
# take, default 300), E2E_LOADERS (stage e2e's loaders, default "pil dali"), E2E_TIMEOUT (seconds
# each e2e run may take, default 360): a short lease sets these to fit. On a
# bare GPU machine, `source benchmarks/gpu_env.sh` first (benchmarks/gpu_carry.sh says how).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python}}"
shift || true
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(loss augment train data e2e methods pretext clustering)
LOGS="${LOGS:-benchmarks/results/logs}"
SAMPLE="${SAMPLE:-../shared/data/imagenet-sample}"
PYTEST_ARGS="${PYTEST_ARGS:-}"
LOSS_ARGS="${LOSS_ARGS:---sizes 1024 2048 4096 8192 16384 32768 65536 131072 262144 --dims 128 256 --dtypes bfloat16 float32}"
mkdir -p "$LOGS"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_suite.sh needs a CUDA GPU')"
"$PY" -c "import fastssl.kernels.info_nce" || { echo "gpu_suite.sh: fastssl.kernels does not import" >&2; exit 1; }
"$PY" - <<'PYEOF'
import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF

# gpu_pytest LOG FILE...: the tests on the GPU (compiled Triton kernels, not the interpreter).
gpu_pytest() {
    local log=$1
    shift
    [ "${GPU_TESTS:-1}" != 0 ] || return 0
    # shellcheck disable=SC2086
    env -u TRITON_INTERPRET "$PY" -m pytest "$@" -q -rs $PYTEST_ARGS 2>&1 | tee "$LOGS/$log" || true
}

# The SimCLR ResNet-50 end-to-end runs read an ImageFolder of the sample linked until it holds
# 84,000 JPEGs (benchmarks/data.py image_folder): one epoch holds every batch of 256 they read
# (with 16 workers the data and train stages each take 35 warm-up and 128 timed batches:
# benchmarks/data.py in_flight_batches, burst_batches), so no epoch boundary, where the loaders
# pause, falls among them.
photos_folder() {
    "$PY" - "$SAMPLE" 84000 <<'PYEOF'
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import data
print(data.image_folder(Path(sys.argv[1]), Path(tempfile.mkdtemp()), int(sys.argv[2]))[0])
PYEOF
}

# budget_runs NAME PATTERN LINES METHOD...: every method with the demo's settings (its per_method
# section included) for the same fixed budget (20 epochs, batch 256) on a larger embedded dataset
# at 32 px and at 96 px; the last LINES lines matching PATTERN of each run (images/s, pretext
# lines, the logged fitted-batch-norm baseline and the final kNN line) go to $LOGS/NAME_gpu.log,
# its metrics to runs/gpu_NAME/.
budget_runs() {
    local name=$1 pattern=$2 lines=$3
    shift 3
    for px in 32 96; do
        for method in "$@"; do
            echo "== $method ${px}px" | tee -a "$LOGS/${name}_gpu.log"
            "$PY" -m fastssl train --config configs/demo.yaml method.name="$method" train.device=cuda \
                data.embedded_train_per_class=2000 data.embedded_val_per_class=200 data.embedded_image_size=$px \
                augment.size=$px method.dino.local_size=$((px / 2)) data.workers=8 train.epochs=20 \
                train.batch_size=256 run.dir="runs/gpu_${name}/${method}_${px}px" 2>&1 \
                | grep -E "$pattern" | tail -"$lines" | tee -a "$LOGS/${name}_gpu.log"
        done
    done
}

# SimCLR ResNet-50, 224 px, bf16, 256 images per GPU, on the photos in FOLDER, fed by LOADER: the full
# pipeline against the same step on a resident batch (pipeline efficiency), plus model FLOPs
# utilisation.
simclr_resnet50_run() {
    local loader=$1 folder=$2
    # Stopped after E2E_TIMEOUT seconds: a stalled loader must not take the other runs' time.
    timeout -k 10 "${E2E_TIMEOUT:-360}" "$PY" benchmarks/throughput.py --config configs/simclr_resnet50_imagenet.yaml --stage all --steps 10 --warmup 3 \
        data.train="$folder" data.val="$folder" data.loader="$loader" data.workers=16 train.batch_size=256 \
        train.device=cuda train.precision=bf16 2>&1 | tee "$LOGS/simclr_resnet50_${loader}_gpu.log" \
        || echo "gpu_suite.sh: the $loader run stopped or failed (log above)" >&2
}

# ---------------------------------------------------------------- stage: loss (InfoNCE / NT-Xent)
stage_loss() {
    # 1. correctness: the loss tests on the GPU (the GPU-only checks: triton vs chunked beyond the
    #    reference, O((R+C)D) memory, inductor + autocast, CUDA-graph capture).
    gpu_pytest test_losses_gpu.log tests/test_losses.py
    # 2. benchmark: 2N = 1,024 .. 262,144, D in {128, 256}, bf16 and fp32, against the eager and the
    #    compiled reference (and lightly / Inf-CL when installed) -> benchmarks/results/loss_<gpu>.json
    # shellcheck disable=SC2086
    env -u TRITON_INTERPRET "$PY" benchmarks/loss.py --device cuda $LOSS_ARGS 2>&1 | tee "$LOGS/loss_gpu.log"
}

# ------------------------------------------------- stage: augment (two-view SimCLR / BYOL views)
stage_augment() {
    # 1. correctness: fused Triton kernels vs the Kornia reference on the GPU (the GPU-only check:
    #    a 64 x 375 x 500 uint8 batch -> 224 px fp32 / bf16 views), plus the sampling / recipe tests.
    gpu_pytest test_augment_gpu.log tests/test_augment.py tests/test_augment_fused.py
    # 2. benchmark: batch 512 of uint8 375 x 500 -> two 224 px bf16 views; fused vs kornia vs a
    #    torchvision.transforms.v2 loop (and triton_augment when installed); GB/s against 3350 GB/s
    #    (H100 SXM; pass --bandwidth-gbs for another card) -> benchmarks/results/augment_[byol_]<gpu>.json
    env -u TRITON_INTERPRET "$PY" benchmarks/augment.py --device cuda 2>&1 | tee "$LOGS/augment_gpu.log"
    env -u TRITON_INTERPRET "$PY" benchmarks/augment.py --device cuda --recipe byol 2>&1 \
        | tee "$LOGS/augment_byol_gpu.log"
}

# ------------------------------------------------------- stage: trainer and end-to-end throughput
stage_train() {
    # 1. correctness on the GPU: trainer, distributed, evaluation (fp16 scaler, SyncBN paths).
    gpu_pytest test_train_gpu.log tests/test_train.py tests/test_distributed_train.py tests/test_eval.py \
        tests/test_optim.py
    # 2. LARS step: foreach vs the per-parameter loop on ResNet-50's parameters.
    "$PY" benchmarks/throughput.py --stage optim-compare --steps 30 --warmup 5 train.device=cuda 2>&1 \
        | tee "$LOGS/optim_compare_gpu.log"
    # 3. every stage of the demo pipeline on the GPU.
    "$PY" benchmarks/throughput.py --steps 20 --warmup 3 train.device=cuda 2>&1 | tee "$LOGS/throughput_demo_gpu.log"
}

# ------------------------------------------------ stage: input pipeline (torch decode, DALI, FFCV)
# DALI and FFCV are not on the GPU machine: bring them first (benchmarks/gpu_carry.sh prepares
# them here, in parts the device tool can carry, and says how to install them there); without
# them their tests skip and the comparison leaves them out.
stage_data() {
    # 1. correctness on the GPU: every loader's contract, nvJPEG (DALI mixed, torchvision) vs the CPU.
    gpu_pytest test_data_gpu.log tests/test_loaders.py tests/test_data.py tests/test_data_dali.py \
        tests/test_data_ffcv.py
    # 2. DALI's decoder alone at hardware-decoder shares 0, 0.65 and 1: is the GPU's JPEG decoder
    #    in use? -> benchmarks/results/dali_decoder_<gpu>.json
    if "$PY" -c "import nvidia.dali" 2>/dev/null; then
        timeout -k 5 60 "$PY" benchmarks/dali_decoder.py --data "$SAMPLE" --batch 256 --seconds 6 2>&1 \
            | tee "$LOGS/dali_decoder_gpu.log" || true
    fi
    # 3. every installed loader on the sample, two 224 px views, batch 256, all 16 cores, next to
    #    the PIL DataLoader baseline -> benchmarks/results/data_<gpu>.json
    local loaders
    loaders=$("$PY" -c "import importlib.util as u; d=u.find_spec('nvidia') and u.find_spec('nvidia.dali'); \
print(','.join(['pil', 'torch'] + (['dali', 'dali-per_view'] if d else []) + (['ffcv'] if u.find_spec('ffcv') else [])))")
    # Each loader in its own process, stopped (its stacks printed) if it takes over LOADER_TIMEOUT s.
    "$PY" benchmarks/throughput.py --stage data --loader "$loaders" --data "$SAMPLE" --batch 256 \
        --loader-timeout "${LOADER_TIMEOUT:-300}" train.device=cuda 2>&1 | tee "$LOGS/data_gpu.log"
}

# ------------------------------------- stage: end to end (does a SimCLR ResNet-50 step wait for data?)
stage_e2e() {
    if [ ! -d "$SAMPLE" ]; then
        echo "gpu_suite.sh: stage e2e needs the sample ($SAMPLE)" >&2
        return
    fi
    # The PIL DataLoader (16 workers), then DALI when installed (E2E_LOADERS chooses), on the
    # same machine.
    local folder loader
    folder=$(photos_folder)
    for loader in ${E2E_LOADERS:-pil dali}; do
        if [ "$loader" = dali ] && ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
            echo "gpu_suite.sh: DALI is not installed: no dali e2e run" >&2
            continue
        fi
        simclr_resnet50_run "$loader" "$folder"
    done
}

# ------------------------------------------------------------- stage: methods (same data, same budget)
stage_methods() {
    # 1. correctness on the GPU: every method's unit, resume and distributed tests.
    gpu_pytest test_methods_gpu.log tests/test_methods.py tests/test_methods_distributed.py
    # 2. every method for the same fixed budget: images/s and kNN top-1 side by side.
    budget_runs methods "kNN top-1|img/s" 3 simclr moco_v2 moco_v3 byol simsiam dino
}

# ------------------------------------------------------- stage: pretext tasks (same data, same budget)
stage_pretext() {
    # 1. correctness on the GPU: the batched pretext ops against their per-image references, Lab on
    #    the device, every task's unit and resume tests.
    gpu_pytest test_pretext_gpu.log tests/test_pretext_color.py tests/test_pretext_patches.py \
        tests/test_pretext_methods.py
    # 2. every task for the same fixed budget: its pretext line, kNN top-1 and images/s.
    budget_runs pretext "^pretext|kNN top-1|img/s" 5 rotation jigsaw relative_position colorization inpainting \
        split_brain super_resolution multitask
}

# ---------------------------------------- stage: clustering and predictive methods (DeepCluster, OBoW, CPC)
stage_clustering() {
    # 1. correctness on the GPU: k-means on CUDA against the CPU result, the methods' unit and resume
    #    tests, and the gathered features of DeepCluster on 2 ranks (gloo).
    gpu_pytest test_clustering_gpu.log tests/test_cluster.py tests/test_deepcluster.py tests/test_obow.py \
        tests/test_cpc.py
    # 2. k-means at DeepCluster's ImageNet scale: 1.28M x 256 features into 10,000 clusters, 20 iterations.
    "$PY" - <<'PYEOF' 2>&1 | tee "$LOGS/kmeans_gpu.log"
import time, torch, torch.nn.functional as F
from fastssl.cluster import kmeans
x = F.normalize(torch.randn(1_281_167, 256, device="cuda"), dim=1)
for k in (1000, 10000):
    torch.cuda.synchronize(); start = time.perf_counter()
    result = kmeans(x, k, iterations=20, seed=0)
    torch.cuda.synchronize()
    print(f"kmeans n={len(x)} d=256 k={k} 20 iterations: {time.perf_counter() - start:.1f}s, inertia {result.inertia:.0f}")
PYEOF
    # 3. each method for the same fixed budget, as above.
    budget_runs clustering "kNN top-1|img/s" 3 deepcluster obow cpc
}

for stage in "${STAGES[@]}"; do
    case $stage in
        loss|augment|train|data|e2e|methods|pretext|clustering) "stage_$stage" ;;
        *) echo "gpu_suite.sh: unknown stage '$stage' (loss augment train data e2e methods pretext clustering)" >&2; exit 2 ;;
    esac
done
