#!/usr/bin/env bash
# Create .venv and install the project with its test and serving extras (idempotent).
# CPU machines get the CPU build of torch: it is pinned first, so nothing pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
python -m pip install -q --disable-pip-version-check -e plugins/livekit  # the LiveKit agent plugin (livekit-agents==1.8.9)
