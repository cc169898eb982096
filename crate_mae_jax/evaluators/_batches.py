"""Shared pass over the eval split: sums a jitted per-batch step's outputs."""
import jax

from crate_mae_jax import sharding, state_lib


def jit_step(context, step_fn):
  if context.mesh is None:
    return jax.jit(step_fn)
  return state_lib.jit_eval_step(step_fn, context.variables_sharding, context.mesh,
                                 context.rules)


def averaged(context, step, variables, max_batches) -> dict:
  """Sums {'loss_sum', 'count', others} over the eval batches; returns the means
  ('loss', others) and 'examples'."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(context.source.eval_batches()):
    if max_batches is not None and i >= max_batches:
      break
    if context.mesh is not None:
      batch = sharding.global_batch(batch, context.mesh)
    out = jax.device_get(step(variables, batch, i))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count", 0.0), 1.0)
  result = {"loss": totals.pop("loss_sum", 0.0) / count}
  result.update({k: v / count for k, v in totals.items()})
  result["examples"] = count
  return result
