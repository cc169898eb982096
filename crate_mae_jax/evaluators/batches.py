"""Shared pass over the eval split: sums a jitted per-batch step's outputs."""
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp


class BatchProgress:
  """Logs 'eval: batch i/n' at most every `every_s` seconds, so that a long
  evaluation shows it is alive (and how far it got) between the train logs."""

  def __init__(self, total: int, what: str = "eval", every_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.what, self.every_s, self.clock = int(total), what, every_s, clock
    self._last = clock()

  def __call__(self, done: int) -> None:
    now = self.clock()
    if now - self._last >= self.every_s and done < self.total:
      logging.info("%s: batch %d/%d", self.what, done, self.total)
      self._last = now


def inputs(source, batch: dict):
  """The model inputs of an eval batch: its images through the eval-time device
  augmentation (normalisation, no randomness)."""
  return source.device_augment(jax.random.key(0), batch["image"], False)


def padding_mask(batch: dict, size: int):
  """1 for real examples, 0 for the padding of a last partial batch."""
  return batch.get("mask", jnp.ones((size,)))


def averaged(step, variables, source, max_batches) -> dict:
  """Sums a jitted step(variables, batch, index) -> {'loss_sum', 'count', others}
  over the eval batches of `source`; returns the means ('loss', others) and
  'examples'."""
  totals: dict[str, float] = {}
  total = source.num_eval_batches
  if max_batches is not None:
    total = min(total, max_batches)
  progress = BatchProgress(total)
  for i, batch in enumerate(source.eval_batches()):
    if max_batches is not None and i >= max_batches:
      break
    out = jax.device_get(step(variables, batch, i))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    progress(i + 1)
  count = max(totals.pop("count", 0.0), 1.0)
  result = {"loss": totals.pop("loss_sum", 0.0) / count}
  result.update({k: v / count for k, v in totals.items()})
  result["examples"] = count
  return result
