"""What a run needs, built one way for training, the TPU planner and the benchmark.

`setup(config, model, mesh, num_train_examples, num_classes)` turns a validated
config (and the `ResolvedModel` that `config_lib.validate` returned) into the
task's module, its optimizer and schedule, the abstract train state with its
shardings, and the jitted train step. The planner and the benchmark lower
exactly the step that `train.train_and_evaluate` runs.
"""
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_mae_jax import sharding
from crate_mae_jax.data.augment_jax import identity_augment
from crate_mae_jax.training import optim, state_lib, tasks


def num_steps(config, num_train_examples: int) -> tuple[int, float]:
  """(steps of the run, steps per epoch): `num_train_steps`, else `num_epochs`."""
  steps_per_epoch = num_train_examples / config.batch_size
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch))), steps_per_epoch


def image_shape(config, model) -> tuple[int, int, int]:
  """(height, width, channels) of one input image."""
  size = config.data.image_size
  return (size, size, model["channels"])


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """A run's parts: see the module docstring. `state_shardings` is the
  TrainState's NamedShardings; `abstract_state` its shapes."""
  task: tasks.Task
  model: Any                 # the ResolvedModel
  module: nn.Module          # what the task trains (MAE or classifier)
  init_inputs: tuple
  init_kwargs: dict
  tx: Any
  schedule: Callable
  total_steps: int
  steps_per_epoch: float
  abstract_params: Any
  abstract_state: Any
  state_shardings: Any
  mesh: Any
  rules: tuple
  num_classes: int | None
  train_step: Callable

  def init_state(self, key, params_override=None):
    """A fresh, sharded TrainState (`params_override`: see state_lib.init_state)."""
    state, _ = state_lib.init_state(self.module, self.tx, self.mesh, self.rules,
                                    self.init_inputs, self.init_kwargs, key,
                                    params_override=params_override)
    return state

  def variables_sharding(self, has_batch_stats: bool):
    """The sharding of what evaluators receive: params, or {'params', 'batch_stats'}."""
    shard = self.state_shardings
    if not self.task.classifies:
      return shard.params
    if has_batch_stats:
      return {"params": shard.params, "batch_stats": shard.batch_stats}
    return {"params": shard.params}

  def eval_jit(self, has_batch_stats: bool) -> Callable:
    """What evaluators jit their step(variables, batch, index) with: the
    variables sharded as the state, the batch assembled, the mesh active."""
    shard = self.variables_sharding(has_batch_stats)
    return lambda step: state_lib.jit_eval_step(step, shard, self.mesh, self.rules)

  def scope(self):
    """The mesh and logical axis rules the model's sharding hints need."""
    return sharding.activate(self.mesh, self.rules)

  def abstract_batch(self, config) -> dict:
    """The global batch as sharded ShapeDtypeStructs (for lowering without data)."""
    shapes = {"image": ((config.batch_size, *image_shape(config, self.model)), jnp.float32)}
    if self.task.classifies:
      shapes["label"] = ((config.batch_size,), jnp.int32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(self.mesh, len(s)))
            for k, (s, d) in shapes.items()}

  def abstract_sharded_state(self):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_shardings)


def build_model(config, model, num_classes: int | None = None):
  """(module, init inputs, init kwargs) of the config's task; `model`: the
  ResolvedModel that `config_lib.validate(config)` returned."""
  task = tasks.get(config.task)
  x = jnp.zeros((1, *image_shape(config, model)), jnp.float32)
  return task.build(config, model, num_classes), (x,), task.init_kwargs(model)


def setup(config, model, mesh, num_train_examples: int, num_classes: int | None = None,
          device_augment: Callable = identity_augment) -> RunSetup:
  """The run `config` describes on `mesh` (`model`: the ResolvedModel of
  `config_lib.validate(config)`; `device_augment`: the data source's on-device
  augmentation)."""
  task = tasks.get(config.task)
  module, init_inputs, init_kwargs = build_model(config, model, num_classes)
  abstract_params = nn.meta.unbox(
      state_lib.abstract_variables(module, init_inputs, init_kwargs)["params"])
  total_steps, steps_per_epoch = num_steps(config, num_train_examples)
  tx, schedule = optim.create(config, abstract_params, total_steps, steps_per_epoch,
                              trainable=task.trainable(abstract_params),
                              depth=model["depth"] if task.layer_decay else None)
  rules = sharding.rules(config.mesh)
  abstract, shard = state_lib.state_shardings(module, tx, mesh, rules, init_inputs,
                                              init_kwargs)
  step_fn = task.make_step(module, tx, config, model, num_classes, device_augment, schedule)
  return RunSetup(task=task, model=model, module=module, init_inputs=init_inputs,
                  init_kwargs=init_kwargs, tx=tx, schedule=schedule, total_steps=total_steps,
                  steps_per_epoch=steps_per_epoch, abstract_params=abstract_params,
                  abstract_state=abstract, state_shardings=shard, mesh=mesh, rules=rules,
                  num_classes=num_classes,
                  train_step=state_lib.jit_train_step(step_fn, shard, mesh, rules))
