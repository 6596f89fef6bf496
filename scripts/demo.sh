#!/usr/bin/env bash
# Set up from scratch and run the main job: the randomwalks demo (3 seeds, 200 steps each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ilql demo randomwalks "$@"
