#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one command (<= 8 minutes on one H100, no download):
#   bash scripts/gpu_check.sh --out gpu_check/        -> gpu_check/gpu_check.json, gpu_check/gpu_check.md, logs/
#   bash scripts/gpu_check.sh --smoke --out /tmp/gc  -> the same stages, tiny models, CPU, seconds
# Every stage has its own time cap; a failing stage is recorded and the others still run
# (scripts/gpu_check.py says what each stage measures). PYTHON=... picks the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
