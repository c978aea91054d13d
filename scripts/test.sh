#!/usr/bin/env bash
# Installs the project with its test extras and runs the whole suite (slow tests included).
# pytest exits 5 when it collects nothing: that is a failure here, as any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-test.txt
python -m pip install -q -e ".[test]"
export EGPO_JAX_COMPILATION_CACHE="${EGPO_JAX_COMPILATION_CACHE:-$HOME/.cache/egpo_jax/jax_cache}"
# Two workers (one per core): compilation dominates and is single-threaded. Files stay
# whole on one worker so module fixtures (compiled functions, warmed models) are shared.
python -m pytest tests -n 2 --dist loadfile --durations=30 -q "$@"
