#!/usr/bin/env bash
# The main job on one machine, no cluster: offline generation of a talking, listening avatar.
# Default: the shipped demo model on the synthetic sample conversation (samples/synthetic/), a
# synthetic face that talks with its voice and reacts to the user beside it.
# With converted weights: AVATAR_FORCING_WEIGHTS=/path/to/weights bash scripts/demo.sh (photo samples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
if [ -n "${AVATAR_FORCING_WEIGHTS:-}" ]; then
  model=(--weights "$AVATAR_FORCING_WEIGHTS")
  inputs=(--portrait samples/portrait.png --avatar-audio samples/avatar_speech.wav --user-video samples/user.mp4)
else
  model=()  # the demo model (avatar_forcing/synthetic/assets/demo-model)
  inputs=(--portrait samples/synthetic/portrait.png --avatar-audio samples/synthetic/avatar_speech.wav
          --user-video samples/synthetic/user.mp4)
fi
avatar-forcing generate "${model[@]}" "${inputs[@]}" --side-by-side --out out/demo.mp4 "$@"
