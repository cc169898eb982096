"""Checkpoints written before the package's re-layout (commit 548c67d, flat modules)
still restore, resume and initialise a probe. The fixture and how it was made:
tests/fixtures/README.md, "checkpoint_548c67d"."""
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import config_lib
from crate_mae_jax.training import checkpoints, setup as setup_lib, state_lib, train

LEGACY = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_548c67d"


def legacy_config(task: str, **overrides):
  """The config the fixture was trained with (2 steps of a width-16 model)."""
  fields = dict(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2,
                keep_checkpoints=1, keep_best=False)
  cfg = tiny_train_config(task, source="quickstart", **{**fields, **overrides})
  cfg.model.update(width=16, depth=1, heads=2, decoder_depth=1)
  cfg.eval.diagnostics = False
  return cfg


@pytest.mark.parametrize("task", ["pretrain", "linear_probe"])
def test_a_legacy_checkpoint_matches_todays_model(task):
  path = str(LEGACY / task / "checkpoints")
  assert checkpoints.latest_step(path) == 2
  params, meta = checkpoints.restore_params(path)
  assert meta["task"] == task and meta["model"]["width"] == 16
  cfg = legacy_config(task, init_from=str(LEGACY / "pretrain") if task != "pretrain" else "")
  model = config_lib.resolve_model(cfg.model)
  train.check_against_checkpoint(cfg, meta, path, model)
  module, inputs, kwargs = setup_lib.build_model(cfg, model, 10)
  abstract = nn.meta.unbox(state_lib.abstract_variables(module, inputs, kwargs)["params"])
  checkpoints.check_compatible(params, abstract, where=path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_a_legacy_run_resumes_and_a_probe_starts_from_it(tmp_path):
  workdir = tmp_path / "pretrain"
  shutil.copytree(LEGACY / "pretrain", workdir)
  results = train.train_and_evaluate(legacy_config("pretrain", num_train_steps=3),
                                     str(workdir))
  assert results["step"] == 3 and np.isfinite(results["loss"])
  assert checkpoints.latest_step(os.path.join(workdir, "checkpoints")) == 3
  probe = train.train_and_evaluate(
      legacy_config("linear_probe", num_train_steps=1, init_from=str(LEGACY / "pretrain")),
      str(tmp_path / "probe"))
  assert probe["step"] == 1 and 0.0 <= probe["top1"] <= 1.0
