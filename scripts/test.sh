#!/usr/bin/env bash
# Set up and run the whole test suite (needs root, as CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
