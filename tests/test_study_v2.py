"""The multi-seed study driver (experiments/study_v2) and its report, on CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import study_v2, study_v2_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_list_puts_every_first_seed_first():
  runs = study_v2.run_list(["a", "b"], [0, 1], supervised=["b"], pixel_floor=True)
  assert runs == ["mae-a-s0", "mae-b-s0", "supervised-b-s0", "pixel_floor",
                  "mae-a-s1", "mae-b-s1", "supervised-b-s1"]
  assert study_v2.parse_run("mae-crate_mae_lam0.5-s2") == ("mae", "crate_mae_lam0.5", 2)
  assert study_v2.parse_run("pixel_floor") == ("pixel_floor", None, None)


def test_claim_is_exclusive_per_launch(tmp_path):
  assert study_v2.claim(str(tmp_path), "mae-a-s0", "launch_1")
  assert not study_v2.claim(str(tmp_path), "mae-a-s0", "launch_1")
  assert study_v2.claim(str(tmp_path), "mae-a-s0", "launch_2")   # a new launch resumes


def test_variant_config_sets_lambda_seed_and_epochs():
  cfg = study_v2.variant_config("pretrain", "crate_mae_lam5", 2, 10.0, {}, 60_000, 2)
  assert cfg.model.ista_lambda == 5.0 and cfg.seed == 2 and cfg.num_epochs == 10.0
  assert cfg.optim.warmup_epochs == pytest.approx(0.5)      # 5 of 100, scaled
  assert cfg.eval_every_steps == int(np.ceil(10 * 60_000 / 512 / 2))
  matched = study_v2.variant_config("supervised", "vit_mae_matched", 0, 5.0, {}, 60_000, 2)
  assert matched.model.width == 96 and matched.task == "finetune" and not matched.init_from
  assert study_v2.variant_config("pretrain", "vit_mae_all", 0, 1.0, {}, 100,
                                 1).model.encoder_sees == "all"


def _layered(base: float, depth: int = 2) -> dict:
  out = {}
  for pool, shift in (("cls", 0.0), ("mean", 0.02)):
    values = [base + shift + 0.01 * i for i in range(depth + 1)]
    names = [f"layer_{i:02d}" for i in range(depth)] + ["final"]
    out.update({f"{pool}/{n}": v for n, v in zip(names, values)})
    out[f"{pool}/best"] = max(values)
  return out


def _fake_run(variant: str, seed: int, trained: float, random: float, ft: float) -> dict:
  wb = lambda start: {f"mask_{r:g}": {f"encoder/coding_rate/layer_{i:02d}": start - 10 * i
                                      for i in range(2)} | {
                                          f"encoder/sparsity/layer_{i:02d}": 0.5
                                          for i in range(2)}
                      for r in (0.0, 0.75)}
  crate = variant.startswith("crate")
  return {"kind": "mae", "variant": variant, "seed": seed, "name": f"mae-{variant}-s{seed}",
          "params": {"encoder": 100}, "environment": {"device_kind": "cpu"},
          "random_init": {"knn": _layered(random), "linear_probe": _layered(random),
                          "white_box": wb(50.0) if crate else {}},
          "pretrained": {"knn": _layered(trained), "linear_probe": _layered(trained),
                         "white_box": wb(80.0) if crate else {}},
          "finetune": {"results": {"top1": ft}}, "pretrain": {"results": {"loss": 0.2}}}


def test_report_aggregates_seeds_and_answers(tmp_path):
  runs = [_fake_run("crate_mae_lam0.5", s, 0.80 + 0.01 * s, 0.70, 0.90) for s in (0, 1)]
  runs += [_fake_run("vit_mae_matched", s, 0.75, 0.74, 0.88 + 0.01 * s) for s in (0, 1)]
  runs.append({"kind": "supervised", "variant": "vit_mae_matched", "seed": 0,
               "name": "supervised-vit_mae_matched-s0",
               "supervised": {"results": {"top1": 0.87}}})
  for run in runs:
    os.makedirs(tmp_path / "runs" / run["name"])
    with open(tmp_path / "runs" / run["name"] / "results.json", "w") as f:
      json.dump(run, f)
  study = study_v2_report.report(str(tmp_path), str(tmp_path / "docs"))
  crate = study["aggregate"]["mae"]["crate_mae_lam0.5"]
  assert crate["knn_best/pretrained"]["mean"] == pytest.approx(0.845)   # mean pool, final layer
  assert crate["knn_best/pretrained"]["sd"] == pytest.approx(0.01 / np.sqrt(2))
  assert crate["knn_gap_best"]["mean"] == pytest.approx(0.845 - 0.74)
  answers = open(tmp_path / "docs" / "answers.md").read()
  assert "CRATE-MAE λ=0.5 vs the parameter-matched ViT-MAE" in answers
  assert "(goal ≥ 5: met)" in answers and "(goal ≥ 5: missed)" in answers
  assert "80.0 (layer 0) → 70.0 (layer 1)" in answers and "falls with depth" in answers
  for name in ("layerwise_readout.png", "white_box.png"):
    image = np.asarray(Image.open(tmp_path / "docs" / name).convert("L"), np.float32)
    assert image.std() > 5, name


ARGS = ["--tiny", "--data_source=quickstart", "--max_examples=256", "--pretrain_epochs=0.5",
        "--finetune_epochs=0.5", "--pixel_floor_epochs=1", "--seeds=0",
        "--variants=crate_mae_lam0.5,vit_mae_matched", "--supervised=vit_mae_matched",
        "--max_train=256", "--diag_images=16", "--evals=1", "--workers=2", "--deadline_s=900"]


@pytest.mark.slow
def test_two_workers_end_to_end_resume_and_report(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, "-m", "experiments.study_v2", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd + ARGS, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected = ["mae-crate_mae_lam0.5-s0", "mae-vit_mae_matched-s0",
              "supervised-vit_mae_matched-s0", "pixel_floor"]
  paths = [tmp_path / "runs" / n / "results.json" for n in expected]
  assert all(p.exists() for p in paths)
  logs = [open(tmp_path / f"worker_{i}.log").read() for i in range(2)]
  assert all("done in" in log for log in logs)       # both workers took runs
  crate = json.load(open(paths[0]))
  assert set(crate["pretrained"]["white_box"]) == {"mask_0", "mask_0.75"}
  assert "mean/layer_01" in crate["random_init"]["knn"]
  assert crate["finetune"]["results"]["top1"] > 0
  mtimes = [p.stat().st_mtime for p in paths]
  proc = subprocess.run(cmd + ARGS, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [p.stat().st_mtime for p in paths] == mtimes   # finished runs are skipped
  proc = subprocess.run(cmd + ["--report_only", f"--docs={tmp_path / 'docs'}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = open(tmp_path / "docs" / "study2.md").read()
  assert "Runs finished: 4 of 4" in text and "raw pixels" in text
