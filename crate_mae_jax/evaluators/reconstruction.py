"""Masked autoencoding on the eval split: the masked MSE and a reconstruction figure.

The loss uses a fixed masking key per batch (fold_in(seed, batch index)), so the
numbers of two evaluations of the same parameters are equal.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.analysis import diagnostics
from crate_mae_jax.evaluators import batches, common
from crate_mae_jax.models import patches


def trivial_mse(images, patch_size: int, norm_pix_loss: bool) -> float:
  """The patch MSE of predicting zeros everywhere, the floor a reconstruction must
  beat: with `norm_pix_loss` each patch's own mean, otherwise the data set's
  mean pixel (inputs are normalised). Masked patches are a uniform sample, so
  the mean over all patches is the expected masked MSE."""
  target = patches.patchify(jnp.asarray(images), patch_size)
  return float(patches.per_patch_mse(jnp.zeros_like(target), target,
                                     bool(norm_pix_loss)).mean())


@common.register("reconstruction")
class Evaluator:
  """{'loss', 'examples'} and, with `num_images`, the image 'reconstruction'
  (original | masked | reconstruction | reconstruction with the visible patches)."""
  PREDICT = "masked"

  def __init__(self, predict_fn, *, source, mask_ratio: float, patch_size: int,
               norm_pix_loss: bool, mean=None, std=None, num_images: int = 0,
               max_batches: int | None = None, seed: int = 0, jit=jax.jit,
               scope=contextlib.nullcontext):
    self.predict_fn, self.source, self.scope = predict_fn, source, scope
    self.mask_ratio, self.patch_size = float(mask_ratio), int(patch_size)
    self.norm_pix_loss, self.mean, self.std = bool(norm_pix_loss), mean, std
    self.num_images, self.max_batches, self.seed = int(num_images), max_batches, int(seed)

    def step(params, batch, index):
      key = jax.random.fold_in(jax.random.key(self.seed), index)
      images = batches.inputs(source, batch)
      out = predict_fn(params, images, key, self.mask_ratio)
      per_patch = patches.per_patch_mse(out["pred"], patches.patchify(images, self.patch_size),
                                        self.norm_pix_loss)
      per_image = patches.masked_mean(per_patch, out["mask"], axis=-1)
      mask = batches.padding_mask(batch, per_image.shape[0])
      return {"loss_sum": (per_image * mask).sum(), "count": mask.sum()}
    self.step = jit(step)

  def run(self, state) -> dict:
    params = common.params_of(state)
    out = batches.averaged(self.step, params, self.source, self.max_batches)
    if self.num_images:
      out["reconstruction"] = self.figure(params)
    return out

  def figure(self, params) -> np.ndarray:
    from crate_mae_jax.analysis import figures  # pylint: disable=import-outside-toplevel
    batch = next(iter(self.source.eval_batches()))
    images = batches.inputs(self.source, {"image": jnp.asarray(batch["image"][: self.num_images])})
    with self.scope():
      out = self.predict_fn(params, images, jax.random.key(self.seed), self.mask_ratio)
    panels = diagnostics.reconstruction_panels(
        np.asarray(images), np.asarray(out["pred"]), np.asarray(out["mask"]), self.patch_size,
        self.mean, self.std, self.norm_pix_loss)
    return figures.grid_image(panels)
