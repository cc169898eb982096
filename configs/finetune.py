"""End-to-end fine-tuning of a pre-trained encoder (MAE protocol).

    python -m crate_mae_jax.main --config=configs/finetune.py:cifar10,base \
        --workdir=DIR --config.init_from=PRETRAIN_WORKDIR_OR_CONVERTED_CKPT

Argument: DATASET[,VARIANT] as in configs/linear_probe.py.
"""
from crate_mae_jax import recipes


def get_config(arg: str | None = None):
  dataset, _, variant = (arg or "imagenet2012").partition(",")
  return recipes.finetune(dataset, variant or "base")
