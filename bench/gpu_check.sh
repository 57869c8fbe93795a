#!/usr/bin/env bash
# The GPU check in one command (bench/gpu.py): ~3-5 minutes on one H100, no network; skips with
# one line (exit 0) on a machine without CUDA. Extra arguments go to `python -m bench.gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.gpu "$@"
