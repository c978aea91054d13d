#!/usr/bin/env bash
# Installs the project with its test extras and runs the whole suite (slow tests included).
# pytest exits 5 when it collects nothing: that is a failure here, as any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-test.txt
python -m pip install -q -e ".[test]"
# Two workers (one per core): compilation dominates and is single-threaded. Files stay
# whole on one worker so module fixtures (compiled functions, warmed models) are shared.
# --max-worker-restart=0: under --dist loadfile, pytest-xdist 3.8 hangs after replacing a
# crashed worker (pytest-xdist#1323/#1378); a crash must fail the run at once, with the
# crashed test named, not stall it until the CI limit.
# No persistent compilation cache unless EGPO_JAX_COMPILATION_CACHE is set: on a fresh
# machine it saves ~10%. Workers crashed late in full runs when XLA:CPU's compiled code
# exhausted vm.max_map_count; tests/conftest.py bounds that.
python -m pytest tests -n 2 --dist loadfile --max-worker-restart=0 --durations=30 -q "$@"
