#!/usr/bin/env bash
# Install everything moe2 needs on a fresh Debian/Ubuntu machine into ./.venv:
# mosquitto (Debian package, when root), llama-cpp-python (built from source, ~6 min on
# 2 cores, cached by pip afterwards), torch 2.13.0 CPU for the offline tools, and the dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "==> installing mosquitto"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    echo "moe2: mosquitto is missing; install it with: sudo apt-get install -y mosquitto" >&2
    exit 1
  fi
fi
# The Debian package enables a system broker on 1883; moe2's demo and tests start their own.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip wheel
EXTRAS=${MOE2_EXTRAS:-agent,coordinator,train,dev}
echo "==> pip install -e .[$EXTRAS] (llama-cpp-python compiles from source the first time)"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "==> installed: $(.venv/bin/moe2 --help >/dev/null && echo moe2 OK)"
