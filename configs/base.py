"""CRATE-MAE-Base pre-training on ImageNet-1k at 224 px (the paper's recipe).

    python -m crate_mae_jax.main --config=configs/base.py --workdir=DIR \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from crate_mae_jax import recipes


def get_config():
  return recipes.pretrain_imagenet("base")
