#!/usr/bin/env bash
# Quick start: install into .venv (package registries only), then pre-train a small
# CRATE-MAE on the shipped Fashion-MNIST subset, linear-probe it and compare with a
# raw-pixel linear classifier. CPU only; no data or weights are downloaded.
# The quick start needs no TensorFlow (in-memory data; TensorBoard files through
# tensorboardX), so .venv gets the package and the tensorboard viewer only.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f .venv/.quickstart-installed ]; then
  echo "Installing crate-mae-jax with JAX, Flax, Optax, Orbax and TensorBoard into .venv" \
       "(CPU only; usually 1-2 minutes, longer on a slow network) ..."
  log="$(mktemp)"
  trap 'rm -f "$log"' EXIT
  if ! { python3 -m venv .venv &&
         .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install --no-compile -c requirements-ci.txt -e . tensorboard &&
         # bytecode on all cores (pip compiles one file at a time); files of other
         # Python versions' syntax in some packages fail, as under pip: not an error
         { .venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c \
             'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true; }; } \
       >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: installing into .venv failed (pip's output above); fix it and run" \
         "./quickstart.sh again" >&2
    exit 1
  fi
  touch .venv/.quickstart-installed
fi
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m crate_mae_jax.tools.quickstart --workdir="${1:-workdirs/quickstart}"
