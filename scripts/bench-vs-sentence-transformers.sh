#!/usr/bin/env bash
# The default pipeline against the Python it replaces (BENCHMARKS.md, "The local model against sentence-transformers"):
# installs sentence-transformers (pinned, with torch from PyPI) into a venv of its own (.venv-st), builds the release
# `vectordb`, installs the local model, and runs tests/python/st_bench.py: `vectordb pipeline` with the local model
# and sentence-transformers on the same N texts (default 2,000), same model files, same machine, one run.
#
#   scripts/bench-vs-sentence-transformers.sh [N]        EMBEDDING_PRECISION=f32|bf16 compares the other path
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
if [[ ! -x .venv-st/bin/python ]]; then python3 -m venv .venv-st; fi
.venv-st/bin/pip install --quiet --disable-pip-version-check "torch==2.15.0" "sentence-transformers==6.3.0"
cargo build --release --locked -p aura-cli --bin vectordb
target/release/vectordb model install >/dev/null
model_dir=${EMBEDDING_MODEL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/aura360/models}/all-MiniLM-L6-v2
.venv-st/bin/python tests/python/st_bench.py target/release/vectordb "$model_dir" "$n"
