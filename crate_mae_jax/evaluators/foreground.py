"""Foreground score of the cls token's attention maps (`analysis/foreground.py`).

Per encoder layer and head, on the first `num_images` eval images: the share of
the attention mass on object patches and the IoU of its top-k patches with the
object, beside a uniform map's ('chance/...'). Needs a data source with an exact
foreground (Fashion-MNIST: the non-zero pixels); CRATE-MAE and ViT-MAE alike.
"""
import numpy as np

from crate_mae_jax.analysis import foreground
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.evaluators import common


@common.register("foreground")
class Evaluator:
  PREDICT = "attention"

  def __init__(self, predict_fn, *, source, data, mean, std, patch_size: int,
               num_images: int = 1000):
    if not foreground.gives_masks(data):
      raise ConfigError(f"config.evals: 'foreground' needs images with a foreground mask "
                        f"(config.data.source in {foreground.MASK_SOURCES}), got "
                        f"{data.source!r}; remove it")
    self.predict_fn, self.source, self.num_images = predict_fn, source, int(num_images)
    self.mean, self.std, self.patch_size = mean, std, int(patch_size)

  def run(self, state) -> dict:
    from crate_mae_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    images, count = [], 0
    for x, _ in input_pipeline.normalised_eval_batches(self.source):
      images.append(x)
      count += len(x)
      if count >= self.num_images:
        break
    images = np.concatenate(images)[: self.num_images]
    masks = foreground.object_patches(images, self.mean, self.std, self.patch_size)
    params = common.params_of(state)
    summary = foreground.foreground_scores(lambda x: self.predict_fn(params, x), images, masks)
    return foreground.summary_scalars(summary)
