"""Foreground score of attention maps: masks, the two scores and their chance
level against brute force, the ViT attention read-out against the block's own
output, and the evaluator on the shipped Fashion-MNIST subset."""
import itertools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import models
from crate_mae_jax.analysis import diagnostics, foreground
from crate_mae_jax.config_lib import ConfigError
from crate_mae_jax.data.datasets import fashion_mnist


def test_expected_random_iou_matches_enumeration():
  for n, k in [(6, 1), (6, 2), (6, 3), (7, 5), (5, 5)]:
    fg = set(range(k))
    ious = [len(fg & set(t)) / len(fg | set(t)) for t in itertools.combinations(range(n), k)]
    assert foreground.expected_random_iou(k, n) == pytest.approx(np.mean(ious), abs=1e-12)
  assert np.isnan(foreground.expected_random_iou(0, 4))
  with pytest.raises(ValueError, match="k <= n"):
    foreground.expected_random_iou(5, 4)


def test_scores_of_hand_made_maps():
  fg = np.zeros((1, 2, 3), bool)
  fg[0, 0, :2] = True                                    # 2 of 6 patches
  on = np.where(fg, 0.4, 0.0)                            # all mass on the object
  off = np.where(fg, 0.0, 0.2)                           # all mass off it
  half = np.array([[[0.3, 0.0, 0.3], [0.0, 0.0, 0.0]]])  # top-2 = one object patch + one not
  uniform = np.full((1, 2, 3), 0.1)
  attn = np.stack([on, off, half, uniform], axis=1)[None]   # (1 layer, B=1, 4 heads, 2, 3)
  s = foreground.per_image_scores(attn, fg)
  np.testing.assert_allclose(s["mass"][0, 0], [1.0, 0.0, 0.5, 2 / 6])
  np.testing.assert_allclose(s["iou"][0, 0, :3], [1.0, 0.0, 1 / 3])
  assert s["chance_mass"][0] == pytest.approx(2 / 6)
  assert s["chance_iou"][0] == pytest.approx(foreground.expected_random_iou(2, 6))
  summary = foreground.summarise(s)
  assert summary["num_informative"] == 1 and summary["mass"].shape == (1, 4)
  scalars = foreground.summary_scalars(summary)
  assert scalars["mass/layer_00/head_1"] == 0.0 and scalars["chance/mass"] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="layers, B, heads"):
    foreground.per_image_scores(attn[0], fg)


def test_uninformative_images_are_left_out():
  fg = np.zeros((3, 2, 2), bool)
  fg[1] = True                                           # every patch
  fg[2, 0, 0] = True                                     # one patch: the only informative one
  attn = np.full((1, 3, 1, 2, 2), 0.25)
  s = foreground.per_image_scores(attn, fg)
  assert s["informative"].tolist() == [False, False, True]
  summary = foreground.summarise(s)
  assert summary["num_images"] == 3 and summary["num_informative"] == 1
  assert summary["chance_mass"] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="no image"):
    foreground.summarise(foreground.per_image_scores(attn[:, :2], fg[:2]))


def test_masks_from_raw_and_from_normalised_images_agree():
  raw = fashion_mnist.load_quickstart()["test"][0][:64]           # uint8 (64, 28, 28, 1)
  pixels = foreground.foreground_pixels(raw)
  normalised = (raw / 255.0 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
  np.testing.assert_array_equal(
      foreground.foreground_from_normalized(normalised.astype(np.float32), fashion_mnist.MEAN,
                                            fashion_mnist.STD), pixels)
  patches = foreground.patch_foreground(pixels, 4)
  assert patches.shape == (64, 7, 7)
  assert patches[0].sum() == sum(pixels[0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any()
                                 for i in range(7) for j in range(7))
  assert 0 < patches.mean() < 1
  with pytest.raises(ValueError, match="divisible"):
    foreground.patch_foreground(pixels, 5)


def _tiny(arch):
  cfg = tiny_train_config(source="quickstart")
  if arch == "vit_mae":
    cfg.model.update(arch="vit_mae", decoder_width=32, decoder_heads=2, mlp_ratio=2.0)
  model = models.build_mae(cfg.model)
  params = model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                      np.zeros((1, 28, 28, 1), np.float32), mask_ratio=0.75)["params"]
  return cfg, model, nn.meta.unbox(params)


def test_crate_attention_layers_are_cls_attention_of_each_layer():
  _, model, params = _tiny("crate_mae")
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  maps = diagnostics.cls_attention_layers(model, params, x)
  assert maps.shape == (2, 3, 2, 7, 7)
  np.testing.assert_allclose(maps[1], diagnostics.cls_attention(model, params, x, layer=1),
                             rtol=1e-6)


@pytest.mark.slow
def test_vit_attention_reproduces_the_block_output():
  """The cls row read from the captured query/key, applied to the captured values
  and the block's output projection, gives the block's own attention output."""
  _, model, params = _tiny("vit_mae")
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  maps = diagnostics.cls_attention_layers(model, params, x)
  assert maps.shape == (2, 2, 2, 7, 7)
  assert np.all(maps.reshape(2, 2, 2, -1).sum(-1) < 1)
  _, state = model.apply({"params": params}, x, method="encode", mutable=["intermediates"],
                         capture_intermediates=lambda m, n: m.name in ("qkv", "out"))
  for i in range(2):
    inter = state["intermediates"]["encoder"][f"layer_{i}"]
    v = np.asarray(inter["qkv"]["__call__"][0])[:, :, 2]               # (B, N, heads, d_h)
    cls_weight = 1.0 - maps[i].reshape(2, 2, -1).sum(-1)                # (B, heads)
    weights = np.concatenate([cls_weight[..., None], maps[i].reshape(2, 2, -1)], -1)
    mixed = np.einsum("bhk,bkhd->bhd", weights, v)
    out = params["encoder"][f"layer_{i}"]["out"]
    expect = np.einsum("bhd,hde->be", mixed, np.asarray(out["kernel"])) + np.asarray(out["bias"])
    np.testing.assert_allclose(np.asarray(inter["out"]["__call__"][0])[:, 0], expect,
                               rtol=1e-4, atol=1e-5)


def test_evaluator_scores_both_archs_and_refuses_sources_without_masks():
  from crate_mae_jax.data import input_pipeline
  from crate_mae_jax.evaluators import common, predict
  evals = ml_collections.ConfigDict({"fg": dict(type="foreground", num_images=16)})
  for arch in ("crate_mae", "vit_mae"):
    cfg, model, params = _tiny(arch)
    cfg.evals = evals
    resolved = models.resolve(cfg.model)
    fns = predict.predict_fns(model, resolved, classifies=False)
    source = input_pipeline.create(cfg.data, cfg.augment, task="pretrain", batch_size=8, seed=0)
    (sched,) = common.from_config(cfg, resolved, fns, source=source)
    out = sched.evaluator.run({"params": params})
    assert 0 < out["chance/mass"] < 1 and 0 < out["chance/iou"] < 1
    for key in ("mass/layer_01/head_1", "iou/layer_00/mean"):
      assert 0.0 <= out[key] <= 1.0
  cfg.data.source = "tfds"
  cfg.data.name = "cifar10"
  with pytest.raises(ConfigError, match="'foreground' needs images with a foreground mask"):
    common.from_config(cfg, resolved, fns)
  cfg = tiny_train_config("linear_probe", source="quickstart")
  cfg.evals = evals
  resolved = models.resolve(cfg.model)
  classifier_fns = predict.predict_fns(models.build_classifier(cfg.model, 10), resolved,
                                       classifies=True)
  with pytest.raises(ConfigError, match="'foreground' reads the model function 'attention'"):
    common.from_config(cfg, resolved, classifier_fns)


@pytest.mark.slow
def test_analyze_adds_the_foreground_score_for_fashion_mnist_images(tmp_path):
  from crate_mae_jax.tools import analyze
  from crate_mae_jax.training import checkpoints
  cfg, _, params = _tiny("crate_mae")
  ckpt = checkpoints.save_params(str(tmp_path / "ckpt"), params,
                                 {"model": models.resolve(cfg.model), "task": "pretrain"})
  result = analyze.analyze(str(tmp_path / "ckpt"), str(tmp_path / "out"), config=cfg,
                           num_images=16)
  fg = result["foreground"]
  assert ckpt and fg["num_images"] == 16 and len(fg["mass"]) == 2 and len(fg["iou"][0]) == 2
  assert 0 < fg["chance_mass"] < 1 and all(0 <= v <= 1 for v in fg["mass_layer_mean"])
  assert "attention mass on the object" in analyze._foreground_line(result)
