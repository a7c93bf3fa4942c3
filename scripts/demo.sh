#!/usr/bin/env bash
# The main job on one machine, no cluster: offline generation on the sample inputs.
# With converted weights: AVATAR_FORCING_WEIGHTS=/path/to/weights bash scripts/demo.sh
# Without, the tiny model runs with random weights (a loud warning says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
if [ -n "${AVATAR_FORCING_WEIGHTS:-}" ]; then model=(--weights "$AVATAR_FORCING_WEIGHTS"); else model=(--random-init --config tiny); fi
avatar-forcing generate "${model[@]}" \
  --portrait samples/portrait.png --avatar-audio samples/avatar_speech.wav --user-video samples/user.mp4 \
  --side-by-side --out out/demo.mp4 "$@"
