"""The standard ViT-MAE baseline (He et al., 2022) in the same codebase.

The encoder runs on the visible patches only; a separate, usually lighter decoder
embeds the latent, inserts mask tokens, adds its own position table and
reconstructs pixels. Same patching, masking and loss code as CRATE-MAE, so every
comparison between the two is apples to apples.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax import layers
from crate_mae_jax.crate_mae import _grid, add_position
from crate_mae_jax.patches import masking_from_noise, masked_mse, patchify


class ViTEncoder(nn.Module):
  """ViT encoder; `ids_keep` (B, K) selects the visible patches (MAE)."""
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.PatchEmbed(self.patch_size, self.width, name="patch_embed", **kw)(images)
    cls = layers.token(self, "cls_token", self.width, self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
    x = add_position(jnp.concatenate([cls, x], axis=1), _grid(images, self.patch_size))
    if ids_keep is not None:
      visible = jnp.take_along_axis(x[:, 1:], ids_keep[..., None], axis=1)
      x = jnp.concatenate([x[:, :1], visible], axis=1)
    x, valid = layers.stack_padding(x, self.attention_impl, self.dtype)
    block = layers.remat_layer(layers.ViTBlock, self.remat_policy)
    for i in range(self.depth):
      x = block(self.heads, self.mlp_ratio,
                self.drop_path * i / max(self.depth - 1, 1),
                attention_impl=self.attention_impl, name=f"layer_{i}",
                **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    return layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", **kw)(x)


class ViTDecoder(nn.Module):
  """MAE decoder: embed, unshuffle with mask tokens, ViT blocks, pixel head."""
  patch_size: int
  channels: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array,
               grid: tuple[int, int], train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.width, kernel_init=layers.partitioned(layers.xavier(), ("embed", "mlp")),
                 bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
                 name="embed", **kw)(latent)
    mask_token = layers.token(self, "mask_token", self.width, self.param_dtype)
    batch, length = ids_restore.shape
    fill = jnp.broadcast_to(mask_token.astype(x.dtype),
                            (batch, length + 1 - x.shape[1], self.width))
    shuffled = jnp.concatenate([x[:, 1:], fill], axis=1)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
    x = add_position(jnp.concatenate([x[:, :1], unshuffled], axis=1), grid)
    x, valid = layers.stack_padding(x, self.attention_impl, self.dtype)
    block = layers.remat_layer(layers.ViTBlock, self.remat_policy)
    for i in range(self.depth):
      x = block(self.heads, self.mlp_ratio, attention_impl=self.attention_impl,
                name=f"layer_{i}", **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    x = layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", **kw)(x)
    pred = nn.Dense(self.patch_size**2 * self.channels,
                    kernel_init=layers.partitioned(layers.xavier(), ("mlp", "pixels")),
                    bias_init=layers.partitioned(nn.initializers.zeros, ("pixels",)),
                    name="pixel_head", **kw)(x)
    return pred[:, 1:, :]


class ViTMAE(nn.Module):
  """MAE with a ViT encoder on visible patches; same outputs as `CrateMAE`.

  `latent` holds only the cls token and the visible tokens (B, 1+K, D).
  """
  patch_size: int
  channels: int
  width: int
  depth: int
  heads: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None
  remat_policy: str | None = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, remat_policy=self.remat_policy)
    self.encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.heads,
                              self.mlp_ratio, **kw)
    self.decoder = ViTDecoder(self.patch_size, self.channels, self.decoder_width,
                              self.decoder_depth, self.decoder_heads, self.mlp_ratio, **kw)

  def __call__(self, images: jax.Array, *, mask_ratio: float,
               noise: jax.Array | None = None, train: bool = False) -> dict:
    grid = _grid(images, self.patch_size)
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"),
                                 (images.shape[0], grid[0] * grid[1]))
    mask, ids_restore, ids_keep = masking_from_noise(noise, mask_ratio)
    latent = self.encoder(images, ids_keep, train)
    pred = self.decoder(latent, ids_restore, grid, train)
    loss = masked_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
    return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore, loss=loss)

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.encoder(images, None, train)
