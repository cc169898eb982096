"""Top-1 / top-5 and cross-entropy of a classifier (linear probe, fine-tuning)."""
import jax
import jax.numpy as jnp
import optax

from crate_mae_jax.evaluators import batches, common


@common.register("classification")
class Evaluator:
  """{'loss', 'top1', 'top5', 'examples'} over the eval split (padding excluded)."""
  PREDICT = "classify"

  def __init__(self, predict_fn, *, source, jit=jax.jit, max_batches: int | None = None):
    self.source, self.max_batches = source, max_batches

    def step(variables, batch, index):
      del index
      logits = predict_fn(variables, batches.inputs(source, batch))
      labels, mask = batch["label"], batches.padding_mask(batch, logits.shape[0])
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return {"loss_sum": (loss * mask).sum(),
              "top1": ((jnp.argmax(logits, -1) == labels) * mask).sum(),
              "top5": ((top5 == labels[:, None]).any(-1) * mask).sum(),
              "count": mask.sum()}
    self.step = jit(step)

  def run(self, state) -> dict:
    return batches.averaged(self.step, common.variables_of(state), self.source,
                            self.max_batches)
