"""Export to the official PyTorch format: the inverse of convert_torch, the golden
fixture's keys and shapes, classifier checkpoints and bad input."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax import models
from crate_mae_jax.models import layers
from crate_mae_jax.training import checkpoints
from crate_mae_jax.tools import convert_torch, export_torch

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, ".official")
HEADS = 4


def official_state_dict(official_tiny) -> dict:
  return {k[len("sd/"):]: v for k, v in official_tiny.items() if k.startswith("sd/")}


def assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def load_pth(path) -> dict:
  return {k: v.numpy() for k, v in torch.load(path, map_location="cpu",
                                              weights_only=True).items()}


def tiny_config(arch: str, **fields):
  cfg = models.model_config("base", arch)
  cfg.update(fields)
  return models.resolve(cfg)


def vit_config(encoder_sees: str):
  cfg = models.model_config("base", "vit_mae")
  cfg.update(width=32, depth=2, heads=4, decoder_depth=1, decoder_heads=2, patch_size=4,
             encoder_sees=encoder_sees, decoder_width=16 if encoder_sees == "visible" else None)
  return models.resolve(cfg)


def random_params(cfg, seed=0):
  """Initialised params with every leaf perturbed (no zero biases, no identities)."""
  r = models.resolve(cfg)
  size = r["patch_size"] * 2
  variables = models.build_mae(r).init(
      {"params": jax.random.key(seed), "masking": jax.random.key(seed + 1)},
      jnp.zeros((1, size, size, r["channels"])), mask_ratio=0.5)
  import flax.linen as nn
  params = nn.meta.unbox(variables["params"])
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [np.asarray(x, np.float32) + rng.normal(0, 0.1, x.shape).astype(np.float32)
             for x in leaves])


def save(tmp_path, params, r, task="pretrain", image_size=32, name="ckpt"):
  config = json.dumps({"data": {"image_size": image_size}})
  return checkpoints.save_params(str(tmp_path / name), params,
                                 {"model": dict(r), "task": task, "config": config})


# ------------------------------------------------------------------------ CRATE-MAE
def test_crate_export_is_the_golden_state_dict_and_converts_back(official_tiny, tmp_path):
  sd = official_state_dict(official_tiny)
  cfg = models.resolve(convert_torch.infer_model_config(sd, heads=HEADS))
  params = convert_torch.torch_to_flax(sd, cfg)
  step_dir = save(tmp_path, params, cfg)
  out = str(tmp_path / "crate.pth")
  info = export_torch.export(step_dir, out)          # a step folder, read as its root + step
  exported = load_pth(out)
  # the official module's keys and shapes, decoder_embed included
  assert sorted(exported) == sorted(sd)
  for k, v in sd.items():
    assert exported[k].shape == v.shape and exported[k].dtype == np.float32, k
    if k.startswith("decoder_embed."):
      continue
    np.testing.assert_allclose(exported[k], v, atol=1e-6 if "pos_embed" in k else 0, err_msg=k)
  assert np.all(exported["decoder_embed.bias"] == 0)
  bound = np.sqrt(6.0 / (64 + 64))
  assert 0 < np.abs(exported["decoder_embed.weight"]).max() <= bound
  # the exact inverse: export -> convert_torch gives the same parameters
  assert_same_tree(convert_torch.torch_to_flax(exported, cfg), params)
  assert convert_torch.main(["--checkpoint", out, "--output", str(tmp_path / "back"),
                             "--heads", str(HEADS)]) == 0
  back, _ = checkpoints.restore_params(str(tmp_path / "back"))
  assert_same_tree(back, params)
  side = json.load(open(out + ".json"))
  assert side == json.loads(json.dumps(info, default=str))
  assert (side["arch"], side["task"], side["image_size"], side["patch_size"]) == \
      ("crate_mae", "pretrain", 32, 4)
  assert side["constructor"]["embed_dim"] == 64 and side["constructor"]["num_heads"] == HEADS
  assert side["dropped"] == [] and "decoder_embed" in side["filled"][0]


def test_crate_random_weights_round_trip():
  """Trained-looking weights (nothing zero or identity) survive ours -> official -> ours."""
  cfg = tiny_config("crate_mae", width=32, depth=2, heads=2, decoder_depth=1, patch_size=4)
  params = random_params(cfg)
  sd, _ = export_torch.flax_to_torch(params, cfg, 16)
  assert_same_tree(convert_torch.torch_to_flax(sd, cfg), params)


def test_one_head_attention_with_a_trained_projection_is_refused():
  cfg = tiny_config("crate_mae", width=16, depth=1, heads=1, decoder_depth=1, patch_size=4)
  params = random_params(cfg)
  with pytest.raises(export_torch.ExportError, match="one-head"):
    export_torch.flax_to_torch(params, cfg, 16)


def test_probe_checkpoint_exports_the_encoder_and_says_what_is_dropped(official_tiny, tmp_path,
                                                                       capsys):
  sd = official_state_dict(official_tiny)
  cfg = models.resolve(convert_torch.infer_model_config(sd, heads=HEADS))
  encoder = convert_torch.torch_to_flax(sd, cfg)["encoder"]
  head = {"kernel": np.ones((64, 10), np.float32), "bias": np.zeros(10, np.float32)}
  save(tmp_path, {"encoder": encoder, "head": head}, cfg, task="linear_probe")
  out = str(tmp_path / "probe.pth")
  assert export_torch.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", out]) == 0
  printed = capsys.readouterr().out
  assert "dropped 1" in printed and "linear_probe" in printed
  exported = load_pth(out)
  assert sorted(exported) == sorted(sd)
  for name, path, _ in convert_torch.key_map(cfg):
    if path[0] == "encoder":
      np.testing.assert_array_equal(exported[name], sd[name], err_msg=name)
  side = json.load(open(out + ".json"))
  assert side["task"] == "linear_probe"
  assert len(side["dropped"]) == 1 and side["dropped"][0].startswith("head (")
  assert "(64, 10)" in side["dropped"][0] and "no place" in side["dropped"][0]
  assert any(f.startswith("decoder:") for f in side["filled"])


# ------------------------------------------------------------------------ ViT-MAE
def _models_mae_names(depth, decoder_depth) -> set:
  """facebookresearch/mae models_mae.MaskedAutoencoderViT's state-dict names."""
  block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
           "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
           "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
  names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias",
           "mask_token", "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
           "decoder_pred.weight", "decoder_pred.bias"}
  names |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
  names |= {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
  return names


@pytest.mark.parametrize("encoder_sees", ["visible", "all"])
def test_vit_export_round_trip_and_layout(tmp_path, encoder_sees):
  cfg = vit_config(encoder_sees)
  params = random_params(cfg)
  save(tmp_path, params, cfg, image_size=16)
  out = str(tmp_path / "vit.pth")
  info = export_torch.export(str(tmp_path / "ckpt"), out)
  exported = load_pth(out)
  assert set(exported) == _models_mae_names(2, 1)
  d, dd = 32, cfg["decoder_width"]
  expected = {"pos_embed": (1, 17, d), "decoder_pos_embed": (1, 17, dd),
              "patch_embed.proj.weight": (d, 3, 4, 4), "mask_token": (1, 1, dd),
              "decoder_embed.weight": (dd, d), "blocks.0.attn.qkv.weight": (3 * d, d),
              "blocks.0.attn.qkv.bias": (3 * d,), "blocks.0.mlp.fc1.weight": (4 * d, d),
              "decoder_blocks.0.attn.proj.weight": (dd, dd), "decoder_pred.weight": (48, dd)}
  for k, shape in expected.items():
    assert exported[k].shape == shape, k
  assert_same_tree(convert_torch.torch_to_flax(exported, cfg), params)
  assert (info["arch"], info["image_size"]) == ("vit_mae", 16)
  assert ("note" in info) == (encoder_sees == "all")
  if encoder_sees == "visible":  # our decoder embedding is the official one
    np.testing.assert_array_equal(exported["decoder_embed.weight"],
                                  params["decoder"]["embed"]["kernel"].T)


def _timm_block(sd, prefix, x, heads):
  """timm's ViT Block (as models_mae builds it) on official tensors, in torch."""
  f = torch.nn.functional
  t = {k[len(prefix):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(prefix)}
  b, n, c = x.shape
  h = f.layer_norm(x, (c,), t["norm1.weight"], t["norm1.bias"], eps=1e-6)
  qkv = f.linear(h, t["attn.qkv.weight"], t["attn.qkv.bias"])
  q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
  a = f.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
  x = x + f.linear(a, t["attn.proj.weight"], t["attn.proj.bias"])
  h = f.layer_norm(x, (c,), t["norm2.weight"], t["norm2.bias"], eps=1e-6)
  h = f.linear(f.gelu(f.linear(h, t["mlp.fc1.weight"], t["mlp.fc1.bias"])),
               t["mlp.fc2.weight"], t["mlp.fc2.bias"])
  return x + h


def test_vit_exported_block_computes_what_ours_does():
  """The qkv split (3, heads, head_dim) and the projection layout mean the same thing."""
  cfg = vit_config("visible")
  params = random_params(cfg)
  sd, _ = export_torch.flax_to_torch(params, cfg, 16)
  x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
  ours = layers.ViTBlock(4, attention_impl="explicit").apply(
      {"params": params["encoder"]["layer_0"]}, jnp.asarray(x))
  theirs = _timm_block(sd, "blocks.0.", torch.from_numpy(x), 4).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ official module
def _official_module():
  if not os.path.isdir(os.path.join(OFFICIAL, "model", "crate_ae")):
    pytest.skip(".official/model (the official CRATE code, not committed) is absent")
  pytest.importorskip("timm", reason="the official crate_ae module imports timm")
  pytest.importorskip("einops", reason="the official CRATE blocks import einops")
  sys.path.insert(0, OFFICIAL)
  try:
    from model.crate_ae import crate_ae  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(OFFICIAL)
  return crate_ae


def test_strict_load_into_the_official_module(official_tiny, tmp_path):
  crate_ae = _official_module()
  from functools import partial
  sd = official_state_dict(official_tiny)
  cfg = models.resolve(convert_torch.infer_model_config(sd, heads=HEADS))
  save(tmp_path, convert_torch.torch_to_flax(sd, cfg), cfg)
  out = str(tmp_path / "crate.pth")
  info = export_torch.export(str(tmp_path / "ckpt"), out)
  args = info["constructor"]
  model = crate_ae.MaskedAutoencoderViT(
      crate_ae.CRATEEncoderBlock, crate_ae.CRATEDecoderBlock,
      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **args)
  model.load_state_dict(torch.load(out, weights_only=True), strict=True)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("problem", ["no_checkpoint", "unknown_arch", "no_output_dir"])
def test_bad_input_is_one_line(official_tiny, tmp_path, capsys, problem):
  sd = official_state_dict(official_tiny)
  cfg = models.resolve(convert_torch.infer_model_config(sd, heads=HEADS))
  checkpoint, out = str(tmp_path / "ckpt"), str(tmp_path / "x.pth")
  if problem == "no_checkpoint":
    checkpoint = str(tmp_path / "nothing_here")
  else:
    model = dict(cfg, arch="resnet") if problem == "unknown_arch" else cfg
    checkpoints.save_params(checkpoint, convert_torch.torch_to_flax(sd, cfg),
                            {"model": model, "task": "pretrain"})
    if problem == "no_output_dir":
      out = str(tmp_path / "missing" / "x.pth")
  capsys.readouterr()
  assert export_torch.main(["--checkpoint", checkpoint, "--output", out]) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("export_torch: error:"), lines
  word = {"no_checkpoint": "does not exist", "unknown_arch": "resnet",
          "no_output_dir": "missing"}[problem]
  assert word in lines[0]
  assert not os.path.exists(out)
