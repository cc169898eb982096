"""LayerNorm, optionally fused with the residual add before it, as a Pallas
Triton kernel for NVIDIA GPUs, with its own backward.

    layer_norm(x, scale, bias, eps)                -> y = LN(x)
    add_layer_norm(x, r, scale, bias, eps, sign)   -> (s, LN(s)), s = x + sign·r

Why a kernel of our own: a transformer layer adds a residual branch to the
stream and normalises the sum at once. Apart, that is an XLA add (read x, r;
write s) and a LayerNorm (read s; write y) forward, and the same twice again
backward; fused, the forward reads x and r once and writes s and y, and the
backward reads s, dy and ds once and writes the one gradient both inputs get.
Each program owns `block_rows` whole rows (the feature axis padded to a power
of two and masked), so the statistics are row-local and float32; the backward
recomputes them from s instead of saving them, and writes per-program partial
sums of dscale and dbias that XLA adds up (a (programs, features) array).

Numerics follow flax's `nn.LayerNorm(use_fast_variance=False)` with float32
parameters: statistics and the affine map in float32, the output cast to the
input dtype; s is rounded to the input dtype before it is normalised, as the
separate add would. `layer_norm_reference` / `add_layer_norm_reference` are
that XLA path (the tests' reference). Off GPU (or `interpret=True`) the kernel
runs in Pallas interpret mode, which is how the CPU tests exercise it.

Measurements: BENCHMARKS.md, "LayerNorm kernels". Imports only jax (the GPU
image has neither ml_collections nor TensorFlow).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:                                      # the Triton flavour of Pallas
  from jax.experimental.pallas import triton as plgpu
except ImportError:                       # pragma: no cover - every jax we support has it
  plgpu = None

__all__ = ["layer_norm", "add_layer_norm", "layer_norm_reference",
           "add_layer_norm_reference", "supported", "Config"]

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_FEATURES = 8192


@dataclasses.dataclass(frozen=True)
class Config:
  """Rows per program and Triton warps (forward, backward)."""
  block_rows: int = 8
  num_warps_fwd: int = 4
  num_warps_bwd: int = 4


def supported(shape, dtype, platform: str | None = None) -> bool:
  """Whether the compiled kernel applies: an NVIDIA GPU, bf16/fp16, at most
  MAX_FEATURES features. (Interpret mode runs any float dtype.)"""
  platform = platform or jax.default_backend()
  return (platform in ("gpu", "cuda") and plgpu is not None and len(shape) >= 1
          and jnp.dtype(dtype) in _HALF and 1 <= shape[-1] <= MAX_FEATURES)


def layer_norm_reference(x, scale, bias, eps: float):
  """flax's LayerNorm (two-pass variance) with float32 statistics and affine map."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * (jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32))
  return (y + bias.astype(jnp.float32)).astype(x.dtype)


def add_layer_norm_reference(x, r, scale, bias, eps: float, sign: int = 1):
  s = x + r if sign > 0 else x - r
  return s, layer_norm_reference(s, scale, bias, eps)


def layer_norm(x, scale, bias, eps: float, *, interpret: bool | None = None,
               config: Config | None = None):
  """LN over the last axis of `x` (any leading shape)."""
  interpret = _interpret(x, interpret)
  if interpret is None:
    return layer_norm_reference(x, scale, bias, eps)
  rows = x.reshape(-1, x.shape[-1])
  y = _ln(rows, scale, bias, float(eps), config or Config(), interpret)
  return y.reshape(x.shape)


def add_layer_norm(x, r, scale, bias, eps: float, sign: int = 1, *,
                   interpret: bool | None = None, config: Config | None = None):
  """(s, LN(s)) with s = x + r (sign 1) or x − r (sign −1), one kernel each way."""
  if x.shape != r.shape or x.dtype != r.dtype:
    raise ValueError(f"add_layer_norm wants x and r of one shape and dtype, got "
                     f"{x.shape} {x.dtype} and {r.shape} {r.dtype}")
  interpret = _interpret(x, interpret)
  if interpret is None:
    return add_layer_norm_reference(x, r, scale, bias, eps, sign)
  d = x.shape[-1]
  s, y = _add_ln(x.reshape(-1, d), r.reshape(-1, d), scale, bias, float(eps),
                 1 if sign > 0 else -1, config or Config(), interpret)
  return s.reshape(x.shape), y.reshape(x.shape)


def _interpret(x, interpret):
  """True/False: interpret mode / compiled; None: use the reference (a GPU
  that the compiled kernel does not support for this shape or dtype)."""
  if interpret is not None:
    return bool(interpret)
  if jax.default_backend() == "gpu":
    return False if supported(x.shape, x.dtype, "gpu") else None
  return True


# ----------------------------------------------------------------------------
# Kernels. Refs are (block_rows, features padded to a power of two) views;
# loads of rows past the array and of padded features are masked to zero.

def _pow2(n: int) -> int:
  return max(16, 1 << max(0, int(n) - 1).bit_length())


def _compiler_params(num_warps: int):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
  if cls is None:                          # pragma: no cover
    return dict(triton=dict(num_warps=num_warps, num_stages=1))
  return cls(num_warps=num_warps, num_stages=1)


def _masks(n_rows, d, block_rows, width):
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  cols = jnp.arange(width)
  row_ok, col_ok = rows < n_rows, cols < d
  return row_ok[:, None] & col_ok[None, :], col_ok


def _normalise(s, col_ok, d, eps):
  """(x̂, rstd) of float32 rows `s` (padded features zero)."""
  mean = jnp.sum(s, axis=1, keepdims=True) / d
  c = jnp.where(col_ok[None, :], s - mean, 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(c * c, axis=1, keepdims=True) / d + eps)
  return c * rstd, rstd


def _fwd_kernel(*refs, eps, n_rows, d, block_rows, fused, sign):
  if fused:
    x_ref, r_ref, g_ref, b_ref, s_ref, y_ref = refs
  else:
    x_ref, g_ref, b_ref, y_ref = refs
  mask, col_ok = _masks(n_rows, d, block_rows, x_ref.shape[-1])
  x = plgpu.load(x_ref, mask=mask, other=0.0)
  if fused:
    r = plgpu.load(r_ref, mask=mask, other=0.0)
    s = x.astype(jnp.float32) + sign * r.astype(jnp.float32)
    s = s.astype(x_ref.dtype)                 # rounded as the separate add rounds it
    plgpu.store(s_ref, s, mask=mask)
    x = s
  xhat, _ = _normalise(x.astype(jnp.float32), col_ok, d, eps)
  g = plgpu.load(g_ref, mask=col_ok, other=0.0).astype(jnp.float32)
  b = plgpu.load(b_ref, mask=col_ok, other=0.0).astype(jnp.float32)
  plgpu.store(y_ref, (xhat * g[None, :] + b[None, :]).astype(y_ref.dtype), mask=mask)


def _bwd_kernel(*refs, eps, n_rows, d, block_rows, fused):
  if fused:
    s_ref, dy_ref, ds_ref, g_ref, dx_ref, dg_ref, db_ref = refs
  else:
    s_ref, dy_ref, g_ref, dx_ref, dg_ref, db_ref = refs
  mask, col_ok = _masks(n_rows, d, block_rows, s_ref.shape[-1])
  s = plgpu.load(s_ref, mask=mask, other=0.0).astype(jnp.float32)
  xhat, rstd = _normalise(s, col_ok, d, eps)
  dy = plgpu.load(dy_ref, mask=mask, other=0.0).astype(jnp.float32)
  g = plgpu.load(g_ref, mask=col_ok, other=0.0).astype(jnp.float32)
  dxhat = dy * g[None, :]
  mean_dxhat = jnp.sum(dxhat, axis=1, keepdims=True) / d
  mean_dxhat_xhat = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d
  dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
  if fused:
    dx = dx + plgpu.load(ds_ref, mask=mask, other=0.0).astype(jnp.float32)
  plgpu.store(dx_ref, dx.astype(dx_ref.dtype), mask=mask)
  dg_ref[...] = jnp.sum(dy * xhat, axis=0)    # rows past the array have dy = 0
  db_ref[...] = jnp.sum(dy, axis=0)


def _specs(n_rows, d, cfg):
  width = _pow2(d)
  block_rows = min(cfg.block_rows, _pow2(n_rows))
  programs = -(-n_rows // block_rows)
  rows = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
  vec = pl.BlockSpec((width,), lambda i: (0,))
  part = pl.BlockSpec((None, width), lambda i: (i, 0))
  return block_rows, programs, width, rows, vec, part


def _forward(x, r, scale, bias, eps, sign, cfg, interpret):
  n_rows, d = x.shape
  block_rows, programs, _, rows, vec, _ = _specs(n_rows, d, cfg)
  fused = r is not None
  kernel = functools.partial(_fwd_kernel, eps=eps, n_rows=n_rows, d=d,
                             block_rows=block_rows, fused=fused, sign=sign)
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  args = (x, r, scale, bias) if fused else (x, scale, bias)
  return pl.pallas_call(
      kernel, grid=(programs,),
      in_specs=[rows, rows, vec, vec] if fused else [rows, vec, vec],
      out_specs=[rows, rows] if fused else rows,
      out_shape=[out, out] if fused else out,
      compiler_params=_compiler_params(cfg.num_warps_fwd), interpret=interpret,
      name="add_layer_norm_fwd" if fused else "layer_norm_fwd")(*args)


def _backward(s, dy, ds, scale, eps, cfg, interpret):
  n_rows, d = s.shape
  block_rows, programs, width, rows, vec, part = _specs(n_rows, d, cfg)
  fused = ds is not None
  kernel = functools.partial(_bwd_kernel, eps=eps, n_rows=n_rows, d=d,
                             block_rows=block_rows, fused=fused)
  partial_sum = jax.ShapeDtypeStruct((programs, width), jnp.float32)
  args = (s, dy, ds, scale) if fused else (s, dy, scale)
  dx, dg, db = pl.pallas_call(
      kernel, grid=(programs,),
      in_specs=[rows, rows, rows, vec] if fused else [rows, rows, vec],
      out_specs=[rows, part, part],
      out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype), partial_sum, partial_sum],
      compiler_params=_compiler_params(cfg.num_warps_bwd), interpret=interpret,
      name="add_layer_norm_bwd" if fused else "layer_norm_bwd")(*args)
  return dx, dg.sum(0)[:d], db.sum(0)[:d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ln(x, scale, bias, eps, cfg, interpret):
  return _forward(x, None, scale, bias, eps, 1, cfg, interpret)


def _ln_fwd(x, scale, bias, eps, cfg, interpret):
  return _ln(x, scale, bias, eps, cfg, interpret), (x, scale, bias)


def _ln_bwd(eps, cfg, interpret, res, dy):
  x, scale, bias = res
  dx, dg, db = _backward(x, dy.astype(x.dtype), None, scale, eps, cfg, interpret)
  return dx, dg.astype(scale.dtype), db.astype(bias.dtype)


_ln.defvjp(_ln_fwd, _ln_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _add_ln(x, r, scale, bias, eps, sign, cfg, interpret):
  return tuple(_forward(x, r, scale, bias, eps, sign, cfg, interpret))


def _add_ln_fwd(x, r, scale, bias, eps, sign, cfg, interpret):
  s, y = _forward(x, r, scale, bias, eps, sign, cfg, interpret)
  return (s, y), (s, scale, bias)


def _add_ln_bwd(eps, sign, cfg, interpret, res, cotangents):
  s, scale, bias = res
  ds, dy = cotangents
  dx, dg, db = _backward(s, dy.astype(s.dtype), ds.astype(s.dtype), scale, eps, cfg,
                         interpret)
  return dx, dx if sign > 0 else -dx, dg.astype(scale.dtype), db.astype(bias.dtype)


_add_ln.defvjp(_add_ln_fwd, _add_ln_bwd)
