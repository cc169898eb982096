"""Evaluators: k-NN and ridge probes on synthetic features, per-layer features, the
train loop running listed evaluators through a passed-in writer, the CLI."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import models
from crate_mae_jax.training import train
from crate_mae_jax.config_lib import ConfigError
from crate_mae_jax.evaluators import common, features, knn, linear_probe, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 5


def _clusters(n, seed, dim=16, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(123).normal(size=(CLASSES, dim)) * 3
  y = rng.integers(0, CLASSES, n)
  return centres[y] + spread * rng.normal(size=(n, dim)), y


def test_knn_separable_reaches_100_and_random_labels_reach_chance():
  x, y = _clusters(500, 0)
  tx, ty = _clusters(1000, 1)
  assert knn.knn_accuracy(x, y, tx, ty, CLASSES, k=20, temperature=0.07) >= 0.99
  rng = np.random.default_rng(2)   # labels that carry no information about the inputs
  chance = knn.knn_accuracy(x, rng.integers(0, CLASSES, len(y)), tx,
                            rng.integers(0, CLASSES, len(ty)), CLASSES, k=20, temperature=0.07)
  assert abs(chance - 1 / CLASSES) < 0.08


def test_knn_weights_votes_by_similarity():
  # Two close neighbours of class 1 outweigh three distant ones of class 0.
  train_f = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
  train_y = np.array([1, 1, 0, 0, 0])
  acc = knn.knn_accuracy(train_f, train_y, np.array([[1.0, 0.05]]), np.array([1]), 2, k=5,
                         temperature=0.07)
  assert acc == 1.0


def test_ridge_probe_separable_and_random_labels():
  x, y = _clusters(500, 0, spread=1.0)
  tx, ty = _clusters(1000, 1, spread=1.0)
  acc, lam = linear_probe.ridge_probe_accuracy(x, y, tx, ty, CLASSES)
  assert acc >= 0.98 and lam in linear_probe.LAMBDAS
  rng = np.random.default_rng(2)
  chance, _ = linear_probe.ridge_probe_accuracy(x, rng.integers(0, CLASSES, len(y)), tx,
                                                rng.integers(0, CLASSES, len(ty)), CLASSES)
  assert abs(chance - 1 / CLASSES) < 0.08


def test_layer_features_match_the_encoder_output():
  cfg = models.model_config("tiny")
  cfg.update(width=32, depth=3, heads=2, patch_size=4, channels=1)
  encoder = features.feature_encoder(cfg)
  images = np.random.default_rng(0).normal(size=(5, 16, 16, 1)).astype(np.float32)
  params = encoder.init(jax.random.key(0), images[:1])["params"]
  out = features.extract(features.make_extract_fn(encoder), params, images, batch_size=2)
  assert out["cls"].shape == (4, 5, 32) and out["mean"].shape == (4, 5, 32)
  tokens = np.asarray(encoder.apply({"params": params}, images))
  np.testing.assert_allclose(out["cls"][-1], tokens[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["mean"][-1], tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out["cls"][0], out["cls"][1])   # distinct layers
  assert features.layer_names(3) == ["layer_00", "layer_01", "layer_02", "final"]


class ListWriter:
  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self.scalars.setdefault(k, []).append((step, float(v)))

  def write_images(self, step, images):
    self.images.update({k: (step, np.asarray(v).shape) for k, v in images.items()})

  def write_hparams(self, hparams):
    self.hparams = dict(hparams)

  def flush(self):
    pass


def _tiny_quickstart(task="pretrain"):
  cfg = tiny_train_config(task, source="quickstart")
  cfg.data.max_examples = 64
  return cfg


def _with_evals(cfg, **evals):
  cfg.evals = ml_collections.ConfigDict(evals)
  return cfg


@pytest.mark.slow
def test_train_loop_runs_listed_evaluators_through_the_given_writer(tmp_path):
  cfg = _tiny_quickstart()
  cfg.evals = ml_collections.ConfigDict(dict(
      eval=dict(type="reconstruction"),
      knn=dict(type="knn", every_steps=2, max_train=64, max_test=32, k=5),
      probe=dict(type="linear_probe", max_train=64, max_test=32, pools=("mean",))))
  writer, calls = ListWriter(), []
  results = train.train_and_evaluate(cfg, str(tmp_path), writer=writer,
                                     hooks=[calls.append])
  assert calls == [1, 2, 3, 4]
  assert [s for s, _ in writer.scalars["knn/cls/final"]] == [2, 4]
  assert [s for s, _ in writer.scalars["probe/mean/layer_00"]] == [4]
  assert "probe/cls/final" not in writer.scalars
  assert writer.images["eval/reconstruction"][0] == 4
  assert "train/learning_rate" in writer.scalars and "eval/loss" in writer.scalars
  assert 0.0 <= results["knn/mean/best"] <= 1.0 and np.isfinite(results["loss"])
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["knn/cls/final"] == results["knn/cls/final"]


def test_default_evals_and_bad_entries():
  cfg = _tiny_quickstart()
  assert sorted(common.default_evals(cfg, models.resolve(cfg.model))) == [
      "diag", "eval", "foreground"]   # the quick-start images give object masks
  cfg.model.arch = "vit_mae"
  assert sorted(common.default_evals(cfg, models.resolve(cfg.model))) == ["eval", "foreground"]
  cfg = _tiny_quickstart()
  resolved = models.resolve(cfg.model)
  fns = predict.predict_fns(models.build_mae(cfg.model), resolved, classifies=False)
  cfg.evals = ml_collections.ConfigDict({"x": dict(type="nope")})
  with pytest.raises(ConfigError, match=r"config.evals.x.type='nope' is unknown"):
    common.from_config(cfg, resolved, fns)
  cfg.evals = ml_collections.ConfigDict({"knn": dict(type="knn", bogus=1)})
  with pytest.raises(ConfigError, match=r"config.evals.knn: .*bogus"):
    common.from_config(cfg, resolved, fns)
  cfg.evals = ml_collections.ConfigDict({"acc": dict(type="classification")})
  with pytest.raises(ConfigError, match=r"config.evals.acc: 'classification' reads the model "
                     r"function 'classify', which task='pretrain'"):
    common.from_config(cfg, resolved, fns)
  cfg.evals = ml_collections.ConfigDict({"knn": dict(type="knn", pred="masked")})
  built = common.from_config(cfg, resolved, fns)   # `pred` picks another function
  assert built[0].evaluator.encode_fn is fns["masked"]


def test_diagnostics_evaluator_drops_decoder_sparsity_and_adds_masked(tmp_path):
  from crate_mae_jax.data import input_pipeline
  from crate_mae_jax.evaluators import diagnostics
  cfg = _tiny_quickstart()
  source = input_pipeline.create(cfg.data, cfg.augment, task="pretrain", batch_size=8, seed=0)
  model = models.build_mae(cfg.model)
  params = model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                      np.zeros((1, 28, 28, 1), np.float32), mask_ratio=0.75)["params"]
  (sched,) = common.from_config(
      _with_evals(cfg, diag=dict(type="diagnostics")), models.resolve(cfg.model),
      predict.predict_fns(model, models.resolve(cfg.model), classifies=False), source=source)
  assert isinstance(sched.evaluator, diagnostics.Evaluator)
  out = sched.evaluator.run({"params": params})
  assert "encoder/coding_rate/layer_01" in out and "mask_0.75/encoder/sparsity/layer_00" in out
  assert "decoder/coding_rate/layer_00" in out
  assert not any("decoder/sparsity" in k for k in out)
  assert out["encoder/coding_rate/layer_00"] != out["mask_0.75/encoder/coding_rate/layer_00"]


TINY_FLAGS = ["--config=configs/quickstart.py", "--config.model.width=32",
              "--config.model.depth=2", "--config.model.heads=2",
              "--config.model.decoder_depth=2", "--max_train=200", "--max_test=100"]


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "crate_mae_jax.tools.evaluate", *TINY_FLAGS, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_on_a_random_init_tiny_model(tmp_path):
  out = tmp_path / "evals.json"
  proc = _cli("--random_init", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| layer_01 |" in proc.stdout and "knn cls" in proc.stdout
  saved = json.load(open(out))
  assert saved["random_init"] and set(saved["results"]) == {"knn", "linear_probe",
                                                             "diagnostics"}
  assert 0 <= saved["results"]["knn"]["mean/final"] <= 1


def test_cli_refuses_a_missing_checkpoint(tmp_path):
  proc = _cli(f"--checkpoint={tmp_path / 'none'}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_split_arrays_are_the_normalised_eval_path():
  from crate_mae_jax.data import augment_jax, input_pipeline
  cfg = _tiny_quickstart()
  x, y, classes = input_pipeline.split_arrays(cfg.data, "test", max_examples=50, batch_size=16)
  assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32 and y.shape == (50,)
  assert classes == 10
  source = input_pipeline.create(cfg.data, None, task="pretrain", batch_size=64, seed=0)
  raw = next(iter(source.eval_batches()))
  expected = source.device_augment(jax.random.key(0), raw["image"][:50], False)
  np.testing.assert_allclose(x, np.asarray(expected), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y, raw["label"][:50])
  train_x, _, _ = input_pipeline.split_arrays(cfg.data, "train", max_examples=7)
  assert len(train_x) == 7
  images = np.ones((2, 4, 4, 3), np.float32)
  assert augment_jax.identity_augment(jax.random.key(0), images, True) is images


def test_batch_progress_logs_every_interval_not_every_batch():
  from absl import logging as absl_logging
  from crate_mae_jax.evaluators import batches
  now = [0.0]
  lines = []
  progress = batches.BatchProgress(10, what="eval", every_s=10.0, clock=lambda: now[0])
  original = absl_logging.info
  absl_logging.info = lambda msg, *args: lines.append(msg % args)
  try:
    for i in range(1, 11):
      now[0] += 4.0            # 4 s per batch: a line every third batch
      progress(i)
  finally:
    absl_logging.info = original
  assert lines == ["eval: batch 3/10", "eval: batch 6/10", "eval: batch 9/10"], lines


def test_trivial_reconstruction_mse():
  from crate_mae_jax.evaluators import reconstruction
  rng = np.random.default_rng(0)
  flat = np.full((2, 8, 8, 1), 3.0, np.float32)               # constant patches
  assert reconstruction.trivial_mse(flat, 4, True) == pytest.approx(0.0, abs=1e-6)
  assert reconstruction.trivial_mse(flat, 4, False) == pytest.approx(9.0)
  noise = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  # standardised with the unbiased variance (as MAE): (n - 1) / n for n = 16 pixels
  assert reconstruction.trivial_mse(noise, 4, True) == pytest.approx(15 / 16, abs=1e-3)


def test_best_layer_picks_the_best_pool_and_layer():
  from crate_mae_jax.evaluators import features
  scalars = features.per_layer_scalars({"cls": [0.5, 0.7], "mean": [0.6, 0.65]},
                                       ["layer_00", "final"])
  assert features.best_layer(scalars) == (pytest.approx(0.7), "cls/final")
