"""Our LayerNorm kernel (crate_mae_jax/kernels/layernorm_pallas.py), plain and
with the residual add fused in, against flax's `nn.LayerNorm` and the separate add.

On CPU the kernel runs in Pallas interpret mode (the block shapes and masks the
GPU compiles). Values and gradients of every input (x, the residual, scale,
bias) in float32 (tight) and bf16 (loose), feature counts that are not powers
of two, row counts that are not multiples of the block, x + r and x − r, under
jax.jit; the model with norm_impl='pallas' against 'flax' (same parameters,
same loss and gradients). The compiled kernel runs only on an NVIDIA GPU.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax import models
from crate_mae_jax.kernels import layernorm, layernorm_pallas

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(shape, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  x = (jax.random.normal(k[0], shape) * 2.5 + 0.7).astype(dtype)
  r = jax.random.normal(k[1], shape).astype(dtype)
  scale = 1.0 + 0.3 * jax.random.normal(k[2], shape[-1:])
  bias = 0.3 * jax.random.normal(k[3], shape[-1:])
  return x, r, scale, bias, jax.random.normal(k[4], shape), jax.random.normal(k[5], shape)


def _flax_ln(x, scale, bias, eps=1e-5):
  module = nn.LayerNorm(epsilon=eps, dtype=x.dtype, use_fast_variance=False)
  return module.apply({"params": {"scale": scale, "bias": bias}}, x)


SHAPES = [(3, 11, 40), (2, 7, 768), (5, 24)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_values_and_grads(shape, dtype):
  x, _, scale, bias, cot, _ = _inputs(shape, dtype)

  def loss(fn):
    return jax.jit(jax.grad(lambda x, g, b: (fn(x, g, b).astype(jnp.float32) * cot).sum(),
                            argnums=(0, 1, 2)))

  ours = lambda x, g, b: layernorm_pallas.layer_norm(x, g, b, 1e-5, interpret=True)
  y = jax.jit(ours)(x, scale, bias)
  assert y.dtype == x.dtype and y.shape == x.shape
  assert _rel(y, _flax_ln(x, scale, bias)) < TOL[dtype]
  for got, want in zip(loss(ours)(x, scale, bias), loss(_flax_ln)(x, scale, bias)):
    assert got.dtype == want.dtype
    assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_layer_norm_values_and_grads(shape, dtype, sign):
  x, r, scale, bias, cot_y, cot_s = _inputs(shape, dtype, seed=1)

  def separate(x, r, g, b):
    s = x + r if sign > 0 else x - r
    return s, _flax_ln(s, g, b)

  def ours(x, r, g, b):
    return layernorm_pallas.add_layer_norm(x, r, g, b, 1e-5, sign, interpret=True)

  def grads(fn):
    def loss(*args):
      s, y = fn(*args)
      return (s.astype(jnp.float32) * cot_s).sum() + (y.astype(jnp.float32) * cot_y).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, r, scale, bias)

  (s, y), (s_ref, y_ref) = jax.jit(ours)(x, r, scale, bias), separate(x, r, scale, bias)
  np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
  assert y.dtype == dtype and _rel(y, y_ref) < TOL[dtype]
  got, want = grads(ours), grads(separate)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    assert _rel(g, w) < TOL[dtype]
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(sign * got[0]))


def test_other_block_sizes():
  x, r, scale, bias, _, _ = _inputs((37, 96), jnp.float32)
  want = layernorm_pallas.add_layer_norm_reference(x, r, scale, bias, 1e-5)[1]
  for rows in (1, 4, 16, 64):
    cfg = layernorm_pallas.Config(block_rows=rows)
    got = layernorm_pallas.add_layer_norm(x, r, scale, bias, 1e-5, interpret=True,
                                          config=cfg)[1]
    assert _rel(got, want) < 1e-5, rows


def test_arguments_and_support():
  x = jnp.ones((4, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="one shape and dtype"):
    layernorm_pallas.add_layer_norm(x, jnp.ones((4, 8), jnp.float32), jnp.ones(8),
                                    jnp.zeros(8), 1e-5)
  assert layernorm_pallas.supported((4, 768), jnp.bfloat16, "gpu") == (
      layernorm_pallas.plgpu is not None)
  assert not layernorm_pallas.supported((4, 768), jnp.float32, "gpu")
  assert not layernorm_pallas.supported((4, 768), jnp.bfloat16, "cpu")
  assert layernorm.resolve_norm("pallas", jnp.bfloat16, "gpu") == "pallas"


@pytest.mark.parametrize("arch", ["crate_mae", pytest.param("vit_mae", marks=pytest.mark.slow)])
def test_model_same_parameters_loss_and_grads(arch):
  """A tiny model with norm_impl='pallas' (interpret mode here) is the same
  function of the same parameters as with flax's LayerNorm."""
  def build(impl):
    cfg = models.model_config("tiny", arch=arch)
    cfg.width, cfg.depth, cfg.heads, cfg.decoder_depth, cfg.patch_size = 32, 2, 2, 1, 8
    if arch == "vit_mae":
      cfg.decoder_width, cfg.decoder_heads = 32, 2
    cfg.norm_impl = impl
    return models.build_mae(cfg), cfg

  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  ref, cfg = build("flax")
  ours, _ = build("pallas")
  rngs = {"params": jax.random.key(1), "masking": jax.random.key(2)}
  params = ref.init(rngs, images, mask_ratio=cfg.mask_ratio)["params"]
  params_ours = ours.init(rngs, images, mask_ratio=cfg.mask_ratio)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(params_ours)

  def loss(module):
    def fn(p):
      out = module.apply({"params": p}, images, mask_ratio=cfg.mask_ratio,
                         rngs={"masking": jax.random.key(3)})
      return out["loss"]
    return jax.jit(jax.value_and_grad(fn))

  (l_ref, g_ref), (l_ours, g_ours) = loss(ref)(params), loss(ours)(params)
  assert abs(float(l_ours) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    assert _rel(a, b) < 1e-4


@pytest.mark.skipif(not ON_GPU, reason="the compiled kernel runs on NVIDIA GPUs only")
@pytest.mark.parametrize("shape", [(256 * 197, 768), (1000, 512), (3, 5, 384)])
def test_compiled_matches_reference_on_gpu(shape):
  x, r, scale, bias, cot_y, cot_s = _inputs(shape, jnp.bfloat16, seed=4)

  def run(fn):
    def loss(*args):
      s, y = fn(*args)
      return (s.astype(jnp.float32) * cot_s).sum() + (y.astype(jnp.float32) * cot_y).sum()
    return jax.jit(fn)(x, r, scale, bias), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        x, r, scale, bias)

  ((s1, y1), g1) = run(lambda *a: layernorm_pallas.add_layer_norm(*a, 1e-5, interpret=False))
  ((s2, y2), g2) = run(lambda *a: layernorm_pallas.add_layer_norm_reference(*a, 1e-5))
  np.testing.assert_array_equal(np.asarray(s1, np.float32), np.asarray(s2, np.float32))
  assert _rel(y1, y2) < 1e-2
  for a, b in zip(g1, g2):
    assert _rel(a, b) < 1e-2, (a.shape, _rel(a, b))
  y = jax.jit(lambda *a: layernorm_pallas.layer_norm(*a, 1e-5, interpret=False))(x, scale, bias)
  assert _rel(y, layernorm_pallas.layer_norm_reference(x, scale, bias, 1e-5)) < 1e-2
