"""Foreground score of the cls token's attention maps (`analysis/foreground.py`).

Per encoder layer and head, on the first `num_images` eval images: the share of
the attention mass on object patches and the IoU of its top-k patches with the
object, beside a uniform map's ('chance/...'). Needs a data source with an exact
foreground (Fashion-MNIST: the non-zero pixels); CRATE-MAE and ViT-MAE alike.
"""
import numpy as np

from crate_mae_jax.analysis import foreground
from crate_mae_jax.config_lib import ConfigError
from crate_mae_jax.evaluators import common
from crate_mae_jax.training import tasks


@common.register("foreground")
class Evaluator:

  def __init__(self, context: common.Context, *, num_images: int = 1000):
    data = context.config.data
    if not foreground.gives_masks(data):
      raise ConfigError(f"config.evals: 'foreground' needs images with a foreground mask "
                        f"(config.data.source in {foreground.MASK_SOURCES}), got "
                        f"{data.source!r}; remove it")
    if tasks.get(context.config.task).classifies:
      raise ConfigError("config.evals: 'foreground' runs on pre-training (the masked "
                        f"autoencoder), not task={context.config.task!r}; remove it")
    self.context, self.num_images = context, int(num_images)

  def run(self, state) -> dict:
    from crate_mae_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    images, count = [], 0
    for x, _ in input_pipeline.normalised_eval_batches(self.context.source):
      images.append(x)
      count += len(x)
      if count >= self.num_images:
        break
    images = np.concatenate(images)[: self.num_images]
    data, model = self.context.config.data, self.context.model
    masks = foreground.object_patches(images, data.mean, data.std, model.patch_size)
    summary = foreground.foreground_scores(model, common.params_of(state), images, masks)
    return foreground.summary_scalars(summary)
