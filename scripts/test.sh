#!/usr/bin/env bash
# Install, make sure Redis runs, lint, and run the whole test suite (unit, integration, deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/ensure-redis.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
