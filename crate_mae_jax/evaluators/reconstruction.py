"""Masked autoencoding on the eval split: the masked MSE and a reconstruction figure.

The loss uses a fixed masking key per batch (fold_in(seed, batch index)), so the
numbers of two evaluations of the same parameters are equal.
"""
import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.analysis import diagnostics
from crate_mae_jax.training import steps
from crate_mae_jax.evaluators import batches, common


def trivial_mse(images, patch_size: int, norm_pix_loss: bool) -> float:
  """The patch MSE of predicting zeros everywhere, the floor a reconstruction must
  beat: with `norm_pix_loss` each patch's own mean, otherwise the data set's
  mean pixel (inputs are normalised). Masked patches are a uniform sample, so
  the mean over all patches is the expected masked MSE."""
  from crate_mae_jax.models import patches
  target = patches.patchify(jnp.asarray(images), patch_size)
  return float(patches.per_patch_mse(jnp.zeros_like(target), target,
                                     bool(norm_pix_loss)).mean())


@common.register("reconstruction")
class Evaluator:
  """{'loss', 'examples'} and, with `num_images`, the image 'reconstruction'
  (original | masked | reconstruction | reconstruction with the visible patches)."""

  def __init__(self, context: common.Context, *, mask_ratio: float | None = None,
               num_images: int | None = None, max_batches: int | None = None,
               seed: int | None = None):
    config = context.config
    self.context = context
    self.model = context.model
    self.mask_ratio = (context.resolved["mask_ratio"] if mask_ratio is None
                       else float(mask_ratio))
    self.num_images = config.eval.num_images if num_images is None else int(num_images)
    self.max_batches = config.eval.max_batches if max_batches is None else max_batches
    self.seed = config.seed if seed is None else int(seed)
    self.step = batches.jit_step(context, steps.make_pretrain_eval_step(
        self.model, self.mask_ratio, self.seed, context.source.device_augment))

  def run(self, state) -> dict:
    params = common.params_of(state)
    out = batches.averaged(self.context, self.step, params, self.max_batches)
    if self.num_images:
      out["reconstruction"] = self.figure(params)
    return out

  def figure(self, params) -> np.ndarray:
    from crate_mae_jax.analysis import figures
    source, config = self.context.source, self.context.config
    batch = next(iter(source.eval_batches()))
    images = source.device_augment(jax.random.key(0),
                                   jnp.asarray(batch["image"][: self.num_images]), False)
    with self.context.scope():
      panels, _ = diagnostics.reconstruct(self.model, params, images, self.mask_ratio,
                                          jax.random.key(self.seed), config.data.mean,
                                          config.data.std)
    return figures.grid_image(panels)
