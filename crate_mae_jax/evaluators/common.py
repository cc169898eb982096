"""Evaluators built from `config.evals`, one module per kind, one interface.

    config.evals = {name: {type, every_steps, prefix, **kwargs}}

Each entry becomes `REGISTRY[type](context, **kwargs)`; its `run(state)` takes
the train state and returns a flat dict of scalars (float) and images (uint8
arrays, (H, W, C) or (1, H, W, C)), written as `prefix + key` (prefix: the
entry's name and '/', unless set). The train loop runs every entry at its
`every_steps` (default `config.eval_every_steps`) and at the last step; the
same evaluators run on any checkpoint through `crate_mae_jax.tools.evaluate`.

With `config.evals` empty the task's default is used (`training/tasks.py`):
'eval' (the masked loss and reconstruction figure when pre-training, top-1/top-5
when classifying), and with `config.eval.diagnostics` 'diag' (coding rate and
sparsity per layer, CRATE-MAE) and 'foreground' (images with object masks).

A new evaluator: a module in this package with a class decorated
`@common.register('kind')`, `__init__(self, context, **kwargs)` and
`run(self, state) -> dict`; import it in `evaluators/__init__.py`.
"""
import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from crate_mae_jax import config_lib, sharding
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.training import tasks

REGISTRY: dict[str, type] = {}
RESERVED = ("type", "every_steps", "prefix")


def register(kind: str) -> Callable[[type], type]:
  """Class decorator: makes `kind` usable as `config.evals.<name>.type`."""

  def wrap(cls):
    REGISTRY[kind] = cls
    return cls
  return wrap


@dataclasses.dataclass
class Context:
  """What an evaluator may use: the run's config, the module the task trains,
  its resolved model config, the data source (eval split and its device
  augmentation), the mesh and the sharding of the evaluated variables."""
  config: ml_collections.ConfigDict
  model: nn.Module
  resolved: Any = None  # the ResolvedModel of config_lib.validate(config)
  source: Any = None
  mesh: Any = None
  rules: tuple = ()
  variables_sharding: Any = None
  num_classes: int | None = None

  def __post_init__(self):
    if self.resolved is None:
      self.resolved = config_lib.resolve_model(self.config.model)

  @contextlib.contextmanager
  def scope(self):
    """The mesh and logical axis rules the model's sharding hints need."""
    if self.mesh is None:
      yield
      return
    with sharding.activate(self.mesh, self.rules):
      yield


def params_of(state):
  """The parameters of a TrainState, of {'params': ...} or a bare params tree."""
  if hasattr(state, "params"):
    return state.params
  if isinstance(state, dict) and "params" in state and "encoder" not in state:
    return state["params"]
  return state


def variables_of(state) -> dict:
  """{'params', ['batch_stats']} of a TrainState (or a bare params tree)."""
  params = params_of(state)
  stats = getattr(state, "batch_stats", None)
  return {"params": params, "batch_stats": stats} if stats else {"params": params}


def encoder_params(state):
  """The 'encoder' sub-tree every model of the package keeps."""
  params = params_of(state)
  if "encoder" not in params:
    raise ValueError(f"the parameters hold no 'encoder' sub-tree (keys: {sorted(params)})")
  return params["encoder"]


def default_evals(config, model) -> ml_collections.ConfigDict:
  """The evaluations a run without `config.evals` makes: its task's default."""
  return ml_collections.ConfigDict(tasks.get(config.task).default_evals(config, model))


@dataclasses.dataclass
class Scheduled:
  name: str
  every_steps: int
  prefix: str
  evaluator: Any

  def due(self, step: int, last: bool) -> bool:
    return last or step % self.every_steps == 0


def _spec_dict(spec) -> dict:
  return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def from_config(config, context: Context) -> list[Scheduled]:
  """The evaluators `config.evals` lists (or the task's default), built now, so
  that a bad entry fails before anything compiles."""
  evals = config.get("evals") or default_evals(config, context.resolved)
  out = []
  for name, spec in evals.items():
    kwargs = _spec_dict(spec)
    kind = kwargs.pop("type", name)
    if kind not in REGISTRY:
      raise ConfigError(f"config.evals.{name}.type={kind!r} is unknown; use one of "
                        f"{tuple(sorted(REGISTRY))}")
    every = kwargs.pop("every_steps", None) or config.eval_every_steps
    if not isinstance(every, int) or every < 1:
      raise ConfigError(f"config.evals.{name}.every_steps={every!r} must be a positive integer")
    prefix = kwargs.pop("prefix", None)
    prefix = f"{name}/" if prefix is None else prefix
    try:
      evaluator = REGISTRY[kind](context, **kwargs)
    except TypeError as e:
      raise ConfigError(f"config.evals.{name}: {e}; see crate_mae_jax/evaluators/{kind}.py "
                        "for its options") from None
    out.append(Scheduled(name, int(every), prefix, evaluator))
  return out


def is_image(value) -> bool:
  return isinstance(value, np.ndarray) and value.ndim in (3, 4)


def write(writer, step: int, prefix: str, results: dict) -> None:
  """Scalars through `writer.write_scalars`, images through `write_images`."""
  scalars = {f"{prefix}{k}": float(v) for k, v in results.items() if not is_image(v)}
  images = {f"{prefix}{k}": (v if v.ndim == 4 else v[None]) for k, v in results.items()
            if is_image(v)}
  if scalars:
    writer.write_scalars(step, scalars)
  if images:
    writer.write_images(step, images)


def scalars_only(results: dict) -> dict:
  return {k: float(v) for k, v in results.items() if not is_image(v)}


def host(tree):
  return jax.device_get(tree)
