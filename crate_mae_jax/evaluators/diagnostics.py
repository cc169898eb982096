"""White-box measures per layer: coding rate (compression) and sparsity.

Measured on the first `num_images` eval images, twice: with every patch visible
(mask ratio 0, the official measure) and at the training mask ratio (default
0.75: the encoder's training distribution, 75 % mask tokens). Keys:
'<part>/<measure>/layer_NN' at ratio 0 and 'mask_<ratio>/<part>/<measure>/layer_NN' at
the training ratio (e.g. 'mask_0.75/...'). The decoder's "sparsity" (its dictionary output, dense by
construction) is left out: it measures nothing.
"""
import jax
import jax.numpy as jnp

from crate_mae_jax.analysis import diagnostics
from crate_mae_jax.config_lib import ConfigError
from crate_mae_jax.evaluators import common

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

  def __init__(self, context: common.Context, *, num_images: int | None = None,
               mask_ratios: tuple | None = None):
    config = context.config
    resolved = context.resolved
    if resolved["arch"] != "crate_mae":
      raise ConfigError(f"config.evals: 'diagnostics' needs config.model.arch='crate_mae' "
                        f"(got {resolved['arch']!r}: no subspaces or sparse codes); remove it")
    self.context = context
    self.model = context.model
    self.num_images = config.eval.num_images if num_images is None else int(num_images)
    self.mask_ratios = tuple(mask_ratios if mask_ratios is not None
                             else (0.0, resolved["mask_ratio"]))

  def images(self):
    source = self.context.source
    batch = next(iter(source.eval_batches()))
    return source.device_augment(jax.random.key(0),
                                 jnp.asarray(batch["image"][: self.num_images]), False)

  def run(self, state) -> dict:
    params = common.params_of(state)
    images = self.images()
    out = {}
    for ratio in self.mask_ratios:
      measures = diagnostics.layerwise_measures(self.model, params, images, mask_ratio=ratio)
      out.update(layer_scalars(measures, "" if ratio == 0 else f"mask_{ratio:g}/"))
    return out
