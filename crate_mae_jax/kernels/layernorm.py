"""LayerNorm kernels: flax's `nn.LayerNorm` (the reference), tokamax's Triton
LayerNorm (GPU) and ours (`layernorm_pallas`: Pallas Triton, GPU, the residual add
fused in), behind one `layer_norm` builder with the same parameters, so a
checkpoint does not depend on the kernel that wrote it. `add_and_norm` is the
residual add followed by a LayerNorm: one kernel where the chosen one fuses it."""
import importlib.util
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax.kernels import layernorm_pallas

Dtype = Any
init = jax.nn.initializers


def partitioned_init(initializer, names):
  return nn.with_logical_partitioning(initializer, names)


HALF_DTYPES = (jnp.bfloat16, jnp.float16)
NORM_IMPLS = ("auto", "flax", "tokamax", "pallas")
# Every LayerNorm kernel declares these, so checkpoints do not depend on the kernel.
NORM_SCALE_INIT = partitioned_init(init.ones, ("norm",))
NORM_BIAS_INIT = partitioned_init(init.zeros, ("norm",))


def tokamax_available() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def resolve_norm(implementation: str | None, dtype: Dtype,
                 platform: str | None = None) -> str:
  """The LayerNorm path 'auto' (or None) stands for on this backend and dtype.

  Ours ('pallas', the residual add fused in) on one NVIDIA GPU in bf16/fp16:
  faster in the whole step than tokamax's and flax's (BENCHMARKS.md, "LayerNorm
  kernels"). Not on a mesh of several devices: XLA cannot partition a Triton
  call and would gather the activations to run it whole. Otherwise flax's
  `nn.LayerNorm`: TPUs, CPUs, float32 (the path the golden fixtures are
  checked on). tokamax stays an explicit choice. The choice is logged and
  written to the workdir's run.json.
  """
  if implementation not in (None, "auto"):
    return implementation
  platform = platform or jax.default_backend()
  if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in HALF_DTYPES
      and num_mesh_devices() == 1):
    return "pallas"
  return "flax"


def num_mesh_devices() -> int:
  """Devices of the mesh being traced under (all devices outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.device_count() if mesh.empty else mesh.size


def absl_flags_default() -> None:
  """Lets libraries that read absl's global flags when they run (tokamax) see
  their defaults: in programs that never parse them (notebooks, pytest,
  argparse scripts, the benchmark's own flag set) such a library would parse
  sys.argv and fail on the program's own arguments. Entry points on absl.app
  have parsed them already."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def tokamax_layer_norm(x, scale, bias, eps: float, dtype: Dtype) -> jax.Array:
  """tokamax's Triton LayerNorm (GPU; statistics in float32)."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("config.model.norm_impl='tokamax' needs the tokamax package: "
                      "pip install 'crate-mae-jax[gpu]' (or tokamax), or set "
                      "config.model.norm_impl='auto'") from e
  absl_flags_default()
  return tokamax.layer_norm(x, scale, bias, epsilon=eps,
                            implementation="triton").astype(dtype)


class KernelLayerNorm(nn.Module):
  """LayerNorm with `nn.LayerNorm`'s parameters ('scale', 'bias', same names,
  shapes and logical axes) through another kernel, so checkpoints do not depend
  on the choice. Given `residual`, ours returns (x + sign·residual, its norm)
  from one kernel."""
  epsilon: float
  implementation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def fuses_residual(self) -> bool:
    return self.implementation == "pallas"

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None, sign: int = 1):
    d = x.shape[-1]
    scale = self.param("scale", NORM_SCALE_INIT, (d,), self.param_dtype)
    bias = self.param("bias", NORM_BIAS_INIT, (d,), self.param_dtype)
    devices = num_mesh_devices()
    if devices > 1:
      warnings.warn(f"model.norm_impl={self.implementation!r} on {devices} devices: XLA "
                    "does not partition a Triton kernel, so every device runs it on the "
                    "whole batch; set model.norm_impl='auto' (flax there)", stacklevel=2)
    if self.implementation == "pallas":
      if residual is None:
        return layernorm_pallas.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
      dtype = jnp.result_type(x, residual)    # the dtype the separate add gives
      s, y = layernorm_pallas.add_layer_norm(x.astype(dtype), residual.astype(dtype), scale,
                                             bias, self.epsilon, sign)
      return s, y.astype(self.dtype)
    if residual is not None:
      raise ValueError(f"the {self.implementation!r} LayerNorm does not fuse a residual")
    if self.implementation == "tokamax":
      return tokamax_layer_norm(x, scale, bias, self.epsilon, self.dtype)
    raise ValueError(f"LayerNorm implementation {self.implementation!r} is unknown; "
                     f"use one of {NORM_IMPLS}")


def add_and_norm(norm: nn.Module, x: jax.Array, residual: jax.Array, sign: int = 1,
                 constrain=lambda t: t):
  """(s, norm(s)) with s = x + sign·residual: one kernel where `norm` fuses the
  add (ours), else the add, `constrain(s)` (a sharding hint), then `norm`."""
  if isinstance(norm, KernelLayerNorm) and norm.fuses_residual:
    s, y = norm(x, residual, sign)
    return constrain(s), y
  s = constrain(x + residual if sign > 0 else x - residual)
  return s, norm(s)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str,
               norm_impl: str | None = None) -> nn.Module:
  impl = resolve_norm(norm_impl, dtype)
  if impl == "flax":
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=NORM_SCALE_INIT, bias_init=NORM_BIAS_INIT, name=name)
  return KernelLayerNorm(eps, impl, dtype=dtype, param_dtype=param_dtype, name=name)
