"""White-box diagnostics of a trained (or converted official) CRATE-MAE checkpoint.

    python -m crate_mae_jax.tools.analyze --checkpoint WORKDIR_OR_CHECKPOINT --output DIR \\
        [--config configs/x.py] [--images batch.npz] [--num_images 8] [--layer -1]

Writes to DIR:
  measures.json      per-layer coding rate and sparsity (encoder and decoder,
                     mean/std over the images, mask ratio 0), checkpoint and step;
  layerwise.png      the two per-layer curves;
  reconstruction.png original / masked / reconstruction / reconstruction + visible;
  attention.png      the cls token's attention per head in encoder layer --layer;
  pca.png            first three principal components of the patch features as RGB.
With Fashion-MNIST images (data sources 'fashion_mnist', 'quickstart') measures.json
also holds 'foreground': the attention maps' foreground score per layer and head
(`crate_mae_jax.analysis.foreground`).

The model config comes from the checkpoint's meta; with --config, fields of
config.model that differ from the schema defaults override it, and config.data
names the images (its eval split, through `crate_mae_jax.data.input_pipeline`).
Without --config, the data section saved in the meta of a training run is used.
`--images FILE.npz` (an 'images' array, NHWC, already normalised; optional
'mean'/'std' per channel) needs no dataset at all. Without either, --data
SOURCE[:PATH] picks a data source of the default config. Exit status 2, with
one line on stderr, for a missing or unfitting checkpoint, a ViT-MAE checkpoint
or missing images.
"""
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.training import checkpoints
from crate_mae_jax.analysis import diagnostics, figures, foreground
from crate_mae_jax import config_lib, models
from crate_mae_jax.models import patches


class AnalyzeError(ValueError):
  """A usage problem reported as one line with exit status 2."""


# ----------------------------------------------------------------------------- config


def model_config_from(meta: dict, config=None):
  """The model ConfigDict: the checkpoint's resolved model, overridden by the
  fields of `config.model` that differ from the schema defaults."""
  saved = meta.get("model")
  if not saved:
    if config is None:
      raise AnalyzeError("the checkpoint's meta holds no model config; pass --config")
    return config.model
  cfg = models.model_config(saved.get("variant", "base"), saved.get("arch", "crate_mae"))
  known = set(cfg.keys())
  cfg.update({k: v for k, v in saved.items() if k in known})
  if config is not None:
    defaults = models.model_config(config.model.variant, config.model.arch).to_dict()
    for key, value in config.model.to_dict().items():
      if key in known and value is not None and value != defaults.get(key) and key != "variant":
        cfg[key] = value
  return cfg


def _data_config(config, data_spec: str | None, meta: dict):
  if config is None:
    config = config_lib.default_config()
    saved = meta.get("config")
    if isinstance(saved, str):
      try:
        saved = json.loads(saved)
      except ValueError:
        saved = None
    saved_data = saved.get("data") if isinstance(saved, dict) else meta.get("data")
    if isinstance(saved_data, dict):   # the data section of the training run
      for key, value in saved_data.items():
        if key in config.data and value is not None:
          try:
            config.data[key] = tuple(value) if isinstance(value, list) else value
          except (TypeError, ValueError):
            pass
  if data_spec:
    source, _, path = data_spec.partition(":")
    config.data.source = source
    if path:
      config.data.path = path
  return config


# ----------------------------------------------------------------------------- images


def load_images_npz(path: str, num_images: int, channels: int) -> tuple[np.ndarray, Any, Any]:
  if not os.path.exists(path):
    raise AnalyzeError(f"--images {path!r} does not exist")
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  (zip, pickle, format errors)
    raise AnalyzeError(f"--images {path!r} is not a readable .npz file ({type(e).__name__}); "
                       "save one with np.savez(path, images=...)") from None
  if not hasattr(data, "files"):
    raise AnalyzeError(f"--images {path!r} is a single .npy array, not an .npz; save it "
                       "with np.savez(path, images=...)")
  with data:
    if "images" not in data.files:
      raise AnalyzeError(f"--images {path!r} has no 'images' array (keys: {sorted(data.files)})")
    try:
      raw = data["images"]
      mean = np.asarray(data["mean"], np.float32) if "mean" in data.files else None
      std = np.asarray(data["std"], np.float32) if "std" in data.files else None
    except ValueError as e:  # object arrays need pickle, which is refused
      raise AnalyzeError(f"--images {path!r}: {e}; store numeric arrays") from None
  if raw.dtype.kind not in "iuf":
    raise AnalyzeError(f"--images {path!r}: 'images' has dtype {raw.dtype}; store float "
                       "NHWC images")
  images = np.asarray(raw, np.float32)[:num_images]
  if images.size == 0:
    raise AnalyzeError(f"--images {path!r}: 'images' is empty (shape {raw.shape})")
  if not np.all(np.isfinite(images)):
    raise AnalyzeError(f"--images {path!r}: 'images' holds NaN or inf values; clean them")
  if images.ndim != 4 or images.shape[-1] != channels:
    hint = " (it looks NCHW: transpose to NHWC)" if images.ndim == 4 and \
        images.shape[1] == channels else ""
    raise AnalyzeError(f"--images {path!r}: expected NHWC images with {channels} channels, "
                       f"got shape {images.shape}{hint}")
  return images, mean, std


def load_images_pipeline(config, num_images: int, seed: int) -> np.ndarray:
  try:
    from crate_mae_jax.data import input_pipeline
  except ImportError as e:
    raise AnalyzeError(f"no input pipeline available ({e}); pass --images FILE.npz") from None
  try:
    images, _, _ = input_pipeline.split_arrays(config.data, config.data.eval_split,
                                               max_examples=num_images, seed=seed,
                                               batch_size=max(1, num_images))
  except (ValueError, OSError) as e:
    raise AnalyzeError(f"cannot read images from data source {config.data.source!r}: "
                       f"{e}; pass --images FILE.npz or fix --config.data") from None
  return images


def _per_channel(values, channels: int):
  if values is None:
    return None
  values = np.asarray(values, np.float32).reshape(-1)
  if len(values) != channels:
    values = np.full(channels, values.mean(), np.float32)
  return values


# ----------------------------------------------------------------------------- analysis


def analyze(checkpoint: str, output: str, config=None, images: str | None = None,
            num_images: int = 8, layer: int = -1, step: int | None = None, seed: int = 0,
            data: str | None = None, eps: float = 0.01, pca_per_image: bool = False) -> dict:
  """Runs every diagnostic and writes the files; returns the measures.json dict."""
  picked = {}

  def check(meta):  # before the params of the picked step are read
    cfg = model_config_from(meta, config)
    try:
      resolved = config_lib.resolve_model(cfg)
    except config_lib.ConfigError as e:
      raise AnalyzeError(str(e)) from None
    if resolved["arch"] != "crate_mae":
      raise AnalyzeError(f"{checkpoint!r} is a {resolved['arch']} checkpoint: white-box "
                         "diagnostics need a CRATE-MAE (ViT-MAE has no subspaces or sparse "
                         "codes)")
    if meta.get("task", "pretrain") != "pretrain":
      raise AnalyzeError(f"{checkpoint!r} is a {meta['task']!r} checkpoint: analyze needs the "
                         "pre-trained masked autoencoder (encoder and decoder)")
    picked["resolved"] = resolved

  # The newest complete step, or the next newest where a live run deletes it meanwhile.
  try:
    params, meta, step = checkpoints.read(checkpoint, step, check=check)
  except (FileNotFoundError, checkpoints.CheckpointError) as e:
    raise AnalyzeError(f"cannot read checkpoint {checkpoint!r}: {e}") from None
  resolved = picked["resolved"]
  checkpoints.check_compatible(params,
                               models.abstract_params(resolved, resolved["patch_size"] * 2),
                               where=checkpoint)
  model = models.build_mae(resolved)
  channels, p = resolved["channels"], resolved["patch_size"]

  data_config = _data_config(config, data, meta)
  mean = std = None
  if images:
    batch, mean, std = load_images_npz(images, num_images, channels)
    source = os.path.abspath(images)
  else:
    batch = load_images_pipeline(data_config, num_images, seed)
    source = f"{data_config.data.source}:{data_config.data.eval_split}"
  mean = _per_channel(data_config.data.mean if mean is None else mean, channels)
  std = _per_channel(data_config.data.std if std is None else std, channels)
  if batch.shape[1] % p or batch.shape[2] % p:
    raise AnalyzeError(f"image size {batch.shape[1:3]} is not divisible by patch size {p}")
  b, grid = batch.shape[0], patches.patch_grid(batch, p)
  x = jnp.asarray(batch)

  measures = diagnostics.layerwise_measures(model, params, x, mask_ratio=0.0, eps=eps)
  panels, out = diagnostics.reconstruct(model, params, batch, resolved["mask_ratio"],
                                       jax.random.key(seed), mean, std)
  features, intermediates = diagnostics.encode_with_intermediates(model, params, x)
  attention = diagnostics.cls_attention_from_intermediates(intermediates, layer, grid)
  pca = diagnostics.pca_features(np.asarray(features)[:, 1:], 3, per_image=pca_per_image,
                                 grid=grid)

  os.makedirs(output, exist_ok=True)
  figures.save_layerwise(measures, os.path.join(output, "layerwise.png"))
  figures.save_reconstruction(panels, os.path.join(output, "reconstruction.png"))
  figures.save_attention(panels[0], attention, os.path.join(output, "attention.png"))
  figures.save_pca(panels[0], pca, os.path.join(output, "pca.png"))
  result = {
      "checkpoint": os.path.abspath(checkpoint),
      "step": int(step),
      "images": source,
      "num_images": int(b),
      "image_size": [int(batch.shape[1]), int(batch.shape[2])],
      "mask_ratio": 0.0,
      "eps": eps,
      "attention_layer": int(range(resolved["depth"])[layer]),
      "model": resolved,
      **diagnostics.nest_measures(measures),
      "reconstruction": {"mask_ratio": resolved["mask_ratio"], "seed": seed,
                         "loss": float(out["loss"])},
      "scalars": diagnostics.summary_scalars(measures),
  }
  if not images and foreground.gives_masks(data_config.data):   # Fashion-MNIST: exact masks
    try:
      result["foreground"] = foreground.to_json(foreground.foreground_scores(
          lambda x: diagnostics.cls_attention_layers(model, params, x), batch,
          foreground.object_patches(batch, mean, std, p)))
    except ValueError as e:   # no image with a partial object among the few analysed
      result["foreground"] = {"skipped": str(e)}
  with open(os.path.join(output, "measures.json"), "w") as f:
    json.dump(config_lib.redacted(result), f, indent=2, sort_keys=True, default=str)
  return result


# ----------------------------------------------------------------------------- CLI


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("checkpoint", None, "workdir of a run, or a checkpoint root "
                      "(ours or converted by crate_mae_jax.tools.convert_torch)")
  flags.DEFINE_string("output", None, "directory for measures.json and the figures")
  config_flags.DEFINE_config_file(
      "config", None, "optional config file (configs/*.py): model overrides and data source",
      lock_config=True)
  flags.DEFINE_string("images", None, "npz with 'images' (NHWC, normalised) instead of a "
                      "data source")
  flags.DEFINE_string("data", None, "without --config: data source of the default config, "
                      "SOURCE[:PATH], e.g. fashion_mnist:/data/fmnist")
  flags.DEFINE_integer("num_images", 8, "images to analyse")
  flags.DEFINE_integer("layer", -1, "encoder layer of the attention maps (negative from the end)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_integer("seed", 0, "seed of the data order and of the reconstruction mask")
  flags.DEFINE_float("eps", 0.01, "ε of the coding rate")
  flags.DEFINE_bool("pca_per_image", False, "PCA axes per image instead of joint")
  flags.mark_flags_as_required(["checkpoint", "output"])
  return flags.FLAGS


def _foreground_line(result: dict) -> str:
  fg = result.get("foreground", {})
  if "mass_layer_mean" not in fg:
    return ""
  return (f"; attention mass on the object {['%.3f' % v for v in fg['mass_layer_mean']]} "
          f"(uniform map {fg['chance_mass']:.3f})")


def main(argv) -> int:
  from absl import flags, logging
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every manager step at INFO
  if len(argv) > 1:
    print(f"analyze: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  try:
    result = analyze(FLAGS.checkpoint, FLAGS.output, FLAGS.config, FLAGS.images,
                     FLAGS.num_images, FLAGS.layer, FLAGS.step, FLAGS.seed, FLAGS.data,
                     FLAGS.eps, FLAGS.pca_per_image)
  except (AnalyzeError, checkpoints.CheckpointError, diagnostics.NotWhiteBoxError) as e:
    print(f"analyze: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  enc = result["encoder"]
  print(f"analyze: step {result['step']}, {result['num_images']} images; encoder coding rate "
        f"{['%.2f' % v for v in enc['coding_rate']['mean']]}, sparsity "
        f"{['%.3f' % v for v in enc['sparsity']['mean']]}{_foreground_line(result)}; "
        f"wrote {FLAGS.output}")
  return 0


def run():
  """Console-script entry point."""
  from crate_mae_jax import cli
  cli.quiet_startup()
  cli.run_absl_app(main, _define_flags(), module=__name__,
                   usage="--checkpoint=DIR --output=DIR [--FLAG=VALUE ...]")


if __name__ == "__main__":
  run()
