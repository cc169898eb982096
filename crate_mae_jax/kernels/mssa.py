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

(δ comes from a small XLA pre-pass over O and dO; see Config.delta_in_kernel
for why not from the kernel.)

The forward keeps every key of a (batch, head) on chip: one row block of
logits over all keys at once, in at most a few power-of-two pieces (no
online-softmax rescaling), and saves the
log-sum-exp (float32, base 2) per row for the backward. Statistics are float32;
matrix products take the input dtype and accumulate in float32.

Triton's blocks are powers of two: the tokens are tiled in power-of-two blocks
and the tail (197 = 196 patches + cls in CRATE-MAE-Base) is masked inside the
kernel, so callers need not pad (`TOKEN_MULTIPLE`). Off GPU (or with
`interpret=True`) the same kernel runs in Pallas interpret mode, which is how
the CPU tests exercise it.

Its measurements (micro-benchmark and whole step) are in BENCHMARKS.md, "Our MSSA kernel".

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
# layer stack that runs only this kernel need not pad the tokens (pre-padding
# measured slower, BENCHMARKS.md).
TOKEN_MULTIPLE = 1
# All keys of a (batch, head) are held on chip: tokens up to this many.
MAX_TOKENS = 256
HEAD_DIMS = (32, 64)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOG2E = math.log2(math.e)
_MASK = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile sizes and Triton settings (defaults: the fastest correct ones
  measured, see `default_config`).

  block_q: rows per forward program (its logits are block_q × all keys);
  block_m / block_n: rows per backward program / token chunk of its loop;
  delta_in_kernel: δ = rowsum(dO∘O) computed by each backward program for the
  chunks it reads (True) or by a small XLA pre-pass into a (B, H, T) array
  (False). True races on the GPU (wrong, run-to-run different gradients;
  BENCHMARKS.md, "Our MSSA kernel"): kept for investigation only;
  key_tail: the keys (and the backward's chunks) end in short power-of-two
  pieces (197 keys -> 128 + 64 + 16 in the forward, 3·64 + 16 in the backward)
  instead of padding to the next power of two (256);
  row_tail: likewise the query rows, through extra small pallas_calls for the
  last rows (3 programs of 64 rows + one of 16 per (batch, head)).
  """
  block_q: int = 64
  num_warps_fwd: int = 4
  num_stages_fwd: int = 1
  block_m: int = 64
  block_n: int = 32
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2
  delta_in_kernel: bool = False
  key_tail: bool = True
  row_tail: bool = True


def default_config(tokens: int, head_dim: int) -> Config:
  """The settings measured fastest (and correct) at CRATE-MAE-Base's shape
  (BENCHMARKS.md, "Our MSSA kernel"); every shape gets them, as no other shape
  was timed."""
  del tokens, head_dim
  return Config()


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _keys(t: int) -> int:
  """The token rows of one (batch, head) the kernels see: a power of two, ≥ 16
  (Triton's smallest matrix-product side)."""
  return max(16, _next_pow2(t))


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


def _pieces(n: int, key_tail: bool) -> tuple[tuple[int, int], ...]:
  """Power-of-two (start, size) pieces covering tokens [0, n): with key_tail,
  the binary digits of n rounded up to 16 (197 -> 128 + 64 + 16), else one
  piece of next_pow2(n)."""
  if not key_tail:
    return ((0, max(16, _next_pow2(n))),)
  n = -(-n // 16) * 16
  out, start = [], 0
  for bit in reversed(range(n.bit_length())):
    if n & (1 << bit):
      out.append((start, 1 << bit))
      start += 1 << bit
  return tuple(out)


def _chunks(n: int, block: int, tail: bool) -> tuple[int, tuple[tuple[int, int], ...]]:
  """(full, tails): `full` blocks of `block` tokens, then (with `tail`) the
  rest in the power-of-two pieces of `_pieces` (197 in blocks of 64: 3, and
  one of 16; in blocks of 128: 1, then 64 and 16), else one more full block."""
  full, rest = divmod(n, block)
  if rest == 0:
    return full, ()
  rest16 = -(-rest // 16) * 16
  if not tail or rest16 >= block:
    return full + 1, ()
  return full, tuple((full * block + p0, size) for p0, size in _pieces(rest16, True))


def _fwd_kernel(w_ref, o_ref, lse_ref, *, scale, n_rows, valid, block_q, row0,
                out_rows, pieces):
  i = pl.program_id(0)
  start = row0 + i * block_q
  w_i = _load_rows(w_ref, start, block_q, n_rows)               # (block_q, D)
  c = scale * _LOG2E
  s2, w_p = [], []
  for p0, size in pieces:                                        # keys, in pieces
    w_k = _load_rows(w_ref, p0, size, n_rows)                    # (size, D)
    s = _dot(w_i, w_k, trans_b=True) * c                         # (block_q, size) f32
    if p0 + size > valid:                                        # keys past valid (and T)
      s = jnp.where((p0 + jnp.arange(size) < valid)[None, :], s, _MASK)
    s2.append(s)
    w_p.append(w_k)
  m = functools.reduce(jnp.maximum, [jnp.max(s, axis=1) for s in s2])
  p = [jnp.exp2(s - m[:, None]) for s in s2]
  l = functools.reduce(jnp.add, [jnp.sum(x, axis=1) for x in p])
  o = functools.reduce(jnp.add, [_dot(x.astype(w_k.dtype), w_k) for x, w_k in zip(p, w_p)])
  o = o / l[:, None]
  rel = i * block_q + jnp.arange(block_q)                        # rows of this output
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=(rel < out_rows)[:, None])
  lse_ref[...] = m + jnp.log2(l)


def _bwd_kernel(*refs, scale, n_rows, valid, block_m, row0, out_rows, block_n,
                n_full, tails, delta_in_kernel):
  if delta_in_kernel:
    w_ref, o_ref, do_ref, lse_ref, dw_ref = refs
  else:
    w_ref, do_ref, lse_ref, delta_ref, dw_ref = refs
  def load(first, size):
    """(w, dO, lse, δ) of `size` rows from `first`."""
    w = _load_rows(w_ref, first, size, n_rows)
    do = _load_rows(do_ref, first, size, n_rows)
    lse = _load_vec(lse_ref, first, size, n_rows)
    if delta_in_kernel:
      o = _load_rows(o_ref, first, size, n_rows)
      return w, do, lse, jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=1)
    return w, do, lse, _load_vec(delta_ref, first, size, n_rows)

  i = pl.program_id(0)
  start = row0 + i * block_m
  rows = start + jnp.arange(block_m)
  w_i, do_i, lse_i, delta_i = load(start, block_m)
  c = scale * _LOG2E
  # Rows of this block as keys: masked past valid (only needed below T: rows
  # past T are zero and never stored).
  key_mask_i = (rows < valid)[:, None] if valid < n_rows else None

  def chunk(cstart, size, carry):
    acc_s, acc_v = carry
    w_j, do_j, lse_j, delta_j = load(cstart, size)
    s2 = _dot(w_i, w_j, trans_b=True) * c                          # (m, n)
    # Rows i as queries, chunk j as keys. Chunk rows past T are zero: their
    # p_row is finite and meets zero rows of w_j in the product below.
    p_row = jnp.exp2(s2 - lse_i[:, None])
    if valid < n_rows:
      p_row = jnp.where((cstart + jnp.arange(size) < valid)[None, :], p_row, 0.0)
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

  zeros = jnp.zeros((block_m, w_i.shape[-1]), jnp.float32)
  carry = (zeros, zeros)
  if n_full:
    carry = jax.lax.fori_loop(0, n_full, lambda j, c_: chunk(j * block_n, block_n, c_), carry)
  for cstart, size in tails:
    carry = chunk(cstart, size, carry)
  acc_s, acc_v = carry
  dw = scale * acc_s + acc_v
  rel = i * block_m + jnp.arange(block_m)
  plgpu.store(dw_ref, dw.astype(dw_ref.dtype), mask=(rel < out_rows)[:, None])


def _row_calls(t: int, block: int, tail: bool) -> list[tuple[int, int, int]]:
  """(first row, programs, rows per program) of each pallas_call covering the
  t query rows: blocks of `block`, then (with `tail`) one call per short
  piece of `_chunks` instead of a block of mostly padding (197 = 3·64 + 16)."""
  full, tails = _chunks(t, block, tail)
  return ([(0, full, block)] if full else []) + [(r0, 1, size) for r0, size in tails]


def _stitch(parts):
  """The outputs of _row_calls' calls, (first row, array), as one array: the
  first call's output has every row; the short call's rows are written into
  it (in place, in XLA)."""
  out = parts[0][1]
  for row0, x in parts[1:]:
    out = jax.lax.dynamic_update_slice(out, x, (0, row0, 0, 0))
  return out


def _forward(w, scale, valid, cfg: Config, interpret: bool):
  b, t, h, d = w.shape
  keys = _keys(t)
  block_q = min(cfg.block_q, keys)
  pieces = _pieces(valid, cfg.key_tail)
  full_spec = pl.BlockSpec((None, keys, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  calls = _row_calls(t, block_q, cfg.row_tail)
  os, lses = [], []
  for k, (row0, n, rows) in enumerate(calls):
    end = calls[k + 1][0] if k + 1 < len(calls) else t     # the rows this call owns
    out_rows = t if row0 == 0 else end - row0   # the first call's output is the whole array
    kernel = functools.partial(_fwd_kernel, scale=scale, n_rows=t, valid=valid,
                               block_q=rows, row0=row0, out_rows=out_rows, pieces=pieces)
    o, lse = pl.pallas_call(
        kernel,
        grid=(n, b, h),
        in_specs=[full_spec],
        out_specs=[pl.BlockSpec((None, rows, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((None, None, rows), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct((b, out_rows, h, d), w.dtype),
                   jax.ShapeDtypeStruct((b, h, n * rows), jnp.float32)],
        compiler_params=_compiler_params(cfg.num_warps_fwd, cfg.num_stages_fwd),
        interpret=interpret,
        name="mssa_fwd" if row0 == 0 else "mssa_fwd_tail",
    )(w)
    os.append((row0, o))
    lses.append(lse[..., :end - row0])
  return _stitch(os), jnp.concatenate(lses, axis=-1) if len(lses) > 1 else lses[0]


def _backward(w, o, lse, do, scale, valid, cfg: Config, interpret: bool):
  b, t, h, d = w.shape
  keys = _keys(t)
  block_m = min(cfg.block_m, keys)
  block_n = min(cfg.block_n, keys)
  n_full, tails = _chunks(t, block_n, cfg.key_tail)
  covered = n_full * block_n + sum(size for _, size in tails)
  # The lse (and δ) cover every row any chunk or row block loads; entries past
  # T are masked on load.
  calls = _row_calls(t, block_m, cfg.row_tail)
  n_lse = _next_pow2(max([covered] + [r0 + n * rows for r0, n, rows in calls]))
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, n_lse - t)))
  full = pl.BlockSpec((None, keys, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
  vec = pl.BlockSpec((None, None, n_lse), lambda i, bi, hi: (bi, hi, 0))
  if cfg.delta_in_kernel:
    args, specs = (w, o, do, lse), [full, full, full, vec]
  else:
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, n_lse - t)))
    args, specs = (w, do, lse, delta), [full, full, vec, vec]
  parts = []
  for k, (row0, n, rows) in enumerate(calls):
    end = calls[k + 1][0] if k + 1 < len(calls) else t
    out_rows = t if row0 == 0 else end - row0
    kernel = functools.partial(_bwd_kernel, scale=scale, n_rows=t, valid=valid,
                               block_m=rows, row0=row0, out_rows=out_rows, block_n=block_n,
                               n_full=n_full, tails=tails,
                               delta_in_kernel=cfg.delta_in_kernel)
    dw = pl.pallas_call(
        kernel,
        grid=(n, b, h),
        in_specs=specs,
        out_specs=pl.BlockSpec((None, rows, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct((b, out_rows, h, d), w.dtype),
        compiler_params=_compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
        interpret=interpret,
        name="mssa_bwd" if row0 == 0 else "mssa_bwd_tail",
    )(*args)
    parts.append((row0, dw))
  return _stitch(parts)


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
