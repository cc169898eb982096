"""Unit tests of the optimizer pieces and of gradient accumulation (CPU, seconds)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from crate_mae_jax import config_lib, models
from crate_mae_jax.training import optim, state_lib, steps


def _tiny_encoder_params(arch: str):
  cfg = models.model_config("base", arch)
  cfg.update(dict(patch_size=4, channels=1, width=16, depth=2, heads=2, decoder_depth=1,
                  decoder_width=16, decoder_heads=2))
  return models.abstract_params(cfg, image_size=8)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_layer_index_of_every_encoder_parameter(arch):
  depth = 2
  flat = traverse_util.flatten_dict(_tiny_encoder_params(arch))
  seen = {}
  for path in flat:
    i = optim.layer_index(path, depth)
    seen.setdefault(i, []).append("/".join(path))
    if path[0] == "encoder" and path[1].startswith("layer_"):
      assert i == int(path[1].split("_")[1]) + 1, path
    elif path[0] == "encoder" and path[1] in ("patch_embed", "cls_token", "mask_token"):
      assert i == 0, path
    else:  # final norm, decoder, head: the top of the stack
      assert i == depth + 1, path
  assert sorted(seen) == list(range(depth + 2)), seen


def test_layer_index_of_a_classifier_head():
  assert optim.layer_index(("head", "kernel"), 12) == 13
  assert optim.layer_index(("encoder", "norm", "scale"), 12) == 13
  assert optim.layer_index(("encoder", "layer_11", "mlp", "fc1", "kernel"), 12) == 12


@pytest.mark.parametrize("arch", models.ARCHS)
def test_decay_mask_excludes_norms_biases_and_tokens(arch):
  params = _tiny_encoder_params(arch)
  flat_mask = traverse_util.flatten_dict(optim.decay_mask(params))
  flat = traverse_util.flatten_dict(params)
  decayed = {p for p, m in flat_mask.items() if m}
  assert decayed, "some matrices must take weight decay"
  for path, leaf in flat.items():
    name = path[-1]
    if name in ("cls_token", "mask_token") or name in ("bias", "scale") or leaf.ndim < 2:
      assert path not in decayed, path
    elif name == "kernel" or leaf.ndim >= 2:
      assert path in decayed, path


def _sgd_config(layer_decay=None):
  cfg = config_lib.default_config()
  cfg.optim.name = "sgd"
  cfg.optim.momentum = 0.0
  cfg.optim.weight_decay = 0.0
  cfg.optim.lr = 1.0
  cfg.optim.warmup_epochs = 0.0
  cfg.optim.layer_decay = layer_decay
  return cfg


def test_layer_decay_scales_the_update_of_each_depth():
  depth, decay = 2, 0.5
  params = {"encoder": {"patch_embed": {"kernel": jnp.ones((2, 2))},
                        "layer_0": {"w": jnp.ones((2, 2))},
                        "layer_1": {"w": jnp.ones((2, 2))},
                        "norm": {"scale": jnp.ones((2,))}},
            "head": {"kernel": jnp.ones((2, 2))}}
  tx, _ = optim.create(_sgd_config(decay), params, total_steps=10, steps_per_epoch=1.0,
                       depth=depth)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  head = float(updates["head"]["kernel"][0, 0])
  assert head < 0
  enc = updates["encoder"]
  for name, i in (("patch_embed", 0), ("layer_0", 1), ("layer_1", 2)):
    leaf = next(iter(enc[name].values()))
    np.testing.assert_allclose(float(leaf[0, 0]) / head, decay ** (depth + 1 - i), rtol=1e-6)
  np.testing.assert_allclose(float(enc["norm"]["scale"][0]) / head, 1.0, rtol=1e-6)


class _Linear(nn.Module):
  """A deterministic classifier: no dropout, so micro-batching changes nothing."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_gradient_accumulation_matches_one_big_batch():
  model = _Linear()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 4, 4, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, size=8), jnp.int32)}
  params = model.init(jax.random.key(0), batch["image"])["params"]
  tx = optax.adamw(1e-2, weight_decay=0.05)
  results = []
  for accum in (1, 2):
    state = state_lib.new_state(params, tx.init(params), jax.random.key(1))
    step = jax.jit(steps.make_classify_step(model, tx, num_classes=3, accum_steps=accum))
    state, metrics = step(state, batch)
    results.append((state, metrics))
  (one, m1), (two, m2) = results
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["accuracy"], m2["accuracy"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree_util.tree_leaves(one.params)[0],
                         jax.tree_util.tree_leaves(params)[0])


def test_warmup_longer_than_the_run_is_one_warning(caplog):
  """A warm-up that does not fit is cut to the run, said once with both lengths."""
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  from crate_mae_jax import config_lib
  from crate_mae_jax.training import optim  # pylint: disable=import-outside-toplevel
  cfg = config_lib.default_config()
  cfg.optim.warmup_epochs = 40.0
  with caplog.at_level(std_logging.WARNING):
    lr = optim.schedule(cfg, total_steps=100, steps_per_epoch=10.0)
  lines = [r.getMessage() for r in caplog.records if "warmup_epochs" in r.getMessage()]
  assert len(lines) == 1 and "400 steps" in lines[0] and "has 100" in lines[0], lines
  assert float(lr(99)) == pytest.approx(optim.peak_lr(cfg))
  caplog.clear()
  with caplog.at_level(std_logging.WARNING):
    optim.schedule(cfg, total_steps=1000, steps_per_epoch=10.0)
  assert not [r for r in caplog.records if "warmup_epochs" in r.getMessage()]
