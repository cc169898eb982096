"""The issue-8 study driver (experiments.study) and its config, on CPU.

One end-to-end run of the CLI in a subprocess: tiny models (width 32, depth 2),
the Fashion-MNIST subset shipped in the package (512 train / 1,000 test),
scale 0.01 (a few steps per stage), one evaluation per run. Checks study.json,
study.md, the figures, that no TensorFlow was imported, that the report can be
rebuilt from the folder and that finished stages are not run again.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crate_mae_jax import config_lib, models
from experiments import study

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ("--data_source=quickstart", "--tiny", "--scale=0.01", "--max_examples=512",
        "--evals=1", "--diag_images=16", "--figure_images=4")


def _config_module():
  return study.load_config_module(str(ROOT / "configs" / "fashion_mnist.py"))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("task", ["pretrain", "linear_probe", "finetune"])
@pytest.mark.parametrize("arch", ["crate_mae", "vit_mae"])
def test_config_same_size_for_both_archs(task, arch, tmp_path):
  c = _config_module().get_config(f"{task},{arch}")
  c.data.path = str(tmp_path)            # validate() wants an existing folder
  if task != "pretrain":
    c.init_from = str(tmp_path)
  r = config_lib.validate(c)
  assert (r["arch"], r["width"], r["depth"], r["heads"], r["patch_size"], r["channels"]) == (
      arch, 192, 6, 6, 4, 1)
  assert (r["decoder_width"], r["decoder_depth"], r["decoder_heads"]) == (192, 6, 6)
  assert (r["dtype"], r["param_dtype"]) == ("bfloat16", "float32")
  assert c.data.source == "fashion_mnist" and c.data.image_size == 28 and c.data.in_memory
  assert c.batch_size == 512 and c.data.num_classes == 10 and not c.keep_best
  assert c.num_epochs == {"pretrain": 100, "linear_probe": 20, "finetune": 10}[task]
  steps = math.ceil(c.num_epochs * 60_000 / 512)
  assert c.eval_every_steps * 4 >= steps and c.log_every_steps >= 1
  if task == "linear_probe":
    assert c.probe.pool == "mean" and c.probe.head_norm and c.optim.name == "adamw"
  if task == "finetune":
    assert c.optim.layer_decay and c.augment.mixup == 0 and c.augment.randaugment_layers == 0
    assert c.finetune.pool == "mean" and c.model.drop_path > 0


def test_default_config_reads_debian_fashion_mnist():
  c = _config_module().get_config()
  assert c.task == "pretrain" and c.model.arch == "crate_mae"
  assert c.data.path == "/usr/share/datasets/fashion-mnist"


def test_param_counts_match_the_documented_ones():
  cfg = _config_module().get_config("pretrain,crate_mae")
  crate = study.param_counts(cfg.model, 28)
  vit = study.param_counts(_config_module().get_config("pretrain,vit_mae").model, 28)
  assert crate["encoder"] == 673_344 and vit["encoder"] == 2_673_024
  assert crate["total"] == crate["encoder"] + crate["decoder"]
  assert round(crate["total"] / 1e6, 2) == 1.35 and round(vit["total"] / 1e6, 2) == 5.38


def test_baseline_configs():
  """Mask tokens in the ViT-MAE encoder; a ViT-MAE parameter-matched to CRATE-MAE
  (within 1 %); supervised training = the fine-tuning recipe from scratch."""
  module = _config_module()
  crate = study.param_counts(module.get_config("pretrain,crate_mae").model, 28)
  matched_cfg = module.get_config("pretrain,vit_mae_matched")
  matched = study.param_counts(matched_cfg.model, 28)
  r = models.resolve(matched_cfg.model)
  assert (r["depth"], r["patch_size"], r["width"], r["heads"]) == (6, 4, 96, 6)
  assert r["width"] % r["heads"] == 0 and r["encoder_sees"] == "visible"
  assert matched["encoder"] == 672_960 and matched["total"] == 1_355_152
  assert abs(matched["encoder"] / crate["encoder"] - 1) < 0.01
  assert abs(matched["total"] / crate["total"] - 1) < 0.01
  everything = module.get_config("pretrain,vit_mae_all")
  assert everything.model.encoder_sees == "all" and everything.model.width == 192
  assert study.param_counts(everything.model, 28)["encoder"] == 2_673_216
  sup = module.get_config("supervised,vit_mae_matched")
  fine = module.get_config("finetune,vit_mae_matched")
  assert sup.task == "finetune" and sup.init_from is None
  assert sup.to_dict() == fine.to_dict()


def test_study_config_scales_every_epoch_count():
  base = _config_module().get_config("finetune,vit_mae")
  c = study.study_config("finetune", "vit_mae", scale=0.1, data_source="quickstart",
                         tiny=True, max_examples=300, num_train_examples=300, evals=2)
  assert c.num_epochs == pytest.approx(0.1 * base.num_epochs)
  assert c.optim.warmup_epochs == pytest.approx(0.1 * base.optim.warmup_epochs)
  assert c.data.source == "quickstart" and c.data.path is None and c.data.max_examples == 300
  r = models.resolve(c.model)
  assert (r["width"], r["depth"], r["decoder_width"], r["dtype"]) == (32, 2, 32, "float32")
  steps = math.ceil(c.num_epochs * 300 / c.batch_size)
  assert c.eval_every_steps == math.ceil(steps / 2)


def test_recording_writer_records_and_forwards():
  from crate_mae_jax.training import summaries
  writer = study.RecordingWriter(summaries.LoggingWriter(None))
  writer.write_scalars(3, {"train/loss": 0.5})
  writer.write_scalars(6, {"train/loss": 0.25, "eval/loss": 0.3})
  writer.flush()
  assert writer.scalars == {"train/loss": [[3, 0.5], [6, 0.25]], "eval/loss": [[6, 0.3]]}


@pytest.mark.slow
def test_run_stage_records_the_learning_rate(tmp_path):
  """The steps log 'train/learning_rate'; the stage's 'lr' series is read from it."""
  cfg = study.study_config("pretrain", "crate_mae", scale=0.01, data_source="quickstart",
                           tiny=True, max_examples=256, num_train_examples=256, evals=1)
  stage = study.run_stage(cfg, str(tmp_path / "pre"), num_train=256)
  assert stage["lr"] and len(stage["lr"]) == len(stage["train_loss"])
  assert all(np.isfinite(v) and v >= 0 for _, v in stage["lr"])
  assert stage["lr"] == json.load(open(tmp_path / "pre" / "scalars.json"))[study.LEARNING_RATE]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("study")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "experiments.study", f"--workdir={workdir}",
                         *ARGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(workdir / "study.json") as f:
    return workdir, json.load(f), proc.stdout


def _non_blank(path, min_side: int = 60) -> None:
  assert os.path.isfile(path), path
  image = np.asarray(Image.open(path).convert("RGB"), np.float32)
  assert min(image.shape[:2]) >= min_side, (path, image.shape)
  assert image.std() > 5.0, f"{path} looks blank"
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 8, f"{path} has almost no colours"


@pytest.mark.slow
def test_study_json(study_run):
  workdir, s, _ = study_run
  assert list(s["archs"]) == ["crate_mae", "vit_mae"]
  assert s["protocol"]["num_train"] == 512 and s["protocol"]["num_test"] == 1000
  assert s["environment"]["tensorflow_imported"] is False
  for arch, a in s["archs"].items():
    assert a["params"]["encoder"] > 0 and a["params"]["total"] > a["params"]["encoder"]
    assert a["model"]["width"] == 32 and a["model"]["decoder_width"] == 32
    pre = a["stages"]["pretrain"]
    assert pre["steps"] == 8 and np.isfinite(pre["results"]["loss"])
    assert len(pre["train_loss"]) >= 2 and len(pre["eval_loss"]) == 1
    assert all(np.isfinite(v) for _, v in pre["train_loss"])
    for task in ("linear_probe", "finetune"):
      stage = a["stages"][task]
      assert 0.0 <= stage["results"]["top1"] <= 1.0 and stage["steps"] >= 1
      assert stage["train_loss"]
    init, trained = a["diagnostics"]["init"], a["diagnostics"]["pretrained"]
    assert np.isfinite(init["masked_mse"]) and np.isfinite(trained["masked_mse"])
    assert init["masked_mse"] != trained["masked_mse"]   # the pre-training changed the model
    if arch == "crate_mae":
      for d in (init, trained):
        enc = d["layerwise"]["encoder"]
        assert len(enc["coding_rate"]["mean"]) == 2 and len(enc["sparsity"]["mean"]) == 2
        assert all(0.0 <= v <= 1.0 for v in enc["sparsity"]["mean"])
        assert all(v > 0 for v in enc["coding_rate"]["mean"])
    else:
      assert "layerwise" not in init and "layerwise" not in trained
  floor = s["pixel_floor"]
  assert 0.3 < floor["test_accuracy"] <= 1.0 and floor["num_train"] == 512
  assert floor["params"] == 28 * 28 * 10 + 10


@pytest.mark.slow
def test_study_table(study_run):
  workdir, s, stdout = study_run
  table = (workdir / "study.md").read_text()
  assert table == s["table"] and table.strip() in stdout
  assert "| model | params: encoder / MAE total | pre-train eval loss (masked MSE) |" in table
  crate = s["archs"]["crate_mae"]
  row = next(line for line in table.splitlines() if line.startswith("| CRATE-MAE |"))
  assert f"{crate['params']['encoder']:,} / {crate['params']['total']:,}" in row
  assert f"{100 * crate['stages']['linear_probe']['results']['top1']:.2f}%" in row
  assert f"{100 * crate['stages']['finetune']['results']['top1']:.2f}%" in row
  assert any(line.startswith("| ViT-MAE |") for line in table.splitlines())
  floor = next(line for line in table.splitlines() if line.startswith("| raw pixels"))
  assert f"{100 * s['pixel_floor']['test_accuracy']:.2f}%" in floor
  assert "## Layer-wise compression and sparsity: CRATE-MAE" in table


@pytest.mark.slow
def test_study_figures(study_run):
  workdir, s, _ = study_run
  _non_blank(workdir / "loss_curves.png")
  for name in ("layerwise.png", "layerwise_init.png", "layerwise_pretrained.png",
               "reconstruction.png", "attention.png", "pca.png"):
    _non_blank(workdir / "crate_mae" / name)
  for name in ("reconstruction.png", "attention.png", "pca.png"):
    _non_blank(workdir / "vit_mae" / name)
  assert not (workdir / "vit_mae" / "layerwise.png").exists()
  # attention: image column + one column per head (2 heads), 4 rows
  attention = Image.open(workdir / "vit_mae" / "attention.png")
  assert attention.width < attention.height


@pytest.mark.slow
def test_report_only_rebuilds_the_same_report(study_run):
  workdir, s, _ = study_run
  os.remove(workdir / "study.md")
  rebuilt = study.report(str(workdir))
  assert rebuilt["table"] == s["table"]
  assert (workdir / "study.md").read_text() == s["table"]


@pytest.mark.slow
def test_finished_stages_are_not_run_again(study_run):
  workdir, s, _ = study_run
  stage = study.run_stage(None, str(workdir / "vit_mae" / "finetune"))  # no config needed
  assert stage["results"] == s["archs"]["vit_mae"]["stages"]["finetune"]["results"]
