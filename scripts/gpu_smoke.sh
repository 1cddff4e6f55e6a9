#!/usr/bin/env bash
# Opt-in GPU smoke test: serves the built-in tiny model on TurboMind and on SGLang when CUDA is
# present, and skips each with its reason otherwise. Run it in an environment that has the full
# engine installs (see README: Engines), e.g. the runtime_env a GPU node prepares:
#   scripts/gpu_smoke.sh                # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m pytest -m gpu -rs -q tests/test_lmdeploy_engine.py tests/test_sglang_engine.py "$@"
