"""Readers of a workdir that a live run holds, and hostile inputs of the readers.

`crate-mae-eval` and `crate-mae-analyze` on a workdir whose run is writing it:
they read the newest complete, verified step (a step being deleted by the
run's retention, or not yet sealed, is passed over) without Orbax warnings, and
write nothing into that workdir.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import once_per_run, tiny_train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
        "--config.model.decoder_depth=2"]


def _train(out: pathlib.Path) -> None:
  from crate_mae_jax.training import train
  train.train_and_evaluate(tiny_train_config("pretrain", source="quickstart", keep_best=False),
                           str(out / "run"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny pre-training workdir with complete steps 2 and 4."""
  return once_per_run(tmp_path_factory, "readers_run", _train) / "run"


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _tool(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", f"crate_mae_jax.tools.{module}", *args],
                        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _listing(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _live_copy(trained, tmp_path) -> pathlib.Path:
  """A copy of the run as a reader of a live run finds it: the lock held, and a
  newer step 6 half gone (retention deletes it: no manifest, no Orbax metadata)."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  ckpt = workdir / "checkpoints"
  shutil.copytree(ckpt / "4", ckpt / "6")
  for rel in ("manifest.sha256.json", "_CHECKPOINT_METADATA", "meta/metadata"):
    (ckpt / "6" / rel).unlink()
  (ckpt / "8.orbax-checkpoint-tmp-1").mkdir()   # a save in progress
  return workdir


@pytest.mark.slow
def test_analyze_and_evaluate_on_a_live_workdir(trained, tmp_path):
  from crate_mae_jax.training import workdir_lock
  workdir = _live_copy(trained, tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  lock = workdir_lock.acquire(str(workdir))   # the "live run"
  try:
    assert workdir_lock.held(str(workdir))
    before = _listing(workdir)
    analysis = tmp_path / "analysis"
    proc = _tool("analyze", f"--checkpoint={workdir}", f"--output={analysis}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analyze: step 4," in proc.stdout, proc.stdout
    assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((analysis / "measures.json").read_text())["step"] == 4

    proc = _tool("evaluate", f"--config={ROOT / 'configs/quickstart.py'}", *TINY,
                 f"--checkpoint={workdir}", "--evals=knn", "--max_train=100", "--max_test=50",
                 cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-3000:]
    saved = json.loads((elsewhere / "evals_run_step_4.json").read_text())
    assert saved["evals"] == ["knn"] and "knn" in saved["results"]
    assert _listing(workdir) == before   # nothing written into the live workdir
  finally:
    lock.close()
  assert not workdir_lock.held(str(workdir))


def _params_checkpoint(root: pathlib.Path, steps=(2, 4)) -> pathlib.Path:
  """A params-only checkpoint root (as convert_torch writes) with the given steps."""
  import numpy as np
  from crate_mae_jax.training import checkpoints
  for step in steps:
    checkpoints.save_params(str(root), {"encoder": {"w": np.full(3, step, np.float32)}},
                            {"task": "pretrain"}, step=step)
  return root


def test_a_step_deleted_while_read_gives_the_next_newest(tmp_path, monkeypatch):
  """Retention deletes the picked step between the pick and the read of its arrays."""
  from crate_mae_jax.training import checkpoints, workdir_lock
  workdir = tmp_path / "run"
  _params_checkpoint(workdir / "checkpoints")
  real = checkpoints._restore_params_at   # pylint: disable=protected-access
  deleted = []

  def delete_then_read(directory, step, target):
    if not deleted:
      deleted.append(step)
      shutil.rmtree(os.path.join(directory, str(step)))
    return real(directory, step, target)

  monkeypatch.setattr(checkpoints, "_restore_params_at", delete_then_read)
  lock = workdir_lock.acquire(str(workdir))
  try:
    params, meta, step = checkpoints.read(str(workdir))
  finally:
    lock.close()
  assert deleted == [4] and step == 2 and meta["task"] == "pretrain"
  assert float(params["encoder"]["w"][0]) == 2.0


def test_a_damaged_step_that_stays_is_still_named(tmp_path):
  """Not a deletion: the newest step is damaged and no run holds the workdir."""
  from crate_mae_jax.training import checkpoints
  root = _params_checkpoint(tmp_path / "ckpt")
  (root / "4" / "meta" / "metadata").write_text("{ not json")
  with pytest.raises(checkpoints.CheckpointError, match="step 4 is damaged"):
    checkpoints.read(str(root))


def test_study_and_report_files_redact_credentials(tmp_path):
  """The study drivers' JSON and Markdown go through `config_lib.redacted`."""
  from experiments import study_v2
  path = tmp_path / "run.json"
  study_v2._write_json(str(path), {"data_dir": "gs://user:PASSWORD@bucket/x"})  # pylint: disable=protected-access
  text = path.read_text()
  assert "PASSWORD" not in text and "gs://***@bucket/x" in text


def test_data_fields_the_source_does_not_read_are_warned_about_once(monkeypatch):
  from crate_mae_jax import config_lib, recipes
  monkeypatch.setattr(config_lib, "_WARNED_UNREAD", set())
  lines = []
  monkeypatch.setattr(config_lib.logging, "warning", lambda msg, *a: lines.append(msg % a))
  c = recipes.quickstart("pretrain")
  assert config_lib.warn_unread_data_fields(c) == [] and lines == []
  c.data.data_dir = "gs://user:PASSWORD@bucket/tfds"
  assert config_lib.warn_unread_data_fields(c) == ["data_dir"]
  assert config_lib.warn_unread_data_fields(c) == ["data_dir"]   # a second validate
  assert len(lines) == 1, lines
  assert "config.data.data_dir=" in lines[0] and "data.source='quickstart'" in lines[0]
  assert "data.path" in lines[0] and "PASSWORD" not in lines[0] and "***@bucket" in lines[0]
  t = recipes.quickstart("pretrain")
  t.data.update(source="tfds", name="cifar10", path="/data/images")
  assert config_lib.warn_unread_data_fields(t) == ["path"]
  assert "data.source='tfds'" in lines[-1] and len(lines) == 2


# ------------------------------------------------------------------ hostile data
def _main(*args, cwd=ROOT):
  env = dict(_env(), TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "crate_mae_jax.main",
                         "--config=configs/quickstart.py", *TINY, *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _npz(path, train_labels, images=None):
  import numpy as np
  n = len(train_labels)
  images = np.zeros((n, 28, 28), np.uint8) if images is None else images
  np.savez(path, train_images=images, train_labels=np.asarray(train_labels),
           test_images=np.zeros((4, 28, 28), np.uint8), test_labels=np.zeros(4, np.int64))
  return path


def test_negative_labels_in_arrays_are_refused_in_one_line(tmp_path):
  """A label -1 (e.g. 'unlabelled') would one-hot to zeros and train silently."""
  npz = _npz(tmp_path / "neg.npz", [0, 1, -1, 2] * 4)
  proc = _main(f"--workdir={tmp_path / 'run'}", "--config.data.source=arrays",
               f"--config.data.path={npz}", "--config.data.eval_split=test",
               "--config.num_train_steps=1")
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert "train_labels: label -1 is negative" in lines[0] and "Traceback" not in proc.stderr


def test_labels_are_class_indices(tmp_path):
  import numpy as np
  from crate_mae_jax.data import data_arrays
  assert data_arrays.check_labels(np.array([0., 2., 1.]), "y").dtype == np.int32
  for labels, message in [(np.eye(3), r"shape \(3, 3\).*argmax"),
                          (np.array([0.5, 1.0]), "non-integer"),
                          (np.array([0, 7]), "label 7 but config.data.num_classes=5"),
                          (np.array(["a", "b"]), "not an integer class index")]:
    with pytest.raises(ValueError, match=message):
      data_arrays.check_labels(labels, "y", num_classes=5)
  train = (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 9]))
  with pytest.raises(ValueError, match="train labels: label 9 but config.data.num_classes=3"):
    data_arrays.ArraySource(train, train, batch_size=2, seed=0, image_size=8, mean=(0.5,),
                            std=(0.5,), num_classes=3)
  with pytest.raises(ValueError, match=r"pixel values span \[-1, 300\]"):
    data_arrays.to_uint8(np.array([[-1.0, 300.0]]), "train images")


def _png(path, size=(8, 8)):
  from PIL import Image
  Image.new("L", size, 128).save(path, format="PNG")


def _folder_source(root, **kw):
  from crate_mae_jax import config_lib
  from crate_mae_jax.data import input_pipeline
  c = config_lib.default_config()
  c.data.update(source="image_folder", path=str(root), image_size=8, mean=(0.5,), std=(0.5,),
                **kw)
  return input_pipeline.create(c.data, c.augment, task="pretrain", batch_size=2, seed=0)


def test_image_folders_with_os_files_and_a_decompression_bomb(tmp_path, monkeypatch):
  """OS metadata files are not images; an image above PIL's pixel limit is a bad
  image (skipped and counted, or named with bad_images='fail'), not decoded."""
  from PIL import Image
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(5):
      _png(tmp_path / c / f"{i}.png")
  (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (tmp_path / "a" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")   # macOS resource fork
  (tmp_path / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
  (tmp_path / "b" / "desktop.ini").write_text("[.ShellClassInfo]")
  (tmp_path / "__MACOSX").mkdir()   # a class folder only by accident: holds no image
  _png(tmp_path / "b" / "bomb.png", (40, 40))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 1,600 px: above, yet below 2x
  src = _folder_source(tmp_path)
  assert src.class_names == ("a", "b") and src.num_classes == 2   # __MACOSX is no class
  assert src.stats["skipped_bad_images"] == 1
  assert src.num_train_examples + src.num_eval_examples == 10
  with pytest.raises(ValueError, match=r"bomb\.png: DecompressionBomb"):
    _folder_source(tmp_path, bad_images="fail")


def test_a_class_folder_linking_to_another_or_empty_is_no_class(tmp_path):
  from crate_mae_jax.data import tf_sources
  (tmp_path / "a").mkdir()
  for i in range(3):
    _png(tmp_path / "a" / f"{i}.png")
  (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
  (tmp_path / "c").mkdir()
  _png(tmp_path / "c" / "0.png")
  classes, per_class = tf_sources.class_files(str(tmp_path))
  assert classes == ["a", "c"] and [len(f) for f in per_class] == [3, 1]
  # An eval folder keeps the train classes' indices, even one it has no image of,
  # and ignores a folder without images.
  (tmp_path / "val" / "c").mkdir(parents=True)
  _png(tmp_path / "val" / "c" / "1.png")
  (tmp_path / "val" / "__MACOSX").mkdir()
  classes, per_class = tf_sources.class_files(str(tmp_path / "val"), ["a", "c"])
  assert classes == ["a", "c"] and [len(f) for f in per_class] == [0, 1]
  (tmp_path / "val" / "d").mkdir()
  _png(tmp_path / "val" / "d" / "2.png")
  with pytest.raises(ValueError, match=r"classes \['d'\] that the train folder lacks"):
    tf_sources.class_files(str(tmp_path / "val"), ["a", "c"])


# ------------------------------------------------------------------ the converter's inputs
def _convert(pth, out):
  return subprocess.run([sys.executable, "-m", "crate_mae_jax.tools.convert_torch",
                         f"--checkpoint={pth}", f"--output={out}", "--heads=4"],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def official_sd(official_tiny_pth):
  torch = pytest.importorskip("torch")
  sd = torch.load(official_tiny_pth, map_location="cpu", weights_only=True)
  return sd.get("model", sd)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "training_dict"])
def test_converter_reads_half_precision_and_a_training_checkpoint(official_sd, tmp_path,
                                                                  kind):
  """Weights saved in fp16/bf16 (pos_embed rounded), or a whole training checkpoint
  {'model', 'optimizer', 'epoch', 'scaler'}, convert to the same parameters."""
  import numpy as np
  import torch
  from crate_mae_jax.training import checkpoints
  if kind == "training_dict":
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    obj = {"model": official_sd, "optimizer": opt.state_dict(), "epoch": 3,
           "scaler": {"scale": 65536.0}}
  else:
    obj = {k: v.to(getattr(torch, kind)) for k, v in official_sd.items()}
  torch.save(obj, tmp_path / "in.pth")
  proc = _convert(tmp_path / "in.pth", tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-2000:]
  params, _ = checkpoints.restore_params(str(tmp_path / "out"))
  dictionary = np.asarray(params["encoder"]["layer_0"]["ista"]["dictionary"])
  reference = official_sd["blocks.0.layers.0.1.fn.weight"].float().numpy()
  np.testing.assert_allclose(dictionary, reference,
                             atol=0 if kind == "training_dict" else 1e-2 * np.abs(reference).max())


@pytest.mark.slow
def test_converter_refuses_a_vit_an_encoder_only_model_and_safetensors(official_sd, tmp_path):
  import torch
  vit = {"patch_embed.proj.weight": torch.zeros(32, 3, 4, 4), "cls_token": torch.zeros(1, 1, 32),
         "blocks.0.attn.qkv.weight": torch.zeros(96, 32),
         "blocks.0.mlp.fc1.weight": torch.zeros(128, 32)}
  encoder_only = {k: v for k, v in official_sd.items() if not k.startswith("decoder")}
  cases = {"vit.pth": (vit, "a ViT state dict (blocks.0.attn.qkv.weight)"),
           "enc.pth": (encoder_only, "no decoder_blocks.N weights")}
  for name, (sd, message) in cases.items():
    torch.save(sd, tmp_path / name)
    proc = _convert(tmp_path / name, tmp_path / f"out_{name}")
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  # A .safetensors file: without the safetensors package, PyTorch's own line names it;
  # with it, the file is read and this one holds no CRATE-MAE.
  header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
  (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header +
                                           b"\0" * 4)
  proc = _convert(tmp_path / "m.safetensors", tmp_path / "out_st")
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  import importlib.util
  expected = "patch_embed" if importlib.util.find_spec("safetensors") else "pip install safetensors"
  assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
  assert not (tmp_path / "out_st").exists()
