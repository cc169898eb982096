"""Linear probe of a pre-trained encoder (MAE protocol).

    python -m crate_mae_jax.main --config=configs/linear_probe.py:cifar10,base \
        --workdir=DIR --config.init_from=PRETRAIN_WORKDIR_OR_CONVERTED_CKPT

Argument: DATASET[,VARIANT] with DATASET one of imagenet2012, cifar10, cifar100,
oxford_flowers102, oxford_iiit_pet (default imagenet2012,base).
"""
from crate_mae_jax import recipes


def get_config(arg: str | None = None):
  dataset, _, variant = (arg or "imagenet2012").partition(",")
  return recipes.linear_probe(dataset, variant or "base")
