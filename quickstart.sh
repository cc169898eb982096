#!/usr/bin/env bash
# Quick start: install into .venv (package registries only), then pre-train a small
# CRATE-MAE on the shipped Fashion-MNIST subset, linear-probe it and compare with a
# raw-pixel linear classifier. CPU only; no data or weights are downloaded.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c requirements-ci.txt -e '.[tf]'
fi
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3
exec .venv/bin/python -m crate_mae_jax.tools.quickstart --workdir="${1:-workdirs/quickstart}"
