#!/usr/bin/env bash
# Pack, on the development machine, what a bare GPU machine (Python 3.12, torch, triton,
# torchvision, numba, opencv; no network) lacks for benchmarks/gpu_suite.sh: Kornia, DALI for
# CUDA 13, FFCV built for Python 3.12 with the shared libraries its extension links, and
# shared/data/imagenet-sample. The device tool carries at most 64 MiB a call (the checkout
# included), so everything goes to .gpu_carry/ (ignored by git) in parts of at most 63 MB:
#   first.tar.gz   Kornia, FFCV and their pure-Python needs (unzipped wheels), FFCV's libraries,
#                  the sample: what the loss, augment and train stages can use at once;
#   dali.p1 ...    DALI and its wheels, unzipped without the other Pythons' extensions, as one
#                  xz stream cut in parts (the 200 MB wheel shrinks to about 176 MB);
#   parts.txt      the parts and their sha256, which benchmarks/gpu_env.sh checks.
#
#   bash benchmarks/gpu_carry.sh            # here; prints one command per device call
#
# On the machine every call carries its parts and runs `bash benchmarks/gpu_lease.sh N` (a 15-minute
# lease's plan), which sources benchmarks/gpu_env.sh: it unpacks what has arrived and installs
# DALI once all its parts are there. The machine keeps /tmp between calls only while it stays warm
# (30 s), so the calls follow one another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
SAMPLE=${SAMPLE:-../shared/data/imagenet-sample}
LIMIT=63000000                      # bytes a call may carry besides the checkout (~2 MB)
OUT=.gpu_carry
grep -qx "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/wheels" "$stage/first/site" "$stage/first/libs" "$stage/dali_site"

# Binary wheels for CPython 3.12 on x86-64 (the machine's numpy, torch, opencv, tqdm, psutil,
# packaging and six are kept).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$stage/wheels" \
    kornia kornia_rs nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13<0.10" nvidia-libnvcomp-cu13==5.3.0.16 \
    nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree nvtx makefun libcst \
    terminaltables pytorch_pfn_extras 2>&1 | grep -v "is ignored" || true
# From source, for Python 3.12: FFCV 1.0.2 against this machine's OpenCV and libjpeg-turbo, and
# the two pure-Python packages it needs that PyPI has no wheels of.
"$PY312" -m pip wheel -q --no-deps -w "$stage/wheels" ffcv==1.0.2 fastargs assertpy 2>&1 | grep -v "is ignored" || true

for wheel in "$stage"/wheels/*.whl; do
    case $(basename "$wheel") in
        kornia*|ffcv*|fastargs*|assertpy*|terminaltables*|pytorch_pfn_extras*) unzip -q -o "$wheel" -d "$stage/first/site" ;;
        *) unzip -q -o "$wheel" -d "$stage/dali_site" ;;
    esac
done
# The libraries FFCV's extension needs beyond those every Linux has (C and C++ runtimes, libm, zlib).
ldd "$stage"/first/site/ffcv/_libffcv*.so | awk '/=> \// {print $3}' \
    | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|libz|ld-linux-x86-64)\.so' \
    | while read -r lib; do cp -L "$lib" "$stage/first/libs/"; done
if [ -d "$SAMPLE" ]; then cp -r "$SAMPLE" "$stage/first/sample"; fi
# DALI ships an extension per Python version and its C++ headers: only 3.12's is needed.
find "$stage/dali_site" -name '*.cpython-3*' ! -name '*cpython-312-*' -delete
rm -rf "$stage/dali_site/nvidia/dali/include"

tar czf "$OUT/first.tar.gz" -C "$stage" first
tar c -C "$stage" dali_site | xz -T0 -7 > "$stage/dali.tar.xz"
first_part=$((LIMIT - $(stat -c %s "$OUT/first.tar.gz")))
head -c "$first_part" "$stage/dali.tar.xz" > "$OUT/dali.p1"
tail -c +$((first_part + 1)) "$stage/dali.tar.xz" | split -b "$LIMIT" -a 1 --numeric-suffixes=2 - "$OUT/dali.p"
(cd "$OUT" && sha256sum first.tar.gz dali.p* > parts.txt)

echo "wrote $OUT ($(du -sh "$OUT" | cut -f1)): $(cd "$OUT" && echo *)"
echo "device calls, one after the other (each within 30 s of the last):"
n=0
timeouts=(175 75 130 480)      # gpu_lease.sh's limits for each call, plus 10 s
for part in "$OUT"/dali.p*; do
    n=$((n + 1))
    carry="\"$part\""
    [ "$n" -eq 1 ] && carry="\"$OUT/parts.txt\", \"$OUT/first.tar.gz\", $carry"
    echo "  call $n: carry [$carry]; command: bash benchmarks/gpu_lease.sh $n; timeout_s ${timeouts[n - 1]:-600}"
done
# gpu_lease.sh plans four calls: DALI in four parts.
[ "$n" -eq 4 ] || echo "DALI came in $n parts, not 4: adapt benchmarks/gpu_lease.sh's calls" >&2
