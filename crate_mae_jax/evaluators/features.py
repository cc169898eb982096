"""Pooled features of every encoder layer, extracted once per evaluation.

For an encoder of depth d the layers are 'layer_00' .. 'layer_{d-1}' (the raw
output of each block) and 'final' (the last block after the encoder's final
LayerNorm: what a probe or fine-tuning head reads). Pools: 'cls' (the cls token)
and 'mean' (the average of the patch tokens). No masking: every patch visible.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax import models
from crate_mae_jax.evaluators import common
from crate_mae_jax.evaluators.batches import BatchProgress

POOLS = ("cls", "mean")


def feature_encoder(model):
  """The encoder of `model` (resolved or a model config) for feature extraction:
  float32 compute, no drop path, no rematerialisation (same parameters as the
  trained one)."""
  return models.build_encoder(models.with_fields(model, dtype="float32", drop_path=0.0,
                                                 remat_policy=None))


def layer_names(depth: int) -> list[str]:
  return [f"layer_{i:02d}" for i in range(depth)] + ["final"]


def _is_block(module, method_name) -> bool:
  return method_name == "__call__" and (module.name or "").startswith("layer_")


def make_extract_fn(encoder) -> Callable:
  """A jitted fn(encoder_params, images) -> {pool: (layers, B, D)} (float32)."""

  def fn(params, images):
    final, state = encoder.apply({"params": params}, images, None, False,
                                 capture_intermediates=_is_block)
    blocks = state["intermediates"]
    n = final.shape[1]   # block outputs may carry attention padding rows at the end
    tokens = [blocks[f"layer_{i}"]["__call__"][0][:, :n] for i in range(encoder.depth)]
    tokens.append(final)
    stacked = jnp.stack([t.astype(jnp.float32) for t in tokens])   # (layers, B, N, D)
    return {"cls": stacked[:, :, 0], "mean": stacked[:, :, 1:].mean(axis=2)}
  return jax.jit(fn)


def extract(extract_fn, params, images: np.ndarray, batch_size: int = 256) -> dict:
  """{pool: (layers, N, D) float32 numpy} for `images` (N, H, W, C), in batches
  (the last one padded, so that one shape compiles)."""
  out: dict[str, list] = {p: [] for p in POOLS}
  n = len(images)
  batch_size = max(1, min(batch_size, n))
  progress = BatchProgress(-(-n // batch_size), what="features")
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:],
                                              chunk.dtype)])
    feats = jax.device_get(extract_fn(params, jnp.asarray(chunk)))
    for pool in POOLS:
      out[pool].append(np.asarray(feats[pool])[:, :real])
    progress(start // batch_size + 1)
  return {pool: np.concatenate(v, axis=1) for pool, v in out.items()}


class SplitFeatures:
  """Train and test images (normalised, un-augmented) of a data config, loaded
  once (or given as `arrays` ((train_x, train_y), (test_x, test_y)));
  `features(encode_fn, params)` extracts the per-layer features of both."""

  def __init__(self, data, *, seed: int = 0, max_train: int | None = None,
               max_test: int | None = None, batch_size: int = 256, arrays=None):
    from crate_mae_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    if arrays is None:
      limit = [m for m in (max_train, data.max_examples) if m]
      train_x, train_y, classes = input_pipeline.split_arrays(
          data, data.train_split, max_examples=min(limit) if limit else None, seed=seed)
      test_x, test_y, _ = input_pipeline.split_arrays(
          data, data.eval_split, max_examples=max_test, seed=seed)
    else:
      (train_x, train_y), (test_x, test_y) = arrays
      classes = int(max(train_y.max(), test_y.max())) + 1
    self.train_x, self.train_y = train_x, np.asarray(train_y, np.int32)
    self.test_x, self.test_y = test_x, np.asarray(test_y, np.int32)
    self.num_classes = int(data.num_classes or classes)
    self.batch_size = batch_size

  def features(self, encode_fn, encoder_params) -> tuple[dict, dict]:
    return (extract(encode_fn, encoder_params, self.train_x, self.batch_size),
            extract(encode_fn, encoder_params, self.test_x, self.batch_size))


def per_layer_scalars(accuracies: dict, names: list[str]) -> dict:
  """{pool: (layers,)} -> {'<pool>/layer_00': a, ..., '<pool>/final': a, '<pool>/best': max}."""
  out = {}
  for pool, values in accuracies.items():
    for name, value in zip(names, values):
      out[f"{pool}/{name}"] = float(value)
    out[f"{pool}/best"] = float(np.max(values))
  return out


def best_layer(scalars: dict) -> tuple[float, str]:
  """(top-1, '<pool>/<layer>') of the best layer and pool in `per_layer_scalars`' output."""
  key = max((k for k in scalars if not k.endswith("/best")), key=scalars.get)
  return float(scalars[key]), key



class LayerReadout:
  """Base of the evaluators that read every encoder layer out with a classifier on
  frozen features: the 'encode' function's features are extracted once per `run`
  (train and test split, each pool), and `score(train_features, test_features)
  -> top-1` is applied to every layer. Returns {'<pool>/layer_NN', '<pool>/final',
  '<pool>/best'}."""
  PREDICT = "encode"

  def __init__(self, predict_fn, *, data, seed: int = 0, max_train: int | None = 10_000,
               max_test: int | None = None, pools: tuple = POOLS, batch_size: int = 256,
               arrays=None):
    self.encode_fn, self.pools = predict_fn, tuple(pools)
    self.data = SplitFeatures(data, seed=seed, max_train=max_train, max_test=max_test,
                              batch_size=batch_size, arrays=arrays)

  def score(self, train_features, test_features) -> float:
    raise NotImplementedError

  def run(self, state) -> dict:
    train, test = self.data.features(self.encode_fn, common.encoder_params(state))
    names = layer_names(len(train[POOLS[0]]) - 1)
    acc = {pool: [self.score(train[pool][i], test[pool][i]) for i in range(len(names))]
           for pool in self.pools}
    return per_layer_scalars(acc, names)
