"""White-box diagnostics: the official numbers, the measures, the figures and the CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from crate_mae_jax.training import checkpoints
from crate_mae_jax.tools import convert_torch
from crate_mae_jax.analysis import diagnostics, figures
from crate_mae_jax import models

from conftest import ROOT

HEADS = 4


def _state_dict(official_tiny):
  return {k[len("sd/"):]: v for k, v in official_tiny.items() if k.startswith("sd/")}


def _images(official_tiny):
  return np.ascontiguousarray(official_tiny["imgs_nchw"].transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def tiny(official_tiny):
  sd = _state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  params = convert_torch.torch_to_flax(sd, cfg)
  return cfg, models.build_mae(cfg), params


# ----------------------------------------------------------------------------- fixture


def test_fixture_measures_reproduced(official_tiny, tiny):
  cfg, model, params = tiny
  m = diagnostics.layerwise_measures(model, params, _images(official_tiny), mask_ratio=0.0)
  rate = official_tiny["full/coding_rate_per_layer"]
  sparse = official_tiny["full/sparsity_per_layer"]
  rel = np.abs(m["encoder/coding_rate/mean"] - rate) / np.abs(rate)
  assert rel.max() <= 1e-4, rel
  assert np.abs(m["encoder/sparsity/mean"] - sparse).max() <= 1e-3
  depth, decoder_depth = cfg.depth, cfg.decoder_depth
  for key, n in (("encoder/coding_rate", depth), ("encoder/sparsity", depth),
                 ("decoder/coding_rate", decoder_depth), ("decoder/sparsity", decoder_depth)):
    for stat in ("mean", "std"):
      values = m[f"{key}/{stat}"]
      assert isinstance(values, np.ndarray) and values.shape == (n,)
      assert np.all(np.isfinite(values)) and np.all(values >= 0)
  # the decoder's dictionary output is a dense linear map's output
  assert np.all(m["decoder/sparsity/mean"] > 0.9)
  scalars = diagnostics.summary_scalars(m)
  assert scalars["diag/encoder/coding_rate/layer_01"] == pytest.approx(float(rate[1]), rel=1e-4)
  assert scalars["diag/encoder/sparsity/layer_00"] == pytest.approx(float(sparse[0]), abs=1e-3)
  assert len(scalars) == 2 * depth + 2 * decoder_depth
  assert all(isinstance(v, float) for v in scalars.values())
  assert len(diagnostics.summary_scalars(m, include_std=True)) == 2 * len(scalars)


def test_measures_masked_and_per_image(official_tiny, tiny):
  _, model, params = tiny
  fn = diagnostics.make_measure_fn(model, mask_ratio=0.75, per_image=True)
  per_image = fn(params, jnp.asarray(_images(official_tiny)), jnp.asarray(official_tiny["noise"]))
  assert per_image["encoder/coding_rate"].shape == (2, 4)
  reduced = diagnostics.reduce_measures(per_image)
  np.testing.assert_allclose(reduced["encoder/sparsity/std"],
                             np.std(np.asarray(per_image["encoder/sparsity"]), axis=1, ddof=1),
                             rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(reduced["decoder/coding_rate/mean"])))


def test_vit_mae_is_refused():
  cfg = models.model_config("tiny", "vit_mae")
  with pytest.raises(ValueError, match="CRATE-MAE"):
    diagnostics.layerwise_measures(models.build_mae(cfg), None, np.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="CRATE-MAE"):
    diagnostics.measures_from_intermediates({"intermediates": {"encoder": {"layer_0": {}}}})


# ----------------------------------------------------------------------------- measures


def _official_rate(z: np.ndarray, eps: float) -> np.ndarray:
  """The official N×N formula, float64, per image."""
  z = z.astype(np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  _, _, n, p = z.shape
  gram = z @ np.swapaxes(z, -1, -2)
  _, logdet = np.linalg.slogdet(np.eye(n) + p / (n * eps) * gram)
  return logdet.sum(-1) / 2


@pytest.mark.parametrize("shape,eps", [((3, 2, 17, 8), 0.01), ((2, 4, 65, 16), 0.01),
                                       ((4, 1, 5, 12), 0.01), ((2, 3, 30, 6), 0.5)])
def test_coding_rate_matches_official_formula(shape, eps):
  z = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
  expected = _official_rate(z, eps)
  per_image = np.asarray(jax.jit(diagnostics.coding_rate_per_image, static_argnums=1)(z, eps))
  np.testing.assert_allclose(per_image, expected, rtol=2e-5)
  mean, std = diagnostics.coding_rate(jnp.asarray(z), eps)
  np.testing.assert_allclose(float(mean), expected.mean(), rtol=2e-5)
  np.testing.assert_allclose(float(std), expected.std(ddof=1), rtol=1e-3, atol=1e-4)


def test_coding_rate_single_image_and_scale_invariance():
  z = np.random.default_rng(0).normal(size=(1, 2, 9, 4)).astype(np.float32)
  mean, std = diagnostics.coding_rate(z)
  assert float(std) == 0.0
  np.testing.assert_allclose(float(mean), _official_rate(z, 0.01)[0], rtol=2e-5)
  np.testing.assert_allclose(float(diagnostics.coding_rate(z * 7.0)[0]), float(mean), rtol=1e-5)


def test_sparsity_known_array():
  z = np.zeros((2, 4, 5), np.float32)
  z[0, :2] = 1.0           # 10 of 20 non-zero
  z[1, 0, 0] = -3.0        # 1 of 20 (negative counts too)
  per_image = np.asarray(diagnostics.sparsity_per_image(z))
  np.testing.assert_allclose(per_image, [0.5, 0.05])
  mean, std = diagnostics.sparsity(z)
  np.testing.assert_allclose(float(mean), 0.275)
  np.testing.assert_allclose(float(std), np.std([0.5, 0.05], ddof=1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(diagnostics.sparsity_per_image(z, threshold=1.0)),
                             [0.0, 0.05])


# ----------------------------------------------------------------------------- attention, PCA


def test_cls_attention(official_tiny, tiny):
  _, model, params = tiny
  images = _images(official_tiny)
  attn = diagnostics.cls_attention(model, params, images, layer=-1)
  assert attn.shape == (4, HEADS, 8, 8)
  features, inter = diagnostics.encode_with_intermediates(model, params, images)
  w = np.asarray(inter["encoder"]["layer_1"]["mssa"]["subspace_proj"][0], np.float64)
  full = np.asarray(diagnostics.cls_attention_weights(jnp.asarray(w)))
  np.testing.assert_allclose(full.sum(-1), 1.0, rtol=1e-5)   # cls + patches
  patch_sums = attn.sum(axis=(2, 3))
  assert np.all(patch_sums < 1.0)                           # patches alone
  np.testing.assert_allclose(patch_sums + full[:, :, 0], 1.0, rtol=1e-5)
  logits = np.einsum("bhd,bkhd->bhk", w[:, 0], w) / np.sqrt(w.shape[-1])
  ref = np.exp(logits - logits.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(attn.reshape(4, HEADS, 64), ref[:, :, 1:], rtol=1e-4, atol=1e-7)
  first = diagnostics.cls_attention(model, params, images, layer=0)
  assert not np.allclose(first, attn)
  assert features.shape == (4, 65, 64)


@pytest.mark.parametrize("per_image", [False, True])
def test_pca_features(per_image):
  feats = np.random.default_rng(1).normal(size=(3, 16, 10))
  out = diagnostics.pca_features(feats, per_image=per_image)
  assert out.shape == (3, 4, 4, 3)
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.isclose(out.min(), 0.0) and np.isclose(out.max(), 1.0)
  out = diagnostics.pca_features(feats[:, :12], grid=(3, 4))
  assert out.shape == (3, 3, 4, 3)
  assert diagnostics.pca_features(feats[:, :, :2]).shape == (3, 4, 4, 3)   # fewer dims than n


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_panels(norm_pix_loss):
  rng = np.random.default_rng(2)
  p, b, c = 4, 2, 3
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  images = rng.normal(size=(b, 16, 16, c)).astype(np.float32)
  mask = (rng.uniform(size=(b, 16)) < 0.75).astype(np.float32)
  pred = rng.normal(size=(b, 16, p * p * c)).astype(np.float32)
  original, masked, recon, pasted = diagnostics.reconstruction_panels(
      images, pred, mask, p, mean, std, norm_pix_loss)
  for panel in (original, masked, recon, pasted):
    assert panel.shape == images.shape and panel.min() >= 0 and panel.max() <= 1
  np.testing.assert_allclose(original, np.clip(images * std + mean, 0, 1), atol=1e-6)
  pixel_mask = np.repeat(np.repeat(mask.reshape(b, 4, 4), p, 1), p, 2)[..., None] > 0
  visible = np.broadcast_to(~pixel_mask, images.shape)
  np.testing.assert_array_equal(pasted[visible], original[visible])
  np.testing.assert_array_equal(masked[visible], original[visible])
  np.testing.assert_array_equal(pasted[~visible], recon[~visible])
  assert np.all(masked[~visible] == 0.5)
  # a perfect prediction (in the loss's units) reconstructs the original
  target = np.asarray(diagnostics._patchify(images, p))
  if norm_pix_loss:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, keepdims=True, ddof=1) + 1e-6)
  perfect = diagnostics.reconstruction_panels(images, target, mask, p, mean, std,
                                              norm_pix_loss)[2]
  np.testing.assert_allclose(perfect, original, atol=1e-5)


# ----------------------------------------------------------------------------- figures


def test_grid_image_and_figures(tmp_path):
  rng = np.random.default_rng(3)
  tiles = rng.uniform(size=(2, 3, 8, 8, 3))
  grid = figures.grid_image(tiles, border=2, scale=2)
  assert grid.dtype == np.uint8 and grid.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)
  panels = tuple(rng.uniform(size=(5, 8, 8, 3)) for _ in range(4))   # columns, rows = images
  grid = figures.grid_image(panels, border=1, scale=1)
  assert grid.shape == (5 * 8 + 6, 4 * 8 + 5, 3)
  np.testing.assert_array_equal(grid[1 + 9:1 + 9 + 8, 1 + 18:1 + 18 + 8],
                                figures.to_uint8(panels[2][1]))
  gray = figures.grid_image([[rng.uniform(size=(8, 8, 1))]], titles=["x"])
  assert gray.shape == (figures.HEADER + 96 + 4, 96 + 4, 3)


_MEASURES = {"encoder/coding_rate/mean": np.array([3.0, 2.0, 1.5]),
             "encoder/coding_rate/std": np.array([0.1, 0.2, 0.1]),
             "encoder/sparsity/mean": np.array([0.5, 0.4, 0.3]),
             "encoder/sparsity/std": np.zeros(3),
             "decoder/coding_rate/mean": np.array([1.0, 1.2]),
             "decoder/coding_rate/std": np.array([0.05, 0.05]),
             "decoder/sparsity/mean": np.array([0.9, 0.8]),
             "decoder/sparsity/std": np.array([0.01, 0.02])}


def _png(path, size):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == size, (im.format, im.size)
    rgb = np.asarray(im.convert("RGB"), np.float32)
  assert rgb.std() > 5 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 16, "looks blank"
  return rgb


def test_layerwise_figure(tmp_path):
  fig = figures.layerwise_figure(_MEASURES)
  rate, sparsity = fig.axes
  assert rate.get_title() == "Coding rate (compression) per layer"
  assert sparsity.get_title() == "Sparsity per layer: fraction non-zero"
  assert (rate.get_xlabel(), rate.get_ylabel()) == ("layer", "coding rate R")
  for ax in fig.axes:
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["encoder", "decoder"]
  assert sparsity.get_ylim() == (0.0, 1.0)
  encoder_line = rate.get_lines()[0]
  np.testing.assert_array_equal(encoder_line.get_ydata(), [3.0, 2.0, 1.5])
  assert encoder_line.get_color() == figures.ENCODER_COLOR
  assert [int(float(t.get_text().replace("−", "-"))) for t in rate.get_xticklabels()
          if t.get_text() and 0 <= float(t.get_text().replace("−", "-")) <= 2] == [0, 1, 2]
  image = figures.layerwise_image(_MEASURES)
  assert image.shape == (380, 960, 3) and image.dtype == np.uint8
  rgb = _png(figures.save_layerwise(_MEASURES, str(tmp_path / "l.png")), (960, 380))
  np.testing.assert_array_equal(rgb, image)
  # a model with encoder measures only (no decoder) still gets both panels
  enc = {k: v for k, v in _MEASURES.items() if k.startswith("encoder")}
  fig = figures.layerwise_figure(enc, size=(640, 300))
  assert [len(ax.get_legend().get_texts()) for ax in fig.axes] == [1, 1]
  _png(figures.save_layerwise(enc, str(tmp_path / "e.png"), size=(640, 300)), (640, 300))


def test_heatmap_is_the_plasma_colormap():
  import matplotlib
  v = np.linspace(0, 1, 7).reshape(7, 1)
  np.testing.assert_allclose(figures.heatmap(v), matplotlib.colormaps["plasma"](v)[..., :3],
                             atol=1e-6)
  np.testing.assert_allclose(figures.heatmap([-1.0, 2.0, np.nan]),
                             figures.heatmap([0.0, 1.0, 0.0]))
  dark, bright = figures.heatmap([0.0, 1.0])
  assert dark.sum() < 1.0 < bright.sum()


def test_study_line_plot_and_before_after(tmp_path):
  from experiments import plots
  xs = np.arange(4)
  panels = [("loss", "epoch", [("CRATE-MAE train", xs, [3.0, 2.0, 1.5, 1.2], "tab:blue", "line"),
                               ("CRATE-MAE eval", xs[::2], [2.5, 1.6], "tab:blue", "dots"),
                               ("", xs, [3.5, 3.0, 2.9, 2.8], "tab:orange", "dots")]),
            ("empty", "epoch", [])]
  fig = plots.line_plot_figure(panels, panel_size=(400, 300))
  loss, empty = fig.axes
  assert loss.get_title() == "loss" and loss.get_xlabel() == "epoch"
  assert [t.get_text() for t in loss.get_legend().get_texts()] == ["CRATE-MAE train",
                                                                   "CRATE-MAE eval"]
  line, dots, unnamed = loss.get_lines()
  assert line.get_linestyle() == "-" and dots.get_linestyle() == "None"
  assert dots.get_marker() == "o" and unnamed.get_label().startswith("_")
  assert [t.get_text() for t in empty.texts] == ["no data"]
  _png(plots.line_plot(panels, str(tmp_path / "curves.png"), panel_size=(400, 300)),
       (800, 300))
  nested = {"encoder": {"coding_rate": {"mean": [3.0, 2.0], "std": [0.1, 0.1]},
                        "sparsity": {"mean": [0.4, 0.3], "std": [0.0, 0.0]}}}
  fig = plots.layerwise_before_after_figure(nested, nested, "CRATE-MAE")
  assert [sub._suptitle.get_text() for sub in fig.subfigs] == [
      "CRATE-MAE: untrained (initialisation)", "CRATE-MAE: after pre-training"]
  assert len(fig.axes) == 4
  _png(plots.save_layerwise_before_after(nested, nested, str(tmp_path / "ba.png"),
                                         "CRATE-MAE"), (960, 808))


# ----------------------------------------------------------------------------- CLI


def _run(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "crate_mae_jax.tools.analyze", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_analyze_cli_end_to_end(tmp_path, official_tiny, tiny):
  cfg, _, params = tiny
  ckpt = checkpoints.save_params(str(tmp_path / "ckpt"), params,
                                 {"model": models.resolve(cfg), "task": "pretrain"}, step=7)
  images = tmp_path / "images.npz"
  np.savez(images, images=_images(official_tiny))
  out = tmp_path / "out"
  result = _run("--checkpoint", os.path.dirname(ckpt), "--output", str(out),
                "--images", str(images), "--num_images", "8", "--layer", "-1")
  assert result.returncode == 0, result.stderr[-3000:]
  measures = json.loads((out / "measures.json").read_text())
  assert measures["step"] == 7 and measures["num_images"] == 4
  assert measures["checkpoint"] == os.path.dirname(ckpt)
  np.testing.assert_allclose(measures["encoder"]["coding_rate"]["mean"],
                             official_tiny["full/coding_rate_per_layer"], rtol=1e-4)
  np.testing.assert_allclose(measures["encoder"]["sparsity"]["mean"],
                             official_tiny["full/sparsity_per_layer"], atol=1e-3)
  for part in ("encoder", "decoder"):
    for measure in ("coding_rate", "sparsity"):
      for stat in ("mean", "std"):
        assert len(measures[part][measure][stat]) == 2
  tile, b = 96, 2   # 32-pixel images upscaled 3x, 2-pixel borders
  sizes = {"reconstruction.png": (4 * tile + 5 * b, figures.HEADER + 4 * tile + 5 * b),
           "attention.png": ((1 + HEADS) * tile + (2 + HEADS) * b,
                             figures.HEADER + 4 * tile + 5 * b),
           "pca.png": (2 * tile + 3 * b, figures.HEADER + 4 * tile + 5 * b),
           "layerwise.png": (960, 380)}
  for name, size in sizes.items():
    with Image.open(out / name) as im:
      assert im.format == "PNG" and im.size == size, name
      assert np.asarray(im.convert("RGB"), np.float32).std() > 10, f"{name} looks blank"


def test_analyze_cli_errors(tmp_path):
  result = _run("--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith("analyze:")]
  assert len(lines) == 1 and "does not exist" in lines[0]
  vit = models.resolve(models.model_config("tiny", "vit_mae"))
  ckpt = checkpoints.save_params(str(tmp_path / "vit"), {"w": np.zeros(2, np.float32)},
                                 {"model": vit, "task": "pretrain"})
  result = _run("--checkpoint", os.path.dirname(ckpt), "--output", str(tmp_path / "o"))
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith("analyze:")]
  assert len(lines) == 1 and "vit_mae" in lines[0] and "CRATE-MAE" in lines[0]


def test_no_tensorflow_import():
  code = ("import sys; import crate_mae_jax.analysis.diagnostics, crate_mae_jax.analysis.figures, "
          "crate_mae_jax.tools.analyze, crate_mae_jax.training.steps, crate_mae_jax.models; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'torch', 'matplotlib')]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
