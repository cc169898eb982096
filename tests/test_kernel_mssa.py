"""The Pallas MSSA kernel (crate_mae_jax/kernels/mssa.py) against the exact XLA path.

On CPU the kernel runs in Pallas interpret mode: the same kernel code, block
shapes and masks that the GPU compiles. Values and gradients (of a random-
weighted sum) in float32 (tight) and bf16 (loose), token counts that are not
powers of two (13, 40, 197), keys masked from valid_length on, odd head counts,
head_dim 32 and 64, other tile settings, all under jax.jit. The compiled kernel
at CRATE-MAE-Base's shape runs only on an NVIDIA GPU (skipped elsewhere).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax.kernels import mssa

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _max_abs(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def _bf16_close(x, exact, xla, rel_floor):
  """x (bf16) against the float32 path, no worse than XLA's bf16 path `xla`:
  in norm, and element-wise (a few wrong elements hide in a norm)."""
  assert _rel(x, exact) < max(1.5 * _rel(xla, exact), rel_floor)
  assert _max_abs(x, exact) < 3 * _max_abs(xla, exact) + 1e-2


def _inputs(shape, dtype, seed=0):
  kw, kg = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, shape, jnp.float32).astype(dtype)
  cot = jax.random.normal(kg, shape, jnp.float32)
  return w, cot


def _value_and_grad(fn, w, cot, scale, valid):
  def loss(w):
    out = fn(w, scale, valid)
    return (out.astype(jnp.float32) * cot).sum(), out
  (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
  return out, grad


def _kernel(cfg=None, interpret=None):
  return lambda w, s, v: mssa.mssa_attention(w, s, v, interpret=interpret, config=cfg)


@pytest.mark.parametrize("shape,valid", [
    ((2, 64, 2, 64), None),     # a power of two: no masks at all
    ((2, 13, 3, 32), None),     # odd length: the tail masked in the kernel
    ((2, 13, 3, 32), 9),        # keys masked from 9 on, padded queries kept
    ((1, 40, 6, 32), 33),
    ((1, 197, 1, 64), None),    # CRATE-MAE-Base's 196 patches + cls
    ((1, 5, 2, 32), 3),         # fewer tokens than the smallest block (16)
])
def test_float32_values_and_grads(shape, valid):
  w, cot = _inputs(shape, jnp.float32)
  s = shape[-1] ** -0.5
  out, grad = _value_and_grad(_kernel(), w, cot, s, valid)
  ref, ref_grad = _value_and_grad(mssa.mssa_reference, w, cot, s, valid)
  assert out.shape == w.shape and out.dtype == w.dtype and grad.dtype == w.dtype
  assert _rel(out, ref) < 1e-5
  assert _rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("shape,valid", [
    ((2, 64, 2, 64), None),
    ((2, 13, 3, 32), 9),
    ((1, 208, 1, 64), 197),     # a stack that pre-padded 197 -> 208 tokens
])
def test_bfloat16_values_and_grads(shape, valid):
  """bf16 against the exact path on the float32 upcast; no worse than XLA's own
  bf16 attention is."""
  w, cot = _inputs(shape, jnp.bfloat16, seed=1)
  s = shape[-1] ** -0.5
  out, grad = _value_and_grad(_kernel(), w, cot, s, valid)
  assert out.dtype == grad.dtype == jnp.bfloat16
  exact, exact_grad = _value_and_grad(mssa.mssa_reference, w.astype(jnp.float32), cot, s, valid)
  xla, xla_grad = _value_and_grad(mssa.mssa_reference, w, cot, s, valid)
  _bf16_close(out, exact, xla, 1e-2)
  _bf16_close(grad, exact_grad, xla_grad, 2e-2)


@pytest.mark.parametrize("cfg", [
    # forward blocks shorter than the backward's: the lse is padded for the loop
    mssa.Config(block_q=16, block_m=32, block_n=32, delta_in_kernel=False),
    mssa.Config(block_q=64, block_m=16, block_n=64, delta_in_kernel=True),
    # every block a power of two past T: no short last piece of keys or rows
    mssa.Config(key_tail=False, row_tail=False),
    mssa.Config(block_q=32, block_m=64, block_n=16, num_warps_bwd=8),
    # 100 = 64 + 32 + 16 rows (three calls) and keys
    mssa.Config(block_q=64, block_m=64, block_n=64),
])
def test_other_tilings(cfg):
  shape, valid = (1, 100, 3, 32), 90
  w, cot = _inputs(shape, jnp.float32, seed=2)
  s = 32 ** -0.5
  out, grad = _value_and_grad(_kernel(cfg), w, cot, s, valid)
  ref, ref_grad = _value_and_grad(mssa.mssa_reference, w, cot, s, valid)
  assert _rel(out, ref) < 1e-5
  assert _rel(grad, ref_grad) < 1e-5
  assert _max_abs(grad, ref_grad) < 1e-4


def test_interpret_is_the_default_off_gpu():
  if ON_GPU:
    pytest.skip("off-GPU default")
  w, _ = _inputs((1, 13, 2, 32), jnp.float32, seed=3)
  a = jax.jit(lambda w: mssa.mssa_attention(w, 0.2, 11))(w)
  b = jax.jit(lambda w: mssa.mssa_attention(w, 0.2, 11, interpret=True))(w)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_supported_and_arguments():
  assert mssa.supported((4, 197, 12, 64), jnp.bfloat16, "gpu")
  assert mssa.supported((4, 197, 3, 32), jnp.float16, "cuda")
  assert not mssa.supported((4, 197, 12, 64), jnp.float32, "gpu")
  assert not mssa.supported((4, 197, 12, 64), jnp.bfloat16, "cpu")
  assert not mssa.supported((4, 197, 12, 64), jnp.bfloat16, "tpu")
  assert not mssa.supported((4, mssa.MAX_TOKENS + 1, 12, 64), jnp.bfloat16, "gpu")
  assert not mssa.supported((4, 197, 12, 48), jnp.bfloat16, "gpu")
  assert isinstance(mssa.TOKEN_MULTIPLE, int) and mssa.TOKEN_MULTIPLE >= 1
  w = jnp.zeros((1, 13, 1, 32))
  with pytest.raises(ValueError):
    mssa.mssa_attention(w, 0.1, 14)
  with pytest.raises(ValueError):
    mssa.mssa_attention(w, 0.1, 0)
  with pytest.raises(ValueError):
    mssa.mssa_attention(w[0], 0.1)


# ---------------------------------------------------------------------------
# The compiled kernel (NVIDIA GPUs only).

@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas Triton kernel: NVIDIA GPUs")
@pytest.mark.parametrize("tokens,valid", [(197, None), (208, 197), (256, 197)])
def test_compiled_matches_reference_on_gpu(tokens, valid):
  """CRATE-MAE-Base (4, 197, 12, 64) bf16: in-kernel masking of the tail, and
  inputs the stack pre-padded."""
  w, cot = _inputs((4, tokens, 12, 64), jnp.bfloat16, seed=4)
  s = 64 ** -0.5
  out, grad = _value_and_grad(_kernel(interpret=False), w, cot, s, valid)
  exact, exact_grad = _value_and_grad(mssa.mssa_reference, w.astype(jnp.float32), cot, s, valid)
  xla, xla_grad = _value_and_grad(mssa.mssa_reference, w, cot, s, valid)
  _bf16_close(out, exact, xla, 1e-2)
  _bf16_close(grad, exact_grad, xla_grad, 2e-2)


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas Triton kernel: NVIDIA GPUs")
def test_compiled_is_deterministic_on_gpu():
  """The same gradient bit for bit, run after run (a race in generated code
  shows as run-to-run differences: see Config.delta_in_kernel)."""
  w, cot = _inputs((16, 197, 12, 64), jnp.bfloat16, seed=6)
  grads = [np.asarray(_value_and_grad(_kernel(interpret=False), w, cot, 0.125, None)[1],
                      np.float32) for _ in range(3)]
  for g in grads[1:]:
    np.testing.assert_array_equal(g, grads[0])


@pytest.mark.skipif(not ON_GPU, reason="the compiled Pallas Triton kernel: NVIDIA GPUs")
def test_compiled_is_the_default_on_gpu():
  w, _ = _inputs((2, 197, 3, 32), jnp.bfloat16, seed=5)
  a = jax.jit(lambda w: mssa.mssa_attention(w, 0.2))(w)
  b = jax.jit(lambda w: mssa.mssa_attention(w, 0.2, interpret=False))(w)
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
