"""XLA flags that make the training step faster on NVIDIA GPUs, set by default.

The entry points (`main`, `benchmark`) call `apply()` before JAX creates its
backends (XLA reads `XLA_FLAGS` then, not at import). The flags are only added
when a CUDA plugin for JAX is installed and `JAX_PLATFORMS` does not rule the
GPU out; a flag the user already sets in `XLA_FLAGS` keeps the user's value,
and `CRATE_MAE_XLA_DEFAULTS=0` turns the defaults off altogether.

Why these two (BENCHMARKS.md has the measurements): cuBLAS beats XLA's Triton
GEMM fusions on this model's shapes, and cuDNN's LayerNorm kernel beats XLA's
fused one.
"""
import importlib.metadata
import os
from typing import MutableMapping

GPU_FLAGS = {
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_cudnn_layer_norm": "true",
}
OFF_SWITCH = "CRATE_MAE_XLA_DEFAULTS"


def cuda_plugin_installed() -> bool:
  """True when a jax CUDA plugin (jax-cuda12/13-plugin) is installed."""
  for dist in importlib.metadata.distributions():
    name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
    if name.startswith("jax-cuda") and name.endswith("plugin"):
      return True
  return False


def gpu_possible(environ: MutableMapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").lower()
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  return cuda_plugin_installed()


def flags_to_add(user_flags: str) -> list[str]:
  """Our GPU flags that the user's XLA_FLAGS does not already set."""
  return [f"--{name}={value}" for name, value in GPU_FLAGS.items()
          if f"--{name}=" not in user_flags and f"--{name} " not in user_flags + " "]


def apply(environ: MutableMapping[str, str] | None = None,
          gpu: bool | None = None) -> list[str]:
  """Adds the GPU defaults to `XLA_FLAGS`; returns what was added."""
  environ = os.environ if environ is None else environ
  if environ.get(OFF_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  if not (gpu_possible(environ) if gpu is None else gpu):
    return []
  user = environ.get("XLA_FLAGS", "")
  added = flags_to_add(user)
  if added:
    environ["XLA_FLAGS"] = " ".join(added + ([user] if user else []))
  return added
