"""`crate_mae_jax.tools.plan` unchanged, plus the compiled TPU HLO written to $PLAN_HLO_OUT.

    JAX_PLATFORMS=cpu PLAN_HLO_OUT=/tmp/x.hlo python benchmarks/plans/xla_changes/plan_hlo.py \
        --config=configs/base.py --topology=v5p:2x4x4 --mesh=data=4,fsdp=8 --json=OUT.json

The planner's `collectives(hlo_text)` is the one place that sees the executable's text;
it is wrapped to save that text as well. Everything else is the planner's own code path.
"""
import os
import sys

# The checkout this file is in, not an installed copy of the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from crate_mae_jax.tools import plan  # noqa: E402

_collectives = plan.collectives


def _saving_collectives(hlo_text):
  out = os.environ.get("PLAN_HLO_OUT")
  if out:
    with open(out, "w") as f:
      f.write(hlo_text)
  return _collectives(hlo_text)


plan.collectives = _saving_collectives

if os.environ.get("PLAN_FAST_VARIANCE") == "1":
  # Experiment only (not a code change of the package): flax's one-pass LayerNorm
  # statistics, var = E[x²] − E[x]² (use_fast_variance=True), at every LayerNorm
  # the models build with a half-precision compute dtype.
  import flax.linen as nn
  import jax.numpy as jnp
  from crate_mae_jax.kernels import layernorm
  from crate_mae_jax.models import layers

  def _fast_variance_layer_norm(eps, dtype, param_dtype, name, norm_impl=None):
    if layernorm.resolve_norm(norm_impl, dtype) == "flax" and jnp.dtype(dtype) != jnp.float32:
      return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                          use_fast_variance=True, scale_init=layernorm.NORM_SCALE_INIT,
                          bias_init=layernorm.NORM_BIAS_INIT, name=name)
    return layernorm.layer_norm(eps, dtype, param_dtype, name, norm_impl)

  layers.layer_norm = _fast_variance_layer_norm

if __name__ == "__main__":
  print(f"planner: {plan.__file__}", file=sys.stderr)
  plan.run()
