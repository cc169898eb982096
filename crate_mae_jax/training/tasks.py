"""The table of tasks the one train loop runs: pretrain, linear_probe, finetune.

A task says what differs between them and nothing else: the module it trains,
its step, which parameters train, whether `init_from` supplies the encoder, the
metric that picks the best checkpoint, its default evaluators and the checks of
its own config fields. A new task is one more `Task` row in `TASKS`.
"""
import dataclasses
from typing import Callable

import jax

from crate_mae_jax import models
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.training import steps

FOREGROUND_IMAGES = 256   # eval images the default foreground score averages over


@dataclasses.dataclass(frozen=True)
class Task:
  """One row of the task table (see the module docstring)."""
  name: str
  build: Callable          # (config, model, num_classes) -> flax module
  init_kwargs: Callable    # (model) -> the module's call kwargs at init
  make_step: Callable      # (module, tx, config, model, num_classes, augment, schedule)
  best_metric: str         # what `config.best_metric` defaults to
  best_mode: str           # 'min' or 'max'
  default_evals: Callable  # (config, model) -> {name: {type, ...}}
  check: Callable          # (config) -> None; raises ConfigError on its own fields
  classifies: bool         # labels, classes and a classification head
  encoder_from_init: bool  # `config.init_from` gives the encoder's parameters
  frozen_encoder: bool = False  # only the head trains (linear probe)
  layer_decay: bool = False     # layer-wise lr decay over the encoder's depth
  reads: tuple = ()             # config fields only some tasks read ('augment.mixup')

  def trainable(self, params):
    """The bool tree of trained parameters (None: all of them)."""
    if not self.frozen_encoder:
      return None
    return {k: jax.tree_util.tree_map(lambda _, k=k: k != "encoder", v)
            for k, v in params.items()}



def _check_pool(section: str):
  def check(config):
    pool = config[section].pool
    if pool not in ("cls", "mean"):
      raise ConfigError(f"config.{section}.pool={pool!r} is unknown; use 'cls' or 'mean'")
  return check


def _no_mixup(config):
  a = config.augment
  if a.mixup or a.cutmix:
    raise ConfigError(f"config.augment.mixup: mixup/cutmix apply to task='finetune' only, "
                      f"not {config.task!r}; set --config.augment.mixup=0 "
                      "--config.augment.cutmix=0")


def _check_pretrain(config):
  _no_mixup(config)


def _check_probe(config):
  _no_mixup(config)
  if not config.init_from:
    raise ConfigError("config.init_from: linear_probe needs init_from: a pre-training "
                      "workdir or a checkpoint written by crate_mae_jax.tools.convert_torch")
  _check_pool("probe")(config)


def _pretrain_evals(config, model):
  """The masked loss and figure; with `config.eval.diagnostics` also the white-box
  measures (CRATE-MAE) and, where the images give an object mask, the attention
  maps' foreground score (both archs)."""
  from crate_mae_jax.analysis import foreground  # pylint: disable=import-outside-toplevel
  evals = {"eval": {"type": "reconstruction"}}
  if config.eval.diagnostics and model["arch"] == "crate_mae":
    evals["diag"] = {"type": "diagnostics"}
  if config.eval.diagnostics and foreground.gives_masks(config.data):
    evals["foreground"] = {"type": "foreground", "num_images": FOREGROUND_IMAGES}
  return evals


def _classify_evals(config, model):
  del config, model
  return {"eval": {"type": "classification"}}


def _pretrain_step(module, tx, config, model, num_classes, augment, schedule):
  del num_classes
  return steps.make_pretrain_step(module, tx, model["mask_ratio"], config.accum_steps,
                                  augment, schedule)


def _classify_step(module, tx, config, model, num_classes, augment, schedule):
  del model
  mix = None
  a = config.augment
  if a.mixup or a.cutmix:
    from crate_mae_jax.data import augment_jax  # pylint: disable=import-outside-toplevel
    mix = lambda k, x, y: augment_jax.mixup_cutmix(k, x, y, a.mixup, a.cutmix)
  return steps.make_classify_step(module, tx, num_classes, config.accum_steps,
                                  a.label_smoothing, mix, augment, schedule)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("pretrain",
         build=lambda config, model, num_classes: models.build_mae(model),
         init_kwargs=lambda model: {"mask_ratio": model["mask_ratio"]},
         make_step=_pretrain_step, best_metric="loss", best_mode="min",
         default_evals=_pretrain_evals, check=_check_pretrain,
         classifies=False, encoder_from_init=False),
    Task("linear_probe",
         build=lambda config, model, num_classes: models.build_classifier(
             model, num_classes, pool=config.probe.pool, head_norm=config.probe.head_norm,
             frozen=True),
         init_kwargs=lambda model: {},
         make_step=_classify_step, best_metric="top1", best_mode="max",
         default_evals=_classify_evals, check=_check_probe,
         classifies=True, encoder_from_init=True, frozen_encoder=True,
         reads=("init_from", "probe", "model.drop_path", "augment.label_smoothing")),
    Task("finetune",
         build=lambda config, model, num_classes: models.build_classifier(
             model, num_classes, pool=config.finetune.pool,
             head_init_std=config.finetune.head_init_std),
         init_kwargs=lambda model: {},
         make_step=_classify_step, best_metric="top1", best_mode="max",
         default_evals=_classify_evals, check=_check_pool("finetune"),
         classifies=True, encoder_from_init=True, layer_decay=True,
         reads=("init_from", "finetune", "model.drop_path", "augment.label_smoothing",
                "augment.randaugment_layers", "augment.randaugment_magnitude",
                "augment.mixup", "augment.cutmix")),
)}
# Every field some task reads and another does not.
TASK_FIELDS = tuple(sorted({f for t in TASKS.values() for f in t.reads}))


def get(name: str) -> Task:
  """The task `config.task` names; an unknown name is a ConfigError."""
  if name not in TASKS:
    raise ConfigError(f"config.task={name!r} is unknown; use one of {tuple(TASKS)}")
  return TASKS[name]
