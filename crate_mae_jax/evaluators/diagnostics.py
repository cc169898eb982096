"""White-box measures per layer: coding rate (compression) and sparsity.

Measured on the first `num_images` eval images, twice: with every patch visible
(mask ratio 0, the official measure) and at the training mask ratio (default
0.75: the encoder's training distribution, 75 % mask tokens). Keys:
'<part>/<measure>/layer_NN' at ratio 0 and 'mask_<ratio>/<part>/<measure>/layer_NN' at
the training ratio (e.g. 'mask_0.75/...'). The decoder's "sparsity" (its dictionary output, dense by
construction) is left out: it measures nothing.
"""
import jax.numpy as jnp

from crate_mae_jax.analysis import diagnostics
from crate_mae_jax.evaluators import batches, common

UNINFORMATIVE = ("decoder/sparsity",)


def layer_scalars(measures: dict, tag: str = "") -> dict:
  """{'encoder/coding_rate/mean': (layers,)} -> {'<tag>encoder/coding_rate/layer_00': v}."""
  out = {}
  for key, value in diagnostics.summary_scalars(measures).items():
    name = key[len("diag/"):]
    if not any(name.startswith(u + "/") for u in UNINFORMATIVE):
      out[tag + name] = value
  return out


@common.register("diagnostics")
class Evaluator:
  """Coding rate and sparsity per layer at each of `mask_ratios` (default: 0 and
  the training `mask_ratio`) on the first `num_images` eval images."""
  PREDICT = "measures"

  def __init__(self, predict_fn, *, source, num_images: int, mask_ratio: float,
               mask_ratios: tuple | None = None):
    self.predict_fn, self.source, self.num_images = predict_fn, source, int(num_images)
    self.mask_ratios = tuple(mask_ratios if mask_ratios is not None else (0.0, mask_ratio))

  def images(self):
    batch = next(iter(self.source.eval_batches()))
    return batches.inputs(self.source, {"image": jnp.asarray(batch["image"][: self.num_images])})

  def run(self, state) -> dict:
    params = common.params_of(state)
    images = self.images()
    out = {}
    for ratio in self.mask_ratios:
      measures = self.predict_fn(params, images, mask_ratio=ratio)
      out.update(layer_scalars(measures, "" if ratio == 0 else f"mask_{ratio:g}/"))
    return out
