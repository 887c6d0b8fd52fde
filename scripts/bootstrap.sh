#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages the tests run for real
# (Prometheus, Alertmanager, Chromium) and a virtual environment with gradwatch installed
# editable with its agent (tensorflow-cpu), collector and dev extras.
# Re-runs are fast: pip runs again only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GRADWATCH_VENV:-.venv}
TORCH_CPU=2.13.0+cpu

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
# The web UI's tests look at the pages in a real headless browser.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
        echo "bootstrap: please install ${missing[*]} (Debian packages); skipping" >&2
    else
        SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
        echo "bootstrap: installing ${missing[*]} with apt-get"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.gradwatch-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing gradwatch[agent-cpu,collector,dev] into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[agent-cpu,collector,dev]"
    # tf-keras (Keras 2) for its tests. It requires the `tensorflow` distribution, which
    # tensorflow-cpu provides under another name; --no-deps avoids a second TensorFlow.
    "$VENV/bin/python" -m pip install -q --no-deps "tf-keras>=2.21,<2.22"
    # PyTorch's CPU build (190 MB; PyPI's default build pulls 3 GB of CUDA libraries): from
    # the local wheel folder where the package index has one, else PyTorch's CPU index.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_CPU" 2>/dev/null \
        || "$VENV/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_CPU%+cpu}"
    # PyTorch Lightning (its automatic optimization steps with a closure) and Hugging Face
    # Accelerate (its optimizer wrapper), for their tests; after torch, so that pip keeps
    # the CPU build.
    "$VENV/bin/python" -m pip install -q "pytorch-lightning>=2.5,<2.7" "accelerate>=1.0,<2"
    echo "$want" > "$stamp"
fi
