"""Throughput of the pre-training step: img/s, ms/step, TFLOP/s, peak memory.

    python -m crate_mae_jax.tools.benchmark --variant base --batch_size 256 --json out.json

Its defaults are the training defaults (`configs/base.py` in bf16: attention
'auto', the GPU XLA flags of `xla_defaults`), so it measures what users get.

Times the compiled train step (forward, backward and the pre-training AdamW of
`optim.create`) exactly as training runs it (`state_lib.jit_train_step`: state
donated, batch already on the devices). After `--warmup` steps it runs
`--windows` windows of `--steps` steps each, synchronising (block_until_ready)
only at the end of a window, and reports the median window's ms/step with the
spread over windows.

Comma lists in --variant/--arch/--dtype/--attention_impl/--norm_impl/--remat_policy/
--batch_size and '|'-separated alternatives in --xla_flags give a sweep: every
combination runs in its own subprocess (own XLA flags, own peak memory), and
the table of all rows is printed at the end. `--report=a.json,b.json` prints
the table of earlier runs.

FLOPs are counted analytically (`forward_flops`): 2·m·n·k for every matrix
product of the forward pass as the *official* PyTorch model computes it (ISTA
as three products, attention logits and weighted sum on all tokens, the pixel
head on all tokens), per image; a training step counts 3× the forward (the
backward pass costs twice the forward). Elementwise work, norms and softmax
are not counted. "model TFLOP/s" uses that count, so it is comparable with the
PyTorch baseline; "exec" uses what this code runs (ISTA folded into one
product x(D − DᵀD), whose DᵀD costs 2d³ per layer per step). The compiled
step's own `cost_analysis()` flops are reported as a cross-check.

Imports no TensorFlow and needs no clu; `--input_pipeline` times the host input
pipeline when `crate_mae_jax.data.input_pipeline` (and its TensorFlow) is importable
and skips with a message otherwise.
"""
import argparse
import datetime
import glob
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags

GIB = 1024**3

# Kernel-name patterns for the profile breakdown (first match wins).
KERNEL_CATEGORIES = (
    ("attention (cuDNN/flash)", r"sdpa|fmha|flash|fprop|bprop|cudnn"),
    ("matmul (triton fusion)", r"triton_gemm|gemm_fusion|triton.*dot|__triton_gemm"),
    ("matmul (cuBLAS/CUTLASS)", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|wgmma"),
    ("reduction fusion", r"reduce|reduction"),
    ("transpose/copy", r"transpose|copy|memcpy|memset|concatenate|dynamic.update"),
    ("elementwise fusion", r"fusion|loop_|triton"),
)


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(r: dict, image_size: int, mask_ratio: float, batch_size: int = 1,
                  executed: bool = False) -> float:
  """Matrix-product FLOPs of one image's forward pass (see the module doc).

  `r` is `models.resolve(config.model)`. executed=False counts the official
  model; executed=True counts this code (fused ISTA, DᵀD amortised over the
  batch).
  """
  from crate_mae_jax.models.patches import num_kept
  p, c = r["patch_size"], r["channels"]
  grid = image_size // p
  num_patches = grid * grid
  pix = p * p * c
  d = r["width"]

  def attention(n, width):
    return 4 * n * n * width  # q·kᵀ and weights·v over all heads

  total = 2 * num_patches * pix * d  # patch embedding (all patches)
  if r["arch"] == "crate_mae":
    n = num_patches + 1
    mssa = 2 * n * d * d + attention(n, d) + 2 * n * d * d  # U_k, attention, out
    if executed and r["ista_fused"]:
      ista = 2 * n * d * d + 2 * d**3 / batch_size
    else:
      ista = 3 * 2 * n * d * d
    total += r["depth"] * (mssa + ista)
    total += r["decoder_depth"] * (2 * n * d * d + mssa)   # dictionary + MSSA
    total += 2 * n * d * pix                               # pixel head
    return float(total)
  # ViT-MAE: encoder on cls + visible patches, decoder on all tokens.
  ne = num_kept(num_patches, mask_ratio) + 1
  nd = num_patches + 1
  dd = r["decoder_width"]
  hidden, hidden_d = int(d * r["mlp_ratio"]), int(dd * r["mlp_ratio"])

  def block(n, width, hid):
    return 2 * n * width * 3 * width + attention(n, width) + 2 * n * width * width \
        + 2 * 2 * n * width * hid
  total += r["depth"] * block(ne, d, hidden)
  total += 2 * ne * d * dd                                  # decoder embed
  total += r["decoder_depth"] * block(nd, dd, hidden_d)
  total += 2 * nd * dd * pix                                # pixel head
  return float(total)


# ----------------------------------------------------------------------------- helpers


def environment() -> dict:
  import jax
  import jaxlib
  env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "backend": jax.default_backend(), "devices": len(jax.devices()),
         "device_kind": jax.devices()[0].device_kind, "host_cores": _cores(),
         "python": sys.version.split()[0]}
  try:
    env["platform_version"] = jax.devices()[0].client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
    if cuda_versions is not None:
      env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
      env["cudnn"] = cuda_versions.cudnn_get_version()
      env["cuda_driver"] = cuda_versions.cuda_driver_get_version()
  except Exception:  # pylint: disable=broad-except
    pass
  for name in ("flax", "optax"):
    try:
      env[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except
      pass
  env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return env


def _sig(x: float, digits: int = 4) -> float:
  """x rounded to `digits` significant digits (small CPU numbers stay non-zero)."""
  return float(f"{x:.{digits}g}")


def _augments_on_host(pipe) -> bool:
  from crate_mae_jax.data import augment_jax
  return getattr(pipe, "device_augment", None) in (None, augment_jax.identity_augment)


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def _memory_analysis_bytes(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes
                 + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def _peak_bytes() -> float | None:
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return float(max(peaks)) if peaks else None


# ----------------------------------------------------------------------------- one run


def build(args):
  """(compiled step, state, batch, resolved model, config, compile seconds, params,
  FLOPs): the pre-training step `train` runs, built by the same `training.setup`."""
  import jax
  import numpy as np
  from crate_mae_jax import config_lib, models, sharding
  from crate_mae_jax.training import setup as setup_lib

  c = config_lib.default_config()
  c.model = models.model_config(args.variant, args.arch)
  c.model.dtype = args.dtype
  c.model.mask_ratio = args.mask_ratio
  c.model.attention_impl = "auto" if args.attention_impl in ("none", "default") \
      else args.attention_impl
  c.model.norm_impl = "auto" if args.norm_impl in ("none", "default") else args.norm_impl
  c.model.remat_policy = None if args.remat_policy == "none" else args.remat_policy
  for key in ("width", "depth", "heads", "patch_size", "decoder_depth"):
    if getattr(args, key, None):
      c.model[key] = getattr(args, key)
  c.data.image_size = args.image_size
  c.batch_size = args.batch_size
  c.num_train_steps = 10_000  # the schedule's length; only its values depend on it
  try:
    c.mesh.shape = sharding.parse_mesh(args.mesh)
    resolved = config_lib.validate(c)
    try:
      config_lib.check_backend(c, jax.default_backend())
    except config_lib.ConfigError as e:  # name the flag the benchmark was given
      raise config_lib.ConfigError(f"--attention_impl {args.attention_impl}: {e}") from None
    mesh = sharding.create_mesh(c.mesh.shape)
    if args.batch_size % sharding.num_batch_shards(mesh):
      raise config_lib.ConfigError(
          f"--batch_size {args.batch_size} is not divisible by the "
          f"{sharding.num_batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)}")
  except config_lib.ConfigError as e:
    raise SystemExit(str(e)) from None
  run = setup_lib.setup(c, resolved, mesh, num_train_examples=100 * args.batch_size)
  state = run.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  local = args.batch_size // jax.process_count()
  images = rng.standard_normal((local, args.image_size, args.image_size,
                                resolved["channels"]), dtype=np.float32)
  batch = sharding.global_batch({"image": images}, mesh)
  t0 = time.perf_counter()
  lowered = run.train_step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  return (compiled, state, batch, resolved, c, compile_s, models.count_params(state.params),
          _cost_flops(lowered))


def run_one(args) -> dict:
  import jax
  row: dict[str, Any] = dict(
      arch=args.arch, variant=args.variant, batch_size=args.batch_size,
      image_size=args.image_size, dtype=args.dtype, attention_impl=args.attention_impl,
      norm_impl=args.norm_impl, remat_policy=args.remat_policy, mesh=args.mesh, mask_ratio=args.mask_ratio,
      xla_flags=os.environ.get("XLA_FLAGS", ""), label=args.label)
  compiled, state, batch, r, _, compile_s, params, hlo_flops = build(args)
  from crate_mae_jax import models  # pylint: disable=import-outside-toplevel
  kernels = models.kernels(r)
  row.update(params=params, compile_s=round(compile_s, 2),
             attention_resolved=kernels["attention"], norm_resolved=kernels["layernorm"])

  for _ in range(max(args.warmup, 1)):
    state, metrics = compiled(state, batch)
  first_loss = float(jax.device_get(metrics["loss"]))

  times = []
  for _ in range(args.windows):
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / args.steps)
  last_loss = float(jax.device_get(metrics["loss"]))

  ms = [t * 1e3 for t in times]
  med = statistics.median(ms)
  fwd = forward_flops(r, args.image_size, args.mask_ratio, args.batch_size)
  fwd_exec = forward_flops(r, args.image_size, args.mask_ratio, args.batch_size,
                           executed=True)
  img_s = args.batch_size / (med / 1e3)
  # The compiled module's own count (on GPU it misses library calls such as
  # cuBLAS and cuDNN) and the count of the lowered, unoptimised HLO.
  xla_flops = _cost_flops(compiled)
  row.update(
      ms_step=round(med, 3), ms_min=round(min(ms), 3), ms_max=round(max(ms), 3),
      spread_pct=round(100 * (max(ms) - min(ms)) / med, 2), windows_ms=[round(m, 3) for m in ms],
      img_s=round(img_s, 1),
      gflop_fwd_img=_sig(fwd / 1e9), gflop_fwd_img_exec=_sig(fwd_exec / 1e9),
      model_tflops=_sig(3 * fwd * img_s / 1e12),
      exec_tflops=_sig(3 * fwd_exec * img_s / 1e12),
      xla_gflop_step=None if xla_flops is None else _sig(xla_flops / 1e9),
      xla_tflops=None if xla_flops is None else _sig(xla_flops / (med / 1e3) / 1e12),
      xla_vs_exec=None if xla_flops is None else round(
          xla_flops / (3 * fwd_exec * args.batch_size), 3),
      hlo_gflop_step=None if hlo_flops is None else _sig(hlo_flops / 1e9),
      hlo_vs_exec=None if hlo_flops is None else round(
          hlo_flops / (3 * fwd_exec * args.batch_size), 3),
      peak_gib=None if _peak_bytes() is None else round(_peak_bytes() / GIB, 2),
      xla_mem_gib=None if _memory_analysis_bytes(compiled) is None else round(
          _memory_analysis_bytes(compiled) / GIB, 2),
      loss_first=first_loss, loss_last=last_loss,
      finite=bool(jax.numpy.isfinite(last_loss)), env=environment())
  if args.profile:
    try:
      row["profile"] = profile(compiled, state, batch, args.profile, args.profile_steps)
      state = row["profile"].pop("_state")
    except Exception as e:  # pylint: disable=broad-except
      row["profile"] = {"error": f"{type(e).__name__}: {e}"}
  if args.dump_hlo:
    os.makedirs(os.path.dirname(os.path.abspath(args.dump_hlo)) or ".", exist_ok=True)
    with open(args.dump_hlo, "w") as f:
      f.write(compiled.as_text())
  return row


def profile(compiled, state, batch, out_dir: str, n: int) -> dict:
  """Traces `n` steps and sums device kernel time by name and category."""
  import jax
  os.makedirs(out_dir, exist_ok=True)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  with jax.profiler.trace(out_dir):
    for _ in range(n):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - t0) / n
  result: dict[str, Any] = {"_state": state, "dir": out_dir, "steps": n,
                            "wall_ms_step_traced": round(wall * 1e3, 3)}
  files = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    result["error"] = "no xplane file written"
    return result
  try:
    from jax.profiler import ProfileData
    data = ProfileData.from_file(files[-1])
  except Exception as e:  # pylint: disable=broad-except
    result["error"] = f"could not read the trace: {e!r}"
    return result
  kernels: dict[str, float] = {}
  ops: dict[str, float] = {}
  line_names = []
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      name = line.name or ""
      events = list(line.events)
      line_names.append(f"{plane.name} / {name} ({len(events)})")
      target = None
      if name.startswith("Stream") or "stream" in name.lower():
        target = kernels
      elif "op" in name.lower():
        target = ops
      if target is None:
        continue
      for ev in events:
        target[ev.name] = target.get(ev.name, 0.0) + ev.duration_ns / 1e6 / n
  result["lines"] = line_names
  # Model part of each fusion kernel, from the op_name of the HLO instruction
  # whose name the kernel carries (deduplicated fusions count under one name).
  op_names = {}
  try:
    for m in re.finditer(r"^\s*%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", compiled.as_text(),
                         re.MULTILINE):
      op_names[m.group(1).replace(".", "_").replace("-", "_")] = m.group(2)
  except Exception:  # pylint: disable=broad-except
    pass
  parts: dict[str, float] = {}
  for kname, ms in kernels.items():
    part = _model_part(op_names.get(kname.replace(".", "_").replace("-", "_")), kname)
    parts[part] = parts.get(part, 0.0) + ms
  result["parts_ms"] = {k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
  cats: dict[str, float] = {}
  for kname, ms in kernels.items():
    low = kname.lower()
    cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, low)), "other")
    cats[cat] = cats.get(cat, 0.0) + ms
  busy = sum(kernels.values())
  result.update(
      kernel_ms_step=round(busy, 3),
      categories_ms={k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
      top_kernels=[(k[:160], round(v, 3)) for k, v in
                   sorted(kernels.items(), key=lambda kv: -kv[1])[:40]],
      top_ops=[(k[:160], round(v, 3)) for k, v in
               sorted(ops.items(), key=lambda kv: -kv[1])[:40]],
      # Every kernel over 0.5 ms/step with the HLO op_name that says what it does.
      named_kernels=[(k[:160], round(v, 3),
                      (op_names.get(k.replace(".", "_").replace("-", "_")) or "")[:240])
                     for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]) if v >= 0.5])
  return result


def _model_part(op_name: str | None, kernel: str) -> str:
  """'forward/backward: component' for a kernel, from its HLO op_name."""
  low = kernel.lower()
  if op_name is None:
    if re.search(r"sdpa|fmha|flash|cudnn", low):
      return "attention core (cuDNN)"
    if re.search(r"gemm|nvjet|cutlass|xmma|cublas", low):
      return "library matmul (cuBLAS)"
    return "unattributed"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  o = op_name.lower()
  if re.search(r"opt_state|adam|optax|tree_|apply_updates|scale_by|global_norm|isfinite|_where",
               o) and "crate" not in o and "vit" not in o:
    return "optimizer + finite check"
  for key, part in (("subspaces", "MSSA projections"), ("mssa/out", "MSSA projections"),
                    ("attn/out", "attention projections"), ("/qkv", "attention projections"),
                    ("mssa", "attention core"), ("attention", "attention core"),
                    ("ista", "ISTA"), ("dictionary", "decoder dictionary"),
                    ("mlp", "MLP"), ("norm", "layernorm"), ("patch_embed", "embed/head"),
                    ("pixel_head", "embed/head"), ("sort", "masking"), ("mask", "masking")):
    if key in o:
      return f"{direction}: {part}"
  return f"{direction}: other"


# ----------------------------------------------------------------------------- input pipeline


def time_input_pipeline(args) -> dict:
  """Host decode + augment throughput of `crate_mae_jax.data.input_pipeline`."""
  try:
    from crate_mae_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    msg = (f"input pipeline skipped: {e} (it needs TensorFlow)" if "tensorflow" in str(e).lower()
           else f"input pipeline skipped: crate_mae_jax.data.input_pipeline is not importable ({e})")
    print(msg)
    return {"skipped": msg}
  from crate_mae_jax import config_lib
  c = config_lib.default_config()
  c.data.source = args.input_source
  c.data.image_size = args.image_size
  if args.input_path:
    c.data.path = args.input_path
  try:
    batch_size = int(_split(str(args.batch_size))[0])
    pipe = input_pipeline.create(c.data, c.augment, task="pretrain",
                                 batch_size=batch_size, seed=0)
    it = iter(pipe.train_batches(0))
    next(it)  # start-up (file listing, first decode) stays out of the number
    n = 0
    t0 = time.perf_counter()
    for _ in range(args.input_batches):
      b = next(it)
      n += len(next(iter(b.values())) if isinstance(b, dict) else b)
    dt = time.perf_counter() - t0
  except Exception as e:  # pylint: disable=broad-except
    msg = f"input pipeline skipped: {type(e).__name__}: {e}"
    print(msg)
    return {"skipped": msg}
  cores = _cores()
  # In-memory sources hand out raw uint8 arrays and augment on the device
  # (source.device_augment), so their host number is batching only.
  out = {"source": args.input_source, "images": n, "seconds": round(dt, 3),
         "host_augment": _augments_on_host(pipe),
         "img_s": round(n / dt, 1), "cores": cores, "img_s_per_core": round(n / dt / cores, 1)}
  print(f"input pipeline ({args.input_source}): {out['img_s']} img/s on {cores} cores "
        f"= {out['img_s_per_core']} img/s per core")
  return out


# ----------------------------------------------------------------------------- micro benchmarks


def _time_fn(fn, *xs, windows: int = 5, reps: int = 10) -> float:
  """Median ms per call of a jitted fn (sync at the end of each window)."""
  import jax
  out = fn(*xs)
  jax.block_until_ready(out)
  times = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*xs)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps * 1e3)
  return statistics.median(times)


def micro(args) -> list[dict]:
  """Ceilings and attention variants at the model's shapes (fwd + bwd)."""
  import jax
  import jax.numpy as jnp
  from crate_mae_jax import config_lib, models
  from crate_mae_jax.kernels import attention, layernorm
  r = config_lib.resolve_model(models.model_config(
      args.variant if args.variant != "all" else "base", _split(args.arch)[0]))
  b = int(_split(args.batch_size)[0])
  n = (args.image_size // r["patch_size"]) ** 2 + 1
  d, h = r["width"], r["heads"]
  hd = d // h
  key = jax.random.key(0)
  rows = []

  def add(name, ms, flops=None, nbytes=None):
    row = {"micro": name, "ms": round(ms, 4)}
    if flops:
      row["tflops"] = round(flops / ms / 1e9, 1)
    if nbytes:
      row["gb_s"] = round(nbytes / ms / 1e6, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)

  gpu = jax.default_backend() == "gpu"
  big = jax.random.normal(key, (1 << (28 if gpu else 20),), jnp.float32)  # 1 GiB on GPU
  add(f"copy {big.nbytes >> 20} MiB f32 (x*1.0001)", _time_fn(jax.jit(lambda x: x * 1.0001), big),
      nbytes=2 * big.nbytes)
  del big
  m = b * n
  x = jax.random.normal(key, (m, d), jnp.bfloat16)
  wmat = jax.random.normal(key, (d, d), jnp.bfloat16) * 0.03
  add(f"matmul bf16 ({m}x{d})@({d}x{d})", _time_fn(jax.jit(lambda a, c: a @ c), x, wmat),
      flops=2 * m * d * d)
  k = 8192 if gpu else 256
  add(f"matmul bf16 {k}^3", _time_fn(jax.jit(lambda a, c: a @ c),
                                    jax.random.normal(key, (k, k), jnp.bfloat16),
                                    jax.random.normal(jax.random.key(2), (k, k), jnp.bfloat16)),
      flops=2 * k**3)
  # LayerNorm kernels at the model's shapes: bf16 activations, f32 parameters.
  ln_ref = None
  x_probe = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)  # a cotangent
  for impl in layernorm.NORM_IMPLS[1:]:
    ln = layernorm.layer_norm(1e-5, jnp.bfloat16, jnp.float32, "ln", impl)
    ln_grad = jax.jit(jax.grad(lambda p, a, ln=ln: (ln.apply(p, a).astype(jnp.float32)
                                                    * x_probe).sum(), argnums=(0, 1)))
    try:
      lnp = ln.init(key, x[:8])
      grads = ln_grad(lnp, x)
      if ln_ref is None:
        ln_ref = grads
      err = max(float(jnp.linalg.norm((a - b).astype(jnp.float32))
                      / jnp.linalg.norm(b.astype(jnp.float32)))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ln_ref)))
      add(f"layernorm {impl} fwd+bwd bf16 ({m}x{d}), grad rel.err {err:.1e}",
          _time_fn(ln_grad, lnp, x), nbytes=4 * x.nbytes)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"micro": f"layernorm {impl}", "error": f"{type(e).__name__}: {e}"[:300]})
      print(json.dumps(rows[-1]), flush=True)
  del x
  w = jax.random.normal(key, (b, n, h, hd), jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), (b, n, h, hd), jnp.bfloat16)
  scale = hd ** -0.5
  flops = 3 * 4 * b * h * n * n * hd
  impls = {
      "xla": lambda q: jax.nn.dot_product_attention(q, q, q, scale=scale, implementation="xla"),
      "explicit": lambda q: attention.attention(q, q, q, scale, "explicit"),
      "cudnn": lambda q: attention.attention(q, q, q, scale, "cudnn"),
      "mssa": lambda q: attention.attention(q, q, q, scale, "mssa"),
  }
  ref = None
  for name, fn in impls.items():
    def loss(q, fn=fn):
      return (fn(q).astype(jnp.float32) * g.astype(jnp.float32)).sum()
    step = jax.jit(jax.value_and_grad(loss))
    try:
      val, grad = step(w)
      if ref is None:
        ref = (val, grad)
      err = float(jnp.linalg.norm((grad - ref[1]).astype(jnp.float32))
                  / jnp.linalg.norm(ref[1].astype(jnp.float32)))
      fwd = jax.jit(fn)
      add(f"attention {name} fwd ({b},{n},{h},{hd})", _time_fn(fwd, w), flops=flops / 3)
      add(f"attention {name} fwd+bwd, grad rel.err {err:.1e}", _time_fn(step, w), flops=flops)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"micro": f"attention {name}", "error": f"{type(e).__name__}: {e}"[:300]})
      print(json.dumps(rows[-1]), flush=True)
  return rows


# ----------------------------------------------------------------------------- table / sweep

COLUMNS = (("label", "label", "{}"), ("arch", "arch", "{}"), ("variant", "var", "{}"),
           ("batch_size", "batch", "{}"), ("dtype", "dtype", "{}"),
           ("attention_impl", "attn", "{}"), ("norm_impl", "norm", "{}"),
           ("remat_policy", "remat", "{}"),
           ("img_s", "img/s", "{:,.0f}"), ("ms_step", "ms/step", "{:.2f}"),
           ("spread_pct", "±%", "{:.1f}"), ("model_tflops", "model TF/s", "{:.0f}"),
           ("exec_tflops", "exec TF/s", "{:.0f}"), ("hlo_vs_exec", "HLO/exec flops", "{:.2f}"),
           ("peak_gib", "peak GiB", "{:.2f}"), ("compile_s", "compile s", "{:.0f}"))


def table(rows: list[dict]) -> str:
  out = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
         "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
  for row in rows:
    if "error" in row:
      out.append(f"| {row.get('label') or ''} | {row.get('arch')} | {row.get('variant')} | "
                 f"{row.get('batch_size')} | {row.get('dtype')} | {row.get('attention_impl')} | "
                 f"{row.get('remat_policy')} | ERROR: {row['error'][:120]} |")
      continue
    cells = []
    for key, _, fmt in COLUMNS:
      v = row.get(key)
      cells.append("–" if v is None or v == "" else fmt.format(v))
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def _split(text: str, sep: str = ",") -> list[str]:
  return [t.strip() for t in text.split(sep) if t.strip()]


def sweep(args, argv) -> list[dict]:
  variants = ["tiny", "small", "base", "large"] if args.variant == "all" else _split(args.variant)
  combos = list(itertools.product(
      _split(args.arch), variants, [int(b) for b in _split(args.batch_size)], _split(args.dtype),
      _split(args.attention_impl), _split(args.norm_impl), _split(args.remat_policy),
      [f.strip() for f in args.xla_flags.split("|")] if args.xla_flags else [""]))
  if len(combos) == 1 and not args.isolate:
    arch, variant, batch, dtype, attn, norm, remat, flags = combos[0]
    args = argparse.Namespace(**{**vars(args), "arch": arch, "variant": variant,
                                 "batch_size": batch, "dtype": dtype, "attention_impl": attn,
                                 "norm_impl": norm, "remat_policy": remat})
    try:
      return [run_one(args)]
    except Exception as e:  # pylint: disable=broad-except
      return [dict(arch=arch, variant=variant, batch_size=batch, dtype=dtype,
                   attention_impl=attn, norm_impl=norm, remat_policy=remat, label=args.label,
                   error=f"{type(e).__name__}: {e}")]
  rows = []
  keep = _strip_sweep_flags(argv)
  for arch, variant, batch, dtype, attn, norm, remat, flags in combos:
    base_env = os.environ.get("XLA_FLAGS_BASE", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [base_env,
                                                             "" if flags == "default" else flags])))
    env["XLA_FLAGS_BASE"] = base_env
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "row.json")
      cmd = [sys.executable, "-m", "crate_mae_jax.tools.benchmark", *keep,
             "--arch", arch, "--variant", variant, "--batch_size", str(batch),
             "--dtype", dtype, "--attention_impl", attn, "--norm_impl", norm,
             "--remat_policy", remat,
             "--noisolate", "--quiet", "--json", out]
      if args.profile:
        cmd += ["--profile", os.path.join(args.profile, f"{arch}_{variant}_{attn}_{len(rows)}")]
      if args.dump_hlo:
        cmd += ["--dump_hlo", f"{args.dump_hlo}.{arch}_{variant}_{attn}_{remat}_{len(rows)}.txt"]
      label = args.label or ""
      if flags and flags != "default":
        label = (label + " " if label else "") + flags
      cmd += [f"--label={label}"]
      print(f"--- {arch} {variant} batch {batch} {dtype} attn={attn} norm={norm} remat={remat} "
            f"flags={flags or 'default'}", flush=True)
      t0 = time.perf_counter()
      try:
        proc = subprocess.run(cmd, env=env, timeout=args.run_timeout, capture_output=True,
                              text=True)
        tail = (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode == 0 and os.path.exists(out):
          with open(out) as f:
            data = json.load(f)
          got = data["rows"]
          for g in got:
            g["env"] = data.get("env")
        else:
          lines = [l for l in tail.splitlines() if l.strip()]
          got = [dict(error=f"exit {proc.returncode}: " + " / ".join(lines[-3:]))]
          print(tail, flush=True)
      except subprocess.TimeoutExpired:
        got = [dict(error=f"timed out after {args.run_timeout}s")]
      for g in got:
        g.setdefault("arch", arch), g.setdefault("variant", variant)
        g.setdefault("batch_size", batch), g.setdefault("dtype", dtype)
        g.setdefault("attention_impl", attn), g.setdefault("norm_impl", norm)
        g.setdefault("remat_policy", remat)
        g.setdefault("label", label)
        g["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in g.items()
                          if k not in ("profile", "windows_ms", "env")}), flush=True)
        if "profile" in g:
          _print_profile(g)
      rows.extend(got)
  return rows


def _strip_sweep_flags(argv):
  """argv without the flags a sweep sets per run."""
  drop = {"--arch", "--variant", "--batch_size", "--dtype", "--attention_impl", "--norm_impl",
          "--remat_policy", "--xla_flags", "--json", "--label", "--profile", "--dump_hlo"}
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    name = a.split("=", 1)[0]
    if name in drop:
      skip = "=" not in a
      continue
    if name in ("--isolate", "--noisolate", "--quiet"):
      continue
    out.append(a)
  return out


def _print_profile(row):
  p = row["profile"]
  if "error" in p:
    print("profile:", p["error"])
    return
  print(f"profile {row.get('arch')} {row.get('variant')}: wall {p['wall_ms_step_traced']} ms/step, "
        f"kernels {p['kernel_ms_step']} ms/step")
  for k, v in p["categories_ms"].items():
    print(f"  {k:28s} {v:9.3f} ms")
  for k, v in p.get("parts_ms", {}).items():
    print(f"  {k:40s} {v:9.3f} ms")
  # JSON written before named_kernels existed: its top kernels, without op_names.
  named = p.get("named_kernels") or [(k, v, "") for k, v in p["top_kernels"][:15]]
  print("  kernels over 0.5 ms/step (name: HLO op_name):")
  for k, v, op in named:
    print(f"  {v:8.3f} ms  {k[:70]}: {op[:150]}")


# ----------------------------------------------------------------------------- command line
# Its own flag set: the benchmark is also imported as a library (tests, the
# study), where its flag names (dtype, variant, ...) must not collide with
# other modules' flags in absl's global set.
FLAGS = flags.FlagValues()
flags.DEFINE_string("variant", "base", "tiny/small/base/large, a comma list, or all", flag_values=FLAGS)
flags.DEFINE_string("arch", "crate_mae", "crate_mae, vit_mae or a comma list", flag_values=FLAGS)
flags.DEFINE_string("batch_size", "256", "global batch (comma list allowed)", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "image side in pixels", flag_values=FLAGS)
flags.DEFINE_string("dtype", "bfloat16", "compute dtype: float32, bfloat16 (comma list allowed)", flag_values=FLAGS)
flags.DEFINE_string("attention_impl", "auto",
                    "auto (the training default: on one GPU in bf16/fp16 our mssa kernel for CRATE-MAE, "
                    "cuDNN for ViT-MAE; else XLA), "
                    "xla, cudnn, mssa (our q=k=v kernel, GPU), splash (TPU), explicit (comma list allowed)",
                    flag_values=FLAGS)
flags.DEFINE_string("norm_impl", "auto",
                    "LayerNorm kernel: auto (the training default), flax, tokamax, pallas (ours) "
                    "(comma list allowed)", flag_values=FLAGS)
flags.DEFINE_string("remat_policy", "none",
                    "none, full or a jax.checkpoint_policies name (comma list allowed)", flag_values=FLAGS)
flags.DEFINE_integer("width", 0, "override the variant's width", flag_values=FLAGS)
flags.DEFINE_integer("depth", 0, "override the variant's depth", flag_values=FLAGS)
flags.DEFINE_integer("decoder_depth", 0, "override the decoder depth", flag_values=FLAGS)
flags.DEFINE_integer("heads", 0, "override the variant's heads", flag_values=FLAGS)
flags.DEFINE_integer("patch_size", 0, "override the patch size (16)", flag_values=FLAGS)
flags.DEFINE_string("mesh", "data=-1", "e.g. data=-1 or data=2,fsdp=4", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "steps per timed window", flag_values=FLAGS)
flags.DEFINE_integer("windows", 5, "timed windows (median reported)", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "untimed steps after compiling", flag_values=FLAGS)
flags.DEFINE_float("mask_ratio", 0.75, "fraction of patches masked", flag_values=FLAGS)
flags.DEFINE_string("xla_flags", "",
                    "extra XLA flags; '|' separates alternatives to sweep ('default' = none)", flag_values=FLAGS)
flags.DEFINE_bool("isolate", None,
                  "run each configuration in its own process (default: when sweeping)", flag_values=FLAGS)
flags.DEFINE_integer("run_timeout", 600, "seconds per isolated run", flag_values=FLAGS)
flags.DEFINE_string("profile", "", "trace steps into this folder, print a breakdown", flag_values=FLAGS)
flags.DEFINE_integer("profile_steps", 3, "steps traced with --profile", flag_values=FLAGS)
flags.DEFINE_string("dump_hlo", "", "write the compiled step's HLO text here", flag_values=FLAGS)
flags.DEFINE_string("label", "", "a label for the rows", flag_values=FLAGS)
flags.DEFINE_bool("input_pipeline", False,
                  "also time the host input pipeline (needs crate_mae_jax.data.input_pipeline)", flag_values=FLAGS)
flags.DEFINE_string("input_source", "quickstart", "data.source of the timed input pipeline", flag_values=FLAGS)
flags.DEFINE_string("input_path", "", "data.path of the timed input pipeline", flag_values=FLAGS)
flags.DEFINE_integer("input_batches", 20, "batches timed with --input_pipeline", flag_values=FLAGS)
flags.DEFINE_bool("no_model", False, "time the input pipeline only (with --input_pipeline)", flag_values=FLAGS)
flags.DEFINE_string("json", "", "write rows and environment here", flag_values=FLAGS)
flags.DEFINE_list("report", None, "print the table of these JSON files (comma list)", flag_values=FLAGS)
flags.DEFINE_bool("micro", False,
                  "time ceilings (copy, matmul), LayerNorm and attention kernels at the "
                  "model's shapes", flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "print no table", flag_values=FLAGS)
_FLAG_NAMES = ("variant", "arch", "batch_size", "image_size", "dtype", "attention_impl",
               "norm_impl", "remat_policy", "width", "depth", "decoder_depth", "heads",
               "patch_size", "mesh", "steps", "windows", "warmup", "mask_ratio", "xla_flags",
               "isolate", "run_timeout", "profile", "profile_steps", "dump_hlo", "label",
               "input_pipeline", "input_source", "input_path", "input_batches", "no_model",
               "json", "report", "micro", "quiet")


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The benchmark's absl flags from `argv` (without the program name), as a
  namespace; parsing again starts from the defaults (tests call `main` twice).
  `--help` prints the flags and exits 0; a bad flag exits 2 naming it."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  if cli.wants_help([sys.argv[0], *argv]):
    cli.print_help([sys.argv[0], *argv], FLAGS, module=__name__)
    sys.exit(0)
  FLAGS.unparse_flags()
  try:
    FLAGS(["benchmark", *argv])
  except flags.Error as e:
    print(f"error: {e} (see --help)", file=sys.stderr)
    sys.exit(2)
  return argparse.Namespace(**{name: FLAGS[name].value for name in _FLAG_NAMES})


def main(argv=None):
  """Runs the benchmark for `argv` (flags only; default: the command line);
  returns the rows."""
  argv = list(sys.argv[1:] if argv is None else argv)
  from crate_mae_jax.training import xla_defaults  # the training defaults, before JAX starts
  xla_defaults.apply()
  args = parse_args(argv)

  if args.report:
    rows = []
    for path in args.report:
      with open(path) as f:
        rows.extend(json.load(f)["rows"])
    print(table(rows))
    return rows

  n_combos = (4 if args.variant == "all" else len(_split(args.variant))) * len(_split(args.arch)) \
      * len(_split(args.batch_size)) * len(_split(args.dtype)) \
      * len(_split(args.attention_impl)) * len(_split(args.norm_impl)) \
      * len(_split(args.remat_policy)) \
      * (len(args.xla_flags.split("|")) if args.xla_flags else 1)
  if args.isolate is None:
    args.isolate = n_combos > 1
  if not args.isolate and args.xla_flags and args.xla_flags != "default":
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                     args.xla_flags]))

  result: dict[str, Any] = {"date": datetime.date.today().isoformat(), "argv": argv}
  if args.micro:
    result["micro"] = micro(args)
    result["env"] = environment()
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result["micro"]
  if args.input_pipeline:
    result["input_pipeline"] = time_input_pipeline(args)
  rows = [] if args.no_model else sweep(args, argv)
  result["rows"] = rows
  result["env"] = next((r["env"] for r in rows if "env" in r), None)
  for r in rows:
    r.pop("env", None)
  if result["env"] is None and not args.isolate:
    result["env"] = environment()
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)
  if not args.quiet:
    env = result["env"]
    if env:
      print(f"# {env['device_kind']} x{env['devices']}, jax {env['jax']}, "
            f"{env.get('platform_version', '')}".strip())
    if not args.isolate and rows and "profile" in rows[0]:
      _print_profile(rows[0])
    print(table(rows))
  return rows


def run() -> None:
  """Console script `crate-mae-benchmark` (main returns the rows; the script exits 0)."""
  main()
  sys.exit(0)


if __name__ == "__main__":
  main()
