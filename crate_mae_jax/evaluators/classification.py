"""Top-1 / top-5 and cross-entropy of a classifier (linear probe, fine-tuning)."""
from crate_mae_jax.training import steps
from crate_mae_jax.evaluators import batches, common


@common.register("classification")
class Evaluator:
  """{'loss', 'top1', 'top5', 'examples'} over the eval split (padding excluded)."""

  def __init__(self, context: common.Context, *, max_batches: int | None = None):
    self.context = context
    self.max_batches = (context.config.eval.max_batches if max_batches is None
                        else max_batches)
    self.step = batches.jit_step(context, steps.make_classify_eval_step(
        context.model, context.source.device_augment))

  def run(self, state) -> dict:
    return batches.averaged(self.context, self.step, common.variables_of(state),
                             self.max_batches)
