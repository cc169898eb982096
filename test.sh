#!/usr/bin/env bash
# Tests on a fresh clone: creates .venv-test (once; updated when the dependency files
# change), installs the pinned CPU-only dependencies, then runs pytest.
#
#   ./test.sh            the default run: every test but those marked slow, compiled
#                        quickly (XLA CPU -O0, one compilation cache for the run)
#   ./test.sh --full     everything, slow multi-process and end-to-end tests included
#                        (also TEST_FULL=1 ./test.sh); this is what CI runs
#   ./test.sh [--full] ARGS...   extra arguments go to pytest (e.g. -k fixture -x)
#
# TEST_VENV picks another environment folder; TEST_WORKERS the number of pytest-xdist
# workers (default 2); TORCH_INDEX a pip index for the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")"
full="${TEST_FULL:-0}"
if [ "${1:-}" = "--full" ]; then
  full=1
  shift
fi
venv="${TEST_VENV:-.venv-test}"
# The stamp is a hash of the dependency files it was installed from: a change re-installs.
stamp="$(cat pyproject.toml requirements-ci.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first, alone, as the CPU build: let the dependency resolver pick it and it
  # takes PyPI's CUDA build (several GB). Where pip does not already find a CPU wheel
  # (CI's machines do), set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
  "$venv/bin/python" -m pip install -q --no-compile ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --no-compile -c requirements-ci.txt -e '.[dev]'
  # Bytecode for every installed module on all cores (pip compiles one file at a time:
  # ~80 s of the install on 2 cores, ~55 s this way). Python files of other versions'
  # syntax in some packages fail to compile, as under pip: quiet, not an error.
  "$venv/bin/python" -m compileall -qq -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
  echo "$stamp" > "$venv/.installed"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
markers=(-m "not slow")
if [ "$full" = "1" ]; then
  markers=()
else
  # The default run is the quick one: XLA's CPU backend compiles without LLVM's
  # optimisations (about half the compile time of each tiny train step; the programs are
  # the same HLO) and one compilation cache serves the whole run (tests/conftest.py).
  # --full (CI) compiles as a user's run does.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  export CRATE_MAE_JAX_TEST_SHARED_CACHE="${CRATE_MAE_JAX_TEST_SHARED_CACHE:-1}"
fi
exec "$venv/bin/python" -m pytest -q -rs --durations=10 -n "${TEST_WORKERS:-2}" --dist loadfile "${markers[@]}" "$@" tests
