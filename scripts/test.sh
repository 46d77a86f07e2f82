#!/usr/bin/env bash
# Set up .venv (if needed) and run the fast test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m zoo` for every torchvision model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv test
exec .venv/bin/python -m pytest -q "$@"
