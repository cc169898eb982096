"""Running a finished job again resumes to the same finished result."""
import json
import os

import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import train


def _rerun_gives_same_results(task, tmp_path, **overrides):
  cfg = tiny_train_config(task, source="quickstart", **overrides)
  first = train.train_and_evaluate(cfg, str(tmp_path))
  stored = json.load(open(os.path.join(tmp_path, "results.json")))
  second = train.train_and_evaluate(cfg, str(tmp_path))
  assert json.load(open(os.path.join(tmp_path, "results.json"))) == stored
  assert second == first
  return first


def test_rerun_of_finished_pretraining_reports_the_same_loss(tmp_path):
  results = _rerun_gives_same_results("pretrain", tmp_path)
  assert results["step"] == 4 and np.isfinite(results["loss"])


@pytest.mark.slow
def test_rerun_of_finished_probe_reports_the_same_top1(tmp_path):
  pre = tmp_path / "pre"
  train.train_and_evaluate(tiny_train_config("pretrain", source="quickstart"), str(pre))
  results = _rerun_gives_same_results("linear_probe", tmp_path / "probe", init_from=str(pre))
  assert 0.0 <= results["top1"] <= 1.0
