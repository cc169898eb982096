"""Quick start: a small CRATE-MAE on the Fashion-MNIST subset shipped in the package.

    python -m crate_mae_jax.main --config=configs/quickstart.py --workdir=/tmp/qs/pretrain
    python -m crate_mae_jax.main --config=configs/quickstart.py:linear_probe \
        --workdir=/tmp/qs/probe --config.init_from=/tmp/qs/pretrain

`python -m crate_mae_jax.tools.quickstart` runs both and a raw-pixel baseline.
"""
from crate_mae_jax import recipes


def get_config(task: str | None = None):
  return recipes.quickstart(task or "pretrain")
