#!/usr/bin/env bash
# The main job on one machine, no cluster: offline generation on the sample inputs.
# With converted weights: AVATAR_FORCING_WEIGHTS=/path/to/weights bash scripts/demo.sh
# Else, when a demo model is installed (avatar-forcing build-demo --install), that model on the
# synthetic sample conversation (samples/synthetic/); else the tiny model with random weights
# (a loud warning says so).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
photo=(--portrait samples/portrait.png --avatar-audio samples/avatar_speech.wav --user-video samples/user.mp4)
synthetic=(--portrait samples/synthetic/portrait.png --avatar-audio samples/synthetic/avatar_speech.wav
           --user-video samples/synthetic/user.mp4)
if [ -n "${AVATAR_FORCING_WEIGHTS:-}" ]; then
  args=(--weights "$AVATAR_FORCING_WEIGHTS" "${photo[@]}")
elif [ -f avatar_forcing/synthetic/assets/demo-model/model.safetensors ]; then
  args=("${synthetic[@]}")  # no --weights: the installed demo model
else
  args=(--random-init --config tiny "${photo[@]}")
fi
avatar-forcing generate "${args[@]}" --side-by-side --out out/demo.mp4 "$@"
