"""The standard ViT-MAE baseline (He et al., 2022) in the same codebase.

`encoder_sees='visible'` (MAE): the encoder runs on the visible patches only; a
separate, usually lighter decoder embeds the latent, inserts mask tokens, adds
its own position table and reconstructs pixels. `encoder_sees='all'` (the
official CRATE repository's `mae_vit_*` baseline, laid out like CRATE-MAE): the
masked patches' embeddings are replaced by a learned mask token before the
position table, the encoder runs on the whole sequence and the decoder (as wide
as the encoder) consumes the normalised latent directly. Same patching, masking and loss code as CRATE-MAE, so every
comparison between the two is apples to apples.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.models import layers
from crate_mae_jax.models.layers import add_position
from crate_mae_jax.models.patches import masking_from_noise, masked_mse, patch_grid, patchify


ENCODER_SEES = ("visible", "all")


class ViTEncoder(layers.StackModule):
  """ViT encoder; `ids_keep` (B, K) selects the visible patches (MAE), or, with
  `mask_tokens`, `mask` (B, L; 1 = masked) swaps masked patch embeddings for a
  learned mask token and every token is kept."""
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  mask_tokens: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None,
               train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if mask is not None and not self.mask_tokens:
      raise ValueError("ViTEncoder(mask_tokens=False) takes ids_keep, not a mask")
    x = layers.encoder_stem(self, images, self.patch_size, self.width, mask=mask,
                            mask_token=self.mask_tokens, **kw)
    if ids_keep is not None:
      visible = jnp.take_along_axis(x[:, 1:], ids_keep[..., None], axis=1)
      x = jnp.concatenate([x[:, :1], visible], axis=1)
    x, valid = layers.stack_padding(x, self.attention_impl, self.dtype, shared_qkv=False)
    block = layers.remat_layer(layers.ViTBlock, self.remat_policy)
    for i in range(self.depth):
      x = block(self.heads, self.mlp_ratio,
                self.drop_path * i / max(self.depth - 1, 1),
                attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                name=f"layer_{i}",
                **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    return layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", norm_impl=self.norm_impl, **kw)(x)


class ViTDecoder(layers.StackModule):
  """MAE decoder: embed, unshuffle with mask tokens, ViT blocks, pixel head; with
  `embed_latent=False` the latent (full sequence, decoder width) goes straight
  into the blocks."""
  patch_size: int
  channels: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  embed_latent: bool = True

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array,
               grid: tuple[int, int], train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.embed_latent:
      x = self._embed_and_unshuffle(latent, ids_restore, grid, kw)
    else:
      x = latent
    x, valid = layers.stack_padding(x, self.attention_impl, self.dtype, shared_qkv=False)
    block = layers.remat_layer(layers.ViTBlock, self.remat_policy)
    for i in range(self.depth):
      x = block(self.heads, self.mlp_ratio, attention_impl=self.attention_impl,
                norm_impl=self.norm_impl, name=f"layer_{i}", **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    x = layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", norm_impl=self.norm_impl, **kw)(x)
    pred = nn.Dense(self.patch_size**2 * self.channels,
                    kernel_init=layers.partitioned(layers.xavier(), ("decoder_embed", "pixels")),
                    bias_init=layers.partitioned(nn.initializers.zeros, ("pixels",)),
                    name="pixel_head", **kw)(x)
    return pred[:, 1:, :]

  def _embed_and_unshuffle(self, latent, ids_restore, grid, kw):
    x = nn.Dense(self.width,
                 kernel_init=layers.partitioned(layers.xavier(), ("embed", "decoder_embed")),
                 bias_init=layers.partitioned(nn.initializers.zeros, ("decoder_embed",)),
                 name="embed", **kw)(latent)
    mask_token = layers.token(self, "mask_token", self.width, self.param_dtype)
    batch, length = ids_restore.shape
    fill = jnp.broadcast_to(mask_token.astype(x.dtype),
                            (batch, length + 1 - x.shape[1], self.width))
    shuffled = jnp.concatenate([x[:, 1:], fill], axis=1)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
    return add_position(jnp.concatenate([x[:, :1], unshuffled], axis=1), grid)


class ViTMAE(layers.StackModule):
  """MAE with a ViT encoder; same outputs as `CrateMAE`.

  `latent` holds the cls token and the visible tokens (B, 1+K, D), or every
  token (B, 1+L, D) with `encoder_sees='all'`.
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
  encoder_sees: str = "visible"      # 'visible' (MAE) or 'all' (mask tokens, official mae_vit)
  norm_pix_loss: bool = False

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, norm_impl=self.norm_impl,
              remat_policy=self.remat_policy)
    if self.encoder_sees not in ENCODER_SEES:
      raise ValueError(f"encoder_sees={self.encoder_sees!r}; use one of {ENCODER_SEES}")
    full = self.encoder_sees == "all"
    self.encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.heads,
                              self.mlp_ratio, mask_tokens=full, **kw)
    self.decoder = ViTDecoder(self.patch_size, self.channels, self.decoder_width,
                              self.decoder_depth, self.decoder_heads, self.mlp_ratio,
                              embed_latent=not full, **kw)

  def __call__(self, images: jax.Array, *, mask_ratio: float,
               noise: jax.Array | None = None, train: bool = False) -> dict:
    grid = patch_grid(images, self.patch_size)
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"),
                                 (images.shape[0], grid[0] * grid[1]))
    mask, ids_restore, ids_keep = masking_from_noise(noise, mask_ratio)
    if self.encoder_sees == "all":
      latent = self.encoder(images, None, train, mask=mask)
    else:
      latent = self.encoder(images, ids_keep, train)
    pred = self.decoder(latent, ids_restore, grid, train)
    loss = masked_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
    return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore, loss=loss)

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.encoder(images, None, train)
