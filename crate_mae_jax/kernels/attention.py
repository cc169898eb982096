"""Attention kernels behind one `attention(q, k, v, scale, implementation)`:
XLA's `dot_product_attention` (the reference, TPU/CPU/float32), 'explicit'
einsums (the textbook form, for tests), cuDNN's fused kernel (GPU), the Pallas
TPU splash kernel (opt-in) and our own MSSA kernel for q = k = v (GPU,
`kernels.mssa`). `resolve_attention` decides what 'auto' means on a backend;
`stack_padding` pads the tokens once per layer stack for kernels that need it.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from crate_mae_jax.kernels import mssa
from crate_mae_jax.sharding import ACT_HEADS, mesh_spec

Dtype = Any
HALF_DTYPES = (jnp.bfloat16, jnp.float16)

ATTENTION_IMPLS = ("auto", "explicit", "xla", "cudnn", "splash", "mssa")
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
                      platform: str | None = None, shared_qkv: bool = True,
                      head_dim: int | None = None) -> str:
  """The attention kernel 'auto' (or None) stands for on this backend and dtype.

  `shared_qkv`: the layer's q, k and v are one tensor (CRATE's MSSA) — not
  ViT-MAE's attention. On one NVIDIA GPU in bf16/fp16, MSSA runs our own
  kernel ('mssa', `kernels.mssa`: one input, one dW; faster in the whole
  Base step than cuDNN, BENCHMARKS.md "Our MSSA kernel"), everything else
  cuDNN's fused kernel. Several GPUs keep cuDNN for MSSA too: the kernel runs
  per shard there, which no benchmark has timed yet. 'xla' everywhere else:
  TPUs, CPUs and float32, XLA's `dot_product_attention`, the exact path the
  golden fixtures are checked on (on TPU in bf16/fp16, `xla_half_attention`:
  the same function with fewer bytes stored, see there). `platform` defaults to JAX's
  default backend; the pod planner passes 'tpu' when it compiles for a
  topology from a CPU host. 'mssa' asked for on attention with separate
  q, k, v, or with a `head_dim` the kernel does not take, stands for what
  'auto' picks for separate q, k, v.

  On TPU the Pallas splash kernel ('splash') stays opt-in: XLA's compile-time
  estimates cannot time its kernels and no TPU has measured it yet
  (BENCHMARKS.md, "Pallas splash attention on TPU").
  """
  if head_dim is not None and head_dim not in mssa.HEAD_DIMS:
    shared_qkv = False  # not for our kernel: as for separate q, k, v
  if implementation == "mssa" and not shared_qkv:
    implementation = "auto"
  if implementation not in (None, "auto"):
    return implementation
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda") and jnp.dtype(dtype) in HALF_DTYPES:
    return "mssa" if shared_qkv and num_mesh_devices() == 1 else "cudnn"
  return "xla"


def num_mesh_devices() -> int:
  """Devices of the mesh being traced under (all devices outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.device_count() if mesh.empty else mesh.size


def attention(q, k, v, scale: float, implementation: str,
              valid_length: int | None = None) -> jax.Array:
  """softmax(q kᵀ · scale) v over (batch, tokens, heads, head_dim) arrays.

  `implementation` is a resolved name (see `resolve_attention`): 'explicit'
  forms the logits with einsums and takes the softmax in float32, 'cudnn' is
  the fused GPU kernel, 'xla' is `jax.nn.dot_product_attention` on XLA
  (`xla_half_attention` on TPU in bf16/fp16),
  'splash' the Pallas TPU kernel (see `splash_attention`), 'mssa' our
  kernel where q, k and v are one array of a shape it takes (else what 'auto'
  picks for separate q, k, v: cuDNN on a GPU).
  `valid_length` (self-attention only): the tokens from that index on are
  padding, masked out as keys (every path supports it; the layer stacks pad
  only for cuDNN); their rows of the output are meaningless.
  """
  if implementation == "mssa":
    if q is k and k is v and mssa.supported(q.shape, q.dtype, kernel_platform()):
      return mssa_self_attention(q, scale, valid_length)
    # Separate q, k, v, or a shape the kernel does not take (head_dim 48 of Small):
    # the strongest vendor path, not the XLA reference.
    implementation = resolve_attention("auto", q.dtype, kernel_platform(), shared_qkv=False)
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
    if jnp.dtype(q.dtype) in HALF_DTYPES and kernel_platform() == "tpu":
      return xla_half_attention(q, k, v, scale, valid_length)
    # Key lengths only: padded query rows then stay finite (an all-masked
    # row could turn into NaN and poison the weight gradients).
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla",
                                        key_value_seq_lengths=lengths)
  raise ValueError(f"attention implementation {implementation!r} is unknown; "
                   f"use one of {ATTENTION_IMPLS}")


def xla_half_attention(q, k, v, scale: float, valid_length: int | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention`'s function for bf16/fp16 on TPU, with the
  backward pass written out, so that XLA stores less per layer.

  Forward: logits q kᵀ accumulated in float32, rounded to q's dtype (see
  HALF_LOGITS) and soft-maxed in float32; the (batch, heads, tokens, tokens)
  array XLA writes between its two passes over them is E = exp(logits − max)
  in q's dtype, not
  in float32 (which it then reads again to form P = E / sum in q's dtype), and
  out = (E v) / sum: the normalisation is applied to the (tokens, head_dim)
  rows of the output (float32) instead of to E, which also takes the place of P
  as what the backward pass keeps (with the row sums, and q, k, v and out):
  half the bytes of the float32 exponentials that differentiating the float32
  softmax keeps, and no P.

  Backward from E in half precision (P = E / sum, as the fused GPU kernels
  recompute P): dP = dO vᵀ in float32, dS = P (dP − rowsum(dO ∘ O)) scale
  (flash attention's identity rowsum(P ∘ dP) = rowsum(dO ∘ O)), dq = dS k,
  dk = dSᵀ q, dv = Eᵀ (dO / sum); for CRATE's q = k = v (one array `w`, MSSA)
  dw is their sum, each transposed product contracting over the query axis in
  the matmul itself (dS + dSᵀ formed first would copy a transpose).
  Only the TPU path in bf16/fp16 uses it; float32 keeps XLA's reference.
  `valid_length`: keys from that index on are masked out (every path's contract).
  """
  if valid_length is not None and valid_length >= k.shape[1]:
    valid_length = None
  if q is k and k is v:
    return _shared_attention(q, scale, valid_length)
  return _separate_attention(q, k, v, scale, valid_length)


_F32 = dict(preferred_element_type=jnp.float32)
# The logits q kᵀ leave the TPU half path's matmul in q's dtype (accumulated in
# float32 on the MXU, rounded once; the softmax then runs in float32): XLA
# writes them to HBM between the matmul and the softmax, and in bf16 that
# shortened its estimate of the CRATE-MAE-Base v5p step from 60.7 to 56.2 ms
# (BENCHMARKS.md, "TPU plans before/after XLA-level changes"). False: float32.
HALF_LOGITS = True


def _forward(q, k, v, scale, valid_length):
  """(out, E, 1 / rowsum E): E = exp(q kᵀ · scale − max) in q's dtype."""
  logits_dtype = q.dtype if HALF_LOGITS else jnp.float32
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
  logits = logits.astype(jnp.float32) * scale
  if valid_length is not None:
    logits = jnp.where(jnp.arange(k.shape[1]) < valid_length, logits, -jnp.inf)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  inv = 1.0 / jnp.sum(e, axis=-1)                        # (b, h, q), float32
  e = e.astype(q.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", e, v, **_F32) * _rows(inv)
  return out.astype(q.dtype), e, inv


def _rows(inv):
  """(b, h, q) row factors broadcast over (b, q, h, d)."""
  return jnp.swapaxes(inv, 1, 2)[..., None]


def _logits_grad(e, inv, out, dout, v, scale):
  """dS = P (dP − rowsum(dO ∘ O)) · scale, P = E / sum, dP = dO vᵀ; in e's dtype."""
  dp = jnp.einsum("bqhd,bkhd->bhqk", dout, v, **_F32)
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
  p = e.astype(jnp.float32) * inv[..., None]
  return (p * (dp - delta[..., None]) * scale).astype(e.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _separate_attention(q, k, v, scale, valid_length):
  return _forward(q, k, v, scale, valid_length)[0]


def _separate_fwd(q, k, v, scale, valid_length):
  out, e, inv = _forward(q, k, v, scale, valid_length)
  return out, (q, k, v, e, inv, out)


def _separate_bwd(scale, valid_length, res, dout):
  del valid_length  # masked keys have E = 0, so dS = 0 there
  q, k, v, e, inv, out = res
  dout = dout.astype(q.dtype)
  ds = _logits_grad(e, inv, out, dout, v, scale)
  dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k)
  dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
  dv = jnp.einsum("bhqk,bqhd->bkhd", e, (dout * _rows(inv)).astype(q.dtype))
  return dq, dk, dv


_separate_attention.defvjp(_separate_fwd, _separate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _shared_attention(w, scale, valid_length):
  return _forward(w, w, w, scale, valid_length)[0]


def _shared_fwd(w, scale, valid_length):
  out, e, inv = _forward(w, w, w, scale, valid_length)
  return out, (w, e, inv, out)


def _shared_bwd(scale, valid_length, res, dout):
  del valid_length
  w, e, inv, out = res
  dout = dout.astype(w.dtype)
  ds = _logits_grad(e, inv, out, dout, w, scale)
  # Each product in w's dtype, as XLA's reference path sums dq + dk + dv.
  dw = (jnp.einsum("bhqk,bkhd->bqhd", ds, w)
        + jnp.einsum("bhqk,bqhd->bkhd", ds, w)
        + jnp.einsum("bhqk,bqhd->bkhd", e, (dout * _rows(inv)).astype(w.dtype)))
  return (dw,)


_shared_attention.defvjp(_shared_fwd, _shared_bwd)


def mssa_self_attention(w, scale: float, valid_length: int | None = None) -> jax.Array:
  """Our MSSA kernel (`kernels.mssa`) for q = k = v: one input, one dW.

  Pallas Triton cannot be partitioned by XLA, so under a mesh of several
  devices it runs per shard in `shard_map` (batch as 'activation_batch', heads
  as 'heads', as the constraints around it place them). Shapes the compiled
  kernel does not take fall back to XLA inside `mssa_attention`.
  """
  local = functools.partial(mssa.mssa_attention, scale=scale, valid_length=valid_length)
  placed = mesh_spec(ACT_HEADS, w.shape)
  if placed is None:
    return local(w)
  batch, _, heads, _ = placed
  spec = jax.sharding.PartitionSpec(batch, None, heads, None)
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,),
                       out_specs=spec, check_vma=False)(w)


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




def stack_padding(x: jax.Array, attention_impl: str | None, dtype: Dtype,
                  shared_qkv: bool = True,
                  head_dim: int | None = None) -> tuple[jax.Array, int | None]:
  """Pads the tokens once for a whole stack of layers for a kernel that needs it.

  Padding and slicing in every layer costs a pass over the activations each
  time; padding once and masking the padded keys by length gives the real
  tokens exactly the same values (their rows never mix with the padding, and
  the padding's rows are dropped at the end, so their gradients are zero).
  Returns the padded array and the number of real tokens (None: not padded).
  """
  padding = STACK_PADDED.get(resolve_attention(attention_impl, dtype,
                                                shared_qkv=shared_qkv, head_dim=head_dim))
  if padding is None:
    return x, None
  multiple, max_overhead = padding
  n, length = x.shape[1], padded_length(x.shape[1], multiple)
  if length == n or length > n * (1 + max_overhead):
    return x, None
  return pad_tokens(x, length), n
