#!/usr/bin/env bash
# The fast lane: lint, then every test that builds no model and starts no server (tests/conftest.py's rules),
# on 2 processes. About a minute on 2 cores (CONTRIBUTING.md). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check patcher tests bench && .venv/bin/python -m pytest -q -n 2 -m "not slow" "$@"
