# Source on the GPU machine, from the checkout's root, at the start of every device call:
#   source benchmarks/gpu_env.sh && bash benchmarks/gpu_suite.sh python3 STAGES; gpu_results
# It copies the parts this call carried (.gpu_carry/, packed by benchmarks/gpu_carry.sh) to
# /tmp/carry, unpacks first.tar.gz once (Kornia, FFCV, FFCV's libraries, the sample), installs
# DALI once every part listed in parts.txt has arrived intact, and exports what gpu_suite.sh
# reads. `gpu_results` packs the JSON records into $OUT/results.tgz (a call returns 8 files).
CARRY=/tmp/carry
mkdir -p "$CARRY"
cp .gpu_carry/* "$CARRY"/ 2>/dev/null || true
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if [ -f "$CARRY/first.tar.gz" ] && [ ! -d "$CARRY/first" ]; then
    tar xzf "$CARRY/first.tar.gz" -C "$CARRY" && cp -rn "$CARRY"/first/site/* "$SITE"/
fi
if [ ! -d "$CARRY/dali_site" ] && [ -f "$CARRY/parts.txt" ]; then
    if (cd "$CARRY" && sha256sum --quiet -c parts.txt >/dev/null 2>&1); then
        cat "$CARRY"/dali.p* | xz -dc -T0 | tar x -C "$CARRY"
        # An nvidia/__init__.py would turn the image's nvidia namespace (cuBLAS, cuDNN...) into a package.
        [ -e "$SITE/nvidia/__init__.py" ] || rm -f "$CARRY/dali_site/nvidia/__init__.py"
        cp -rn "$CARRY"/dali_site/* "$SITE"/
    else
        echo "gpu_env: DALI not installed yet: $(cd "$CARRY" && ls dali.p* 2>/dev/null | wc -l) of" \
             "$(grep -c dali.p "$CARRY/parts.txt") parts here, or one is damaged" >&2
    fi
fi
export LD_LIBRARY_PATH="$CARRY/first/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SAMPLE="$CARRY/first/sample" LOGS="${OUT:-benchmarks/results/logs}" PYTHONUNBUFFERED=1
# pytest-xdist (on the GPU image) runs the tests in 8 processes: Triton compiles in parallel.
export PYTEST_ARGS="${PYTEST_ARGS-$(python3 -c 'import xdist' 2>/dev/null && echo '-n 8 -p no:cacheprovider')}"
python3 - <<'PYEOF'
import importlib.util as u
have = {m: u.find_spec(m) is not None for m in ("kornia", "ffcv", "xdist")}
have["nvidia.dali"] = u.find_spec("nvidia") is not None and u.find_spec("nvidia.dali") is not None
print("gpu_env:", ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
PYEOF

gpu_results() {
    tar czf "${OUT:?}/results.tgz" benchmarks/results/*.json
}
