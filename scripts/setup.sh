#!/usr/bin/env bash
# Create .venv and install ilql. torch==2.13.0 goes first: on CPU machines its wheel is local,
# and every other requirement keeps a range that 2.13.0 satisfies (no CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
