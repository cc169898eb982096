"""Running a finished job again resumes to the same finished result."""
import json
import os

import numpy as np
import pytest

from conftest import TINY_QUICKSTART_SCRIPT, tiny_train_config
from crate_mae_jax.training import train


def _rerun_gives_same_results(task, tmp_path, **overrides):
  cfg = tiny_train_config(task, source="quickstart", **overrides)
  first = train.train_and_evaluate(cfg, str(tmp_path))
  stored = json.load(open(os.path.join(tmp_path, "results.json")))
  second = train.train_and_evaluate(cfg, str(tmp_path))
  assert json.load(open(os.path.join(tmp_path, "results.json"))) == stored
  assert second == first
  return first


@pytest.mark.slow
def test_rerun_of_finished_pretraining_reports_the_same_loss(tmp_path):
  results = _rerun_gives_same_results("pretrain", tmp_path)
  assert results["step"] == 4 and np.isfinite(results["loss"])


@pytest.mark.slow
def test_rerun_of_finished_probe_reports_the_same_top1(tmp_path):
  pre = tmp_path / "pre"
  train.train_and_evaluate(tiny_train_config("pretrain", source="quickstart"), str(pre))
  results = _rerun_gives_same_results("linear_probe", tmp_path / "probe", init_from=str(pre))
  assert 0.0 <= results["top1"] <= 1.0


@pytest.mark.slow
def test_quickstart_twice_prints_the_same_summary(tmp_path):
  """The quick start (at a tiny size) run twice in the same workdir: the second run
  resumes the finished runs and prints the same numbers."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)

  def summary():
    proc = subprocess.run([sys.executable, "-c", TINY_QUICKSTART_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any("linear probe on CRATE-MAE features" in line for line in lines), proc.stdout
    return [line for line in lines if "min on" not in line]  # the timing line differs

  first = summary()
  results = {d: json.load(open(tmp_path / d / "results.json"))
             for d in ("pretrain", "linear_probe")}
  assert summary() == first
  for d, stored in results.items():
    assert json.load(open(tmp_path / d / "results.json")) == stored
