"""The raw-pixel floor: a linear classifier on normalised pixels (TF-free).

Trained full-batch-free with AdamW on mini-batches, softmax cross-entropy, on
exactly the train/test images a probe uses, so "probe accuracy above the pixel
floor" compares like with like.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax


def linear_classifier(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      test_y: np.ndarray, num_classes: int, epochs: int = 30,
                      batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
                      seed: int = 0) -> dict:
  """Fits softmax regression on flattened, standardised features; returns
  {'train_accuracy', 'test_accuracy'}."""
  train_x = train_x.reshape(len(train_x), -1).astype(np.float32)
  test_x = test_x.reshape(len(test_x), -1).astype(np.float32)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  dim = train_x.shape[1]
  params = {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}
  steps_per_epoch = max(1, len(train_x) // batch_size)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch),
                   weight_decay=weight_decay)
  opt_state = tx.init(params)
  logits_of = lambda p, x: x @ p["w"] + p["b"]

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        logits_of(p, x), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(train_x))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, train_x[idx], train_y[idx])
  accuracy = lambda x, y: float((np.asarray(jnp.argmax(logits_of(params, x), -1)) == y).mean())
  return {"train_accuracy": accuracy(train_x, train_y),
          "test_accuracy": accuracy(test_x, test_y)}
