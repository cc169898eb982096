"""The official-checkpoint converter, end to end and on malformed input."""
import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_mae_jax.training import checkpoints
from crate_mae_jax.tools import convert_torch
from crate_mae_jax import models

import reference_numpy as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = 4


def official_state_dict(official_tiny) -> dict:
  return {k[len("sd/"):]: v for k, v in official_tiny.items() if k.startswith("sd/")}


def subprocess_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def check_against_fixture(official_tiny, params, cfg):
  """Both fixture forward passes with `params` give the official outputs."""
  model = models.build_mae(cfg)
  images = jnp.asarray(official_tiny["imgs_nchw"].transpose(0, 2, 3, 1))
  noise = jnp.asarray(official_tiny["noise"])
  for tag, ratio in (("full", 0.0), ("masked", 0.75)):
    out = model.apply({"params": params}, images, mask_ratio=ratio, noise=noise)
    for key in ("latent", "pred"):
      err = ref.rel_err(out[key], official_tiny[f"{tag}/{key}"])
      assert err < 1e-4, f"{tag}/{key}: relative error {err:.3g}"
    np.testing.assert_array_equal(np.asarray(out["mask"]), official_tiny[f"{tag}/mask"])
    np.testing.assert_array_equal(np.asarray(out["ids_restore"]),
                                  official_tiny[f"{tag}/ids_restore"])
  expected = float(official_tiny["masked/loss"])
  assert abs(float(out["loss"]) - expected) < 1e-4 * expected


def assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------- numpy-only paths
def test_converted_tree_fits_the_model(official_tiny):
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  params = convert_torch.torch_to_flax(sd, cfg)
  abstract = models.abstract_params(cfg, image_size=32)
  checkpoints.check_compatible(params, abstract, where="test")
  assert models.count_params(params) == models.count_params(abstract)
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == np.float32
  # pos tables and the never-called decoder_embed are dropped, everything else used
  used = sum(v.size for k, v in sd.items() if k not in convert_torch.IGNORED)
  assert models.count_params(params) == used


def test_infer_model_config_without_heads_needs_a_named_width(official_tiny):
  sd = official_state_dict(official_tiny)
  with pytest.raises(convert_torch.ConversionError, match="--heads"):
    convert_torch.infer_model_config(sd)


def test_not_a_crate_mae_state_dict():
  with pytest.raises(convert_torch.ConversionError, match="patch_embed.proj.weight"):
    convert_torch.infer_model_config({"head.weight": np.zeros((2, 2))}, heads=1)


def test_refusal_names_every_bad_key(official_tiny):
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  bad = dict(sd)
  del bad["blocks.1.layers.0.1.fn.weight"]
  bad["blocks.0.layers.0.2.fn.weight"] = np.zeros((64, 64), np.float32)
  bad["decoder_pred.bias"] = np.zeros((47,), np.float32)
  with pytest.raises(convert_torch.ConversionError) as info:
    convert_torch.torch_to_flax(bad, cfg)
  message = str(info.value)
  assert "blocks.1.layers.0.1.fn.weight" in message      # missing
  assert "blocks.0.layers.0.2.fn.weight" in message      # unexpected
  assert "decoder_pred.bias" in message and "(47,)" in message and "(48,)" in message
  assert message.index("missing") < message.index("blocks.1.layers.0.1.fn.weight")
  assert message.index("unexpected") < message.index("blocks.0.layers.0.2.fn.weight")
  assert "\n" not in message


def test_refuses_a_foreign_position_table(official_tiny):
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  sd["pos_embed"] = sd["pos_embed"] + 0.5
  with pytest.raises(convert_torch.ConversionError, match="pos_embed"):
    convert_torch.torch_to_flax(sd, cfg)


def test_refuses_heads_that_do_not_divide_the_width(official_tiny):
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=5)
  with pytest.raises(ValueError, match="heads"):
    convert_torch.torch_to_flax(sd, cfg)


def test_one_head_expects_no_output_projection(official_tiny):
  """Official one-head attention has no `to_out` (nn.Identity): a checkpoint that
  has one is not a one-head model, and --heads 1 is refused naming those keys."""
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=1)
  with pytest.raises(convert_torch.ConversionError, match=r"unexpected \[.*to_out\.0\.weight"):
    convert_torch.torch_to_flax(sd, cfg)
  no_out = {k: v for k, v in sd.items() if ".to_out." not in k}
  params = convert_torch.torch_to_flax(no_out, cfg)
  out = params["encoder"]["layer_0"]["mssa"]["out"]
  np.testing.assert_array_equal(out["kernel"].reshape(64, 64), np.eye(64))
  np.testing.assert_array_equal(out["bias"], 0)


def test_unwrap_numpy_state_dicts(official_tiny):
  sd = official_state_dict(official_tiny)
  for wrapped in (sd, {"model": sd, "epoch": 3}, {"state_dict": sd},
                  {f"module.{k}": v for k, v in sd.items()},
                  {"model": {f"module.{k}": v for k, v in sd.items()}}):
    out = convert_torch.unwrap_state_dict(wrapped)
    assert sorted(out) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(out[k], sd[k])


# --------------------------------------------------------------------- .pth files
@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def save_pth(torch, path, obj):
  torch.save(obj, path)
  return str(path)


def torch_state_dict(torch, official_tiny):
  return {k: torch.from_numpy(np.array(v)) for k, v in official_state_dict(official_tiny).items()}


@pytest.mark.slow
def test_cli_subprocess_end_to_end(torch, official_tiny, official_tiny_pth, tmp_path):
  out_dir = tmp_path / "converted"
  proc = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.tools.convert_torch", "--checkpoint",
       str(official_tiny_pth), "--output", str(out_dir), "--heads", str(HEADS)],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout
  params, meta = checkpoints.restore_params(str(out_dir))
  assert meta["model"]["heads"] == HEADS and meta["model"]["width"] == 64
  assert meta["model"]["depth"] == 2 and meta["model"]["decoder_depth"] == 2
  assert meta["task"] == "pretrain"
  cfg = convert_torch.infer_model_config(official_state_dict(official_tiny), heads=HEADS)
  check_against_fixture(official_tiny, params, cfg)
  # restoring onto an abstract target checks the structure on the way in
  target = models.abstract_params(cfg, image_size=32)
  params2, _ = checkpoints.restore_params(str(out_dir), target=target)
  assert_same_tree(params, params2)


def test_cli_main_in_process(torch, official_tiny, official_tiny_pth, tmp_path, capsys):
  out_dir = tmp_path / "converted"
  code = convert_torch.main(["--checkpoint", str(official_tiny_pth), "--output",
                             str(out_dir), "--heads", str(HEADS), "--ista_lambda", "0.5"])
  assert code == 0
  assert "wrote" in capsys.readouterr().out
  params, meta = checkpoints.restore_params(str(out_dir))
  assert meta["model"]["ista_lambda"] == 0.5 and meta["model"]["ista_step"] == 0.1
  sd = official_state_dict(official_tiny)
  cfg = convert_torch.infer_model_config(sd, heads=HEADS)
  check_against_fixture(official_tiny, params, cfg)
  assert_same_tree(params, convert_torch.torch_to_flax(sd, cfg))
  # a target of another model is refused with the differing entries named
  deeper = convert_torch.infer_model_config(sd, heads=HEADS, depth=3)
  with pytest.raises(checkpoints.CheckpointError, match="layer_2"):
    checkpoints.restore_params(str(out_dir), target=models.abstract_params(deeper, 32))


@pytest.mark.parametrize("wrapping", ["top_level", "model", "state_dict", "module_prefix",
                                      "model_module_prefix", "mae_training_checkpoint"])
def test_pth_wrappings(torch, official_tiny, tmp_path, wrapping):
  sd = torch_state_dict(torch, official_tiny)
  prefixed = {f"module.{k}": v for k, v in sd.items()}
  obj = {"top_level": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd},
         "module_prefix": prefixed, "model_module_prefix": {"model": prefixed},
         # what the MAE training code (used for CRATE-MAE) saves: includes the
         # run's argparse.Namespace, which a weights-only load must accept
         "mae_training_checkpoint": {
             "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
             "epoch": 399, "scaler": {"scale": 65536.0},
             "args": argparse.Namespace(model="mae_crate_base", mask_ratio=0.75)},
         }[wrapping]
  path = save_pth(torch, tmp_path / "ckpt.pth", obj)
  loaded = convert_torch.load_torch_state_dict(path)
  expected = official_state_dict(official_tiny)
  assert sorted(loaded) == sorted(expected)
  for k, v in expected.items():
    assert loaded[k].dtype == v.dtype
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_pth_with_prefix_converts_to_the_same_params(torch, official_tiny, tmp_path):
  sd = torch_state_dict(torch, official_tiny)
  path = save_pth(torch, tmp_path / "ckpt.pth",
                  {"state_dict": {f"module.{k}": v for k, v in sd.items()}})
  out_dir = tmp_path / "converted"
  assert convert_torch.main(["--checkpoint", path, "--output", str(out_dir),
                             "--heads", str(HEADS)]) == 0
  params, _ = checkpoints.restore_params(str(out_dir))
  expected = official_state_dict(official_tiny)
  assert_same_tree(params, convert_torch.torch_to_flax(
      expected, convert_torch.infer_model_config(expected, heads=HEADS)))


def bad_pth(torch, official_tiny, tmp_path):
  sd = torch_state_dict(torch, official_tiny)
  del sd["norm.bias"]                                          # missing
  sd["decoder_blocks.0.layers.0.2.fn.weight"] = torch.zeros(64, 64)  # unexpected
  sd["mask_token"] = torch.zeros(1, 1, 32)                     # wrong shape
  return save_pth(torch, tmp_path / "bad.pth", {"model": sd})


BAD_KEYS = ("norm.bias", "decoder_blocks.0.layers.0.2.fn.weight", "mask_token")


def test_convert_refuses_bad_pth(torch, official_tiny, tmp_path):
  path = bad_pth(torch, official_tiny, tmp_path)
  with pytest.raises(convert_torch.ConversionError) as info:
    convert_torch.convert(path, str(tmp_path / "out"), heads=HEADS)
  for key in BAD_KEYS:
    assert key in str(info.value)
  assert not (tmp_path / "out").exists()


def test_cli_refusal_in_process(torch, official_tiny, tmp_path, capsys):
  path = bad_pth(torch, official_tiny, tmp_path)
  code = convert_torch.main(["--checkpoint", path, "--output", str(tmp_path / "out"),
                             "--heads", str(HEADS)])
  assert code == 2
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip()]
  assert len(lines) == 1, captured.err
  for key in BAD_KEYS:
    assert key in lines[0]
  assert "Traceback" not in captured.err
  assert not (tmp_path / "out").exists()


def test_cli_refusal_subprocess_exit_code(torch, official_tiny, tmp_path):
  path = bad_pth(torch, official_tiny, tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.tools.convert_torch", "--checkpoint", path,
       "--output", str(tmp_path / "out"), "--heads", str(HEADS)],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("convert_torch:")
  for key in BAD_KEYS:
    assert key in lines[0]


@pytest.mark.parametrize("problem", ["missing_file", "not_a_checkpoint", "bad_heads"])
def test_cli_other_errors_are_one_line(torch, official_tiny_pth, tmp_path, capsys, problem):
  checkpoint, heads = str(official_tiny_pth), "4"
  if problem == "missing_file":
    checkpoint = str(tmp_path / "nope.pth")
  elif problem == "not_a_checkpoint":
    checkpoint = str(tmp_path / "junk.pth")
    with open(checkpoint, "wb") as f:
      f.write(b"this is not a pickle")
  else:
    heads = "5"
  code = convert_torch.main(["--checkpoint", checkpoint, "--output",
                             str(tmp_path / "out"), "--heads", heads])
  assert code == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("convert_torch:"), lines
