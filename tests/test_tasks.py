"""The task table and the one setup that training, the planner and the benchmark share."""
import ast
import pathlib

import jax
import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import config_lib, sharding
from crate_mae_jax.training import setup as setup_lib, tasks

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "crate_mae_jax"


def _setup(task, **overrides):
  cfg = tiny_train_config(task, source="quickstart", **overrides)
  if task != "pretrain":
    cfg.init_from = ""
  model = config_lib.resolve_model(cfg.model)
  mesh = sharding.create_mesh(cfg.mesh.shape)
  return cfg, setup_lib.setup(cfg, model, mesh, num_train_examples=64, num_classes=10)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_sets_up_and_its_step_lowers(name):
  cfg, run = _setup(name)
  assert run.task is tasks.TASKS[name]
  assert run.total_steps == cfg.num_train_steps and run.steps_per_epoch == 64 / cfg.batch_size
  lowered = run.train_step.lower(run.abstract_sharded_state(), run.abstract_batch(cfg))
  assert lowered.compile() is not None
  assert ("label" in run.abstract_batch(cfg)) == run.task.classifies


def test_the_probe_trains_its_head_only_and_finetuning_decays_by_layer():
  _, probe = _setup("linear_probe")
  mask = probe.task.trainable(probe.abstract_params)
  assert not any(jax.tree_util.tree_leaves(mask["encoder"]))
  assert all(jax.tree_util.tree_leaves({k: v for k, v in mask.items() if k != "encoder"}))
  assert tasks.TASKS["pretrain"].trainable({"x": 1}) is None
  assert tasks.TASKS["finetune"].layer_decay and not tasks.TASKS["linear_probe"].layer_decay


def test_a_task_checks_its_own_fields_in_validate():
  cfg = tiny_train_config("linear_probe", source="quickstart")
  cfg.init_from = ""
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    config_lib.validate(cfg)
  cfg = tiny_train_config("pretrain", source="quickstart")
  cfg.augment.mixup = 0.8
  with pytest.raises(config_lib.ConfigError, match="finetune"):
    config_lib.validate(cfg)
  cfg.task = "distill"
  with pytest.raises(config_lib.ConfigError, match="config.task='distill' is unknown"):
    config_lib.validate(cfg)


def test_the_planner_and_the_benchmark_build_through_setup(monkeypatch):
  from crate_mae_jax.tools import benchmark, plan
  calls = []
  real = setup_lib.setup

  def counting(*args, **kwargs):
    calls.append(args[0].task)
    return real(*args, **kwargs)
  monkeypatch.setattr(setup_lib, "setup", counting)
  cfg = tiny_train_config("pretrain", source="quickstart")
  mesh = sharding.create_mesh(cfg.mesh.shape)
  plan.lower_train_step(cfg, mesh, num_train_examples=64)
  args = benchmark.parse_args(["--variant=tiny", "--width=32", "--depth=1", "--heads=2",
                               "--decoder_depth=1", "--patch_size=8", "--image_size=16",
                               "--dtype=float32"])
  args.batch_size = 2  # one combination of the sweep, as `benchmark.sweep` hands it over
  compiled, state, batch, *_ = benchmark.build(args)
  assert np.isfinite(float(compiled(state, batch)[1]["loss"]))
  assert calls == ["pretrain", "pretrain"]


def _task_branches(path: pathlib.Path) -> list[str]:
  """`<x>.task == ...` / `!= ...` / `in ...` comparisons in a module."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Compare):
      for side in (node.left, *node.comparators):
        if isinstance(side, ast.Attribute) and side.attr == "task":
          found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
  return found


def test_no_module_branches_on_the_task_outside_the_table():
  branches = [b for p in sorted(PACKAGE.rglob("*.py")) if p.name != "tasks.py"
              for b in _task_branches(p)]
  assert not branches, branches


def test_models_are_resolved_in_one_place():
  calls = [f"{p.relative_to(PACKAGE)}:{n.lineno}" for p in sorted(PACKAGE.rglob("*.py"))
           for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
           and n.func.attr == "resolve" and isinstance(n.func.value, ast.Name)
           and n.func.value.id == "models"]
  assert calls == ["config_lib.py:" + calls[0].split(":")[1]] and len(calls) == 1, calls
