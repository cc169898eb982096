"""The quick start: pre-train, linear-probe and compare with raw pixels, on CPU.

    python -m crate_mae_jax.tools.quickstart [--workdir=workdirs/quickstart]

Runs `configs/quickstart.py` (a small CRATE-MAE on the Fashion-MNIST subset shipped
in the package), then its linear probe on the pre-trained encoder, then a linear
classifier on the raw pixels of the same images, and prints the accuracies with
the paths of the checkpoint, the TensorBoard logs and the reconstruction figure.
What shows that pre-training helped: the k-NN and ridge probe (best encoder
layer) of the pre-trained encoder against the randomly initialised encoder the
run started from, and the masked-patch MSE against a trivial predictor.
"""
import os
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np

from crate_mae_jax import cli, recipes
from crate_mae_jax.analysis import pixel_floor
from crate_mae_jax.evaluators import features, reconstruction

FLAGS = flags.FLAGS
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
  return {"pretrained": evaluate.evaluate(pre_cfg, params, kinds, resolved=resolved),
          "random_init": evaluate.evaluate(pre_cfg, random_init, kinds, resolved=resolved)}


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
  trivial = reconstruction.trivial_mse(test_x, pre_cfg.model.patch_size,
                                       pre_cfg.model.norm_pix_loss)
  norm_pix = bool(pre_cfg.model.norm_pix_loss)
  trivial_what = "each patch's own mean" if norm_pix else "the mean pixel"
  minutes = (time.time() - start) / 60
  lines = [
      "",
      f"CRATE-MAE quick start ({len(train_x)} train / {len(test_x)} test Fashion-MNIST "
      f"images, {minutes:.1f} min on {jax.device_count()} {jax.default_backend()} device(s))",
      f"  pre-training eval loss (masked MSE{', norm-pix' if norm_pix else ''}): "
      f"{pre['loss']:.4f} vs {trivial:.4f} for predicting {trivial_what}",
  ]
  for kind, label in (("knn", "k-NN (cosine, k=20)"), ("linear_probe", "ridge probe")):
    (a, where_a), (b, where_b) = (features.best_layer(evidence[s][kind])
                                  for s in ("pretrained", "random_init"))
    lines.append(f"  {label + ', best layer:':31s} pre-trained {100 * a:.1f}% ({where_a}) vs "
                 f"random init {100 * b:.1f}% ({where_b}): {100 * (a - b):+.1f} points")
  lines += [
      f"  linear probe on CRATE-MAE features:  top-1 {100 * probe['top1']:.1f}%",
      f"  linear classifier on raw pixels:     top-1 {100 * pixels['test_accuracy']:.1f}%",
      f"  checkpoint:      {os.path.abspath(os.path.join(pre_dir, 'checkpoints'))}",
      f"  TensorBoard:     tensorboard --logdir {os.path.abspath(FLAGS.workdir)}",
      f"  reconstructions: {os.path.abspath(figure)}",
  ]
  print("\n".join(lines))
  logging.info("quick start done in %.1f min", minutes)


def run():
  """Console-script entry point."""
  cli.quiet_startup()
  if cli.wants_help(sys.argv):
    cli.print_help(sys.argv, FLAGS, module=__name__, usage="[--workdir=DIR]")
    sys.exit(0)
  app.run(main)


if __name__ == "__main__":
  run()
