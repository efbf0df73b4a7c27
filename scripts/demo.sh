#!/usr/bin/env bash
# The one command to see moe2 work: install, then `moe2 demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/moe2 demo "$@"
