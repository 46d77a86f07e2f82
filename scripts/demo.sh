#!/usr/bin/env bash
# Set up .venv (if needed) and prune a torchvision ResNet-18, printing params/MACs before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv examples
exec .venv/bin/python examples/quick_start.py "$@"
