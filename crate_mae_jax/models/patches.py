"""Patch layout and per-sample random masking, shared by every model.

Images are NHWC. A patch is flattened as (row-in-patch, col-in-patch, channel),
the order of the official `patchify`, so pixel targets and the conv-equivalent
patch projection agree with PyTorch checkpoints.
"""
import jax
import jax.numpy as jnp


def patch_grid(images, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of patches of NHWC `images` (an array or anything with .shape)."""
  return images.shape[1] // patch_size, images.shape[2] // patch_size


def num_patches(images, patch_size: int) -> int:
  """Patches per image: the sequence length L before the cls token."""
  rows, cols = patch_grid(images, patch_size)
  return rows * cols


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/p * W/p, p*p*C)."""
  n, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
  x = images.reshape(n, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int,
               grid_hw: tuple[int, int] | None = None) -> jax.Array:
  """Inverse of `patchify`; a square grid unless `grid_hw` says otherwise."""
  n, length, _ = patches.shape
  p = patch_size
  if grid_hw is None:
    side = int(round(length**0.5))
    if side * side != length:
      raise ValueError(f"{length} patches do not form a square grid; pass grid_hw")
    grid_hw = (side, side)
  gh, gw = grid_hw
  x = patches.reshape(n, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * p, gw * p, channels)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Patches kept per image; truncation as the official `int(L * (1 - r))`."""
  return int(num_patches * (1 - mask_ratio))


def masking_from_noise(noise: jax.Array, mask_ratio: float):
  """Per-sample random masking: the patches with the smallest noise are kept.

  Returns (mask, ids_restore, ids_keep): `mask` is 1.0 where a patch is removed,
  `ids_restore` the official unshuffle indices (the rank of each patch's noise),
  `ids_keep` the kept patch indices in ascending-noise order.
  """
  keep = num_kept(noise.shape[1], mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return mask, ids_restore, ids_shuffle[:, :keep]


def per_patch_mse(pred: jax.Array, target: jax.Array, norm_pix_loss: bool) -> jax.Array:
  """Mean squared error of each patch, (N, L).

  With `norm_pix_loss` each target patch is standardised by its own mean and
  (unbiased, as torch.var) variance.
  """
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return jnp.mean((pred.astype(jnp.float32) - target)**2, axis=-1)


def masked_mean(per_patch: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean over masked patches; the mean over all patches where none is masked."""
  masked = mask.sum(axis=axis)
  masked_mean_ = (per_patch * mask).sum(axis=axis) / jnp.maximum(masked, 1.0)
  return jnp.where(masked > 0, masked_mean_, per_patch.mean(axis=axis))


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array,
               norm_pix_loss: bool) -> jax.Array:
  """The MAE loss: per-patch MSE averaged over the masked patches of the batch.

  When nothing is masked (mask ratio 0) the official loss is 0/0; here it is then
  the mean over *all* patches, i.e. the plain autoencoding error, so evaluation
  at ratio 0 stays meaningful.
  """
  return masked_mean(per_patch_mse(pred, target, norm_pix_loss), mask)
