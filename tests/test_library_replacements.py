"""Library functions that replaced hand-written ones keep the old behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crate_mae_jax.models import layers


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


# ----------------------------------------------------------------------------- crop / resize
# The dense interpolation matrices augment_jax used before jax.image.scale_and_translate,
# kept here as the reference: one (out, in) weight row per output pixel, PIL's
# pixel-centre convention, kernel widened when down-sampling, renormalised at the borders.
def _old_kernel(x, method):
  ax = np.abs(x)
  if method == "bilinear":
    return np.maximum(0.0, 1.0 - ax)
  a = -0.5
  near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
  far = ((a * ax - 5.0 * a) * ax + 8.0 * a) * ax - 4.0 * a
  return np.where(ax <= 1.0, near, np.where(ax < 2.0, far, 0.0))


def _old_resize_matrix(in_size, out_size, start, length, method):
  centres = start + (np.arange(out_size) + 0.5) * (length / out_size) - 0.5
  support = max(length / out_size, 1.0)
  w = _old_kernel((np.arange(in_size)[None, :] - centres[:, None]) / support, method)
  total = w.sum(axis=1, keepdims=True)
  return w / np.where(total == 0, 1.0, total)


def _old_crop(image, box, size, method):
  top, left, ch, cw = box
  wy = _old_resize_matrix(image.shape[0], size, top, ch, method)
  wx = _old_resize_matrix(image.shape[1], size, left, cw, method)
  return np.einsum("tw,swc->stc", wx, np.einsum("sh,hwc->swc", wy, image))


_BOXES = [(0, 0, 28, 28), (3, 5, 12, 20), (0, 10, 28, 18), (7.5, 2.25, 9.5, 13.0),
          (20, 20, 8, 8), (1, 0, 4, 6)]


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_crop_and_resize_matches_the_old_dense_matrices(method):
  from crate_mae_jax.data import augment_jax
  image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
  for size in (16, 32):   # down- and up-sampling
    expected = np.stack([_old_crop(image, box, size, method) for box in _BOXES])
    top, left, ch, cw = (jnp.asarray(v, jnp.float32) for v in zip(*_BOXES))
    got = jax.jit(jax.vmap(lambda t, l, h, w: augment_jax.crop_and_resize(
        jnp.asarray(image, jnp.float32), t, l, h, w, size, method)))(top, left, ch, cw)
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)


def test_crop_geometry_of_a_coordinate_image():
  """Pixels that hold their own coordinates: an integer box at scale 1 returns exactly
  those coordinates, the whole-image box returns the image, and a 2x up-sampled crop
  samples at the output pixel centres."""
  from crate_mae_jax.data import augment_jax
  rows, cols = np.meshgrid(np.arange(20.0), np.arange(24.0), indexing="ij")
  image = jnp.asarray(np.stack([rows, cols], -1), jnp.float32)
  for method in ("bilinear", "bicubic"):
    crop = augment_jax.crop_and_resize(image, 4, 6, 10, 10, 10, method)
    np.testing.assert_allclose(crop, image[4:14, 6:16], atol=1e-4)
    same = augment_jax.crop_and_resize(image[:20, :20], 0, 0, 20, 20, 20, method)
    np.testing.assert_allclose(same, image[:20, :20], atol=1e-4)
  up = augment_jax.crop_and_resize(image, 4, 6, 6, 6, 12, "bilinear")
  centres = 4 + (np.arange(12) + 0.5) / 2 - 0.5      # input row of each output pixel
  np.testing.assert_allclose(up[2:-2, 5, 0], centres[2:-2], atol=1e-4)   # inside the box
  np.testing.assert_allclose(up[5, 2:-2, 1], centres[2:-2] + 2, atol=1e-4)


def test_eval_box_is_the_old_eval_geometry():
  from crate_mae_jax.data import augment_jax
  image = np.random.default_rng(1).uniform(0, 255, (80, 100, 3))
  aug = augment_jax.make_device_augment(image_size=64, mean=(0.0,) * 3, std=(1 / 255.0,) * 3)
  got = aug(jax.random.key(0), image[None], False)[0]
  short = round(64 / 0.875)                   # 73: shorter side, then a centre crop of 64
  box = []
  for size in (80, 100):
    resized = max(round(size * short / 80), 64)
    box += [round((resized - 64) / 2) * size / resized, 64 * size / resized]
  expected = np.clip(_old_crop(image, (box[0], box[2], box[1], box[3]), 64, "bicubic"), 0, 255)
  np.testing.assert_allclose(got, expected, atol=2e-3)
  small = augment_jax.make_device_augment(image_size=32, mean=(0.0,), std=(1 / 255.0,))
  gray = image[:28, :28, :1]
  np.testing.assert_allclose(small(jax.random.key(0), gray[None], False)[0],
                             np.clip(_old_crop(gray, (0, 0, 28, 28), 32, "bicubic"), 0, 255),
                             atol=2e-3)


def test_train_crop_flips_the_resized_columns():
  from crate_mae_jax.data import augment_jax
  image = np.random.default_rng(2).integers(0, 256, (1, 12, 12, 1)).astype(np.uint8)
  aug = augment_jax.make_device_augment(image_size=12, mean=(0.0,), std=(1 / 255.0,),
                                        crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))
  outs = {tuple(np.round(np.asarray(aug(jax.random.key(k), image, True))).ravel())
          for k in range(8)}
  assert outs == {tuple(image.ravel().astype(float)), tuple(image[:, :, ::-1].ravel().astype(float))}
  with pytest.raises(ValueError, match="interpolation 'nearest' is unknown"):
    augment_jax.make_device_augment(image_size=12, mean=(0.0,), std=(1.0,), method="nearest")
