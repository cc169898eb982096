"""Evaluators built from `config.evals`, one module per kind, as big_vision's are.

    config.evals = {name: {type, every_steps, prefix, pred, **options}}

Each entry becomes `REGISTRY[type](predict_fn, **options)`: `predict_fn` is the
model function the evaluator reads (`predict.predict_fns`; the class's `PREDICT`,
or the entry's `pred`), options are the entry's own. An option the entry leaves
out but the evaluator's `__init__` names takes the run's value
(`run_options`: num_images, max_batches, seed, mask_ratio, patch_size, ...),
and the run's services are passed to those that name them: `source` (the eval
split), `jit` (jits a (variables, batch, index) step on the mesh) and `scope`
(the mesh for the model's sharding hints). `run(state)` returns a flat dict of
scalars and images (uint8 (H, W, C) or (1, H, W, C)), written as `prefix + key`
(prefix: the entry's name and '/', unless set). The train loop runs every entry
at its `every_steps` (default `config.eval_every_steps`) and at the last step;
`crate_mae_jax.tools.evaluate` runs the same ones on a checkpoint.

With `config.evals` empty the task's default is used (`training/tasks.py`).
"""
import contextlib
import dataclasses
import inspect
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from crate_mae_jax.errors import ConfigError
from crate_mae_jax.training import tasks

REGISTRY: dict[str, type] = {}
RESERVED = ("type", "every_steps", "prefix", "pred")


def register(kind: str) -> Callable[[type], type]:
  """Class decorator: makes `kind` usable as `config.evals.<name>.type`."""

  def wrap(cls):
    REGISTRY[kind] = cls
    return cls
  return wrap


def run_options(config, model) -> dict:
  """The run's value of each option an evaluator may leave to the run (`model`:
  the resolved model config)."""
  return {"num_images": config.eval.num_images, "max_batches": config.eval.max_batches,
          "seed": config.seed, "mask_ratio": model["mask_ratio"],
          "patch_size": model["patch_size"], "norm_pix_loss": model["norm_pix_loss"],
          "mean": config.data.mean, "std": config.data.std, "data": config.data}


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


def accepted_options(cls) -> set[str]:
  """The keyword names `cls(...)` takes, through the `**options` its `__init__`
  hands to a base class."""
  names: set[str] = set()
  for klass in cls.__mro__:
    if "__init__" not in vars(klass):
      continue
    params = inspect.signature(klass.__init__).parameters.values()
    names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY or
              p.kind is p.POSITIONAL_OR_KEYWORD}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
      break
  return names


def from_config(config, model, predict_fns: dict[str, Callable], *, source=None,
                jit: Callable = jax.jit, scope=contextlib.nullcontext) -> list[Scheduled]:
  """The evaluators `config.evals` lists (or the task's default), built now, so
  that a bad entry fails before anything compiles. `model`: the resolved model
  config; `predict_fns`: what `predict.predict_fns` gives for the trained module."""
  evals = config.get("evals") or default_evals(config, model)
  services = {"source": source, "jit": jit, "scope": scope}
  defaults = run_options(config, model)
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
    cls = REGISTRY[kind]
    pred = kwargs.pop("pred", None) or cls.PREDICT
    if pred not in predict_fns:
      raise ConfigError(f"config.evals.{name}: {kind!r} reads the model function {pred!r}, "
                        f"which task={config.task!r} with arch={model['arch']!r} does not "
                        f"give (it gives {tuple(sorted(predict_fns))}); remove the entry")
    accepted = accepted_options(cls)
    for option, value in {**defaults, **services}.items():
      if option in accepted and option not in kwargs:
        kwargs[option] = value
    try:
      evaluator = cls(predict_fns[pred], **kwargs)
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
