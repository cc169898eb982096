"""Downstream heads on a pre-trained encoder: linear probing and fine-tuning.

The classifier keeps the encoder under the name 'encoder', the same sub-tree a
masked autoencoder has, so pre-trained (or converted) encoder parameters drop in.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.models import layers


class Classifier(nn.Module):
  """encoder -> pooled feature -> [BatchNorm without affine] -> linear head.

  `frozen` stops gradients at the features (linear probe): XLA then drops the
  encoder's backward pass entirely. `pool` is 'cls' (the cls token) or 'mean'
  (average of the patch tokens).
  """
  encoder: nn.Module
  num_classes: int
  pool: str = "cls"
  head_norm: bool = False
  frozen: bool = False
  head_init_std: float = 0.01

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    tokens = self.encoder(images, None, train and not self.frozen)
    feature = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(axis=1)
    feature = feature.astype(jnp.float32)
    if self.frozen:
      feature = jax.lax.stop_gradient(feature)
    if self.head_norm:
      feature = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                             use_bias=False, use_scale=False, name="head_norm")(feature)
    return nn.Dense(
        self.num_classes,
        kernel_init=layers.partitioned(nn.initializers.truncated_normal(self.head_init_std),
                                       ("embed", "classes")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("classes",)),
        name="head")(feature)
