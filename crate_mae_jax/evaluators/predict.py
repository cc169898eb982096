"""The model functions evaluators are built from, by name (big_vision's predict_fns).

Each takes the evaluated variables first, then model inputs (normalised images,
after the eval-time device augmentation):

  'classify'  (variables, images) -> logits (B, classes)             classifiers
  'masked'    (params, images, key, mask_ratio) -> {'pred', 'mask'}  masked autoencoders
  'attention' (params, images) -> cls attention (layers, B, heads, N-1)   autoencoders
  'measures'  (params, images, mask_ratio) -> coding rate, sparsity per layer   CRATE-MAE
  'encode'    (encoder params, images) -> {pool: (layers, B, D)}     every model

An evaluator reads the one its class names (`PREDICT`) or the entry's `pred`.
"""
import functools
from typing import Callable

from crate_mae_jax.analysis import diagnostics
from crate_mae_jax.evaluators import features


def predict_fns(module, model, classifies: bool) -> dict[str, Callable]:
  """The functions `module` (what the task trains; `model`: its resolved config)
  gives its evaluators."""
  @functools.cache
  def extract_fn():   # built on first use: most runs never extract features
    return features.make_extract_fn(features.feature_encoder(model))

  fns = {"encode": lambda params, images: extract_fn()(params, images)}
  if classifies:
    fns["classify"] = lambda variables, images: module.apply(variables, images, train=False)
    return fns

  def masked(params, images, key, mask_ratio):
    return module.apply({"params": params}, images, mask_ratio=mask_ratio,
                        rngs={"masking": key})
  fns["masked"] = masked
  fns["attention"] = functools.partial(diagnostics.cls_attention_layers, module)
  if model["arch"] == "crate_mae":
    fns["measures"] = functools.partial(diagnostics.layerwise_measures, module)
  return fns
