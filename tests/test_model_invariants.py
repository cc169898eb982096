"""Invariants of the Flax models that need no PyTorch.

The main part compares Flax CRATE-MAE with `reference_numpy`, an independent
float64 model of the official maths, over configurations the official fixture does
not cover (widths, depths, head counts, λ, η, norm_pix_loss, channels, image and
patch sizes, mask ratios). Weights are random, under the official state-dict
names, and reach Flax through the converter.
"""
import dataclasses
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax.tools import convert_torch
from crate_mae_jax import models
from crate_mae_jax.models.patches import masking_from_noise, num_kept

import reference_numpy as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4


# ----------------------------------------------------------------------------- vs numpy
@dataclasses.dataclass(frozen=True)
class Case:
  width: int
  heads: int
  depth: int
  decoder_depth: int
  patch: int
  channels: int
  image: tuple[int, int]
  eta: float = 0.1
  lam: float = 0.5
  norm_pix: bool = False
  ratios: tuple[float, ...] = (0.75,)
  fused: bool = True
  attention: str | None = None
  batch: int = 2


CASES = {
    "w32_h2_d1_all_ratios": Case(32, 2, 1, 1, 4, 3, (16, 16), ratios=(0.0, 0.5, 0.75, 0.9)),
    "w32_h2_d3_dec1_lam0.1_gray_normpix": Case(32, 2, 3, 1, 2, 1, (12, 12), lam=0.1,
                                               norm_pix=True, ratios=(0.75, 0.0)),
    "w48_h6_d2_dec3_eta0.2_lam1_4ch": Case(48, 6, 2, 3, 8, 4, (32, 32), eta=0.2, lam=1.0,
                                           ratios=(0.5, 0.9)),
    "w64_h4_eta0.2_lam0.1_normpix_unfused_explicit": Case(
        64, 4, 2, 2, 4, 3, (24, 24), eta=0.2, lam=0.1, norm_pix=True, ratios=(0.75,),
        fused=False, attention="explicit", batch=3),
    "w16_h1_no_out_projection": Case(16, 1, 1, 2, 4, 3, (16, 16), lam=1.0, ratios=(0.5,)),
    "w32_h4_non_square_grid": Case(32, 4, 2, 1, 4, 3, (16, 24), ratios=(0.75,)),
}


def build_case(case: Case, seed: int = 0):
  rng = np.random.default_rng(seed)
  gh, gw = case.image[0] // case.patch, case.image[1] // case.patch
  sd = ref.random_state_dict(rng, width=case.width, depth=case.depth,
                             decoder_depth=case.decoder_depth, patch_size=case.patch,
                             channels=case.channels, heads=case.heads,
                             grid=gh if gh == gw else None)
  images = rng.standard_normal((case.batch, *case.image, case.channels)).astype(np.float32)
  noise = rng.uniform(size=(case.batch, gh * gw)).astype(np.float32)
  return sd, images, noise


@pytest.mark.parametrize("name", list(CASES))
def test_flax_matches_numpy_reference(name):
  case = CASES[name]
  sd, images, noise = build_case(case)
  cfg = convert_torch.infer_model_config(sd, heads=case.heads, ista_step=case.eta,
                                         ista_lambda=case.lam, norm_pix_loss=case.norm_pix)
  cfg.ista_fused, cfg.attention_impl = case.fused, case.attention
  r = models.resolve(cfg)
  assert (r["width"], r["heads"], r["depth"], r["decoder_depth"]) == (
      case.width, case.heads, case.depth, case.decoder_depth)
  assert (r["patch_size"], r["channels"]) == (case.patch, case.channels)
  params = convert_torch.torch_to_flax(sd, cfg)
  model = models.build_mae(cfg)
  length = noise.shape[1]
  for ratio in case.ratios:
    # eager: op-by-op kernels are cached across ratios and cases, cheaper than
    # compiling one program per (case, ratio) on a small CPU
    out = model.apply({"params": params}, jnp.asarray(images), mask_ratio=ratio,
                      noise=jnp.asarray(noise))
    want = ref.forward(sd, images, noise, ratio, case.heads, case.eta, case.lam,
                       case.norm_pix)
    where = f"{name} ratio={ratio}"
    assert out["latent"].shape == (case.batch, 1 + length, case.width)
    assert out["pred"].shape == (case.batch, length, case.patch**2 * case.channels)
    for key in ("latent", "pred"):
      err = ref.rel_err(out[key], want[key])
      assert err < RTOL, f"{where} {key}: relative error {err:.3g}"
    np.testing.assert_array_equal(np.asarray(out["mask"]), want["mask"], err_msg=where)
    np.testing.assert_array_equal(np.asarray(out["ids_restore"]), want["ids_restore"],
                                  err_msg=where)
    assert np.asarray(out["mask"]).sum(1).tolist() == \
        [length - int(length * (1 - ratio))] * case.batch
    loss = float(out["loss"])
    assert np.isfinite(loss)
    assert abs(loss - want["loss"]) <= RTOL * abs(want["loss"]), (where, loss, want["loss"])


def test_reference_reproduces_the_official_fixture(official_tiny):
  """The numpy model is itself checked against the official PyTorch outputs."""
  sd = {k[3:]: v for k, v in official_tiny.items() if k.startswith("sd/")}
  images = official_tiny["imgs_nchw"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ref.sincos_table(64, 8, 8), sd["pos_embed"][0], atol=1e-6)
  for tag, ratio in (("full", 0.0), ("masked", 0.75)):
    out = ref.forward(sd, images, official_tiny["noise"], ratio, heads=4)
    for key in ("latent", "pred"):
      assert ref.rel_err(out[key], official_tiny[f"{tag}/{key}"]) < 1e-6
    np.testing.assert_array_equal(out["mask"], official_tiny[f"{tag}/mask"])
    np.testing.assert_array_equal(out["ids_restore"], official_tiny[f"{tag}/ids_restore"])
  assert abs(out["loss"] - float(official_tiny["masked/loss"])) < 1e-6


def test_reference_patchify_matches_official_einsum():
  """(row-in-patch, col-in-patch, channel): the official 'nchpwq->nhwpqc'."""
  rng = np.random.default_rng(1)
  nchw = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
  p = 4
  official = np.einsum("nchpwq->nhwpqc", nchw.reshape(2, 3, 2, p, 2, p)).reshape(2, 4, p * p * 3)
  np.testing.assert_array_equal(ref.patchify(nchw.transpose(0, 2, 3, 1), p), official)
  from crate_mae_jax.models.patches import patchify, unpatchify
  np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(nchw.transpose(0, 2, 3, 1)), p)),
                                official)
  np.testing.assert_array_equal(
      np.asarray(unpatchify(jnp.asarray(official), p, 3)), nchw.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- masking
@pytest.mark.parametrize("length,ratio", [(64, 0.0), (64, 0.5), (64, 0.75), (64, 0.9),
                                          (196, 0.75), (10, 0.7), (49, 0.6), (36, 0.25)])
def test_number_of_masked_patches(length, ratio):
  noise = jax.random.uniform(jax.random.key(length), (5, length))
  mask, ids_restore, ids_keep = masking_from_noise(noise, ratio)
  expected = length - int(length * (1 - ratio))   # official truncation, e.g. 10*0.3 -> 2
  assert num_kept(length, ratio) == int(length * (1 - ratio))
  assert np.asarray(mask).sum(1).tolist() == [expected] * 5
  assert ids_keep.shape == (5, length - expected)
  # kept patches are those with the smallest noise, listed in ascending noise
  np.testing.assert_array_equal(np.sort(np.asarray(ids_restore), 1),
                                np.tile(np.arange(length), (5, 1)))
  kept_noise = np.take_along_axis(np.asarray(noise), np.asarray(ids_keep), 1)
  assert np.all(np.diff(kept_noise, axis=1) >= 0)
  assert np.all(np.asarray(mask)[np.arange(5)[:, None], np.asarray(ids_keep)] == 0)


def small_config(**overrides):
  cfg = models.model_config("base", "crate_mae")
  cfg.width, cfg.depth, cfg.heads, cfg.decoder_depth = 32, 1, 2, 1
  cfg.patch_size = 4
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module")
def small_model():
  """A width-32 model with random weights (through the converter: no init cost)."""
  sd = ref.random_state_dict(np.random.default_rng(5), width=32, depth=1, decoder_depth=1,
                             patch_size=4, channels=3, heads=2, grid=4)
  cfg = convert_torch.infer_model_config(sd, heads=2)
  model = models.build_mae(cfg)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  return model, convert_torch.torch_to_flax(sd, cfg), images


def test_masking_rng_is_deterministic(small_model):
  model, params, images = small_model
  fn = jax.jit(lambda p, x, k: model.apply({"params": p}, x, mask_ratio=0.75,
                                           rngs={"masking": k}))
  a = fn(params, images, jax.random.key(7))
  b = fn(params, images, jax.random.key(7))
  c = fn(params, images, jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
  np.testing.assert_array_equal(np.asarray(a["pred"]), np.asarray(b["pred"]))
  assert float(a["loss"]) == float(b["loss"])
  assert not np.array_equal(np.asarray(a["mask"]), np.asarray(c["mask"]))
  assert float(a["loss"]) != float(c["loss"])
  assert np.asarray(a["mask"]).sum(1).tolist() == [12, 12]
  # the masking stream is the only randomness: no key, no masking
  with pytest.raises(Exception):
    model.apply({"params": params}, images, mask_ratio=0.75)


def test_encode_equals_latent_at_ratio_zero(small_model):
  model, params, images = small_model
  out = model.apply({"params": params}, images, mask_ratio=0.0, rngs={"masking": jax.random.key(0)})
  features = model.apply({"params": params}, images, method="encode")
  assert features.shape == (2, 1 + 16, 32)
  np.testing.assert_allclose(np.asarray(features), np.asarray(out["latent"]), rtol=1e-6, atol=1e-6)
  assert float(np.asarray(out["mask"]).sum()) == 0.0
  # the MAE loss at ratio 0 is the mean per-patch MSE over every patch
  from crate_mae_jax.models.patches import patchify
  target = np.asarray(patchify(images, 4), np.float64)
  expected = ((np.asarray(out["pred"], np.float64) - target) ** 2).mean()
  assert abs(float(out["loss"]) - expected) < 1e-5 * expected


# ----------------------------------------------------------------------------- sizes
def test_crate_mae_base_parameter_count():
  count = models.count_params(models.abstract_params(models.model_config("base", "crate_mae")))
  assert count == 43_745_280
  # by hand: 24 layers of 3 (d, d) matrices, an output bias and 2 LayerNorms,
  # patch embedding and pixel head (d*d + d each), 2 tokens, 2 final norms
  d = 768
  assert count == 24 * (3 * d * d + d + 4 * d) + 2 * (d * d + d) + 2 * d + 4 * d


def test_parameter_table_ratio_to_vit_mae():
  table = models.parameter_table()
  row = next(line for line in table.splitlines() if line.startswith("| base "))
  crate, vit = (int(x.replace(",", "")) for x in re.findall(r"\| ([\d,]{6,}) ", row))
  assert crate == 43_745_280
  # official mae_vit_base: ViT-B/16 encoder (qkv bias, MLP ratio 4) 85,647,360 and a
  # 768-wide, 8-layer decoder with embedding, mask token and pixel head 57,886,464
  d = 768
  block = 4 * d * d + 4 * d + 2 * d * 4 * d + 4 * d + d + 4 * d
  encoder = 12 * block + (d * d + d) + d + 2 * d
  decoder = (d * d + d) + d + 8 * block + 2 * d + (d * d + d)
  assert vit == encoder + decoder == 143_533_824
  assert 0.28 < crate / vit < 0.32, crate / vit
  assert f"{crate / vit:.1%}" in row


# ----------------------------------------------------------------------------- init
def test_initialisation_matches_official_distributions():
  d, heads, p, c = 256, 4, 8, 3
  cfg = small_config(width=d, heads=heads, patch_size=p, channels=c)
  model = models.build_mae(cfg)
  variables = jax.jit(lambda k: model.init({"params": k, "masking": k},
                                           jnp.zeros((1, 32, 32, c)), mask_ratio=0.75))(
                                               jax.random.key(3))
  params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables["params"]))
  enc, dec = params["encoder"], params["decoder"]

  for name in ("cls_token", "mask_token"):
    tok = enc[name]
    assert tok.shape == (1, 1, d)
    assert abs(tok.std() - 0.02) < 0.004, (name, tok.std())
    assert abs(tok.mean()) < 0.004

  def uniform(x, bound, what):
    x = np.asarray(x, np.float64).ravel()
    assert np.abs(x).max() <= bound * (1 + 1e-6), what
    assert np.abs(x).max() > 0.97 * bound, what         # not a narrower distribution
    assert abs(x.std() - bound / np.sqrt(3)) < 0.03 * bound / np.sqrt(3), what
    assert abs(x.mean()) < 0.02 * bound, what

  def xavier(kernel, fan_in, fan_out, what):
    uniform(kernel, np.sqrt(6.0 / (fan_in + fan_out)), what)

  # ISTA dictionaries (encoder and decoder): kaiming_uniform, ±sqrt(6/d)
  uniform(enc["layer_0"]["ista"]["dictionary"], np.sqrt(6.0 / d), "encoder dictionary")
  uniform(dec["layer_0"]["dictionary"]["kernel"], np.sqrt(6.0 / d), "decoder dictionary")
  # Linear layers: xavier_uniform on the (out, in) matrix the official code sees
  for where, block in (("encoder", enc["layer_0"]), ("decoder", dec["layer_0"])):
    assert block["mssa"]["subspaces"]["kernel"].shape == (d, heads, d // heads)
    xavier(block["mssa"]["subspaces"]["kernel"], d, d, f"{where} qkv")
    xavier(block["mssa"]["out"]["kernel"], d, d, f"{where} to_out")
    np.testing.assert_array_equal(block["mssa"]["out"]["bias"], 0)
  xavier(dec["pixel_head"]["kernel"], d, p * p * c, "decoder_pred")
  np.testing.assert_array_equal(dec["pixel_head"]["bias"], 0)
  xavier(enc["patch_embed"]["proj"]["kernel"], p * p * c, d, "patch_embed")
  # the conv bias keeps PyTorch's default U(±1/sqrt(fan_in))
  bias = enc["patch_embed"]["proj"]["bias"]
  assert np.abs(bias).max() <= 1 / np.sqrt(p * p * c) and np.abs(bias).max() > 0.5 / np.sqrt(p * p * c)
  # LayerNorms: ones and zeros
  norms = [enc["norm"], dec["norm"], enc["layer_0"]["norm_mssa"], enc["layer_0"]["norm_ista"],
           dec["layer_0"]["norm_dict"], dec["layer_0"]["norm_mssa"]]
  for norm in norms:
    np.testing.assert_array_equal(norm["scale"], 1)
    np.testing.assert_array_equal(norm["bias"], 0)


# ----------------------------------------------------------------------------- misc
def test_imports_pull_in_no_tensorflow():
  code = ("import sys\n"
          "import crate_mae_jax\n"
          "import crate_mae_jax.models, crate_mae_jax.models.crate_mae, crate_mae_jax.models.vit_mae, "
          "crate_mae_jax.models.layers, crate_mae_jax.tools.convert_torch\n"
          "bad = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))\n"
          "assert 'crate_mae_jax.tools.convert_torch' in sys.modules\n"
          "print('TF:', bad)\n"
          "sys.exit(1 if bad else 0)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
  assert "TF: []" in proc.stdout


def test_vit_mae_forward_runs():
  cfg = models.model_config("base", "vit_mae")
  cfg.width, cfg.depth, cfg.heads = 32, 2, 2
  cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads = 16, 1, 2
  cfg.patch_size = 4
  model = models.build_mae(cfg)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  # random weights of the right shapes (eval_shape only: init is slow on a small CPU)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
      models.abstract_params(cfg, image_size=16))
  variables = {"params": params}
  out = jax.jit(lambda v, x, k: model.apply(v, x, mask_ratio=0.75, rngs={"masking": k}))(
      variables, images, jax.random.key(3))
  assert out["latent"].shape == (2, 1 + 4, 32)           # cls + visible patches only
  assert out["pred"].shape == (2, 16, 48)
  assert np.asarray(out["mask"]).sum(1).tolist() == [12, 12]
  assert np.isfinite(float(out["loss"])) and float(out["loss"]) > 0
  features = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, images)
  assert features.shape == (2, 17, 32)


def test_vit_mae_with_mask_tokens_in_the_encoder_matches_the_maths():
  """encoder_sees='all': mask tokens replace the masked patch embeddings before the
  position table, the encoder runs on every token, the decoder reads the latent."""
  from crate_mae_jax.models import layers
  from crate_mae_jax.models.patches import masked_mse, patchify
  from crate_mae_jax.models.pos_embed import sincos_2d
  cfg = models.model_config("base", "vit_mae")
  cfg.update(width=32, depth=2, heads=2, decoder_depth=1, decoder_heads=4, patch_size=4,
             encoder_sees="all", norm_pix_loss=True)
  model = models.build_mae(cfg)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  params = nn.meta.unbox(model.init({"params": jax.random.key(2)}, images, mask_ratio=0.75,
                                    noise=noise)["params"])
  assert "mask_token" in params["encoder"]
  assert "embed" not in params["decoder"] and "mask_token" not in params["decoder"]
  out = model.apply({"params": params}, images, mask_ratio=0.75, noise=noise)

  enc, dec = params["encoder"], params["decoder"]
  mask = np.asarray(masking_from_noise(noise, 0.75)[0])
  x = layers.PatchEmbed(4, 32).apply({"params": enc["patch_embed"]}, images)
  x = jnp.where(mask[..., None] > 0, enc["mask_token"], x)
  x = jnp.concatenate([jnp.broadcast_to(enc["cls_token"], (2, 1, 32)), x], axis=1)
  x = x + sincos_2d(32, (4, 4), cls_token=True)[None]
  for i in range(2):
    x = layers.ViTBlock(2).apply({"params": enc[f"layer_{i}"]}, x)
  norm = lambda p, v: nn.LayerNorm(epsilon=layers.FINAL_NORM_EPS,
                                   use_fast_variance=False).apply({"params": p}, v)
  latent = norm(enc["norm"], x)
  y = layers.ViTBlock(4).apply({"params": dec["layer_0"]}, latent)
  pred = nn.Dense(48).apply({"params": dec["pixel_head"]}, norm(dec["norm"], y))[:, 1:]
  loss = masked_mse(pred, patchify(images, 4), jnp.asarray(mask), True)
  np.testing.assert_allclose(np.asarray(out["latent"]), np.asarray(latent), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["pred"]), np.asarray(pred), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), float(loss), rtol=1e-5)
  assert out["latent"].shape == (2, 17, 32)                 # every token, not just visible
  # The masked patches' pixels never reach the encoder.
  pixel_mask = np.repeat(np.repeat(mask.reshape(2, 4, 4), 4, 1), 4, 2)[..., None] > 0
  changed = jnp.where(pixel_mask, images + 5.0, images)
  again = model.apply({"params": params}, changed, mask_ratio=0.75, noise=noise)
  np.testing.assert_allclose(np.asarray(again["latent"]), np.asarray(out["latent"]), atol=1e-6)
  # Downstream encoders of this config carry the same parameters.
  encoder = models.build_encoder(cfg)
  downstream = nn.meta.unbox(encoder.init(jax.random.key(0), images)["params"])
  assert jax.tree_util.tree_structure(downstream) == jax.tree_util.tree_structure(enc)


def test_encoder_sees_is_checked():
  cfg = models.model_config("base", "vit_mae")
  cfg.encoder_sees = "some"
  with pytest.raises(ValueError, match="encoder_sees='some' is unknown"):
    models.resolve(cfg)
  cfg.encoder_sees, cfg.decoder_width = "all", 512
  with pytest.raises(ValueError, match="decoder_width=512 must equal"):
    models.resolve(cfg)


def test_head_merge_negate_is_the_exact_negative_and_keeps_dense_params():
  """The decoder's y − MSSA(·) takes its sign in the output projection: the same
  parameters as flax's DenseGeneral, the exact negative value and gradients."""
  from crate_mae_jax.models.layers import HeadMerge
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  dense = nn.DenseGeneral(6, axis=(-2, -1), name="out")
  params = dense.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)          # a non-zero bias too
  plus, minus = HeadMerge(6), HeadMerge(6, negate=True)
  mine = nn.meta.unbox(plus.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(plus.apply(params, x), dense.apply(params, x), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(minus.apply(params, x), -plus.apply(params, x))
  g_plus = jax.grad(lambda p, x: plus.apply(p, x).sum(), argnums=(0, 1))(params, x)
  g_minus = jax.grad(lambda p, x: minus.apply(p, x).sum(), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_plus), jax.tree.leaves(g_minus)):
    np.testing.assert_array_equal(a, -b)
