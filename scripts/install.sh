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
EXTRAS=${MOE2_EXTRAS:-agent,coordinator,gateway,train,dev}
echo "==> pip install -e .[$EXTRAS] (llama-cpp-python compiles from source the first time)"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# llama.cpp's vocabulary-only GGUFs (real tokenizers: qwen2, llama-bpe, llama-spm, phi-3, ...)
# and their tokenizer test vectors, from the llama-cpp-python source distribution of the
# installed version, into a cache outside the repository (tests and make-experts use them;
# nothing is downloaded at run time, none is committed).
VOCAB_DIR=${MOE2_VOCAB_DIR:-$HOME/.cache/moe2/llama-vocab}
LLAMA_VERSION=$(.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
if [ ! -f "$VOCAB_DIR/.from-llama-cpp-python-$LLAMA_VERSION" ]; then
  echo "==> fetching llama.cpp's vocabulary GGUFs (llama-cpp-python $LLAMA_VERSION sdist)"
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards \
    '*/vendor/llama.cpp/models/ggml-vocab-*'
  mkdir -p "$VOCAB_DIR"
  cp "$tmp"/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-* "$VOCAB_DIR"/
  rm -rf "$tmp"
  touch "$VOCAB_DIR/.from-llama-cpp-python-$LLAMA_VERSION"
fi
echo "==> installed: $(.venv/bin/moe2 --help >/dev/null && echo moe2 OK), vocabularies in $VOCAB_DIR"
