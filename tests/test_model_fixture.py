"""Flax CRATE-MAE vs the golden outputs of the official PyTorch code.

The weights come from the fixture's official state dict through
`convert_torch.torch_to_flax`; the model must then reproduce the official
latent, prediction, mask, unshuffle indices and loss to 1e-4 relative error in
float32, with either ISTA evaluation and either attention implementation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax.tools import convert_torch
from crate_mae_jax import models
from crate_mae_jax.models.pos_embed import sincos_2d

import reference_numpy as ref

RTOL = 1e-4
HEADS = 4
RATIOS = {"full": 0.0, "masked": 0.75}


def official_state_dict(official_tiny) -> dict:
  return {k[len("sd/"):]: v for k, v in official_tiny.items() if k.startswith("sd/")}


def images_nhwc(official_tiny) -> np.ndarray:
  return np.ascontiguousarray(official_tiny["imgs_nchw"].transpose(0, 2, 3, 1))


def fixture_config(official_tiny, **overrides):
  cfg = convert_torch.infer_model_config(official_state_dict(official_tiny), heads=HEADS)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module")
def converted(official_tiny):
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  return convert_torch.torch_to_flax(sd, cfg)


def run_model(official_tiny, params, ratio, **overrides):
  cfg = fixture_config(official_tiny, **overrides)
  model = models.build_mae(cfg)
  # eager: the op kernels are shared by every variant, cheaper than one compile each
  out = model.apply({"params": params}, jnp.asarray(images_nhwc(official_tiny)),
                    mask_ratio=ratio, noise=jnp.asarray(official_tiny["noise"]))
  return jax.tree_util.tree_map(np.asarray, out)


def assert_close(actual, expected, what, rtol=RTOL):
  err = ref.rel_err(actual, expected)
  assert np.asarray(actual).shape == np.asarray(expected).shape, what
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol}"
  # element-wise as well, relative to the tensor's scale
  scale = np.abs(np.asarray(expected, np.float64)).max()
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=rtol * scale, err_msg=what)
  return err


def test_fixture_config_is_what_the_readme_says(official_tiny):
  r = models.resolve(fixture_config(official_tiny))
  assert (r["width"], r["depth"], r["decoder_depth"], r["heads"]) == (64, 2, 2, 4)
  assert (r["patch_size"], r["channels"]) == (4, 3)
  assert (r["ista_step"], r["ista_lambda"], r["norm_pix_loss"]) == (0.1, 0.5, False)


def test_position_table_equals_official_buffer(official_tiny):
  table = sincos_2d(64, 8, cls_token=True)
  np.testing.assert_allclose(table, official_tiny["sd/pos_embed"][0], atol=1e-6)
  np.testing.assert_allclose(table, official_tiny["sd/decoder_pos_embed"][0], atol=1e-6)


@pytest.mark.parametrize("attention_impl", [None, "explicit"])
@pytest.mark.parametrize("ista_fused", [True, False])
@pytest.mark.parametrize("tag", ["full", "masked"])
def test_matches_official(official_tiny, converted, tag, ista_fused, attention_impl):
  out = run_model(official_tiny, converted, RATIOS[tag], ista_fused=ista_fused,
                  attention_impl=attention_impl)
  errs = {k: assert_close(out[k], official_tiny[f"{tag}/{k}"], f"{tag}/{k}")
          for k in ("latent", "pred")}
  np.testing.assert_array_equal(out["mask"], official_tiny[f"{tag}/mask"])
  np.testing.assert_array_equal(out["ids_restore"], official_tiny[f"{tag}/ids_restore"])
  assert out["mask"].dtype == np.float32
  if tag == "masked":
    assert out["mask"].sum(axis=1).tolist() == [48] * 4
    expected = float(official_tiny["masked/loss"])
    assert abs(float(out["loss"]) - expected) <= RTOL * abs(expected), (out["loss"], expected)
  else:
    assert out["mask"].sum() == 0
    # Official loss is 0/0 here; the package documents the mean over all patches.
    target = ref.patchify(images_nhwc(official_tiny).astype(np.float64), 4)
    expected = ((official_tiny["full/pred"].astype(np.float64) - target) ** 2).mean()
    loss = float(out["loss"])
    assert np.isfinite(loss)
    assert abs(loss - expected) <= RTOL * expected, (loss, expected)
  print(f"{tag} fused={ista_fused} attention={attention_impl}: "
        + ", ".join(f"{k} rel err {v:.2e}" for k, v in errs.items()))


def test_encode_matches_official_full_latent(official_tiny, converted):
  model = models.build_mae(fixture_config(official_tiny))
  latent = model.apply({"params": converted}, jnp.asarray(images_nhwc(official_tiny)),
                       method="encode")
  assert_close(np.asarray(latent), official_tiny["full/latent"], "encode")


def test_sparsity_per_layer_matches_official(official_tiny, converted):
  model = models.build_mae(fixture_config(official_tiny))
  _, state = model.apply({"params": converted}, jnp.asarray(images_nhwc(official_tiny)),
                         mask_ratio=0.0, noise=jnp.asarray(official_tiny["noise"]),
                         mutable=["intermediates"])
  enc = state["intermediates"]["encoder"]
  sparsity = [float(np.mean(np.asarray(enc[f"layer_{i}"]["ista"]["sparse_code"][0]) != 0))
              for i in range(2)]
  np.testing.assert_allclose(sparsity, official_tiny["full/sparsity_per_layer"], atol=1e-3)


@pytest.mark.parametrize("attention_impl", [None, "explicit"])
def test_bfloat16_compute_close_to_float32(official_tiny, converted, attention_impl):
  out = run_model(official_tiny, converted, 0.75, dtype="bfloat16",
                  attention_impl=attention_impl)
  for key in ("latent", "pred"):
    err = ref.rel_err(np.asarray(out[key], np.float32), official_tiny[f"masked/{key}"])
    assert err < 3e-2, f"bfloat16 {key}: relative error {err:.3g}"
  np.testing.assert_array_equal(out["mask"], official_tiny["masked/mask"])
  loss = float(out["loss"])
  assert np.isfinite(loss)
  assert abs(loss - float(official_tiny["masked/loss"])) < 3e-2 * float(official_tiny["masked/loss"])
