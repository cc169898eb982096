"""Optimizers and schedules of the MAE recipes, built from optax pieces.

* pre-training: AdamW (β₂ 0.95), weight decay only on matrices (not on norms,
  biases or tokens), lr = base_lr × batch / 256, linear warm-up then cosine;
* linear probe: LARS (optax.lars) on the head alone, lr 0.1 × batch / 256;
* fine-tuning: AdamW with layer-wise lr decay (optax.multi_transform, one
  scaled learning rate per depth).
`optax.apply_if_finite` wraps everything when non-finite updates are skipped.
"""
import re

from absl import logging
import jax
import ml_collections
import optax
from flax import traverse_util


def peak_lr(cfg: ml_collections.ConfigDict) -> float:
  o = cfg.optim
  return o.lr if o.lr is not None else o.base_lr * cfg.batch_size / 256


def schedule(cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: float):
  requested = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
  warmup = min(requested, max(total_steps - 1, 0))
  if requested > warmup:
    logging.warning(
        "config.optim.warmup_epochs=%s is %d steps but the run has %d: warm-up cut to %d "
        "steps, with no decay phase; lower optim.warmup_epochs or train longer",
        cfg.optim.warmup_epochs, requested, total_steps, warmup)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr(cfg), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.optim.min_lr)


# Never decayed, whatever their rank: biases (the ViT qkv bias is 3-D), norm
# scales and the learned tokens -- as the official MAE / timm parameter groups.
NO_DECAY = ("bias", "scale", "cls_token", "mask_token")


def decay_mask(params):
  """True for parameters that take weight decay: kernels, embeddings and the
  ISTA dictionary; decided by name first, then rank (vectors never decay)."""
  def wants_decay(path, leaf):
    return leaf.ndim >= 2 and getattr(path[-1], "key", None) not in NO_DECAY
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def layer_index(path: tuple[str, ...], depth: int) -> int:
  """Depth of a parameter for layer-wise decay: embeddings 0, layer i → i+1,
  final norm and head depth+1 (as BEiT/MAE `param_groups_lrd`)."""
  if path[0] != "encoder":
    return depth + 1
  name = path[1]
  if name in ("patch_embed", "cls_token", "mask_token"):
    return 0
  match = re.fullmatch(r"layer_(\d+)", name)
  return int(match.group(1)) + 1 if match else depth + 1


def _base(cfg, lr):
  o = cfg.optim
  if o.name == "adamw":
    return lambda mask: optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                    mask=mask)
  if o.name == "lars":
    return lambda mask: optax.lars(lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   weight_decay_mask=mask, trust_ratio_mask=mask)
  return lambda mask: optax.chain(
      optax.add_decayed_weights(o.weight_decay, mask), optax.sgd(lr, momentum=o.momentum))


def create(cfg: ml_collections.ConfigDict, params, total_steps: int,
           steps_per_epoch: float, trainable=None, depth: int | None = None):
  """The optax transformation for `cfg`. `trainable` (a bool tree) freezes the
  rest (linear probe); `depth` enables layer-wise lr decay when configured."""
  lr = schedule(cfg, total_steps, steps_per_epoch)
  mask = decay_mask  # a callable: also valid on the sub-trees multi_transform passes
  layer_decay = cfg.optim.layer_decay
  if layer_decay is not None and layer_decay < 1.0 and depth is not None:
    flat = traverse_util.flatten_dict(params)
    labels = traverse_util.unflatten_dict(
        {k: f"depth_{layer_index(k, depth)}" for k in flat})
    transforms = {}
    for i in range(depth + 2):
      scale = layer_decay ** (depth + 1 - i)
      transforms[f"depth_{i}"] = _base(cfg, lambda step, s=scale: lr(step) * s)(mask)
    tx = optax.multi_transform(transforms, labels)
  else:
    tx = _base(cfg, lr)(mask)
  if trainable is not None:
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if cfg.optim.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.clip_grad_norm), tx)
  if cfg.nonfinite == "skip":
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
  return tx, lr
