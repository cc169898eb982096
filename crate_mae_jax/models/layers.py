"""The building blocks of CRATE-MAE and of the ViT-MAE baseline.

Every parameter carries logical axis names (flax linen partitioning), so a mesh and
a table of rules in the config decide how it is sharded; outside a mesh the names
cost nothing. Initialisers follow the official PyTorch code so training from
scratch starts from the same distribution.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.models.patches import patch_grid, patchify
from crate_mae_jax.models.pos_embed import sincos_2d
from crate_mae_jax.kernels.attention import attention, resolve_attention, stack_padding
from crate_mae_jax.kernels.layernorm import add_and_norm, layer_norm
from crate_mae_jax.sharding import ACT, ACT_HEADS, mesh_spec

Dtype = Any
init = jax.nn.initializers

# Layer norm inside blocks uses PyTorch's default eps; the final norms use 1e-6.
BLOCK_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6


def partitioned(initializer: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(initializer, names)


def kernel_shaped(initializer: Callable, names: tuple[str | None, ...],
                  shape: tuple[int, ...]) -> Callable:
  """A DenseGeneral initialiser whose logical names fit its real shape.

  DenseGeneral calls kernel/bias initialisers with the flattened (in, out)
  shape (so xavier sees PyTorch's fans) and reshapes the result; a boxed value
  of that flat shape cannot carry one name per real dimension under a mesh.
  This one draws the flat matrix and returns it already in `shape`.
  """
  def init_fn(key, flat_shape, dtype=jnp.float32):
    return initializer(key, flat_shape, dtype).reshape(shape)
  return partitioned(init_fn, names)


def xavier() -> Callable:
  """xavier_uniform; DenseGeneral applies it to the flattened (in, out) matrix,
  which is what PyTorch sees for the same layer."""
  return init.xavier_uniform()


def kaiming_uniform() -> Callable:
  """torch.nn.init.kaiming_uniform_ defaults: bound sqrt(6 / fan_in)."""
  return init.he_uniform()


def torch_default_bias(fan_in: int) -> Callable:
  """A PyTorch conv/linear bias left at its default: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / fan_in**0.5

  def initializer(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return initializer


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding constraint from logical names.

  Applies under a mesh set with `jax.set_mesh` and active logical rules
  (`sharding.activate`), a no-op otherwise. Mesh axes that do not divide a
  dimension (a batch of one at init, an odd token count) leave it replicated
  rather than failing.
  """
  spec = mesh_spec(names, x.shape)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)





class LayerModule(nn.Module):
  """The keyword-only fields every layer with attention takes: compute and
  parameter dtypes and the attention and LayerNorm kernels."""
  _: dataclasses.KW_ONLY
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_impl: str | None = None


class StackModule(LayerModule):
  """A stack of such layers (encoder, decoder, whole MAE): also its remat policy."""
  _: dataclasses.KW_ONLY
  remat_policy: str | None = None


class DropPath(nn.Module):
  """Stochastic depth on a residual branch: drops it per sample in training."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    # Dropout with one draw per sample: every axis but the batch is broadcast.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)


def valid_rows(x: jax.Array, valid_length: int | None) -> jax.Array:
  """The real tokens of a padded (batch, tokens, ...) activation, for sown values."""
  return x if valid_length is None else x[:, :valid_length]


class HeadMerge(nn.Module):
  """MSSA's output projection, (…, heads, head_dim) -> (…, width) with bias:
  flax's `DenseGeneral(axis=(-2, -1))`, the same parameters ('kernel', 'bias').
  `negate` returns its negative by negating the (small) kernel and bias, so the
  decoder's `y − MSSA(·)` costs no pass over the activation for the sign,
  forward or backward."""
  width: int
  negate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    heads, head_dim = x.shape[-2:]
    # Drawn flat, as DenseGeneral draws it (xavier's fans are PyTorch's).
    kernel = self.param("kernel", kernel_shaped(xavier(), ("heads", "head_dim", "embed"),
                                                (heads, head_dim, self.width)),
                        (heads * head_dim, self.width), self.param_dtype)
    bias = self.param("bias", partitioned(init.zeros, ("embed",)), (self.width,),
                      self.param_dtype)
    if self.negate:
      kernel, bias = -kernel, -bias
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 2, x.ndim - 1), (0, 1)), ((), ())))
    return y + bias


class MSSA(nn.Module):
  """Multi-head subspace self-attention.

  One bias-free projection U_k per head serves as query, key and value
  (w = x U_k; softmax(w wᵀ / sqrt(d_h)) w): the gradient step that compresses
  tokens towards their subspaces. An output projection with bias mixes heads
  (`negate`: its negative, for the decoder).
  The projection `w` is sown as 'intermediates/subspace_proj' for diagnostics.
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  negate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, valid_length: int | None = None) -> jax.Array:
    width = x.shape[-1]
    w = nn.DenseGeneral(
        (self.heads, self.head_dim), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=kernel_shaped(xavier(), ("embed", "heads", "head_dim"),
                                  (width, self.heads, self.head_dim)),
        name="subspaces")(x)
    self.sow("intermediates", "subspace_proj", valid_rows(w, valid_length))
    w = constrain(w, ACT_HEADS)
    impl = resolve_attention(self.attention_impl, self.dtype, head_dim=self.head_dim)
    out = constrain(attention(w, w, w, self.head_dim**-0.5, impl, valid_length), ACT_HEADS)
    return HeadMerge(width, self.negate, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="out")(out)


class ISTA(nn.Module):
  """One proximal-gradient (ISTA) step on the sparse-coding objective.

  relu(x + η(x D − x Dᵀ D) − η λ), with D the official (d, d) `weight`, stored
  untransposed as 'dictionary'. The two products with D are folded into one,
  x (D − Dᵀ D), computed once per call: same function, a third of the FLOPs.
  `fused=False` evaluates the official three-product form.
  """
  step_size: float = 0.1
  lambd: float = 0.5
  fused: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid_length: int | None = None) -> jax.Array:
    d = x.shape[-1]
    dictionary = self.param("dictionary",
                            partitioned(kaiming_uniform(), ("embed", "dict")),
                            (d, d), self.param_dtype)
    x = x.astype(self.dtype)
    if self.fused:
      dictionary = dictionary.astype(jnp.float32)
      operator = (dictionary - dictionary.T @ dictionary).astype(self.dtype)
      update = x @ operator
    else:
      dictionary = dictionary.astype(self.dtype)
      update = x @ dictionary - (x @ dictionary.T) @ dictionary
    out = jax.nn.relu(x + self.step_size * update - self.step_size * self.lambd)
    self.sow("intermediates", "sparse_code", valid_rows(out, valid_length))
    return out


class CrateEncoderLayer(LayerModule):
  """Compress, then sparsify: z½ = z + MSSA(LN z); z' = ISTA(LN z½)."""
  heads: int
  head_dim: int
  ista_step: float = 0.1
  ista_lambda: float = 0.5
  ista_fused: bool = True
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True,
               valid_length: int | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_mssa", norm_impl=self.norm_impl, **kw)(z)
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl,
             name="mssa", **kw)(h, valid_length)
    norm = layer_norm(BLOCK_NORM_EPS, name="norm_ista", norm_impl=self.norm_impl, **kw)
    z, h = add_and_norm(norm, z, DropPath(self.drop_path)(h, deterministic),
                        constrain=lambda t: constrain(t, ACT))
    z = ISTA(self.ista_step, self.ista_lambda, self.ista_fused, name="ista",
             **kw)(h, valid_length)
    return constrain(z, ACT)


class CrateDecoderLayer(LayerModule):
  """The encoder layer inverted: y = D_lin(LN x); x' = y − MSSA(LN y)."""
  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               valid_length: int | None = None) -> jax.Array:
    del deterministic
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_dict", norm_impl=self.norm_impl, **kw)(x)
    y = nn.Dense(x.shape[-1], use_bias=False,
                 kernel_init=partitioned(kaiming_uniform(), ("dict", "embed")),
                 name="dictionary", **kw)(h)
    self.sow("intermediates", "dictionary_out", valid_rows(y, valid_length))
    y = constrain(y, ACT)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_mssa", norm_impl=self.norm_impl, **kw)(y)
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl, negate=True,
             name="mssa", **kw)(h, valid_length)
    return constrain(y + h, ACT)                    # y − MSSA(LN y), the sign in `negate`


class MLP(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=partitioned(xavier(), ("embed", "mlp")),
                 bias_init=partitioned(init.zeros, ("mlp",)), name="fc1", **kw)(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(width, kernel_init=partitioned(xavier(), ("mlp", "embed")),
                    bias_init=partitioned(init.zeros, ("embed",)), name="fc2", **kw)(x)


class ViTBlock(LayerModule):
  """Pre-norm transformer block of ViT / MAE (separate q, k, v and an MLP)."""
  heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               valid_length: int | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    head_dim = width // self.heads
    h = layer_norm(FINAL_NORM_EPS, name="norm_attn", norm_impl=self.norm_impl, **kw)(x)
    qkv = nn.DenseGeneral(
        (3, self.heads, head_dim),
        kernel_init=kernel_shaped(xavier(), ("embed", None, "heads", "head_dim"),
                                  (width, 3, self.heads, head_dim)),
        bias_init=kernel_shaped(init.zeros, (None, "heads", "head_dim"),
                                (3, self.heads, head_dim)),
        name="qkv", **kw)(h)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q, k, v = (constrain(t, ACT_HEADS) for t in (q, k, v))
    h = attention(q, k, v, head_dim**-0.5,
                  resolve_attention(self.attention_impl, self.dtype, shared_qkv=False),
                  valid_length)
    h = constrain(h, ACT_HEADS)
    h = nn.DenseGeneral(
        width, axis=(-2, -1),
        kernel_init=kernel_shaped(xavier(), ("heads", "head_dim", "embed"),
                                  (self.heads, head_dim, width)),
        bias_init=partitioned(init.zeros, ("embed",)), name="out", **kw)(h)
    norm = layer_norm(FINAL_NORM_EPS, name="norm_mlp", norm_impl=self.norm_impl, **kw)
    x, h = add_and_norm(norm, x, DropPath(self.drop_path)(h, deterministic),
                        constrain=lambda t: constrain(t, ACT))
    h = MLP(int(width * self.mlp_ratio), name="mlp", **kw)(h)
    return constrain(x + DropPath(self.drop_path)(h, deterministic), ACT)


class PatchEmbed(nn.Module):
  """Conv-equivalent patch projection: a dense layer on flattened patches.

  Patches are flattened as (row, col, channel) by `patches.patchify`; the
  official conv kernel (out, in, kh, kw) maps onto this kernel by a transpose.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = patchify(images, self.patch_size)
    fan_in = x.shape[-1]
    return nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(xavier(), ("patch", "embed")),
        bias_init=partitioned(torch_default_bias(fan_in), ("embed",)),
        name="proj")(x)


def token(module: nn.Module, name: str, width: int, dtype: Dtype) -> jax.Array:
  """A learned (1, 1, width) token, N(0, 0.02) as the official init."""
  return module.param(name, partitioned(init.normal(0.02), (None, None, "embed")),
                      (1, 1, width), dtype)


def remat_layer(layer_cls, policy: str | None):
  """Wraps a layer class in `nn.remat` with a named checkpoint policy.

  None keeps every activation; 'full' saves nothing and recomputes the layer;
  any other name is an attribute of `jax.checkpoint_policies`.
  """
  if policy is None or policy == "none":
    return layer_cls
  if policy == "full":
    return nn.remat(layer_cls, static_argnums=(2, 3))
  return nn.remat(layer_cls, static_argnums=(2, 3),
                  policy=getattr(jax.checkpoint_policies, policy))


def add_position(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Adds the fixed 2-D sin-cos table (cls row first, zeros) to (B, 1+L, D)."""
  table = sincos_2d(tokens.shape[-1], grid, cls_token=True)
  return tokens + jnp.asarray(table, tokens.dtype)[None]


def encoder_stem(module: nn.Module, images: jax.Array, patch_size: int, width: int, *,
                 mask: jax.Array | None = None, mask_token: bool = True,
                 **kw) -> jax.Array:
  """The stem shared by the CRATE-MAE and ViT-MAE encoders, (B, 1 + L, width).

  Patch embedding ('patch_embed'); with `mask_token`, a learned 'mask_token'
  that replaces the patches where `mask` (B, L; 1 = masked) is set; a learned
  'cls_token' in front; then the fixed sin-cos position table. The parameters
  are created in `module` (call it from its compact `__call__`), under the
  same names as the official checkpoints.
  """
  x = PatchEmbed(patch_size, width, name="patch_embed", **kw)(images)
  if mask_token:
    token_value = token(module, "mask_token", width, kw.get("param_dtype", jnp.float32))
    if mask is not None:
      x = jnp.where(mask[..., None] > 0, token_value.astype(x.dtype), x)
  cls = token(module, "cls_token", width, kw.get("param_dtype", jnp.float32))
  cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))
  return add_position(jnp.concatenate([cls, x], axis=1), patch_grid(images, patch_size))
