"""CRATE-MAE: a masked autoencoder built from white-box CRATE layers.

Unlike MAE, the encoder sees the whole sequence: masked patches are replaced by a
learned mask token before the (fixed, sin-cos) position embedding is added, as in
the official `model/crate_ae/crate_ae.py`. The decoder consumes the normalised
encoder output directly (the official `decoder_embed` layer is never called and so
does not exist here).
"""
import flax.linen as nn
import jax

from crate_mae_jax.models import layers
from crate_mae_jax.models.patches import masking_from_noise, masked_mse, num_patches, patchify


class CrateEncoder(layers.StackModule):
  """Patch embedding, cls token, optional mask tokens, CRATE layers, final norm.

  `__call__(images, mask=None)` returns all tokens after the final LayerNorm,
  cls first: (B, 1 + L, width). `mask` (B, L), 1 = masked, swaps those patch
  embeddings for the mask token; downstream use passes none.
  """
  patch_size: int
  width: int
  depth: int
  heads: int
  ista_step: float = 0.1
  ista_lambda: float = 0.5
  ista_fused: bool = True
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.encoder_stem(self, images, self.patch_size, self.width, mask=mask, **kw)
    x = layers.constrain(x, layers.ACT)
    x, valid = layers.stack_padding(x, self.attention_impl, self.dtype,
                                    head_dim=self.width // self.heads)
    layer_cls = layers.remat_layer(layers.CrateEncoderLayer, self.remat_policy)
    for i in range(self.depth):
      x = layer_cls(self.heads, self.width // self.heads, self.ista_step,
                    self.ista_lambda, self.ista_fused,
                    self.drop_path * i / max(self.depth - 1, 1),
                    attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                    name=f"layer_{i}", **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    return layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", norm_impl=self.norm_impl, **kw)(x)


class CrateDecoder(layers.StackModule):
  """CRATE decoder layers, final norm and a linear pixel head; drops the cls token."""
  patch_size: int
  channels: int
  width: int
  depth: int
  heads: int

  @nn.compact
  def __call__(self, latent: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, valid = layers.stack_padding(latent, self.attention_impl, self.dtype,
                                    head_dim=self.width // self.heads)
    layer_cls = layers.remat_layer(layers.CrateDecoderLayer, self.remat_policy)
    for i in range(self.depth):
      x = layer_cls(self.heads, self.width // self.heads,
                    attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                    name=f"layer_{i}", **kw)(x, not train, valid)
    x = layers.valid_rows(x, valid)
    x = layers.layer_norm(layers.FINAL_NORM_EPS, name="norm", norm_impl=self.norm_impl, **kw)(x)
    pred = nn.Dense(
        self.patch_size**2 * self.channels,
        kernel_init=layers.partitioned(layers.xavier(), ("embed", "pixels")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("pixels",)),
        name="pixel_head", **kw)(x)
    return pred[:, 1:, :]


class CrateMAE(layers.StackModule):
  """The masked autoencoder. Randomness is explicit: the 'masking' PRNG stream,
  or a `noise` array (B, L) whose smallest entries mark the kept patches.

  Returns a dict with `latent` (B, 1+L, D, after the encoder norm), `pred`
  (B, L, p*p*C), `mask` (B, L; 1 = masked), `ids_restore` and the scalar `loss`.
  """
  patch_size: int
  channels: int
  width: int
  depth: int
  heads: int
  decoder_depth: int
  decoder_heads: int | None = None   # None: as many as the encoder
  ista_step: float = 0.1
  ista_lambda: float = 0.5
  ista_fused: bool = True
  norm_pix_loss: bool = False

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, norm_impl=self.norm_impl,
              remat_policy=self.remat_policy)
    self.encoder = CrateEncoder(self.patch_size, self.width, self.depth, self.heads,
                                self.ista_step, self.ista_lambda, self.ista_fused, **kw)
    self.decoder = CrateDecoder(self.patch_size, self.channels, self.width,
                                self.decoder_depth, self.decoder_heads or self.heads, **kw)

  def __call__(self, images: jax.Array, *, mask_ratio: float,
               noise: jax.Array | None = None, train: bool = False) -> dict:
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"),
                                 (images.shape[0], num_patches(images, self.patch_size)))
    mask, ids_restore, _ = masking_from_noise(noise, mask_ratio)
    latent = self.encoder(images, mask, train)
    pred = self.decoder(latent, train)
    loss = masked_mse(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
    return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore, loss=loss)

  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Encoder features of every token, no masking: (B, 1 + L, D)."""
    return self.encoder(images, None, train)
