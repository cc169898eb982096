"""The Pallas TPU splash-attention path ('splash'), checked on the CPU.

On the CPU the kernel runs in Pallas interpret mode: the same kernel code, so
its values and gradients are checked here against the exact paths. That it
compiles for a TPU, per shard under a mesh, is checked by compiling for a TPU
topology with libtpu (no TPU needed).
"""
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax import config_lib, models
from crate_mae_jax.models import layers

from crate_mae_jax.kernels import attention as kernel_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _libtpu_missing() -> bool:
  try:
    import libtpu  # noqa: F401  (the TPU compiler)
  except ImportError:
    return True
  return False


needs_libtpu = pytest.mark.skipif(_libtpu_missing(), reason="libtpu is not installed: "
                                  "pip install 'crate-mae-jax[tpu]'")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("stack_padded", [False, True])
def test_splash_matches_exact_attention(dtype, tol, stack_padded):
  """q = k = v as in MSSA: values and gradients against 'explicit' (float32
  softmax) and 'xla', with the tokens padded inside the call or by the stack
  (130 tokens of 256, the padding masked through `valid_length`)."""
  t, d = 130, 16
  w = jax.random.normal(jax.random.key(0), (2, t, 3, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(jax.random.key(1), (2, t, 3, d), jnp.float32)
  pad, valid = (256, t) if stack_padded else (t, None)

  def loss(impl):
    def f(w):
      wp = kernel_attention.pad_tokens(w, pad)
      out = kernel_attention.attention(wp, wp, wp, d**-0.5, impl, valid)
      assert out.shape == wp.shape
      return (out[:, :t].astype(jnp.float32) * cot).sum(), out
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (val, out), grad = loss("splash")(w)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))  # padded rows too
  for ref_impl in ("explicit", "xla"):
    (ref_val, ref_out), ref_grad = loss(ref_impl)(w)
    assert _rel(out[:, :t], ref_out[:, :t]) < tol, ref_impl
    assert _rel(grad, ref_grad) < tol, ref_impl
    assert abs(float(val) - float(ref_val)) < tol * (1 + abs(float(ref_val))), ref_impl


def test_splash_tiles():
  # 197 tokens -> 256: one tile per (batch, head); longer sequences in 512s or less.
  assert [kernel_attention.splash_block(n) for n in (128, 256, 384, 512, 640, 1024)] == \
      [128, 256, 384, 512, 128, 512]


def test_splash_pads_the_stack_only_where_it_pays():
  """To a multiple of 128 tokens, up to +50 %; beyond that in every call."""
  padded, valid = kernel_attention.stack_padding(jnp.zeros((2, 197, 8)), "splash", jnp.bfloat16)
  assert padded.shape == (2, 256, 8) and valid == 197      # CRATE-MAE's tokens, +30 %
  # ViT-MAE's 50 visible tokens would more than double: padded per call instead.
  assert kernel_attention.stack_padding(jnp.zeros((2, 50, 8)), "splash", jnp.bfloat16)[1] is None
  assert kernel_attention.stack_padding(jnp.zeros((2, 256, 8)), "splash", jnp.bfloat16)[1] is None


@pytest.mark.slow  # ~15-30 s: the kernel in interpret mode, forward and backward
@pytest.mark.parametrize("stack_padded", [False, True])
def test_crate_mae_with_splash_matches_xla(monkeypatch, stack_padded):
  """A tiny CRATE-MAE: same parameter tree, loss, outputs and gradients."""
  cfg = models.model_config("tiny", "crate_mae")
  cfg.update(width=32, depth=1, heads=2, decoder_depth=1, patch_size=4)
  images = jax.random.normal(jax.random.key(1), (2, 20, 20, 3))  # 25 patches + cls
  noise = jax.random.uniform(jax.random.key(2), (2, 25))
  # 26 tokens -> 128: once per stack or (beyond the limit) in every call.
  monkeypatch.setitem(kernel_attention.STACK_PADDED, "splash", (128, 10.0 if stack_padded else 0.5))

  def run(impl):
    model = models.build_mae(models.with_fields(cfg, attention_impl=impl))
    params = model.init({"params": jax.random.key(0)}, images, mask_ratio=0.75,
                        noise=noise)["params"]

    def loss(p):
      out = model.apply({"params": p}, images, mask_ratio=0.75, noise=noise)
      return out["loss"], out
    return params, jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  params_ref, ((loss_ref, out_ref), grads_ref) = run("xla")
  params, ((loss, out), grads) = run("splash")
  assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_ref))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), params, params_ref))
  assert abs(float(loss) - float(loss_ref)) < 1e-5 * abs(float(loss_ref))
  for key in ("latent", "pred"):
    assert out[key].shape == out_ref[key].shape
    assert _rel(out[key], out_ref[key]) < 1e-5
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree_util.tree_leaves(grads_ref)):
    assert _rel(g, g_ref) < 1e-4, jax.tree_util.keystr(path)


def test_splash_is_refused_on_gpu_before_compile():
  cfg = config_lib.default_config()
  cfg.model.attention_impl = "splash"
  config_lib.validate(cfg)                       # a known name
  config_lib.check_backend(cfg, "tpu")
  config_lib.check_backend(cfg, "cpu")           # Pallas interpret mode (tests)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.model\.attention_impl: 'splash' .* gpu .* use 'auto'"):
    config_lib.check_backend(cfg, "gpu")
  cfg.model.attention_impl = "auto"
  config_lib.check_backend(cfg, "gpu")


def test_training_refuses_splash_on_gpu_first(monkeypatch, tmp_path):
  """The check runs at the start of training, before data, mesh or compile."""
  from conftest import tiny_train_config
  from crate_mae_jax.training import train
  cfg = tiny_train_config(source="quickstart")
  cfg.model.attention_impl = "splash"
  monkeypatch.setattr(train.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(train.sharding, "create_mesh", lambda *a: pytest.fail("went on"))
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
    train.train_and_evaluate(cfg, str(tmp_path))


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from crate_mae_jax import sharding
from crate_mae_jax.models import layers
from crate_mae_jax.kernels import attention as kernel_attention
assert jax.device_count() == 2
rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
         ("heads", "tensor"), ("head_dim", None))
w = jax.random.normal(jax.random.key(0), (4, 26, 2, 8))
cot = jax.random.normal(jax.random.key(1), w.shape)
def loss(impl):
  def f(w):
    w = layers.constrain(w, layers.ACT_HEADS)
    out = layers.constrain(kernel_attention.attention(w, w, w, 8**-0.5, impl), layers.ACT_HEADS)
    return (out * cot).sum()
  return jax.jit(jax.value_and_grad(f))
ref_val, ref_grad = loss("xla")(w)
for shape in ((("data", 2), ("fsdp", 1), ("tensor", 1)),
              (("data", 1), ("fsdp", 1), ("tensor", 2))):
  mesh = sharding.create_mesh(shape)
  with sharding.activate(mesh, rules):
    val, grad = loss("splash")(w)
  rel = float(jnp.linalg.norm(grad - ref_grad) / jnp.linalg.norm(ref_grad))
  assert rel < 1e-5 and abs(float(val - ref_val)) < 1e-4 * abs(float(ref_val)), (shape, rel)
print("ok")
"""


def test_splash_per_shard_matches_on_two_cpu_devices():
  """Batch split over 'data', then heads over 'tensor': each device runs the
  kernel on its block (shard_map), with the values of the unsharded path."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@needs_libtpu
def test_splash_compiles_per_shard_for_a_tpu_mesh():
  """Compiled for 4 TPU v5e chips (data 2 × tensor 2): the Mosaic kernel gets
  each device's block (batch 8/2, heads 4/2) and no activation is gathered.
  Without the shard_map, JAX refuses: a Mosaic kernel cannot be partitioned."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.sharding import NamedSharding, PartitionSpec as P
  from crate_mae_jax.tools import plan
  from crate_mae_jax import sharding
  devices = plan.topology_devices("v5e:2x2")
  mesh = sharding.create_mesh((("data", 2), ("fsdp", 1), ("tensor", 2)), devices)
  rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
           ("heads", "tensor"), ("head_dim", None))

  def loss(w):
    w = layers.constrain(w, layers.ACT_HEADS)
    out = layers.constrain(kernel_attention.attention(w, w, w, 64**-0.5, "splash"), layers.ACT_HEADS)
    return (out.astype(jnp.float32) ** 2).sum()

  with sharding.activate(mesh, rules):
    w = jax.ShapeDtypeStruct((8, 197, 4, 64), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data", None, "tensor")))
    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
  kernels = [line for line in hlo.splitlines() if '"tpu_custom_call"' in line]
  assert len(kernels) >= 3, "forward, dq and dkv kernels"  # (or a fused backward)
  assert all(re.search(r"bf16\[4,2,256,64\]", line) for line in kernels), kernels[0][:400]
  assert "all-gather" not in hlo


def test_planner_keeps_an_explicit_splash():
  from crate_mae_jax.tools import plan
  cfg = config_lib.default_config()
  assert plan.for_tpu(cfg).model.attention_impl == "xla"
  cfg.model.attention_impl = "splash"
  assert plan.for_tpu(cfg).model.attention_impl == "splash"


def test_benchmark_refuses_splash_on_gpu(monkeypatch):
  from crate_mae_jax.tools import benchmark
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  tiny = ["--variant", "tiny", "--width", "32", "--depth", "1", "--heads", "2",
          "--patch_size", "8", "--image_size", "16", "--batch_size", "4", "--steps", "1",
          "--windows", "1", "--warmup", "1", "--dtype", "float32"]
  with pytest.raises(SystemExit, match=r"--attention_impl splash: config\.model\.attention_impl"):
    benchmark.main(tiny + ["--attention_impl", "splash", "--quiet"])
