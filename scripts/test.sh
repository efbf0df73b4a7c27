#!/usr/bin/env bash
# The one command to run the test suite: install, lint, type-check, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check agent coordinator shared cli tests
.venv/bin/mypy
exec .venv/bin/pytest "$@"
