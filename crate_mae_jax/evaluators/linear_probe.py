"""Linear probes on the frozen features of every encoder layer, fitted in closed form.

Per layer and pool: features standardised with the train statistics, then ridge
regression onto one-hot labels, W = (XᵀX + λI)⁻¹ XᵀY, from one eigendecomposition
of XᵀX; λ is picked on a held-out tenth of the train split from a grid, then
the probe is refitted on the whole train split. Seconds per layer where an
SGD probe takes minutes, so every layer can be probed at every evaluation;
absolute accuracies run a little below a trained softmax probe's.
"""
import numpy as np

from crate_mae_jax.evaluators import common, features

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # relative to the mean eigenvalue


def _fit(x: np.ndarray, onehot: np.ndarray, lambdas) -> list[np.ndarray]:
  gram = x.T @ x
  eigval, eigvec = np.linalg.eigh(gram)
  scale = max(float(eigval.mean()), 1e-12)
  proj = eigvec.T @ (x.T @ onehot)
  return [eigvec @ (proj / (eigval + lam * scale)[:, None]) for lam in lambdas]


def ridge_probe_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                         test_y: np.ndarray, num_classes: int, lambdas=LAMBDAS,
                         holdout: float = 0.1, seed: int = 0) -> tuple[float, float]:
  """(test top-1, chosen λ) of the ridge probe (features (N, D))."""
  x = np.asarray(train_f, np.float64)
  mean, std = x.mean(0), x.std(0) + 1e-6
  x = (x - mean) / std
  t = (np.asarray(test_f, np.float64) - mean) / std
  x = np.concatenate([x, np.ones((len(x), 1))], 1)   # bias column
  t = np.concatenate([t, np.ones((len(t), 1))], 1)
  onehot = np.eye(num_classes)[train_y]
  order = np.random.default_rng(seed).permutation(len(x))
  cut = int(len(x) * holdout)
  if cut >= 1 and len(x) - cut >= 2 and len(lambdas) > 1:
    held, fit = order[:cut], order[cut:]
    scores = [float((np.argmax(x[held] @ w, -1) == train_y[held]).mean())
              for w in _fit(x[fit], onehot[fit], lambdas)]
    lam = lambdas[int(np.argmax(scores))]
  else:
    lam = lambdas[len(lambdas) // 2]
  (w,) = _fit(x, onehot, (lam,))
  return float((np.argmax(t @ w, -1) == np.asarray(test_y)).mean()), float(lam)


@common.register("linear_probe")
class Evaluator(features.LayerReadout):
  """{'<pool>/layer_NN', '<pool>/final', '<pool>/best'}: probe top-1 per layer."""

  def score(self, train_features, test_features) -> float:
    d = self.data
    return ridge_probe_accuracy(train_features, d.train_y, test_features, d.test_y,
                                d.num_classes)[0]
