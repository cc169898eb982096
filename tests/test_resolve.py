"""A model config is resolved (sizes filled in, fields checked) once per entry
point; everything downstream reads the `ResolvedModel` it was handed."""
import json

import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import config_lib, models
from crate_mae_jax.training import setup as setup_lib, train


def _tiny_model(arch="crate_mae"):
  cfg = models.model_config("tiny", arch)
  cfg.update(width=32, depth=2, heads=2, patch_size=4, channels=1)
  return cfg


@pytest.fixture
def count_resolutions(monkeypatch):
  """The number of times a model config is actually resolved (filled and checked)."""
  calls = []
  real = models._fill_and_check  # pylint: disable=protected-access

  def counting(cfg):
    calls.append(cfg)
    return real(cfg)
  monkeypatch.setattr(models, "_fill_and_check", counting)
  return calls


def test_resolve_fills_sizes_and_is_idempotent(count_resolutions):
  r = models.resolve(_tiny_model("vit_mae"))
  assert isinstance(r, models.ResolvedModel)
  assert (r["decoder_depth"], r["decoder_width"], r["decoder_heads"]) == (8, 32, 16)
  assert models.resolve(r) is r
  assert len(count_resolutions) == 1
  assert json.loads(json.dumps(r)) == dict(r)  # saved in checkpoint meta as plain JSON


@pytest.mark.parametrize("arch", models.ARCHS)
def test_builders_take_a_resolved_model_or_resolve_a_config(arch, count_resolutions):
  cfg = _tiny_model(arch)
  r = models.resolve(cfg)
  count_resolutions.clear()
  assert models.build_mae(r) == models.build_mae(cfg)
  assert models.build_encoder(r) == models.build_encoder(cfg)
  assert len(count_resolutions) == 2  # only the two unresolved configs
  count_resolutions.clear()
  models.build_classifier(r, 10)
  models.abstract_params(r, image_size=8)
  assert not count_resolutions


def test_an_unresolved_bad_config_fails_in_the_builder_with_the_field():
  cfg = _tiny_model()
  cfg.heads = 5
  with pytest.raises(ValueError, match="config.model.heads=5 does not divide"):
    models.build_mae(cfg)


def test_derived_model_is_checked_again():
  r = models.resolve(_tiny_model())
  f32 = models.with_fields(r, dtype="float32", drop_path=0.0)
  assert f32["dtype"] == "float32" and r["width"] == f32["width"]
  with pytest.raises(ValueError, match="config.model.dtype='int8'"):
    models.with_fields(r, dtype="int8")


def test_the_train_build_path_resolves_once(count_resolutions):
  """What `train_and_evaluate` builds from one validated config: the module, the
  checkpoint check and the default evaluators, without another resolution."""
  from crate_mae_jax import evaluators
  from crate_mae_jax.data import input_pipeline
  cfg = tiny_train_config("pretrain", source="quickstart")
  resolved = config_lib.validate(cfg)
  source = input_pipeline.create(cfg.data, cfg.augment, task="pretrain", batch_size=8, seed=0)
  model, _, init_kwargs = setup_lib.build_model(cfg, resolved)
  assert init_kwargs["mask_ratio"] == resolved["mask_ratio"]
  train.check_against_checkpoint(cfg, {"model": dict(resolved)}, "ckpt", resolved)
  evals = evaluators.from_config(cfg, resolved,
                                 evaluators.predict_fns(model, resolved, classifies=False),
                                 source=source)
  assert {e.name for e in evals} == {"eval", "diag", "foreground"}
  assert len(count_resolutions) == 1


@pytest.mark.slow
def test_a_training_run_resolves_its_model_once(tmp_path, count_resolutions):
  """Validation at the entry resolves; the model, the checkpoint metadata and the
  evaluators (loss, reconstruction, diagnostics) all read that one result."""
  cfg = tiny_train_config("pretrain", source="quickstart", num_train_steps=2,
                          eval_every_steps=2)
  resolved = config_lib.validate(cfg)
  results = train.train_and_evaluate(cfg, str(tmp_path), resolved=resolved)
  assert np.isfinite(results["loss"])
  assert len(count_resolutions) == 1, [c["width"] for c in count_resolutions]


def test_converting_an_official_checkpoint_resolves_once(official_tiny_pth, tmp_path,
                                                         count_resolutions):
  pytest.importorskip("torch")
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax.tools import convert_torch
  convert_torch.convert(str(official_tiny_pth), str(tmp_path / "converted"), heads=4)
  assert len(count_resolutions) == 1
  _, meta = checkpoints.restore_params(str(tmp_path / "converted"))
  assert meta["model"]["heads"] == 4 and meta["model"]["decoder_heads"] == 4
