#!/usr/bin/env bash
# Set up and run the test suite (CPU, tiny models, no network besides the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
# DeepSpeed for tests/test_deepspeed.py (its ZeRO-2/3 paths run on CPU): built from the sdist without compiled ops
DS_BUILD_OPS=0 python -m pip install -q -r requirements-gpu.txt
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m pytest -q "$@"
