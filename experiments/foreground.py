"""Are CRATE-MAE's attention maps more object-centred than ViT-MAE's? The foreground score.

    python -m experiments.foreground --run crate=WORKDIR --run vit=WORKDIR \\
        [--source=fashion_mnist --data_path=/usr/share/datasets/fashion-mnist] \\
        [--max_images=N] [--init_seeds=1,2] [--json=OUT.json]

For every pre-training run named with --run (its latest checkpoint) and for the
randomly initialised parameters that run started from (`tools.evaluate.
random_params`): the foreground score of the cls token's attention, every
encoder layer and head (`crate_mae_jax.analysis.foreground`), on the test split,
with the object patches from the raw images' non-zero pixels; beside the uniform
map's score, and the paired difference of every two models (head means per
layer) with its standard error over the images. Prints a table, writes JSON.
"""
import json
import sys

from absl import app, flags
import numpy as np

from crate_mae_jax import models, recipes
from crate_mae_jax.analysis import diagnostics, foreground

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", [], "NAME=WORKDIR of a pre-training run (repeatable)")
flags.DEFINE_enum("source", "fashion_mnist", ["fashion_mnist", "quickstart"],
                  "images: the full Fashion-MNIST test split or the shipped subset's")
flags.DEFINE_string("data_path", None, "IDX folder for --source=fashion_mnist")
flags.DEFINE_integer("max_images", None, "first N test images only")
flags.DEFINE_integer("batch_size", 500, "images per forward pass")
flags.DEFINE_string("json", None, "JSON file for every score")
flags.DEFINE_list("init_seeds", [], "extra seeds of random initialisations to score beside "
                  "the one each run started from (the spread of the control)")


def run_config(workdir: str):
  """(config, resolved model) of a run: the quick-start recipe with the checkpoint's
  model and seed, so that `random_params` gives the parameters the run started from."""
  from crate_mae_jax.tools import analyze
  from crate_mae_jax.training import checkpoints
  meta, _ = checkpoints.read_meta(workdir)
  cfg = recipes.quickstart("pretrain")
  cfg.model = analyze.model_config_from(meta)
  saved = meta.get("config")
  saved = json.loads(saved) if isinstance(saved, str) else saved
  if isinstance(saved, dict) and isinstance(saved.get("seed"), int):
    cfg.seed = saved["seed"]
  return cfg, models.resolve(cfg.model)


def test_images(source: str, path: str | None, max_images: int | None):
  """(normalised images (N, 28, 28, 1), raw uint8 images) of the test split."""
  from crate_mae_jax.data import input_pipeline
  from crate_mae_jax.data.datasets import fashion_mnist
  cfg = recipes.quickstart("pretrain")
  cfg.data.source = source
  if path:
    cfg.data.path = path
  images, _, _ = input_pipeline.split_arrays(cfg.data, "test", max_examples=max_images)
  load = fashion_mnist.load_fashion_mnist if source == "fashion_mnist" else \
      fashion_mnist.load_quickstart
  raw = load(path)["test"][0][: len(images)]
  return images, raw


def per_image(model, params, images, masks, batch_size):
  parts = [foreground.per_image_scores(
      diagnostics.cls_attention_layers(model, params, images[i:i + batch_size]),
      masks[i:i + batch_size]) for i in range(0, len(images), batch_size)]
  return foreground.concat_scores(parts)


def paired(a, b, keep):
  """Head-mean difference a - b per layer over the informative images: (mean, se)."""
  d = a[:, keep].mean(-1) - b[:, keep].mean(-1)          # (layers, n)
  return d.mean(1).tolist(), (d.std(1, ddof=1) / np.sqrt(d.shape[1])).tolist()


def main(argv):
  del argv
  from crate_mae_jax.tools import evaluate
  from crate_mae_jax.training import checkpoints
  if not FLAGS.run:
    print("error: pass --run NAME=WORKDIR at least once", file=sys.stderr)
    return 2
  images, raw = test_images(FLAGS.source, FLAGS.data_path, FLAGS.max_images)
  pixels = foreground.foreground_pixels(raw)
  mean, std = recipes.quickstart("pretrain").data.mean, recipes.quickstart("pretrain").data.std
  if not np.array_equal(foreground.foreground_from_normalized(images, mean, std), pixels):
    print("error: the normalised test images and the raw ones are not the same images in the "
          "same order; check --source and --data_path", file=sys.stderr)
    return 2
  scores, resolved_of = {}, {}
  for spec in FLAGS.run:
    name, sep, workdir = spec.partition("=")
    if not sep:
      print(f"error: --run {spec!r} is not NAME=WORKDIR", file=sys.stderr)
      return 2
    cfg, resolved = run_config(workdir)
    masks = foreground.patch_foreground(pixels, resolved["patch_size"])
    model = models.build_mae(resolved)
    params, _ = checkpoints.restore_params(workdir)
    runs = [(name, params), (f"{name}_init", evaluate.random_params(cfg, resolved))]
    for seed in FLAGS.init_seeds:
      seeded = cfg.copy_and_resolve_references()
      seeded.seed = int(seed)
      runs.append((f"{name}_init_seed{seed}", evaluate.random_params(seeded, resolved)))
    for label, p in runs:
      scores[label] = per_image(model, p, images, masks, FLAGS.batch_size)
      resolved_of[label] = dict(resolved)
  keep = next(iter(scores.values()))["informative"]
  result = {"source": FLAGS.source, "num_test_images": int(len(images)), "models": {},
            "paired_difference": {}}
  print(f"{len(images)} test images, {int(keep.sum())} with an object covering some but not "
        "all patches")
  for label, s in scores.items():
    summary = foreground.to_json(foreground.summarise(s))
    summary["arch"] = resolved_of[label]["arch"]
    result["models"][label] = summary
    print(f"{label:>12}: mass share per layer {['%.3f' % v for v in summary['mass_layer_mean']]}"
          f" (best head {max(map(max, summary['mass'])):.3f}, uniform "
          f"{summary['chance_mass']:.3f}); top-k IoU {['%.3f' % v for v in summary['iou_layer_mean']]}"
          f" (best head {max(map(max, summary['iou'])):.3f}, random {summary['chance_iou']:.3f})")
  labels = list(scores)
  for i, a in enumerate(labels):
    for b in labels[i + 1:]:
      entry = {}
      for key in ("mass", "iou"):
        mean, se = paired(scores[a][key], scores[b][key], keep)
        entry[key] = {"mean": mean, "se": se}
      result["paired_difference"][f"{a}-{b}"] = entry
      print(f"{a} - {b}: mass {['%+.3f±%.3f' % t for t in zip(*[entry['mass'][k] for k in ('mean', 'se')])]}"
            f", IoU {['%+.3f±%.3f' % t for t in zip(*[entry['iou'][k] for k in ('mean', 'se')])]}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  app.run(main)
