#!/usr/bin/env bash
# Create .venv with everything patcher needs, pinned by constraints.txt (CPU torch from the local wheel
# where there is one), and the Debian packages below where apt is available. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[serve,dev]" onnxscript

# Debian packages: Fashion-MNIST (the demo's data), strace (the tests trace what is flushed before a rename), and Go
# with grpc-go (patcher serve builds its compiled gRPC front with them; without them it uses the Python one)
PACKAGES=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || PACKAGES="$PACKAGES dataset-fashion-mnist"
command -v strace >/dev/null || PACKAGES="$PACKAGES strace"
command -v go >/dev/null || PACKAGES="$PACKAGES golang-go"
[ -d /usr/share/gocode/src/google.golang.org/grpc ] || PACKAGES="$PACKAGES golang-google-grpc-dev"
if [ -n "$PACKAGES" ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    # shellcheck disable=SC2086
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq $PACKAGES >/dev/null || \
        echo "note: could not install$PACKAGES; patcher downloads Fashion-MNIST if it can, the strace test skips," \
             "patcher serve uses its Python gRPC front" >&2
fi
echo "setup done: .venv ready"
