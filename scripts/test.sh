#!/usr/bin/env bash
# The one command to run the test suite: install, lint, type-check, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The unit-file checks need systemd-analyze (present on Debian/Ubuntu hosts; install if root).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
.venv/bin/ruff check agent coordinator shared cli tools gateway tests
.venv/bin/mypy
exec .venv/bin/pytest "$@"
