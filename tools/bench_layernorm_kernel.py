"""Micro-benchmark of the LayerNorm kernels on a GPU, at CRATE-MAE-Base's shape.

Rows (256·197, 768) bf16, float32 scale and bias; for each variant the forward
alone and forward + backward (the VJP with every input's gradient: x, the
residual where there is one, scale, bias):

  * plain LayerNorm: flax's `nn.LayerNorm` (XLA), tokamax's Triton kernel, ours
    (crate_mae_jax/kernels/layernorm_pallas.py) over a sweep of rows per program
    and warps;
  * the residual add and LayerNorm the encoder layer does (s = x + r, LN s):
    XLA's add + flax, XLA's add + tokamax, ours fused (the sweep's best tiling
    and the default).

Median of windows of back-to-back calls (one block_until_ready per window).
Every variant is checked against the float32 flax path (relative error of y,
dx); the bandwidth floor (bytes every variant must move at the measured copy
rate) is printed beside. JSON to --json.

    python3 tools/bench_layernorm_kernel.py          # on the GPU
    JAX_PLATFORMS=cpu python3 tools/bench_layernorm_kernel.py --interpret --rows 64 --windows 1 --calls 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "layernorm_pallas", ROOT / "crate_mae_jax/kernels/layernorm_pallas.py")
lnp = importlib.util.module_from_spec(_spec)
sys.modules["layernorm_pallas"] = lnp
_spec.loader.exec_module(lnp)
EPS = 1e-5


def timed(fn, args, windows, calls):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls * 1e3)
  return statistics.median(times), out


def flax_ln(x, g, b):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.LayerNorm(epsilon=EPS, dtype=x.dtype, use_fast_variance=False).apply(
      {"params": {"scale": g, "bias": b}}, x)


def tokamax_ln(x, g, b):
  import tokamax  # pylint: disable=import-outside-toplevel
  return tokamax.layer_norm(x, g, b, epsilon=EPS, implementation="triton").astype(x.dtype)


INTERPRET = False   # --interpret: a CPU smoke run


def ours_ln(cfg):
  return lambda x, g, b: lnp.layer_norm(x, g, b, EPS, interpret=INTERPRET, config=cfg)


def separate_add(ln):
  def fn(x, r, g, b):
    s = x + r
    return s, ln(s, g, b)
  return fn


def ours_add(cfg):
  return lambda x, r, g, b: lnp.add_layer_norm(x, r, g, b, EPS, interpret=INTERPRET,
                                               config=cfg)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=256 * 197)
  p.add_argument("--features", type=int, default=768)
  p.add_argument("--windows", type=int, default=7)
  p.add_argument("--calls", type=int, default=50)
  p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_ln.json"))
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke run)")
  args = p.parse_args()
  global INTERPRET  # pylint: disable=global-statement
  INTERPRET = args.interpret
  try:
    from absl import flags  # tokamax reads absl flags  # pylint: disable=import-outside-toplevel
    flags.FLAGS.mark_as_parsed()
  except ImportError:
    pass
  n, d = args.rows, args.features
  k = jax.random.split(jax.random.key(0), 6)
  x = (jax.random.normal(k[0], (n, d)) * 2.5 + 0.7).astype(jnp.bfloat16)
  r = jax.random.normal(k[1], (n, d)).astype(jnp.bfloat16)
  g = 1.0 + 0.3 * jax.random.normal(k[2], (d,))
  b = 0.3 * jax.random.normal(k[3], (d,))
  cot = jax.random.normal(k[4], (n, d)).astype(jnp.bfloat16)
  cot_s = jax.random.normal(k[5], (n, d)).astype(jnp.bfloat16)
  print(jax.devices()[0].device_kind, "jax", jax.__version__, f"rows {n} x {d} bf16")

  # The copy rate this GPU reaches (read + write of one bf16 activation).
  copy = jax.jit(lambda t: t * 2)
  ms_copy, _ = timed(copy, (x,), args.windows, args.calls)
  tensor = n * d * 2
  rate = 2 * tensor / (ms_copy * 1e-3)
  print(f"copy: {ms_copy:.4f} ms = {rate / 1e9:,.0f} GB/s")
  floor = {"plain_fwd": 2, "plain_fwdbwd": 5, "add_fwd": 4, "add_fwdbwd": 8}  # tensors moved
  # plain: fwd x -> y; bwd x, dy -> dx. add: fwd x, r -> s, y; bwd s, dy, ds -> dx.
  floor_ms = {k_: v * tensor / rate * 1e3 for k_, v in floor.items()}

  exact_y = np.asarray(flax_ln(x.astype(jnp.float32), g, b))
  exact_dx = np.asarray(jax.vjp(lambda x_: flax_ln(x_, g, b), x.astype(jnp.float32))[1](
      cot.astype(jnp.float32))[0])
  s32 = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)
  exact_add = jax.vjp(lambda s: (s, flax_ln(s, g, b)), s32)[1]((cot_s.astype(jnp.float32),
                                                                 cot.astype(jnp.float32)))[0]
  exact_add = np.asarray(exact_add)
  exact_add_y = np.asarray(flax_ln(s32, g, b))

  rows, configs = [], {}

  def run(name, kind, fn, cfg=None):
    try:
      if kind == "plain":
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x_, g_, b_, c_: jax.vjp(fn, x_, g_, b_)[1](c_))
        ms_f, y = timed(fwd, (x, g, b), args.windows, args.calls)
        ms_b, grads = timed(bwd, (x, g, b, cot), args.windows, args.calls)
        err_y = rel(np.asarray(y, np.float32), exact_y)
        err_dx = rel(np.asarray(grads[0], np.float32), exact_dx)
      else:
        fwd = jax.jit(fn)
        bwd = jax.jit(lambda x_, r_, g_, b_, cs, cy: jax.vjp(fn, x_, r_, g_, b_)[1]((cs, cy)))
        ms_f, (_, y) = timed(fwd, (x, r, g, b), args.windows, args.calls)
        ms_b, grads = timed(bwd, (x, r, g, b, cot_s, cot), args.windows, args.calls)
        err_y = rel(np.asarray(y, np.float32), exact_add_y)
        err_dx = rel(np.asarray(grads[0], np.float32), exact_add)
      row = dict(name=name, kind=kind, fwd_ms=ms_f, fwdbwd_ms=ms_b, err_y=err_y, err_dx=err_dx,
                 floor_fwdbwd_ms=floor_ms[f"{kind}_fwdbwd"], config=str(cfg) if cfg else "")
      print(f"{name:44s} fwd {ms_f:.4f}  fwd+bwd {ms_b:.4f} ms  "
            f"(floor {floor_ms[kind + '_fwdbwd']:.4f}; {ms_b / floor_ms[kind + '_fwdbwd']:.2f}x)  "
            f"err y {err_y:.1e} dx {err_dx:.1e}", flush=True)
      rows.append(row)
      configs[name] = cfg
    except Exception:  # pylint: disable=broad-except
      print(f"{name}: FAILED\n{traceback.format_exc(limit=3)}", flush=True)

  run("flax (XLA)", "plain", flax_ln)
  run("tokamax", "plain", tokamax_ln)
  for block_rows in (2, 4, 8, 16):
    for warps in (4, 8):
      cfg = lnp.Config(block_rows=block_rows, num_warps_fwd=warps, num_warps_bwd=warps)
      run(f"ours rows {block_rows} warps {warps}", "plain", ours_ln(cfg), cfg)
  ours = [r_ for r_ in rows if r_["name"].startswith("ours") and r_["err_dx"] < 1e-2]
  best = min(ours, key=lambda r_: r_["fwdbwd_ms"]) if ours else None
  run("XLA add + flax", "add", separate_add(flax_ln))
  run("XLA add + tokamax", "add", separate_add(tokamax_ln))
  run("ours fused, default", "add", ours_add(lnp.Config()), lnp.Config())
  if best:
    bcfg = configs[best["name"]]
    run(f"ours fused, best plain tiling {best['config']}", "add", ours_add(bcfg), bcfg)
    for warps in (4, 8):
      for block_rows in (bcfg.block_rows // 2, bcfg.block_rows * 2):
        if block_rows >= 1:
          cfg = lnp.Config(block_rows=block_rows, num_warps_fwd=warps, num_warps_bwd=warps)
          run(f"ours fused rows {block_rows} warps {warps}", "add", ours_add(cfg), cfg)
  with open(args.json, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "copy_gb_s": rate / 1e9, "rows": rows}, f, indent=1)
  print("wrote", args.json)


if __name__ == "__main__":
  main()
