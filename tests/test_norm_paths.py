"""LayerNorm kernels: 'flax' is `nn.LayerNorm` (the reference); 'pallas' is ours
(tests/test_kernel_layernorm.py); 'tokamax' is tokamax's Triton kernel (GPU only).
Here: the choice 'auto' makes, the config checks, configs naming the removed
'fused' kernel, and the message when tokamax is missing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax import models

from crate_mae_jax.kernels import layernorm


def test_removed_fused_kernel_reads_as_flax():
  """Checkpoints written with norm_impl='fused' (removed: slower in the step
  than the default, BENCHMARKS.md) load as flax's LayerNorm, the same function."""
  cfg = models.model_config("tiny")
  cfg.norm_impl = "fused"
  assert models.resolve(cfg)["norm_impl"] == "flax"


@pytest.mark.parametrize("platform,dtype,installed,expected", [
    ("gpu", jnp.bfloat16, True, "pallas"), ("gpu", jnp.float16, True, "pallas"),
    ("gpu", jnp.bfloat16, False, "pallas"), ("gpu", jnp.float32, True, "flax"),
    ("tpu", jnp.bfloat16, True, "flax"), ("cpu", jnp.float32, True, "flax")])
def test_auto_norm_choice(monkeypatch, platform, dtype, installed, expected):
  monkeypatch.setattr(layernorm, "tokamax_available", lambda: installed)
  assert layernorm.resolve_norm("auto", dtype, platform) == expected
  assert layernorm.resolve_norm(None, dtype, platform) == expected
  assert layernorm.resolve_norm("flax", dtype, platform) == "flax"
  kernels = models.kernels(models.resolve(models.model_config("tiny")), platform)
  assert kernels == {"attention": "xla", "layernorm": "flax"}   # float32 config


def test_auto_norm_is_flax_on_several_devices(monkeypatch):
  """XLA cannot partition a Triton call: on a mesh of more than one
  device 'auto' keeps flax's LayerNorm."""
  monkeypatch.setattr(layernorm, "tokamax_available", lambda: True)
  monkeypatch.setattr(layernorm, "num_mesh_devices", lambda: 2)
  assert layernorm.resolve_norm("auto", jnp.bfloat16, "gpu") == "flax"
  monkeypatch.setattr(layernorm, "num_mesh_devices", lambda: 1)
  assert layernorm.resolve_norm("auto", jnp.bfloat16, "gpu") == "pallas"


def test_num_mesh_devices_reads_the_mesh():
  assert layernorm.num_mesh_devices() == jax.device_count()
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    assert layernorm.num_mesh_devices() == 1


def test_config_checks_norm_impl():
  cfg = models.model_config("base")
  assert cfg.norm_impl == "auto"
  cfg.norm_impl = None                       # configs saved before the field existed
  assert models.resolve(cfg)["norm_impl"] == "auto"
  cfg.norm_impl = "apex"
  with pytest.raises(ValueError, match=r"config.model.norm_impl='apex' is unknown"):
    models.resolve(cfg)


def test_tokamax_missing_names_the_fix():
  try:
    import tokamax  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    pytest.skip("tokamax is installed")
  except ImportError:
    pass
  module = layernorm.layer_norm(1e-5, jnp.float32, jnp.float32, "n", "tokamax")
  with pytest.raises(ImportError, match=r"norm_impl='tokamax' needs the tokamax package"):
    module.init(jax.random.key(0), jnp.ones((2, 8)))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _check_against_flax(impl, dtype, tol, shape):
  """`impl`'s LayerNorm against flax's: outputs and gradients (params, input),
  with perturbed scale and bias so their gradients are not trivially shaped."""
  x = (jax.random.normal(jax.random.key(0), shape) * 2.5 + 0.7).astype(dtype)
  cot = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)
  ref = layernorm.layer_norm(1e-5, dtype, jnp.float32, "n", "flax")
  new = layernorm.layer_norm(1e-5, dtype, jnp.float32, "n", impl)
  assert isinstance(ref, nn.LayerNorm) and isinstance(new, layernorm.KernelLayerNorm)
  params = ref.init(jax.random.key(1), x)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape, l.dtype)
                                     for l, k in zip(leaves, keys)])

  def loss(module):
    return lambda p, x: (module.apply(p, x).astype(jnp.float32) * cot).sum()

  y_ref, y_new = ref.apply(params, x), new.apply(params, x)
  assert y_new.dtype == y_ref.dtype == dtype
  assert _rel(y_new, y_ref) < tol
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  g_new = jax.grad(loss(new), argnums=(0, 1))(params, x)
  assert g_new[1].dtype == x.dtype
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    assert _rel(a, b) < tol, (a.shape, _rel(a, b))


@pytest.mark.skipif(jax.default_backend() != "gpu" or not layernorm.tokamax_available(),
                    reason="tokamax's Triton LayerNorm runs on NVIDIA GPUs only")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_tokamax_layer_norm_matches_flax_on_gpu(dtype, tol):
  _check_against_flax("tokamax", dtype, tol, (4, 208, 768))
