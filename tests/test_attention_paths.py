"""Attention choice and the pad-once token stacks, checked on the CPU.

The cuDNN kernel itself runs only on NVIDIA GPUs (benchmarks check it there);
what can be checked here is the padding logic around it: a stack that pads its
tokens once and masks the padded keys must give the real tokens the same values
and gradients as the unpadded stack, through every layer kind.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax.models import layers
from crate_mae_jax import models

from crate_mae_jax.kernels import attention as kernel_attention


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("platform,dtype,shared,devices,expected", [
    ("gpu", jnp.bfloat16, True, 1, "mssa"), ("gpu", jnp.float16, True, 1, "mssa"),
    ("gpu", jnp.bfloat16, True, 2, "cudnn"), ("gpu", jnp.bfloat16, False, 1, "cudnn"),
    ("gpu", jnp.float32, True, 1, "xla"), ("tpu", jnp.bfloat16, True, 1, "xla"),
    ("cpu", jnp.bfloat16, True, 1, "xla"), ("cpu", jnp.float32, False, 1, "xla")])
def test_auto_attention_choice(monkeypatch, platform, dtype, shared, devices, expected):
  """'auto': our MSSA kernel for CRATE's q = k = v on one GPU in half precision,
  cuDNN for ViT-MAE's attention and on several GPUs, XLA elsewhere."""
  monkeypatch.setattr(kernel_attention, "num_mesh_devices", lambda: devices)
  resolve = kernel_attention.resolve_attention
  assert resolve("auto", dtype, platform, shared_qkv=shared) == expected
  assert resolve(None, dtype, platform, shared_qkv=shared) == expected
  assert resolve("explicit", dtype, platform) == "explicit"
  # 'mssa' asked for on attention with separate q, k, v means what 'auto' picks there.
  assert resolve("mssa", dtype, platform, shared_qkv=False) == resolve(
      "auto", dtype, platform, shared_qkv=False)


def test_model_kernels_report_per_arch(monkeypatch):
  monkeypatch.setattr(kernel_attention, "num_mesh_devices", lambda: 1)
  for arch, expected in (("crate_mae", "mssa"), ("vit_mae", "cudnn")):
    cfg = models.model_config("tiny", arch)
    cfg.dtype = "bfloat16"
    assert models.kernels(models.resolve(cfg), "gpu")["attention"] == expected


def test_a_head_dim_the_kernel_does_not_take_gets_cudnn(monkeypatch):
  """CRATE-MAE-Small's head_dim 48 is not one of the kernel's: 'auto' (and 'mssa')
  give cuDNN there, not the XLA reference (BENCHMARKS.md: 1.8x slower)."""
  monkeypatch.setattr(kernel_attention, "num_mesh_devices", lambda: 1)
  resolve = kernel_attention.resolve_attention
  assert resolve("auto", jnp.bfloat16, "gpu", True, head_dim=48) == "cudnn"
  assert resolve("mssa", jnp.bfloat16, "gpu", True, head_dim=48) == "cudnn"
  assert resolve("auto", jnp.bfloat16, "gpu", True, head_dim=64) == "mssa"
  for variant, expected in (("small", "cudnn"), ("base", "mssa"), ("large", "mssa")):
    cfg = models.model_config(variant, "crate_mae")
    cfg.dtype = "bfloat16"
    assert models.kernels(models.resolve(cfg), "gpu")["attention"] == expected, variant


def test_mssa_path_matches_xla_in_the_model():
  """attention_impl='mssa' (the Pallas kernel, interpret mode on CPU) gives the
  CRATE-MAE loss and gradients of the XLA path."""
  def build(impl):
    cfg = models.model_config("tiny")
    cfg.update(width=32, depth=2, heads=2, patch_size=8, attention_impl=impl)
    return models.build_mae(cfg)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 4))
  ref, new = build("xla"), build("mssa")
  params = ref.init(jax.random.key(2), images, mask_ratio=0.5, noise=noise)

  def loss(model):
    return lambda p: model.apply(p, images, mask_ratio=0.5, noise=noise)["loss"]

  l_ref, g_ref = jax.jit(jax.value_and_grad(loss(ref)))(params)
  l_new, g_new = jax.jit(jax.value_and_grad(loss(new)))(params)
  assert float(l_new) == pytest.approx(float(l_ref), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    assert _rel(a, b) < 1e-4


def test_default_config_is_auto():
  assert models.model_config("base").attention_impl == "auto"
  with pytest.raises(ValueError, match="attention_impl"):
    cfg = models.model_config("base")
    cfg.attention_impl = "flash"
    models.resolve(cfg)


@pytest.mark.parametrize("impl", ["xla", "explicit"])
def test_padded_attention_matches_unpadded(impl):
  q = jax.random.normal(jax.random.key(0), (2, 13, 3, 8))
  ref = kernel_attention.attention(q, q, q, 8**-0.5, impl)
  qp = kernel_attention.pad_tokens(q, 16)
  out = kernel_attention.attention(qp, qp, qp, 8**-0.5, impl, valid_length=13)
  assert out.shape == (2, 16, 3, 8)
  assert np.all(np.isfinite(np.asarray(out)))
  assert _rel(out[:, :13], ref) < 1e-6


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("valid_length", [None, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_half_attention_matches_xla(shared, valid_length, dtype):
  """The TPU bf16 XLA path (E = exp(logits - max) kept in bf16, normalised on
  the output rows; written-out backward): outputs and gradients within bf16
  rounding of the float32 reference (as close as XLA's own bf16 path, to a
  margin); in float32 the reference's function to 1e-6."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (2, 50, 4, 64)) for key in keys)
  lengths = None if valid_length is None else jnp.full((2,), valid_length, jnp.int32)

  def run(fn, *xs):
    return fn(xs[0], xs[0], xs[0]) if shared else fn(*xs)

  def loss(fn, *xs):
    return jnp.vdot(run(fn, *xs).astype(jnp.float32), g)

  ref = lambda *xs: jax.nn.dot_product_attention(
      *xs, scale=0.125, implementation="xla", key_value_seq_lengths=lengths)
  new = lambda *xs: kernel_attention.xla_half_attention(*xs, 0.125, valid_length)
  args = (q,) if shared else (q, k, v)
  argnums = tuple(range(len(args)))
  exact_out = run(ref, *args)
  exact = jax.grad(lambda *xs: loss(ref, *xs), argnums)(*args)
  low = tuple(x.astype(dtype) for x in args)
  out_ref, out_new = run(ref, *low), run(new, *low)
  assert out_new.dtype == dtype
  grad_ref = jax.grad(lambda *xs: loss(ref, *xs), argnums)(*low)
  grad_new = jax.grad(lambda *xs: loss(new, *xs), argnums)(*low)
  pairs = [(out_new, out_ref, exact_out)] + list(zip(grad_new, grad_ref, exact))
  for a, b, e in pairs:
    if dtype == jnp.float32:
      assert _rel(a, e) < 1e-6
    else:
      assert _rel(a, e) < 1.5 * _rel(b, e) + 1e-3


def test_tpu_bf16_xla_attention_takes_the_half_path(monkeypatch):
  """On TPU in bf16 'xla' is `xla_half_attention`; elsewhere, and in float32, XLA's."""
  w = jax.random.normal(jax.random.key(1), (2, 20, 3, 64), jnp.bfloat16)
  calls = []
  monkeypatch.setattr(kernel_attention, "_shared_attention",
                      lambda *a: calls.append(a) or a[0])
  wf = w.astype(jnp.float32)
  kernel_attention.attention(w, w, w, 0.125, "xla")
  kernel_attention.attention(wf, wf, wf, 0.125, "xla")
  assert not calls
  monkeypatch.setattr(kernel_attention, "kernel_platform", lambda: "tpu")
  kernel_attention.attention(wf, wf, wf, 0.125, "xla")
  assert not calls
  kernel_attention.attention(w, w, w, 0.125, "xla")
  assert len(calls) == 1


@pytest.mark.parametrize("remat,arch", [
    (None, "crate_mae"),     # the default run checks one; CI all four
    pytest.param("full", "crate_mae", marks=pytest.mark.slow),
    pytest.param(None, "vit_mae", marks=pytest.mark.slow),
    pytest.param("full", "vit_mae", marks=pytest.mark.slow)])
def test_pad_once_stack_is_exact(monkeypatch, arch, remat):
  """Forcing the pad-once stacks on the XLA path: same loss, outputs, grads."""
  cfg = models.model_config("tiny", arch)
  cfg.update(width=32, depth=2, heads=2, decoder_depth=2, patch_size=4,
             attention_impl="xla", remat_policy=remat)
  if arch == "vit_mae":
    cfg.update(decoder_width=32, decoder_heads=2)
  model = models.build_mae(cfg)
  images = jax.random.normal(jax.random.key(1), (3, 20, 20, 3))  # 25 patches + cls
  noise = jax.random.uniform(jax.random.key(2), (3, 25))
  variables = model.init({"params": jax.random.key(0)}, images, mask_ratio=0.75,
                         noise=noise)

  def run(params):
    # A fresh jit per call: the padding is read while tracing (one compile, not
    # an op-by-op eager run; the monkeypatch below then gives a second program).
    def loss(p):
      out, inter = model.apply({"params": p}, images, mask_ratio=0.75, noise=noise,
                               mutable=["intermediates"])
      return out["loss"], (out, inter)
    return jax.jit(lambda q: jax.value_and_grad(loss, has_aux=True)(q))(params)

  (loss_ref, (out_ref, inter_ref)), grads_ref = run(variables["params"])
  monkeypatch.setattr(kernel_attention, "STACK_PADDED", {"xla": (16, 10.0)})
  (loss_pad, (out_pad, inter_pad)), grads_pad = run(variables["params"])
  # Padded shapes change the GEMMs' tiling and summation order: exact to float32
  # rounding on a CPU; on a GPU cuBLAS picks other algorithms for them (outputs
  # moved by up to 1.3e-4 relative on an H200): there the tolerances are the GPU's
  # rounding; the exactness check is the CPU's.
  out_tol, grad_tol = (1e-5, 1e-4) if jax.default_backend() == "cpu" else (1e-3, 1e-2)
  assert abs(float(loss_pad) - float(loss_ref)) < out_tol * abs(float(loss_ref)), (
      float(loss_pad), float(loss_ref))
  for key in ("latent", "pred"):
    assert out_pad[key].shape == out_ref[key].shape
    assert _rel(out_pad[key], out_ref[key]) < out_tol, (key, _rel(out_pad[key], out_ref[key]))
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat_pad = dict(jax.tree_util.tree_leaves_with_path(grads_pad))
  for path, g in flat_ref:
    assert np.all(np.isfinite(np.asarray(flat_pad[path])))
    assert _rel(flat_pad[path], g) < grad_tol, (jax.tree_util.keystr(path), _rel(flat_pad[path], g))
  # Sown diagnostics see the real tokens only.
  for a, b in zip(jax.tree_util.tree_leaves(inter_ref.get("intermediates", {})),
                  jax.tree_util.tree_leaves(inter_pad.get("intermediates", {}))):
    assert a.shape == b.shape
    assert _rel(b, a) < out_tol, _rel(b, a)


def test_stack_padding_only_where_it_pays(monkeypatch):
  monkeypatch.setattr(kernel_attention, "resolve_attention",
                      lambda impl, dtype, platform=None, shared_qkv=True, head_dim=None: "cudnn")
  x = jnp.zeros((2, 197, 8))
  padded, valid = kernel_attention.stack_padding(x, "auto", jnp.bfloat16)
  assert padded.shape == (2, 208, 8) and valid == 197
  x = jnp.zeros((2, 50, 8))                  # ViT-MAE's visible tokens: +28 %
  assert kernel_attention.stack_padding(x, "auto", jnp.bfloat16)[1] is None
  x = jnp.zeros((2, 64, 8))                  # already a multiple
  assert kernel_attention.stack_padding(x, "auto", jnp.bfloat16)[1] is None


def test_xla_defaults_respect_the_user():
  from crate_mae_jax.training import xla_defaults
  env = {}
  assert xla_defaults.apply(env, gpu=True) == [
      "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cudnn_layer_norm=true"]
  assert env["XLA_FLAGS"].split() == [
      "--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cudnn_layer_norm=true"]
  # A flag the user sets keeps the user's value; the other default is added.
  env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x"}
  assert xla_defaults.apply(env, gpu=True) == ["--xla_gpu_enable_cudnn_layer_norm=true"]
  assert "--xla_gpu_enable_triton_gemm=true" in env["XLA_FLAGS"]
  assert "--xla_gpu_enable_triton_gemm=false" not in env["XLA_FLAGS"]
  # No GPU, or switched off: nothing changes.
  env = {"XLA_FLAGS": "--foo=1"}
  assert xla_defaults.apply(env, gpu=False) == [] and env == {"XLA_FLAGS": "--foo=1"}
  env = {xla_defaults.OFF_SWITCH: "0"}
  assert xla_defaults.apply(env, gpu=True) == [] and "XLA_FLAGS" not in env
  assert not xla_defaults.gpu_possible({"JAX_PLATFORMS": "cpu"})


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention: NVIDIA GPUs")
@pytest.mark.parametrize("valid_length", [None, 197])
def test_cudnn_matches_xla_on_gpu(valid_length):
  """The default GPU path against the exact one: values and gradients in bf16."""
  w = jax.random.normal(jax.random.key(0), (4, 197, 12, 64), jnp.bfloat16)
  if valid_length is not None:                # pad-once stacks hand in 208 tokens
    w = kernel_attention.pad_tokens(w, 208)
  cot = jax.random.normal(jax.random.key(1), w.shape, jnp.float32)

  def loss(impl):
    def f(w):
      out = kernel_attention.attention(w, w, w, 64**-0.5, impl, valid_length)[:, :197]
      return (out.astype(jnp.float32) * cot[:, :197]).sum()
    return f

  ref_val, ref_grad = jax.value_and_grad(loss("xla"))(w)
  val, grad = jax.value_and_grad(loss("cudnn"))(w)
  assert abs(float(val) - float(ref_val)) < 1e-2 * abs(float(ref_val)) + 1.0
  assert _rel(grad[:, :197], ref_grad[:, :197]) < 1e-2
