"""Input pipelines: one contract over TFDS, image folders and in-memory arrays.

    source = create(config.data, config.augment, task=..., batch_size=per_process_batch,
                    seed=..., process_index=..., process_count=...)

Every source has `num_train_examples` (whole train split, all processes),
`num_classes`, `image_shape` (H, W, C after preprocessing), `num_eval_examples`,
`num_eval_batches` (the same on every process), `stats` (counters, e.g.
'skipped_bad_images'), `device_augment`, `train_batches(start_step)` (infinite)
and `eval_batches()` (one pass, last batch padded, float32 'mask' 0 on padding).

Two kinds of source:

* tf.data (`data.source` 'tfds' with in_memory=False, 'image_folder'):
  `device_augment` is `augment_jax.identity_augment`; batches hold float32 images,
  already augmented and normalised by data.mean/std, and int32 labels. TensorFlow
  is imported lazily in these branches only.
  - train: random resized crop (scale data.crop_scale, ratio 3/4-4/3, Inception
    box sampler, bicubic antialiased resize; JPEGs are decoded cropped), flip
    (data.flip), and for task='finetune' RandAugment (augment.randaugment_layers
    /magnitude; timm's rand-m9-mstd0.5-inc1 op set, see augment_jax).
    Mixup/cutmix/label smoothing are the train step's (augment_jax.mixup_cutmix).
  - eval: images with both sides <= 64 px are resized to image_size; larger ones
    have the shorter side resized to image_size/0.875 and are centre-cropped.
* in-memory arrays (`data_arrays.ArraySource`; 'arrays', the registered datasets
  with their own loader such as 'fashion_mnist' and 'quickstart', and 'tfds' with
  data.in_memory=True): TensorFlow-free; train and
  eval batches hold the raw uint8 images (B, H, W, C0) and `device_augment(rng,
  images, train)` does all of the above in JAX. Every consumer calls it (the
  identity for tf.data sources): `device_augment(key, batch['image'], True)`
  inside the jitted train step, `device_augment(key, batch['image'], False)`
  (eval resize + normalisation; key unused) on every eval batch --
  `normalised_eval_batches` and `split_arrays` do the latter for you.

Determinism and resumption (train_batches(k) yields exactly the batches an
uninterrupted run yields from step k on):

* 'tfds': each process reads its own shard (`tfds.split_for_jax_process`) in
  file order (shuffle_files=False), numbered 0..n-1 by `enumerate`. The stream is
  `Dataset.range(epoch0, inf).flat_map(epoch)`, where `epoch(e)` is the shard
  shuffled with `shuffle(buffer, seed=f(seed, process, e),
  reshuffle_each_iteration=False)`; resuming at step k starts at epoch
  (k*B)//n and skips (k*B)%n examples of it (encoded records: the skip reads,
  but does not decode, up to one epoch). All random augmentation uses stateless
  TF ops keyed on (f(seed, process), e*n + i), i.e. on the example's position
  in the stream; `tf.data.Options.deterministic=True` keeps parallel maps in
  order. (The shuffle's op seed pairs with TF's global seed: do not call
  tf.random.set_seed between runs you want to match.)
* 'image_folder' and the arrays: a global stream shared by all processes
  (`data_arrays.stream_indices`): epoch e visits the files in the numpy
  permutation seeded by (seed, e), global step s covers stream positions
  [s*G, (s+1)*G) (G = B * process_count) and process p takes its slice
  [s*G + p*B, s*G + (p+1)*B); augmentation keys are stream positions. A pure
  function of (seed, step, process), nothing to skip.

Image folders (`data.path`): one sub-folder per class (class index = sorted
folder names); `path/<train_split>` and `path/<eval_split>` (or `val`,
`validation`) sub-folders are used when present, else 10% of every class is held
out for eval (a fixed per-class permutation, independent of the seed). Every
file is checked up front on the host (PIL verify + a draft-mode full decode, in
threads) so the count of bad files is exact: zero-byte, truncated, non-image or
otherwise undecodable files are skipped, logged with their path and counted in
`stats['skipped_bad_images']` (data.bad_images='skip'), or raise ValueError
naming the path ('fail'). Grayscale/RGBA/palette images are converted to the
model's channels; formats or modes TF cannot decode (CMYK JPEG, TIFF, WebP...)
are decoded with PIL.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from crate_mae_jax.data import data_arrays, datasets
from crate_mae_jax.config_lib import TASKS, value_or_default as _get
from crate_mae_jax.data.tf_sources import (  # pylint: disable=unused-import
    HOLDOUT_FRACTION, IMAGE_EXTENSIONS, ImageFolderSource, TfdsSource, class_files,
    tfds_arrays)


# ============================================================================ create
def create(data_cfg, augment_cfg=None, *, task: str, batch_size: int, seed: int,
           process_index: int = 0, process_count: int = 1, arrays: dict | None = None):
  """Builds the input source described by `config.data` / `config.augment`.

  `batch_size` is the per-process batch. `arrays` (source='arrays' only):
  {split: (images, labels)} or {'<split>_images': ..., '<split>_labels': ...};
  without it data.path must name such an .npz file.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is unknown; use one of {TASKS}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  source = _get(data_cfg, "source")
  common = dict(task=task, batch_size=int(batch_size), seed=int(seed),
                process_index=int(process_index), process_count=int(process_count))
  path = _get(data_cfg, "path")
  if source == "arrays":
    if arrays is not None:
      loaded = _normalise_arrays(arrays)
    elif path:
      loaded = data_arrays.load_npz(path)
    else:
      raise ValueError("source='arrays' needs create(..., arrays={...}) or data.path naming "
                       "an .npz with <split>_images / <split>_labels")
  elif source == "image_folder":
    if _get(data_cfg, "in_memory"):
      raise ValueError("config.data.in_memory=True is not supported for source='image_folder'"
                       " (images of any size); set it False")
    return ImageFolderSource(data_cfg, augment_cfg, **common)
  else:  # a registered dataset (crate_mae_jax/datasets), through TFDS or its own loader
    dataset = datasets.for_source(source, _get(data_cfg, "name"))
    if source != "tfds":
      loaded = dataset.load(path)
    elif _get(data_cfg, "in_memory"):
      loaded = tfds_arrays(data_cfg)
    else:
      return TfdsSource(data_cfg, augment_cfg, **common)
  return _array_source(loaded, data_cfg, augment_cfg, **common)


def normalised_eval_batches(source) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The eval split of `source`, un-augmented and normalised, padding dropped:
  (images float32 (n, H, W, C), labels (n,)) per batch. The one way every
  evaluator, figure and baseline reads clean images."""
  import jax  # pylint: disable=import-outside-toplevel
  prepare = jax.jit(lambda x: source.device_augment(jax.random.key(0), x, False))
  for batch in source.eval_batches():
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]))), bool).reshape(-1)
    images = np.asarray(prepare(batch["image"]), np.float32)
    yield images[keep], np.asarray(batch["label"])[keep]


def split_arrays(data_cfg, split: str, *, max_examples: int | None = None,
                 batch_size: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """All of `split` (or its first `max_examples`), normalised and un-augmented,
  through the eval path of `data_cfg`'s source: (images (N, H, W, C) float32,
  labels (N,) int32, num_classes)."""
  cfg = data_cfg.copy_and_resolve_references() if hasattr(
      data_cfg, "copy_and_resolve_references") else dict(data_cfg)
  cfg["eval_split"] = split
  source = create(cfg, None, task="linear_probe", batch_size=batch_size, seed=seed)
  images, labels, count = [], [], 0
  for x, y in normalised_eval_batches(source):
    images.append(x)
    labels.append(y)
    count += len(y)
    if max_examples is not None and count >= max_examples:
      break
  if not images:
    raise ValueError(f"config.data.{split!r}: the split holds no images")
  x, y = np.concatenate(images), np.concatenate(labels).astype(np.int32)
  if max_examples is not None:
    x, y = x[:max_examples], y[:max_examples]
  return x, y, int(source.num_classes)


def _normalise_arrays(arrays: dict) -> dict:
  out = {}
  for key, value in arrays.items():
    if key.endswith("_images"):
      split = key[:-len("_images")]
      out[split] = (np.asarray(value), np.asarray(arrays[f"{split}_labels"]))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
      out[key] = (np.asarray(value[0]), np.asarray(value[1]))
  if not out:
    raise ValueError("arrays: expected {split: (images, labels)} or <split>_images keys")
  return out


def _array_source(loaded: dict, data_cfg, augment_cfg, *, task, batch_size, seed,
                  process_index, process_count, stats=None):
  train = data_arrays.pick_split(loaded, _get(data_cfg, "train_split"), "train_split")
  eval_ = data_arrays.pick_split(loaded, _get(data_cfg, "eval_split"), "eval_split")
  return data_arrays.ArraySource(
      train, eval_, batch_size=batch_size, seed=seed,
      image_size=_get(data_cfg, "image_size"), mean=tuple(_get(data_cfg, "mean")),
      std=tuple(_get(data_cfg, "std")), crop_scale=tuple(_get(data_cfg, "crop_scale")),
      flip=bool(_get(data_cfg, "flip")),
      randaugment_layers=(int(_get(augment_cfg, "randaugment_layers"))
                          if task == "finetune" else 0),
      randaugment_magnitude=float(_get(augment_cfg, "randaugment_magnitude")),
      num_classes=_get(data_cfg, "num_classes"), process_index=process_index,
      process_count=process_count, max_examples=_get(data_cfg, "max_examples"), stats=stats)
