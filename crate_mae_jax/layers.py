"""The building blocks of CRATE-MAE and of the ViT-MAE baseline.

Every parameter carries logical axis names (flax linen partitioning), so a mesh and
a table of rules in the config decide how it is sharded; outside a mesh the names
cost nothing. Initialisers follow the official PyTorch code so training from
scratch starts from the same distribution.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.patches import patchify

Dtype = Any
init = jax.nn.initializers

# Layer norm inside blocks uses PyTorch's default eps; the final norms use 1e-6.
BLOCK_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6


def partitioned(initializer: Callable, names: tuple[str | None, ...]) -> Callable:
  return nn.with_logical_partitioning(initializer, names)


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
  """Activation sharding hint; a no-op unless logical axis rules are active."""
  return nn.with_logical_constraint(x, names)


ACT = ("activation_batch", "activation_length", "activation_embed")


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=partitioned(init.ones, ("norm",)),
      bias_init=partitioned(init.zeros, ("norm",)), name=name)


class DropPath(nn.Module):
  """Stochastic depth on a residual branch: drops it per sample in training."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    # Dropout with one draw per sample: every axis but the batch is broadcast.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)


def attention(q, k, v, scale: float, implementation: str | None) -> jax.Array:
  """softmax(q kᵀ · scale) v over (batch, tokens, heads, head_dim) arrays.

  'explicit' forms the logits with einsums and takes the softmax in float32;
  anything else goes to `jax.nn.dot_product_attention` (None lets JAX pick the
  fastest kernel the backend has, 'cudnn' insists on the fused GPU kernel).
  """
  if implementation == "explicit":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, scale)
  return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                      implementation=implementation)


def cudnn_attention(q, k, v, scale: float, multiple: int = 16) -> jax.Array:
  """cuDNN fused attention for any sequence length.

  cuDNN's training kernels reject odd lengths such as 197 = 14² + 1 tokens, so
  the sequences are zero-padded to a multiple of `multiple` and the padding is
  masked out through the sequence lengths: the softmax runs over the real keys
  only and the padded query rows are dropped, the same function as unpadded
  attention. (bf16/fp16 only, as cuDNN.)
  """
  b, t = q.shape[:2]
  s = k.shape[1]
  tp, sp = -(-t // multiple) * multiple, -(-s // multiple) * multiple
  if (tp, sp) == (t, s):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  k_pad = pad(k, sp)
  q_pad = k_pad if q is k and tp == sp else pad(q, tp)
  v_pad = k_pad if v is k else pad(v, sp)
  out = jax.nn.dot_product_attention(
      q_pad, k_pad, v_pad, scale=scale, implementation="cudnn",
      query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32))
  return out[:, :t]


class MSSA(nn.Module):
  """Multi-head subspace self-attention.

  One bias-free projection U_k per head serves as query, key and value
  (w = x U_k; softmax(w wᵀ / sqrt(d_h)) w): the gradient step that compresses
  tokens towards their subspaces. An output projection with bias mixes heads.
  The projection `w` is sown as 'intermediates/subspace_proj' for diagnostics.
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    w = nn.DenseGeneral(
        (self.heads, self.head_dim), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=partitioned(xavier(), ("embed", "heads", "head_dim")),
        name="subspaces")(x)
    self.sow("intermediates", "subspace_proj", w)
    out = attention(w, w, w, self.head_dim**-0.5, self.attention_impl)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(xavier(), ("heads", "head_dim", "embed")),
        bias_init=partitioned(init.zeros, ("embed",)), name="out")(out)


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
  def __call__(self, x: jax.Array) -> jax.Array:
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
    self.sow("intermediates", "sparse_code", out)
    return out


class CrateEncoderLayer(nn.Module):
  """Compress, then sparsify: z½ = z + MSSA(LN z); z' = ISTA(LN z½)."""
  heads: int
  head_dim: int
  ista_step: float = 0.1
  ista_lambda: float = 0.5
  ista_fused: bool = True
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_mssa", **kw)(z)
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl,
             name="mssa", **kw)(h)
    z = z + DropPath(self.drop_path)(h, deterministic)
    z = constrain(z, ACT)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_ista", **kw)(z)
    z = ISTA(self.ista_step, self.ista_lambda, self.ista_fused, name="ista", **kw)(h)
    return constrain(z, ACT)


class CrateDecoderLayer(nn.Module):
  """The encoder layer inverted: y = D_lin(LN x); x' = y − MSSA(LN y)."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_dict", **kw)(x)
    y = nn.Dense(x.shape[-1], use_bias=False,
                 kernel_init=partitioned(kaiming_uniform(), ("dict", "embed")),
                 name="dictionary", **kw)(h)
    self.sow("intermediates", "dictionary_out", y)
    y = constrain(y, ACT)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_mssa", **kw)(y)
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl,
             name="mssa", **kw)(h)
    return constrain(y - h, ACT)


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


class ViTBlock(nn.Module):
  """Pre-norm transformer block of ViT / MAE (separate q, k, v and an MLP)."""
  heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    head_dim = width // self.heads
    h = layer_norm(FINAL_NORM_EPS, name="norm_attn", **kw)(x)
    qkv = nn.DenseGeneral(
        (3, self.heads, head_dim),
        kernel_init=partitioned(xavier(), ("embed", None, "heads", "head_dim")),
        bias_init=partitioned(init.zeros, (None, "heads", "head_dim")),
        name="qkv", **kw)(h)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    h = attention(q, k, v, head_dim**-0.5, self.attention_impl)
    h = nn.DenseGeneral(
        width, axis=(-2, -1),
        kernel_init=partitioned(xavier(), ("heads", "head_dim", "embed")),
        bias_init=partitioned(init.zeros, ("embed",)), name="out", **kw)(h)
    x = constrain(x + DropPath(self.drop_path)(h, deterministic), ACT)
    h = layer_norm(FINAL_NORM_EPS, name="norm_mlp", **kw)(x)
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
    return nn.remat(layer_cls, static_argnums=(2,))
  return nn.remat(layer_cls, static_argnums=(2,),
                  policy=getattr(jax.checkpoint_policies, policy))
