"""Library functions that replaced hand-written ones keep the old behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crate_mae_jax import layers


def test_kaiming_uniform_is_the_old_variance_scaling():
  key = jax.random.key(3)
  old = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")(key, (64, 32))
  np.testing.assert_array_equal(layers.kaiming_uniform()(key, (64, 32)), old)


def test_tree_norm_is_the_old_global_norm():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(4), -2.0 * jnp.ones((2, 2))]}
  old = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(tree)))
  np.testing.assert_allclose(optax.tree.norm(tree), old, rtol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5])
def test_drop_path_drops_whole_samples_and_rescales(rate):
  x = jnp.ones((512, 5, 3))
  module = layers.DropPath(rate)
  out = module.apply({}, x, False, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_array_equal(module.apply({}, x, True), x)  # evaluation: identity
  out = np.asarray(out)
  per_sample = out.reshape(len(out), -1)
  # each sample is either dropped entirely or kept and scaled by 1 / keep
  kept = np.all(per_sample == 1.0 / (1.0 - rate), axis=1)
  dropped = np.all(per_sample == 0.0, axis=1)
  assert np.all(kept | dropped)
  assert abs(dropped.mean() - rate) < 0.07
