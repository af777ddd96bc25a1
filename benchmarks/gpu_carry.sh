#!/usr/bin/env bash
# Prepare, on the development machine, what the lent GPU machine lacks for the loaders' GPU checks
# (benchmarks/gpu_suite.sh): Kornia, DALI for CUDA 13 (its image's CUDA) and FFCV built for its
# Python 3.12 with the shared libraries FFCV's extension links (OpenCV core/imgproc, libjpeg-turbo
# and theirs). The device tool carries at most 64 MiB a call, so everything is packed into one
# tar cut in 55 MiB parts under .gpu_carry/ (ignored by git):
#
#   bash benchmarks/gpu_carry.sh                      # here; prints the parts
# then, on the GPU machine, one call per part while it stays warm (carry: [".gpu_carry/part.aX"]):
#   mkdir -p /tmp/carry && cp .gpu_carry/part.aX /tmp/carry/
# and a last call:
#   cat /tmp/carry/part.* | tar x -C /tmp/carry && python3 -m pip install -q --no-index --no-deps \
#     --target /tmp/site /tmp/carry/wheels/*.whl && export PYTHONPATH=/tmp/site \
#     LD_LIBRARY_PATH=/tmp/carry/libs && bash benchmarks/gpu_suite.sh python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
OUT=.gpu_carry
grep -qx "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT/stage/wheels" "$OUT/stage/libs"
WHEELS="$OUT/stage/wheels"

# Binary wheels for CPython 3.12 on x86-64 (what the GPU image lacks; its numpy, torch, opencv,
# tqdm, psutil, packaging and six are kept).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" \
    kornia kornia_rs nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13<0.10" nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg \
    nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree nvtx makefun libcst \
    terminaltables pytorch_pfn_extras 2>&1 | grep -v "is ignored" || true

# From source, for Python 3.12: FFCV 1.0.2 against this machine's OpenCV and libjpeg-turbo, and
# the two pure-Python packages it needs that PyPI has no wheels of.
"$PY312" -m pip wheel -q --no-deps -w "$WHEELS" ffcv==1.0.2 fastargs assertpy 2>&1 | grep -v "is ignored" || true
ext=$(mktemp -d)
unzip -q -o "$WHEELS"/ffcv-1.0.2-*.whl 'ffcv/_libffcv*.so' -d "$ext"
# The libraries it needs beyond those every Linux has (C and C++ runtimes, libm, zlib).
ldd "$ext"/ffcv/_libffcv*.so | awk '/=> \// {print $3}' \
    | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|libz|ld-linux-x86-64)\.so' \
    | while read -r lib; do cp -L "$lib" "$OUT/stage/libs/"; done
rm -rf "$ext"

tar c -C "$OUT/stage" wheels libs | split -b 55M - "$OUT/part."
rm -rf "$OUT/stage"
echo "wrote $(ls "$OUT"/part.* | wc -l) parts ($(du -sh "$OUT" | cut -f1)):"
ls -1 "$OUT"/part.*
