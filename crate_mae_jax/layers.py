"""The building blocks of CRATE-MAE and of the ViT-MAE baseline.

Every parameter carries logical axis names (flax linen partitioning), so a mesh and
a table of rules in the config decide how it is sharded; outside a mesh the names
cost nothing. Initialisers follow the official PyTorch code so training from
scratch starts from the same distribution.
"""
import functools
import importlib.util
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.patches import patch_grid, patchify
from crate_mae_jax.pos_embed import sincos_2d
from crate_mae_jax.sharding import fit_spec

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


def mesh_spec(names: tuple[str | None, ...], shape: tuple[int, ...]
              ) -> jax.sharding.PartitionSpec | None:
  """The mesh placement of an array of `shape` with these logical names under
  the current mesh and rules (None outside a mesh or without rules); axes that
  do not divide a dimension leave it replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  return fit_spec(nn.logical_to_mesh_axes(names, rules), shape, mesh.shape)


ACT = ("activation_batch", "activation_length", "activation_embed")
# Per-head activations (batch, tokens, heads, head_dim): heads split over 'tensor'.
ACT_HEADS = ("activation_batch", "activation_length", "heads", "head_dim")


HALF_DTYPES = (jnp.bfloat16, jnp.float16)
NORM_IMPLS = ("auto", "flax", "fused", "tokamax")
# Every LayerNorm kernel declares these, so checkpoints do not depend on the kernel.
NORM_SCALE_INIT = partitioned(init.ones, ("norm",))
NORM_BIAS_INIT = partitioned(init.zeros, ("norm",))


def tokamax_available() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def resolve_norm(implementation: str | None, dtype: Dtype,
                 platform: str | None = None) -> str:
  """The LayerNorm path 'auto' (or None) stands for on this backend and dtype.

  tokamax's Triton LayerNorm on one NVIDIA GPU in bf16/fp16 when the package
  is installed (`pip install 'crate-mae-jax[gpu]'`): the whole Base train step is
  7 % faster on an H100 with it (BENCHMARKS.md, kernel choices). Not on a mesh
  of several devices: XLA cannot partition the Triton call, so it gathers the
  activations to run it whole (2 H200s ran at 55 % scaling efficiency). Otherwise
  flax's `nn.LayerNorm`: TPUs, CPUs, float32 (the path the golden fixtures are
  checked on) and GPUs without tokamax. 'fused' (the custom-VJP LayerNorm
  below) is faster alone but slower inside the step, so it is opt-in.
  The choice is logged and written to the workdir's run.json.
  """
  if implementation not in (None, "auto"):
    return implementation
  platform = platform or jax.default_backend()
  if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in HALF_DTYPES
      and tokamax_available() and num_mesh_devices() == 1):
    return "tokamax"
  return "flax"


def num_mesh_devices() -> int:
  """Devices of the mesh being traced under (all devices outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.device_count() if mesh.empty else mesh.size


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                     dtype: Dtype) -> jax.Array:
  """LayerNorm over the last axis, statistics in float32, output in `dtype`.

  The same function as flax's `nn.LayerNorm` (two-pass variance); its custom
  backward recomputes x̂ from x and the saved row statistics and forms
  dx = rstd·(g·γ − mean(g·γ) − x̂·mean(g·γ·x̂)) in one fusion with two sibling
  row reductions, instead of autodiff's chain of separate passes.
  """
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
  y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, res, g):
  del eps, dtype
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gf = g.astype(jnp.float32)
  batch_axes = tuple(range(g.ndim - 1))
  dscale = (gf * xhat).sum(batch_axes)
  dbias = gf.sum(batch_axes)
  gx = gf * scale.astype(jnp.float32)
  dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


fused_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def absl_flags_default() -> None:
  """Lets libraries that read absl's global flags when they run (tokamax) see
  their defaults: in programs that never parse them (notebooks, pytest,
  argparse scripts, the benchmark's own flag set) such a library would parse
  sys.argv and fail on the program's own arguments. Entry points on absl.app
  have parsed them already."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def tokamax_layer_norm(x, scale, bias, eps: float, dtype: Dtype) -> jax.Array:
  """tokamax's Triton LayerNorm (GPU; statistics in float32)."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("config.model.norm_impl='tokamax' needs the tokamax package: "
                      "pip install 'crate-mae-jax[gpu]' (or tokamax), or set "
                      "config.model.norm_impl='auto'") from e
  absl_flags_default()
  return tokamax.layer_norm(x, scale, bias, epsilon=eps,
                            implementation="triton").astype(dtype)


class KernelLayerNorm(nn.Module):
  """LayerNorm with `nn.LayerNorm`'s parameters ('scale', 'bias', same names,
  shapes and logical axes) through another kernel, so checkpoints do not depend
  on the choice."""
  epsilon: float
  implementation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", NORM_SCALE_INIT, (d,), self.param_dtype)
    bias = self.param("bias", NORM_BIAS_INIT, (d,), self.param_dtype)
    if self.implementation == "fused":
      return fused_layer_norm(x, scale, bias, self.epsilon, self.dtype)
    if self.implementation == "tokamax":
      devices = num_mesh_devices()
      if devices > 1:
        warnings.warn(f"model.norm_impl='tokamax' on {devices} devices: XLA does not "
                      "partition its Triton kernel, so every device runs it on the whole "
                      "batch; set model.norm_impl='auto' (flax there)", stacklevel=2)
      return tokamax_layer_norm(x, scale, bias, self.epsilon, self.dtype)
    raise ValueError(f"LayerNorm implementation {self.implementation!r} is unknown; "
                     f"use one of {NORM_IMPLS}")


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str,
               norm_impl: str | None = None) -> nn.Module:
  impl = resolve_norm(norm_impl, dtype)
  if impl == "flax":
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=NORM_SCALE_INIT, bias_init=NORM_BIAS_INIT, name=name)
  return KernelLayerNorm(eps, impl, dtype=dtype, param_dtype=param_dtype, name=name)


class DropPath(nn.Module):
  """Stochastic depth on a residual branch: drops it per sample in training."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    # Dropout with one draw per sample: every axis but the batch is broadcast.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic)


ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn", "splash")
# cuDNN's fused training kernels want token counts in multiples of this.
CUDNN_TOKEN_MULTIPLE = 16
# The Pallas TPU splash kernel tiles the tokens in blocks of a multiple of 128
# lanes; the tokens are padded to a multiple of 128 ...
SPLASH_BLOCK = 128
# ... and tiled in the largest block up to this that divides them: a short
# sequence (197 -> 256) is one tile per (batch, head), so each kernel grid step
# does a whole head's attention instead of a quarter of it.
SPLASH_MAX_BLOCK = 512
# Attention paths whose layer stacks pad the tokens once (see `stack_padding`):
# the multiple each pads to, and the most padding (a fraction of the tokens)
# for which that pays; beyond it the kernel pads inside each call instead.
# cuDNN: 197 -> 208 (+5.6 %) pays, ViT-MAE's 50 visible tokens -> 64 (+28 %)
# would cost more in its MLPs than it saves. Splash: 197 -> 256 (+30 %) made
# the rest of the TPU step shorter in XLA's estimate than padding in every call
# (BENCHMARKS.md, "Pallas splash attention on TPU").
STACK_PADDED = {"cudnn": (CUDNN_TOKEN_MULTIPLE, 0.10), "splash": (SPLASH_BLOCK, 0.5)}


def resolve_attention(implementation: str | None, dtype: Dtype,
                      platform: str | None = None) -> str:
  """The attention kernel 'auto' (or None) stands for on this backend and dtype.

  cuDNN's fused kernel on NVIDIA GPUs in bf16/fp16 (the fastest path there by
  far: it never writes the logits to memory); XLA's `dot_product_attention`
  everywhere else: TPUs, CPUs and float32, where it is the exact path the golden
  fixtures are checked on. `platform` defaults to JAX's default backend; the pod
  planner passes 'tpu' when it compiles for a topology from a CPU host.

  On TPU the Pallas splash kernel ('splash') stays opt-in: compiled for TPU it
  needs a third less memory than XLA, but whether it is faster depends on how
  fast its kernels run, which XLA's compile-time estimates cannot see and no
  TPU has measured yet (BENCHMARKS.md, "Pallas splash attention on TPU").
  """
  if implementation not in (None, "auto"):
    return implementation
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda") and jnp.dtype(dtype) in HALF_DTYPES:
    return "cudnn"
  return "xla"


def attention(q, k, v, scale: float, implementation: str,
              valid_length: int | None = None) -> jax.Array:
  """softmax(q kᵀ · scale) v over (batch, tokens, heads, head_dim) arrays.

  `implementation` is a resolved name (see `resolve_attention`): 'explicit'
  forms the logits with einsums and takes the softmax in float32, 'cudnn' is
  the fused GPU kernel, 'xla' is `jax.nn.dot_product_attention` on XLA,
  'splash' the Pallas TPU kernel (see `splash_attention`).
  `valid_length` (self-attention only): the tokens from that index on are
  padding, masked out as keys (every path supports it; the layer stacks pad
  only for cuDNN); their rows of the output are meaningless.
  """
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, scale, valid_length)
  if implementation == "splash":
    return splash_attention(q, k, v, scale, valid_length)
  lengths = None
  if valid_length is not None and valid_length < k.shape[1]:
    lengths = jnp.full((q.shape[0],), valid_length, jnp.int32)
  if implementation == "explicit":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if lengths is not None:
      logits = jnp.where(jnp.arange(k.shape[1]) < valid_length, logits, -jnp.inf)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if implementation in ("xla", "auto", None):
    # Key lengths only: padded query rows then stay finite (an all-masked
    # row could turn into NaN and poison the weight gradients).
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla",
                                        key_value_seq_lengths=lengths)
  raise ValueError(f"attention implementation {implementation!r} is unknown; "
                   f"use one of {ATTENTION_IMPLS}")


def padded_length(n: int, multiple: int = CUDNN_TOKEN_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads the token axis (axis 1) of x to `length`."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad)


def cudnn_attention(q, k, v, scale: float, valid_length: int | None = None,
                    multiple: int = CUDNN_TOKEN_MULTIPLE) -> jax.Array:
  """cuDNN fused self-attention for any sequence length.

  cuDNN's training kernels reject odd lengths such as 197 = 14² + 1 tokens, so
  the tokens are zero-padded to a multiple of `multiple` (unless the caller has
  already padded them once for the whole stack, passing `valid_length`) and the
  padding is masked out through the sequence lengths: the softmax runs over the
  real keys only, the same function as unpadded attention. (bf16/fp16 only.)
  """
  if not q.shape[1] == k.shape[1] == v.shape[1]:
    raise ValueError("cudnn_attention is self-attention: q, k and v need one length")
  b, t = q.shape[:2]
  valid = t if valid_length is None else valid_length
  tp = padded_length(t, multiple)
  if tp == t and valid == t:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
  if tp != t:
    k_pad = pad_tokens(k, tp)
    q_pad = k_pad if q is k else pad_tokens(q, tp)
    v_pad = k_pad if v is k else pad_tokens(v, tp)
  else:
    q_pad, k_pad, v_pad = q, k, v
  lengths = jnp.full((b,), valid, jnp.int32)
  out = jax.nn.dot_product_attention(
      q_pad, k_pad, v_pad, scale=scale, implementation="cudnn",
      query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  return out[:, :t]


def splash_block(length: int) -> int:
  """The kernel's tile: the largest multiple of 128 up to SPLASH_MAX_BLOCK
  dividing `length` (itself a multiple of 128)."""
  return max(b for b in range(SPLASH_BLOCK, SPLASH_MAX_BLOCK + 1, SPLASH_BLOCK)
             if length % b == 0)


def splash_attention(q, k, v, scale: float, valid_length: int | None = None) -> jax.Array:
  """Self-attention through JAX's Pallas TPU splash kernel (`make_splash_mha`).

  The kernel takes no scale, so q is scaled; it tiles the tokens in blocks of
  128 lanes, so they are zero-padded to a multiple of 128 (unless the stack did,
  passing `valid_length`) and the padding is put in a segment of its own:
  real queries attend to real keys only (the same function as unpadded
  attention), padded queries to padded keys (finite, dropped or meaningless).
  XLA cannot partition a Mosaic kernel (JAX refuses to compile one on a
  sharded array), so under a mesh the kernel runs per shard in `shard_map`:
  batch split as 'activation_batch', heads as 'heads', as the constraints
  around it already place them, nothing gathered. Off TPU it runs in Pallas
  interpret mode (tests on the CPU; slow).
  """
  if not q.shape[1] == k.shape[1] == v.shape[1]:
    raise ValueError("splash_attention is self-attention: q, k and v need one length")
  t = q.shape[1]
  valid = t if valid_length is None else valid_length
  length = padded_length(t, SPLASH_BLOCK)
  if length != t:
    k_pad = pad_tokens(k, length)
    q = k_pad if q is k else pad_tokens(q, length)
    v = k_pad if v is k else pad_tokens(v, length)
    k = k_pad
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  local = functools.partial(_splash_local, valid=valid, block=splash_block(length),
                            interpret=kernel_platform() != "tpu")
  placed = mesh_spec(ACT_HEADS, q.shape)
  if placed is None:
    out = local(q, k, v)
  else:
    batch, _, heads, _ = placed
    spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    out = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                        in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
  return out[:, :t]


def _splash_local(q, k, v, *, valid: int, block: int, interpret: bool) -> jax.Array:
  """The splash kernel on one device's (batch, tokens, heads, head_dim) block."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  _, length, heads, _ = q.shape
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block,
                            block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  segments = None
  if valid < length:
    ids = (jnp.arange(length) >= valid).astype(jnp.int32)
    segments = splash.SegmentIds(q=ids, kv=ids)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
      heads_first(q), heads_first(k), heads_first(v), segments)
  return heads_first(out)


def kernel_platform() -> str:
  """The platform a kernel is compiled for: the devices of the mesh being
  traced under (the pod planner traces for TPU chips on a CPU host), else
  JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def valid_rows(x: jax.Array, valid_length: int | None) -> jax.Array:
  """The real tokens of a padded (batch, tokens, ...) activation, for sown values."""
  return x if valid_length is None else x[:, :valid_length]


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
    impl = resolve_attention(self.attention_impl, self.dtype)
    out = constrain(attention(w, w, w, self.head_dim**-0.5, impl, valid_length), ACT_HEADS)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=kernel_shaped(xavier(), ("heads", "head_dim", "embed"),
                                  (self.heads, self.head_dim, width)),
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
  norm_impl: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True,
               valid_length: int | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_mssa", norm_impl=self.norm_impl, **kw)(z)
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl,
             name="mssa", **kw)(h, valid_length)
    z = z + DropPath(self.drop_path)(h, deterministic)
    z = constrain(z, ACT)
    h = layer_norm(BLOCK_NORM_EPS, name="norm_ista", norm_impl=self.norm_impl, **kw)(z)
    z = ISTA(self.ista_step, self.ista_lambda, self.ista_fused, name="ista",
             **kw)(h, valid_length)
    return constrain(z, ACT)


class CrateDecoderLayer(nn.Module):
  """The encoder layer inverted: y = D_lin(LN x); x' = y − MSSA(LN y)."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_impl: str | None = None

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
    h = MSSA(self.heads, self.head_dim, attention_impl=self.attention_impl,
             name="mssa", **kw)(h, valid_length)
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
  norm_impl: str | None = None

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
                  resolve_attention(self.attention_impl, self.dtype), valid_length)
    h = constrain(h, ACT_HEADS)
    h = nn.DenseGeneral(
        width, axis=(-2, -1),
        kernel_init=kernel_shaped(xavier(), ("heads", "head_dim", "embed"),
                                  (self.heads, head_dim, width)),
        bias_init=partitioned(init.zeros, ("embed",)), name="out", **kw)(h)
    x = constrain(x + DropPath(self.drop_path)(h, deterministic), ACT)
    h = layer_norm(FINAL_NORM_EPS, name="norm_mlp", norm_impl=self.norm_impl, **kw)(x)
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


def stack_padding(x: jax.Array, attention_impl: str | None, dtype: Dtype
                  ) -> tuple[jax.Array, int | None]:
  """Pads the tokens once for a whole stack of layers for a kernel that needs it.

  Padding and slicing in every layer costs a pass over the activations each
  time; padding once and masking the padded keys by length gives the real
  tokens exactly the same values (their rows never mix with the padding, and
  the padding's rows are dropped at the end, so their gradients are zero).
  Returns the padded array and the number of real tokens (None: not padded).
  """
  padding = STACK_PADDED.get(resolve_attention(attention_impl, dtype))
  if padding is None:
    return x, None
  multiple, max_overhead = padding
  n, length = x.shape[1], padded_length(x.shape[1], multiple)
  if length == n or length > n * (1 + max_overhead):
    return x, None
  return pad_tokens(x, length), n


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
