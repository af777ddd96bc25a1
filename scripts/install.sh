#!/usr/bin/env bash
# Install what fastssl needs, then nothing else: missing system packages (apt-get, when root),
# a virtual environment, and the package (editable) with its extras.
#   usage: scripts/install.sh [VENV_DIR] [EXTRAS]      (defaults: .venv dev; e.g. dev,dali,ffcv)
# The `ffcv` extra is built from source against libjpeg-turbo and OpenCV (their -dev packages).
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-dev}
PYTHON=${PYTHON:-python3}

missing=()
command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3)
command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c "import venv, ensurepip" 2>/dev/null && missing+=(python3-venv)
if [[ ",$EXTRAS," == *,ffcv,* ]]; then
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    pkg-config --exists libturbojpeg 2>/dev/null || missing+=(libturbojpeg0-dev)
    pkg-config --exists opencv4 2>/dev/null || missing+=(libopencv-dev)
fi
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "fastssl: installing system packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "fastssl: please install these system packages first: ${missing[*]}" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "fastssl: creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fastssl-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "fastssl: installing fastssl[$EXTRAS] and its dependencies into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$EXTRAS]"
    touch "$stamp"
fi
