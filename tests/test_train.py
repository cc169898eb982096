"""The train loop end to end: each task on mock TFDS data and on the shipped subset,
resumption equal to an uninterrupted run, probes loading pre-training checkpoints."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import once_per_run, tiny_train_config
from crate_mae_jax.training import checkpoints, train


def _params_close(a, b, tol=1e-6):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _pretrain(out):
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(tiny_train_config("pretrain"), str(out / "run"))
  (out / "results.json").write_text(json.dumps(results, default=float))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """One pre-training run per test run, shared by the pytest-xdist workers."""
  out = once_per_run(tmp_path_factory, "train_pretrain", _pretrain)
  return out / "run", json.loads((out / "results.json").read_text())


def test_pretrain_on_mock_tfds(pretrained):
  workdir, results = pretrained
  assert results["step"] == 4 and np.isfinite(results["loss"]) and results["loss"] > 0
  assert checkpoints.latest_step(os.path.join(workdir, "checkpoints")) == 4
  assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 4
  params, meta = checkpoints.restore_params(str(workdir))
  assert meta["task"] == "pretrain" and meta["model"]["width"] == 32
  assert set(params) == {"encoder", "decoder"}


def test_linear_probe_loads_pretraining_and_keeps_encoder_frozen(pretrained, tmp_path):
  workdir, _ = pretrained
  cfg = tiny_train_config("linear_probe", init_from=str(workdir))
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(cfg, str(tmp_path))
  assert 0.0 <= results["top1"] <= 1.0 and 0.0 <= results["top5"] <= 1.0
  assert results["top5"] >= results["top1"]
  pre, _ = checkpoints.restore_params(str(workdir))
  probe, meta = checkpoints.restore_params(str(tmp_path))
  assert meta["task"] == "linear_probe"
  _params_close(probe["encoder"], pre["encoder"], tol=0)  # frozen: bit-identical
  assert "head" in probe


def test_finetune_updates_encoder(pretrained, tmp_path):
  workdir, _ = pretrained
  cfg = tiny_train_config("finetune", init_from=str(workdir))
  cfg.optim.update(name="adamw", base_lr=1e-2, layer_decay=0.75)
  cfg.augment.update(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
  with tfds.testing.mock_data(num_examples=64):
    results = train.train_and_evaluate(cfg, str(tmp_path))
  assert np.isfinite(results["loss"]) and "top1" in results
  pre, _ = checkpoints.restore_params(str(workdir))
  tuned, _ = checkpoints.restore_params(str(tmp_path))
  diff = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(tuned["encoder"]), jax.tree_util.tree_leaves(pre["encoder"]))]
  assert max(diff) > 0


@pytest.mark.slow
def test_restart_from_checkpoint_matches_uninterrupted_run(tmp_path):
  cfg = tiny_train_config("pretrain", num_train_steps=6, keep_checkpoints=10)
  full, cut = tmp_path / "full", tmp_path / "cut"
  with tfds.testing.mock_data(num_examples=64):
    train.train_and_evaluate(cfg, str(full))
    train.train_and_evaluate(cfg, str(cut))
    # "Kill" the second run after step 2: only that checkpoint survives.
    for step_dir in os.listdir(cut / "checkpoints"):
      if step_dir.isdigit() and int(step_dir) != 2:
        shutil.rmtree(cut / "checkpoints" / step_dir)
    assert checkpoints.latest_step(str(cut / "checkpoints")) == 2
    results = train.train_and_evaluate(cfg, str(cut))
  assert results["step"] == 6
  a, _ = checkpoints.restore_params(str(full))
  b, _ = checkpoints.restore_params(str(cut))
  _params_close(a, b, tol=1e-6)


def test_pretrain_on_shipped_subset_without_tensorflow_data(tmp_path):
  cfg = tiny_train_config("pretrain", source="quickstart")
  results = train.train_and_evaluate(cfg, str(tmp_path))
  assert results["step"] == 4 and np.isfinite(results["loss"])


def test_probe_refuses_checkpoint_of_another_size(pretrained, tmp_path):
  workdir, _ = pretrained
  cfg = tiny_train_config("linear_probe", init_from=str(workdir))
  cfg.model.width = 64
  with pytest.raises(train.ConfigError, match="config.model.width=64"):
    train.train_and_evaluate(cfg, str(tmp_path))


@pytest.mark.slow
def test_probe_and_finetune_on_shipped_subset(tmp_path):
  """The TF-free path: in-memory arrays, augmentation (RandAugment, mixup) on device."""
  pre = tmp_path / "pre"
  train.train_and_evaluate(tiny_train_config("pretrain", source="quickstart"), str(pre))
  probe = train.train_and_evaluate(
      tiny_train_config("linear_probe", source="quickstart", init_from=str(pre)),
      str(tmp_path / "probe"))
  assert 0.0 <= probe["top1"] <= 1.0 and probe["examples"] == 8  # eval.max_batches=1
  cfg = tiny_train_config("finetune", source="quickstart", init_from=str(pre))
  cfg.augment.update(randaugment_layers=2, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
  tuned = train.train_and_evaluate(cfg, str(tmp_path / "finetune"))
  assert np.isfinite(tuned["loss"]) and 0.0 <= tuned["top1"] <= tuned["top5"] <= 1.0
