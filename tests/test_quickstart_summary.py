"""The quick start's summary: like with like (each layer named), one sentence of what
the numbers mean, and every printed number in summary.json."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import TINY_QUICKSTART_SCRIPT
from crate_mae_jax.tools import quickstart


def _summary(pixels: float) -> dict:
  pre = {"cls/layer_00": 0.60, "cls/layer_01": 0.71, "cls/final": 0.66, "cls/best": 0.71,
         "mean/layer_00": 0.65, "mean/layer_01": 0.69, "mean/final": 0.70, "mean/best": 0.70}
  rand = {"cls/layer_00": 0.63, "cls/layer_01": 0.58, "cls/final": 0.55, "cls/best": 0.63,
          "mean/layer_00": 0.66, "mean/layer_01": 0.64, "mean/final": 0.62, "mean/best": 0.66}
  s = {"train_images": 5000, "test_images": 1000, "minutes": 3.4, "devices": 1,
       "backend": "cpu", "norm_pix_loss": True, "masked_mse": 0.6031, "trivial_mse": 0.6492,
       "trivial_predicts": "each patch's own mean", "knn_k": 20,
       "knn": quickstart.compare(pre, rand),
       "ridge_probe": quickstart.compare(dict(pre, **{"mean/final": 0.72}), rand),
       "linear_probe_pool": "mean", "linear_probe_top1": 0.596, "pixels_per_image": 784,
       "raw_pixels_top1": pixels,
       "paths": {"summary": "/w/summary.json", "checkpoint": "/w/pretrain/checkpoints",
                 "tensorboard": "/w", "reconstructions": "/w/pretrain/reconstruction.png"}}
  s["pixels_minus_best_features_points"] = quickstart.pixel_gap(s)
  s["verdict"] = quickstart.verdict(s)
  return s


def test_pretrained_and_random_are_compared_at_the_same_layer():
  knn = _summary(0.825)["knn"]
  assert knn["layer"] == "cls/layer_01" and knn["pretrained"] == 0.71
  assert knn["random_init_same_layer"] == 0.58 and knn["gain_points"] == 13.0
  # the random encoder at its own best layer is shown too, and named
  assert (knn["random_init_best_layer"], knn["random_init_best"]) == ("mean/layer_00", 0.66)
  lines = quickstart.report(_summary(0.825))
  knn_line = next(line for line in lines if "k-NN" in line)
  assert "cls token after block 2" in knn_line and "mean-pooled after block 1" in knn_line
  assert any("ridge probe, mean-pooled encoder output" in line for line in lines)


def test_the_summary_ends_in_one_sentence_that_follows_the_numbers():
  below = _summary(0.825)
  assert below["pixels_minus_best_features_points"] == 10.5  # 82.5 - 72.0 (ridge, final)
  sentence = below["verdict"]
  assert sentence.count(". ") == 0 and sentence.endswith(".")
  assert "+13.0 points of k-NN" in sentence and "10.5 points below" in sentence
  assert "do not make features better than pixels" in sentence
  above = _summary(0.70)
  assert "beat a linear classifier on the raw pixels by 2.0 points" in above["verdict"]
  assert quickstart.report(below)[-5].strip() == sentence  # before the paths


def _numbers(value) -> set[str]:
  """Every way the report may print a number of summary.json."""
  out = set()
  if isinstance(value, dict):
    for v in value.values():
      out |= _numbers(v)
  elif isinstance(value, str):
    out |= set(re.findall(r"\d+(?:\.\d+)?", value))  # numbers inside the verdict, layer keys
    out |= {str(int(n) + 1) for n in re.findall(r"layer_(\d+)", value)}  # 'after block N'
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    out |= {f"{value}", f"{value:.1f}", f"{value:.4f}", f"{100 * value:.1f}", f"{value:,}"}
  return out


def _printed_numbers(lines: list[str]) -> list[str]:
  text = "\n".join(line for line in lines if "/" not in line.split(":")[0] and
                   not line.lstrip().startswith(("numbers:", "checkpoint:", "TensorBoard:",
                                                 "reconstructions:")))
  return re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", text)


def test_every_printed_number_is_in_summary_json():
  s = _summary(0.825)
  known = _numbers(json.loads(json.dumps(s)))
  printed = _printed_numbers(quickstart.report(s))
  assert printed and not [n for n in printed if n not in known], printed


@pytest.mark.slow
def test_quickstart_writes_what_it_prints(tmp_path):
  """The quick start at a tiny size: summary.json holds every number on the console."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", TINY_QUICKSTART_SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(tmp_path / "summary.json"))
  start = proc.stdout.index("CRATE-MAE quick start")
  lines = proc.stdout[start:].strip().splitlines()
  assert lines[-5].strip() == summary["verdict"]
  printed = _printed_numbers(lines)
  assert printed and not [n for n in printed if n not in _numbers(summary)], printed
  # the console has no config dump or parameter table; the workdir has both
  assert "[Hyperparameters]" not in proc.stderr and "hparams:" not in proc.stderr
  assert "+-" not in proc.stderr and "| Name" not in proc.stderr
  for d in ("pretrain", "linear_probe"):
    assert (tmp_path / d / "params.txt").read_text().count("encoder") > 0
    assert "encoder_sees" not in (tmp_path / d / "config.json").read_text()
