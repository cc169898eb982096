"""The quick start: pre-train, linear-probe and compare with raw pixels, on CPU.

    python -m crate_mae_jax.tools.quickstart [--workdir=workdirs/quickstart]

Runs `configs/quickstart.py` (a small CRATE-MAE on the Fashion-MNIST subset shipped
in the package), then its linear probe on the pre-trained encoder, then a linear
classifier on the raw pixels of the same images, and prints the accuracies, one
sentence of what they mean, and the paths of the checkpoint, the TensorBoard logs
and the reconstruction figure; every number printed is also in
`<workdir>/summary.json`. What shows that pre-training helped: the k-NN and ridge
probe of the pre-trained encoder at its best layer against the randomly initialised
encoder the run started from at that same layer, and the masked-patch MSE against
a trivial predictor.
"""
import json
import os
import time

from absl import flags, logging
import jax
import numpy as np

from crate_mae_jax import cli, recipes
from crate_mae_jax.analysis import pixel_floor
from crate_mae_jax.evaluators import features, reconstruction

KNN_K = 20   # neighbours of the k-NN readout
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's one flag, defined when the tool runs (not on import, so the
  summary functions below can be imported beside other tools' flags)."""
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", "workdirs/quickstart", "Where checkpoints and logs go.")


def _arrays(cfg, split: str):
  """Un-augmented, normalised images and labels of a split, via the eval path."""
  from crate_mae_jax.data import input_pipeline
  cfg = cfg.copy_and_resolve_references()
  cfg.data.eval_split = split
  source = input_pipeline.create(cfg.data, cfg.augment, task="linear_probe", batch_size=500,
                                 seed=cfg.seed)
  images, labels = [], []
  for batch in source.eval_batches():
    keep = np.asarray(batch["mask"]) > 0
    x = batch["image"]
    if source.device_augment is not None:
      x = source.device_augment(jax.random.key(0), x, False)
    images.append(np.asarray(x)[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels), source.num_classes


def reconstruction_figure(pre_cfg, workdir: str, resolved=None) -> str:
  """Writes original | masked | reconstruction | pasted-back for 8 test images."""
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax.analysis import diagnostics, figures
  from crate_mae_jax import models
  params, _ = checkpoints.restore_params(workdir)
  model = models.build_mae(pre_cfg.model if resolved is None else resolved)
  images, _, _ = _arrays(pre_cfg, pre_cfg.data.eval_split)
  images = images[:8]
  panels, _ = diagnostics.reconstruct(model, params, images, pre_cfg.model.mask_ratio,
                                     jax.random.key(0), pre_cfg.data.mean, pre_cfg.data.std)
  return figures.save_reconstruction(panels, os.path.join(workdir, "reconstruction.png"))


def learning_evidence(pre_cfg, pre_dir: str, resolved=None) -> dict:
  """The pre-trained encoder against the randomly initialised one it started from,
  under the same k-NN and ridge probe (every layer, best reported)."""
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax.tools import evaluate
  params, _ = checkpoints.restore_params(pre_dir)
  kinds = ["knn", "linear_probe"]
  random_init = evaluate.random_params(pre_cfg, resolved)
  return {"pretrained": evaluate.evaluate(pre_cfg, params, kinds, k=KNN_K, resolved=resolved),
          "random_init": evaluate.evaluate(pre_cfg, random_init, kinds, k=KNN_K,
                                           resolved=resolved)}


def _layer(key: str) -> str:
  """'cls/layer_02' -> 'cls token after block 3'; 'mean/final' -> 'mean-pooled encoder
  output' (after the final norm)."""
  pool, _, layer = key.partition("/")
  what = "cls token" if pool == "cls" else f"{pool}-pooled"
  if layer == "final":
    return f"{what} encoder output"
  return f"{what} after block {int(layer.split('_')[-1]) + 1}"


def compare(pretrained: dict, random_init: dict) -> dict:
  """The pre-trained encoder's best layer (and pool) against the random init at that
  same layer, plus the random init's own best layer: like with like, and the
  random encoder at its best."""
  best = features.best_layer(pretrained)[1]
  rand_best, rand_where = features.best_layer(random_init)
  return {"layer": best, "pretrained": float(pretrained[best]),
          "random_init_same_layer": float(random_init[best]),
          "gain_points": round(100 * (pretrained[best] - random_init[best]), 1),
          "random_init_best_layer": rand_where, "random_init_best": rand_best}


def pixel_gap(s: dict) -> float:
  """Points by which raw pixels beat the best readout of the pre-trained features."""
  best = max(s["knn"]["pretrained"], s["ridge_probe"]["pretrained"], s["linear_probe_top1"])
  return round(100 * (s["raw_pixels_top1"] - best), 1)


def verdict(s: dict) -> str:
  """One plain sentence of what the numbers mean, from the numbers."""
  knn, ridge = s["knn"]["gain_points"], s["ridge_probe"]["gain_points"]
  gap = s["pixels_minus_best_features_points"]
  if knn > 0 or ridge > 0:
    bought = (f"pre-training bought {knn:+.1f} points of k-NN and {ridge:+.1f} of ridge-probe "
              "accuracy over the random encoder it started from (same layer)")
  else:
    bought = (f"pre-training did not beat the random encoder it started from (k-NN "
              f"{knn:+.1f}, ridge probe {ridge:+.1f} points at the same layer)")
  if gap > 0:
    pixels = (f"but its best features are still {gap:.1f} points below a linear classifier "
              "on the raw pixels: a few CPU minutes of pre-training do not make features "
              "better than pixels")
  else:
    pixels = (f"and its best features beat a linear classifier on the raw pixels by "
              f"{-gap:.1f} points")
  return f"In short: {bought}, {pixels}."


def report(s: dict) -> list[str]:
  """The console summary of the numbers in `s` (what `summary.json` holds)."""
  norm = ", norm-pix" if s["norm_pix_loss"] else ""
  lines = [
      "",
      f"CRATE-MAE quick start ({s['train_images']} train / {s['test_images']} test "
      f"Fashion-MNIST images, {s['minutes']:.1f} min on {s['devices']} {s['backend']} "
      "device(s))",
      f"  pre-training eval loss (masked MSE{norm}): {s['masked_mse']:.4f} vs "
      f"{s['trivial_mse']:.4f} for predicting {s['trivial_predicts']}",
  ]
  for kind, label in (("knn", f"k-NN (cosine, k={s['knn_k']})"),
                      ("ridge_probe", "ridge probe")):
    c = s[kind]
    lines.append(
        f"  {label}, {_layer(c['layer'])}: pre-trained {100 * c['pretrained']:.1f}% vs "
        f"random init {100 * c['random_init_same_layer']:.1f}% ({c['gain_points']:+.1f} "
        f"points; random init at its best, {_layer(c['random_init_best_layer'])}: "
        f"{100 * c['random_init_best']:.1f}%)")
  lines += [
      f"  linear probe on CRATE-MAE features ({s['linear_probe_pool']}-pooled encoder "
      f"output): top-1 {100 * s['linear_probe_top1']:.1f}%",
      f"  linear classifier on raw pixels ({s['pixels_per_image']} values per image): "
      f"top-1 {100 * s['raw_pixels_top1']:.1f}%",
      f"  {verdict(s)}",
      f"  numbers:         {s['paths']['summary']}",
      f"  checkpoint:      {s['paths']['checkpoint']}",
      f"  TensorBoard:     tensorboard --logdir {s['paths']['tensorboard']}",
      f"  reconstructions: {s['paths']['reconstructions']}",
  ]
  return lines


def main(argv):
  del argv
  from crate_mae_jax import config_lib
  from crate_mae_jax.training import summaries, train
  summaries.quiet_library_logs()
  cli.enable_compilation_cache()
  start = time.time()
  pre_dir = os.path.join(FLAGS.workdir, "pretrain")
  probe_dir = os.path.join(FLAGS.workdir, "linear_probe")
  pre_cfg = recipes.quickstart("pretrain")
  pre_model = config_lib.validate(pre_cfg)  # resolved once, used by every step below
  pre = train.train_and_evaluate(pre_cfg, pre_dir, resolved=pre_model)
  probe_cfg = recipes.quickstart("linear_probe")
  probe_cfg.init_from = pre_dir
  probe = train.train_and_evaluate(probe_cfg, probe_dir)
  train_x, train_y, classes = _arrays(pre_cfg, pre_cfg.data.train_split)
  test_x, test_y, _ = _arrays(pre_cfg, pre_cfg.data.eval_split)
  pixels = pixel_floor.linear_classifier(train_x, train_y, test_x, test_y, classes)
  figure = reconstruction_figure(pre_cfg, pre_dir, pre_model)
  evidence = learning_evidence(pre_cfg, pre_dir, pre_model)
  norm_pix = bool(pre_cfg.model.norm_pix_loss)
  summary = {
      "train_images": len(train_x), "test_images": len(test_x),
      "minutes": round((time.time() - start) / 60, 1),
      "devices": jax.device_count(), "backend": jax.default_backend(),
      "norm_pix_loss": norm_pix,
      "masked_mse": round(float(pre["loss"]), 4),
      "trivial_mse": round(float(reconstruction.trivial_mse(
          test_x, pre_cfg.model.patch_size, norm_pix)), 4),
      "trivial_predicts": "each patch's own mean" if norm_pix else "the mean pixel",
      "knn_k": KNN_K,
      "knn": compare(evidence["pretrained"]["knn"], evidence["random_init"]["knn"]),
      "ridge_probe": compare(evidence["pretrained"]["linear_probe"],
                             evidence["random_init"]["linear_probe"]),
      "linear_probe_pool": probe_cfg.probe.pool,
      "linear_probe_top1": float(probe["top1"]),
      "pixels_per_image": int(np.prod(train_x.shape[1:])),
      "raw_pixels_top1": float(pixels["test_accuracy"]),
      "paths": {"summary": os.path.abspath(os.path.join(FLAGS.workdir, "summary.json")),
                "checkpoint": os.path.abspath(os.path.join(pre_dir, "checkpoints")),
                "tensorboard": os.path.abspath(FLAGS.workdir),
                "reconstructions": os.path.abspath(figure)},
  }
  summary["pixels_minus_best_features_points"] = pixel_gap(summary)
  summary["verdict"] = verdict(summary)
  with open(summary["paths"]["summary"], "w") as f:
    json.dump(summary, f, indent=2)
  print("\n".join(report(summary)))
  logging.info("quick start done in %.1f min", summary["minutes"])


def run():
  """Console-script entry point."""
  cli.quiet_startup()
  _define_flags()
  cli.run_absl_app(main, FLAGS, module=__name__, usage="[--workdir=DIR]")


if __name__ == "__main__":
  run()
