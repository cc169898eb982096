"""Weighted k-nearest-neighbour classification on frozen features (DINO's k-NN).

Features are L2-normalised; each test image takes its k most cosine-similar
train images, each voting for its label with weight exp(similarity / T).
Nothing is trained, so it measures the features themselves, layer by layer.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.evaluators import common, features


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes(train_f, train_y, test_f, *, k: int, temperature: float, num_classes: int):
  sim = test_f @ train_f.T                                    # (T, N) cosine similarities
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp(top_sim / temperature)
  onehot = jax.nn.one_hot(train_y[top_idx], num_classes)     # (T, k, C)
  return jnp.einsum("tk,tkc->tc", weights, onehot)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                 test_y: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
  """Top-1 accuracy of the weighted k-NN classifier (features (N, D))."""
  train_f, test_f = jnp.asarray(_unit(train_f)), _unit(test_f)
  train_y = jnp.asarray(train_y, jnp.int32)
  k = int(min(k, train_f.shape[0]))
  correct = 0
  for start in range(0, len(test_f), chunk):
    votes = _knn_votes(train_f, train_y, jnp.asarray(test_f[start:start + chunk]), k=k,
                       temperature=float(temperature), num_classes=int(num_classes))
    correct += int((np.asarray(votes.argmax(-1)) == test_y[start:start + chunk]).sum())
  return correct / max(len(test_f), 1)


@common.register("knn")
class Evaluator(features.LayerReadout):
  """{'<pool>/layer_NN', '<pool>/final', '<pool>/best'}: k-NN top-1 per layer."""

  def __init__(self, predict_fn, *, k: int = 20, temperature: float = 0.07, **readout):
    super().__init__(predict_fn, **readout)
    self.k, self.temperature = int(k), float(temperature)

  def score(self, train_features, test_features) -> float:
    d = self.data
    return knn_accuracy(train_features, d.train_y, test_features, d.test_y, d.num_classes,
                        self.k, self.temperature)
