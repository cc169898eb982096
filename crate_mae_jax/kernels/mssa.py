"""CRATE's MSSA attention, softmax(s·W Wᵀ) W with one input W (q = k = v), as a
Pallas Triton kernel for NVIDIA GPUs, with its own backward.

    mssa_attention(w, scale, valid_length=None, *, interpret=None) -> (B, T, H, D)

`w` is (batch, tokens, heads, head_dim). `valid_length`: the tokens from that
index on are padding, masked out as keys only; padded query rows are computed
normally. That is exactly

    jax.nn.dot_product_attention(w, w, w, scale=s, implementation='xla',
                                 key_value_seq_lengths=full(B, valid_length))

which `mssa_reference` is (the reference of the tests, and the fallback where
the kernel does not apply, see `supported`).

Why a kernel of our own: cuDNN's fused attention takes q, k and v apart, so its
backward writes three gradients that XLA then sums; the custom VJP here writes
one dW. With P = softmax(S), S = s·W Wᵀ (symmetric), O = P W, δ = rowsum(dO∘O):

    dS = P∘(dO Wᵀ − δ)          dW = Pᵀ dO + s·(dS + dSᵀ) W

The backward program of row block i (grid: row block, batch, head) walks all
token chunks j of its (batch, head) once. Symmetry gives both S_ij and S_ji
from one product (S_ji = S_ijᵀ), so per chunk it does five matrix products,
as a flash-attention backward does, but writes dW_i = dQ_i + dK_i + dV_i
itself: no atomics, no second pass, no three-gradient sum:

    S2   = log2(e)·s · W_i W_jᵀ                 (row block i × chunk j)
    P_ij = exp2(S2 − lse_i)        dP_ij = dO_i W_jᵀ      (rows i as queries)
    P_jiᵀ= exp2(S2 − lse_j)        dP_jiᵀ = W_i dO_jᵀ     (rows i as keys)
    acc_s += (P_ij∘(dP_ij − δ_i) + P_jiᵀ∘(dP_jiᵀ − δ_j)) W_j
    acc_v += P_jiᵀ dO_j
    dW_i  = s·acc_s + acc_v

The forward keeps every key of a (batch, head) on chip: one row block of
logits over all keys at once (no online-softmax rescaling), and saves the
log-sum-exp (float32, base 2) per row for the backward. Statistics are float32;
matrix products take the input dtype and accumulate in float32.

Triton's blocks are powers of two: the tokens are tiled in power-of-two blocks
and the tail (197 = 196 patches + cls in CRATE-MAE-Base) is masked inside the
kernel, so callers need not pad (`TOKEN_MULTIPLE`). Off GPU (or with
`interpret=True`) the same kernel runs in Pallas interpret mode, which is how
the CPU tests exercise it.

Only jax and numpy are imported here (the GPU image has neither
ml_collections nor TensorFlow).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:                                      # the Triton flavour of Pallas
  from jax.experimental.pallas import triton as plgpu
except ImportError:                       # pragma: no cover - every jax we support has it
  plgpu = None

__all__ = ["mssa_attention", "mssa_reference", "supported", "TOKEN_MULTIPLE",
           "MAX_TOKENS", "HEAD_DIMS", "Config", "default_config"]

# The kernel masks the token tail itself (any length up to MAX_TOKENS), so a
# layer stack that runs only this kernel need not pad the tokens at all: its
# programs tile the tokens in power-of-two blocks either way (197 -> 4 blocks
# of 64), and padding 197 -> 208 would only make the rest of the stack longer.
TOKEN_MULTIPLE = 1
# All keys of a (batch, head) are held on chip: tokens up to this many.
MAX_TOKENS = 256
HEAD_DIMS = (32, 64)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOG2E = math.log2(math.e)
_MASK = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and Triton settings.

  block_q: rows per forward program (its logits are block_q × all keys);
  block_m / block_n: rows per backward program / token chunk of its loop;
  delta_in_kernel: δ = rowsum(dO∘O) computed by each backward program for the
  chunks it reads (True) or by a small XLA pre-pass into a (B, H, T) array.
  """
  block_q: int = 64
  num_warps_fwd: int = 4
  num_stages_fwd: int = 1
  block_m: int = 64
  block_n: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  delta_in_kernel: bool = True


def default_config(tokens: int, head_dim: int) -> Config:
  """The settings measured best on an H200 (tools/bench_mssa_kernel.py)."""
  del tokens, head_dim
  return Config()


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def supported(w_shape, dtype, platform: str | None = None) -> bool:
  """Whether the compiled kernel applies: NVIDIA GPU, bf16/fp16, a
  (B, T, H, D) input with T ≤ MAX_TOKENS and D in HEAD_DIMS. (Interpret mode
  runs any of these shapes in any float dtype.)"""
  platform = platform or jax.default_backend()
  if platform not in ("gpu", "cuda") or plgpu is None:
    return False
  if len(w_shape) != 4:
    return False
  _, t, _, d = w_shape
  return jnp.dtype(dtype) in _HALF and 1 <= t <= MAX_TOKENS and d in HEAD_DIMS


def mssa_reference(w, scale: float, valid_length: int | None = None) -> jax.Array:
  """The exact XLA path: softmax(s·W Wᵀ) W, keys from `valid_length` on masked."""
  lengths = None
  if valid_length is not None and valid_length < w.shape[1]:
    lengths = jnp.full((w.shape[0],), valid_length, jnp.int32)
  return jax.nn.dot_product_attention(w, w, w, scale=scale, implementation="xla",
                                      key_value_seq_lengths=lengths)


def mssa_attention(w, scale: float, valid_length: int | None = None, *,
                   interpret: bool | None = None, config: Config | None = None
                   ) -> jax.Array:
  """softmax(s·W Wᵀ) W over (batch, tokens, heads, head_dim), one dW backward.

  `valid_length` (a Python int): tokens from that index on are masked out as
  keys. `interpret`: None runs the compiled kernel on a GPU (falling back to
  `mssa_reference` for shapes/dtypes `supported` rejects) and interpret mode
  elsewhere; True/False force interpret mode / compilation.
  """
  if w.ndim != 4:
    raise ValueError(f"mssa_attention wants (batch, tokens, heads, head_dim), got {w.shape}")
  t = w.shape[1]
  valid = t if valid_length is None else int(valid_length)
  if not 1 <= valid <= t:
    raise ValueError(f"valid_length {valid_length} outside [1, {t}]")
  if interpret is None:
    if jax.default_backend() == "gpu":
      if not supported(w.shape, w.dtype, "gpu"):
        return mssa_reference(w, scale, valid_length)
      interpret = False
    else:
      interpret = True
  if t > MAX_TOKENS and not interpret:
    raise ValueError(f"the kernel holds at most {MAX_TOKENS} tokens on chip, got {t}")
  cfg = config or default_config(t, w.shape[-1])
  return _mssa(w, float(scale), valid, cfg, bool(interpret))


# ----------------------------------------------------------------------------
# Kernels. Refs are (tokens, head_dim) views of one (batch, head); the token
# blocks are powers of two and may run past T: every load of a token row is
# masked by `row < T` (zeros), every store too.

def _compiler_params(num_warps: int, num_stages: int):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
  if cls is None:                          # pragma: no cover
    return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))
  return cls(num_warps=num_warps, num_stages=num_stages)


def _load_rows(ref, start, size, n_rows):
  rows = start + jnp.arange(size)
  return plgpu.load(ref.at[pl.ds(start, size), :], mask=(rows < n_rows)[:, None], other=0.0)


def _load_vec(ref, start, size, n_rows):
  rows = start + jnp.arange(size)
  return plgpu.load(ref.at[pl.ds(start, size)], mask=rows < n_rows, other=0.0)


def _dot(a, b, trans_b=False):
  # float32 inputs (interpret-mode tests) in full float32; half inputs as they are.
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _fwd_kernel(w_ref, o_ref, lse_ref, *, scale, n_rows, valid, block_q, keys):
  i = pl.program_id(0)
  start = i * block_q
  w_i = _load_rows(w_ref, start, block_q, n_rows)               # (block_q, D)
  w_all = _load_rows(w_ref, 0, keys, n_rows)                    # (keys, D)
  s2 = _dot(w_i, w_all, trans_b=True) * (scale * _LOG2E)       # (block_q, keys) f32
  if valid < keys:                                               # keys past valid, and past T
    s2 = jnp.where((jnp.arange(keys) < valid)[None, :], s2, _MASK)
  m = jnp.max(s2, axis=1)
  p = jnp.exp2(s2 - m[:, None])
  l = jnp.sum(p, axis=1)
  o = _dot(p.astype(w_all.dtype), w_all) / l[:, None]
  rows = start + jnp.arange(block_q)
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=(rows < n_rows)[:, None])
  lse_ref[...] = m + jnp.log2(l)


def _bwd_kernel(*refs, scale, n_rows, valid, block_m, block_n, delta_in_kernel):
  if delta_in_kernel:
    w_ref, o_ref, do_ref, lse_ref, dw_ref = refs
  else:
    w_ref, do_ref, lse_ref, delta_ref, dw_ref = refs
  i = pl.program_id(0)
  start = i * block_m
  rows = start + jnp.arange(block_m)
  w_i = _load_rows(w_ref, start, block_m, n_rows)
  do_i = _load_rows(do_ref, start, block_m, n_rows)
  lse_i = _load_vec(lse_ref, start, block_m, n_rows)
  if delta_in_kernel:
    o_i = _load_rows(o_ref, start, block_m, n_rows)
    delta_i = jnp.sum(do_i.astype(jnp.float32) * o_i.astype(jnp.float32), axis=1)
  else:
    delta_i = _load_vec(delta_ref, start, block_m, n_rows)
  c = scale * _LOG2E
  # Rows of this block as keys: masked past valid (only needed below T: rows
  # past T are zero and never stored).
  key_mask_i = (rows < valid)[:, None] if valid < n_rows else None
  d = w_i.shape[-1]

  def body(j, carry):
    acc_s, acc_v = carry
    cstart = j * block_n
    w_j = _load_rows(w_ref, cstart, block_n, n_rows)
    do_j = _load_rows(do_ref, cstart, block_n, n_rows)
    lse_j = _load_vec(lse_ref, cstart, block_n, n_rows)
    if delta_in_kernel:
      o_j = _load_rows(o_ref, cstart, block_n, n_rows)
      delta_j = jnp.sum(do_j.astype(jnp.float32) * o_j.astype(jnp.float32), axis=1)
    else:
      delta_j = _load_vec(delta_ref, cstart, block_n, n_rows)
    s2 = _dot(w_i, w_j, trans_b=True) * c                          # (m, n)
    # Rows i as queries, chunk j as keys. Chunk rows past T are zero: their
    # p_row is finite and meets zero rows of w_j in the product below.
    p_row = jnp.exp2(s2 - lse_i[:, None])
    if valid < n_rows:
      p_row = jnp.where((cstart + jnp.arange(block_n) < valid)[None, :], p_row, 0.0)
    dp_row = _dot(do_i, w_j, trans_b=True)
    ds = p_row * (dp_row - delta_i[:, None])
    # Rows i as keys, chunk j as queries: P_ji = exp2(S2_ij − lse_j) by symmetry.
    # Chunk rows past T have dO = 0, δ = 0: they add nothing.
    p_col = jnp.exp2(s2 - lse_j[None, :])
    if key_mask_i is not None:
      p_col = jnp.where(key_mask_i, p_col, 0.0)
    dp_col = _dot(w_i, do_j, trans_b=True)
    ds = ds + p_col * (dp_col - delta_j[None, :])
    acc_s = acc_s + _dot(ds.astype(w_j.dtype), w_j)
    acc_v = acc_v + _dot(p_col.astype(do_j.dtype), do_j)
    return acc_s, acc_v

  zeros = jnp.zeros((block_m, d), jnp.float32)
  acc_s, acc_v = jax.lax.fori_loop(0, pl.cdiv(n_rows, block_n), body, (zeros, zeros))
  dw = scale * acc_s + acc_v
  plgpu.store(dw_ref, dw.astype(dw_ref.dtype), mask=(rows < n_rows)[:, None])


def _forward(w, scale, valid, cfg: Config, interpret: bool):
  b, t, h, d = w.shape
  keys = _next_pow2(t)
  block_q = min(cfg.block_q, keys)
  n_blocks = pl.cdiv(t, block_q)
  kernel = functools.partial(_fwd_kernel, scale=scale, n_rows=t, valid=valid,
                             block_q=block_q, keys=keys)
  o, lse = pl.pallas_call(
      kernel,
      grid=(n_blocks, b, h),
      in_specs=[pl.BlockSpec((None, keys, None, d), lambda i, bi, hi: (bi, 0, hi, 0))],
      out_specs=[pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(w.shape, w.dtype),
                 jax.ShapeDtypeStruct((b, h, n_blocks * block_q), jnp.float32)],
      compiler_params=_compiler_params(cfg.num_warps_fwd, cfg.num_stages_fwd),
      interpret=interpret,
      name="mssa_fwd",
  )(w)
  return o, lse


def _backward(w, o, lse, do, scale, valid, cfg: Config, interpret: bool):
  b, t, h, d = w.shape
  keys = _next_pow2(t)
  block_m = min(cfg.block_m, keys)
  block_n = min(cfg.block_n, keys)
  n_blocks = pl.cdiv(t, block_m)
  # lse comes from the forward with its own row blocks: pad/cut it to cover
  # every chunk this loop loads (entries past T are masked on load anyway).
  n_lse = max(pl.cdiv(t, block_n) * block_n, n_blocks * block_m)
  if lse.shape[-1] < n_lse:
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, n_lse - lse.shape[-1])))
  full = pl.BlockSpec((None, keys, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  vec = pl.BlockSpec((None, None, lse.shape[-1]), lambda i, bi, hi: (bi, hi, 0))
  if cfg.delta_in_kernel:
    args, specs = (w, o, do, lse), [full, full, full, vec]
  else:
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, lse.shape[-1] - t)))
    args, specs = (w, do, lse, delta), [full, full, vec, vec]
  kernel = functools.partial(_bwd_kernel, scale=scale, n_rows=t, valid=valid,
                             block_m=block_m, block_n=block_n,
                             delta_in_kernel=cfg.delta_in_kernel)
  return pl.pallas_call(
      kernel,
      grid=(n_blocks, b, h),
      in_specs=specs,
      out_specs=pl.BlockSpec((None, block_m, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
      out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
      compiler_params=_compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
      interpret=interpret,
      name="mssa_bwd",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _mssa(w, scale, valid, cfg, interpret):
  return _forward(w, scale, valid, cfg, interpret)[0]


def _mssa_fwd(w, scale, valid, cfg, interpret):
  o, lse = _forward(w, scale, valid, cfg, interpret)
  return o, (w, o, lse)


def _mssa_bwd(scale, valid, cfg, interpret, res, do):
  w, o, lse = res
  return (_backward(w, o, lse, do.astype(w.dtype), scale, valid, cfg, interpret),)


_mssa.defvjp(_mssa_fwd, _mssa_bwd)
