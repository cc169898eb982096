"""The jitted steps: pure functions of (state, batch) -> (state, metrics).

No TensorFlow, no host synchronisation: metrics stay on the device until the
loop fetches them at logging time. A step with a non-finite loss or gradient
leaves parameters and optimizer state untouched and is counted in the state;
the loop then stops or carries on as `config.nonfinite` says.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from crate_mae_jax.data.augment_jax import identity_augment
from crate_mae_jax.training.state_lib import TrainState, all_finite, new_state  # pylint: disable=unused-import


def step_keys(state: TrainState, n: int):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.random.split(key, n)


def _apply(state: TrainState, tx, grads, loss, batch_stats=None) -> tuple[TrainState, dict]:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The updated state too: a NaN/inf learning rate or an overflowing optimizer
  # moment turns finite gradients into non-finite parameters.
  finite = (jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
            & all_finite(opt_state))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_stats = state.batch_stats if batch_stats is None else keep(batch_stats, state.batch_stats)
  state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state), batch_stats=new_stats,
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where(~finite & (state.first_nonfinite_step < 0),
                                     state.step, state.first_nonfinite_step))
  return state, {"grad_norm": optax.tree.norm(grads), "finite": finite.astype(jnp.float32)}


def _accumulate(loss_and_grad: Callable, params, batch: dict, keys, accum_steps: int):
  """Mean loss/grads/aux over `accum_steps` micro-batches (lax.scan, one update)."""
  if accum_steps == 1:
    return loss_and_grad(params, batch, keys[0])
  micro = jax.tree_util.tree_map(
      lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

  def body(carry, inputs):
    mb, key = inputs
    (loss, aux), grads = loss_and_grad(params, mb, key)
    acc_loss, acc_aux, acc_grads = carry
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    return (acc_loss + loss, add(acc_aux, aux), add(acc_grads, grads)), None

  first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(loss_and_grad, params, first_mb, keys[0])
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  init = (zeros[0][0], zeros[0][1], zeros[1])
  (loss, aux, grads), _ = jax.lax.scan(body, init, (micro, keys[:accum_steps]))
  scale = lambda t: jax.tree_util.tree_map(lambda x: x / accum_steps, t)
  return (loss / accum_steps, scale(aux)), scale(grads)


def make_pretrain_step(model: nn.Module, tx, mask_ratio: float, accum_steps: int = 1,
                       device_augment: Callable = identity_augment, schedule=None):
  """(state, batch) -> (state, metrics) for masked autoencoding."""

  def loss_and_grad(params, batch, key):
    aug_key, mask_key = jax.random.split(key)
    images = device_augment(aug_key, batch["image"], True)

    def loss_fn(p):
      out = model.apply({"params": p}, images, mask_ratio=mask_ratio, train=True,
                        rngs={"masking": mask_key, "dropout": aug_key})
      return out["loss"], {}
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def step(state: TrainState, batch: dict):
    keys = step_keys(state, max(accum_steps, 1))
    (loss, _), grads = _accumulate(loss_and_grad, state.params, batch, keys, accum_steps)
    lr = schedule(state.step) if schedule is not None else 0.0
    state, extra = _apply(state, tx, grads, loss)
    return state, {"loss": loss, "learning_rate": lr, **extra}
  return step


def make_classify_step(model: nn.Module, tx, num_classes: int, accum_steps: int = 1,
                       label_smoothing: float = 0.0, mix: Callable | None = None,
                       device_augment: Callable = identity_augment, schedule=None):
  """(state, batch) -> (state, metrics) for linear probing / fine-tuning.

  `mix(key, images, onehot) -> (images, targets)` applies mixup/cutmix.
  """

  def loss_and_grad(params_and_stats, batch, key):
    params, batch_stats = params_and_stats
    aug_key, mix_key, drop_key = jax.random.split(key, 3)
    images = device_augment(aug_key, batch["image"], True)
    targets = jax.nn.one_hot(batch["label"], num_classes)
    if mix is not None:
      images, targets = mix(mix_key, images, targets)
    if label_smoothing:
      targets = optax.smooth_labels(targets, label_smoothing)

    def loss_fn(p):
      variables = {"params": p}
      if batch_stats:
        variables["batch_stats"] = batch_stats
        logits, new = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": drop_key})
        new_stats = new["batch_stats"]
      else:
        logits = model.apply(variables, images, train=True, rngs={"dropout": drop_key})
        new_stats = batch_stats
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      correct = (jnp.argmax(logits, -1) == batch["label"]).mean()
      return loss, {"accuracy": correct, "batch_stats": new_stats}
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def step(state: TrainState, batch: dict):
    keys = step_keys(state, max(accum_steps, 1))
    fn = lambda p, b, k: loss_and_grad((p, state.batch_stats), b, k)
    (loss, aux), grads = _accumulate(fn, state.params, batch, keys, accum_steps)
    lr = schedule(state.step) if schedule is not None else 0.0
    state, extra = _apply(state, tx, grads, loss, aux["batch_stats"] or None)
    return state, {"loss": loss, "accuracy": aux["accuracy"], "learning_rate": lr, **extra}
  return step
