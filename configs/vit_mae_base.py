"""ViT-MAE-Base pre-training on ImageNet-1k: the baseline of the same configuration."""
from crate_mae_jax import recipes


def get_config():
  return recipes.pretrain_imagenet("base", arch="vit_mae")
