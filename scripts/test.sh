#!/usr/bin/env bash
# The README's test command, as a script: lint, then the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check patcher tests bench && .venv/bin/python -m pytest -q -n 2 "$@"
