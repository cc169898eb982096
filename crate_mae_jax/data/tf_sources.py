"""The tf.data sources: TFDS datasets and image folders (see `input_pipeline` for
the contract they share, their determinism and their resumption). TensorFlow and
TFDS are imported on first use, never at import time.
"""
from __future__ import annotations

import concurrent.futures
import difflib
import functools
import os
import warnings
import zlib
from typing import Iterator

import numpy as np
from absl import logging

from crate_mae_jax.data import augment_jax, data_arrays, datasets, randaugment_tf
from crate_mae_jax import cli
from crate_mae_jax.config_lib import value_or_default as _get

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".jfif")
HOLDOUT_FRACTION = 0.1
_EVAL_ALIASES = ("val", "validation")


# ============================================================================ TF helpers
tensorflow = cli.tensorflow


def _options():
  tf = tensorflow()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


def _fix_channels(image, channels: int):
  """uint8 (h, w, c) with c in 1..4 -> (h, w, channels)."""
  tf = tensorflow()
  n = tf.shape(image)[-1]
  if channels == 3:
    image = tf.cond(n >= 3, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3]))
  elif channels == 1:
    def luminance():
      rgb = tf.cast(image[..., :3], tf.float32)
      y = tf.reduce_sum(rgb * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)
      return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), tf.uint8)
    image = tf.cond(n >= 3, luminance, lambda: image[..., :1])
  else:
    raise ValueError(f"tf.data sources support 1 or 3 channels, not {channels}")
  image.set_shape([None, None, channels])
  return image


def _resize(image, size, method: str = "bicubic"):
  tf = tensorflow()
  out = tf.image.resize(image, size, method=method, antialias=True)
  return tf.clip_by_value(out, 0.0, 255.0)


# ----------------------------------------------------------------------------- RandAugment (TF)
# ============================================================================ tf.data sources
class _TFSource:
  """Shared tf.data preprocessing; subclasses provide the example streams.

  Examples are dicts with 'bytes' (encoded image), 'label', and for training
  'key' (the example's stream position, keying its stateless randomness).
  """
  device_augment = staticmethod(augment_jax.identity_augment)
  _jpeg_fast_path = True

  def __init__(self, data_cfg, augment_cfg, *, task, batch_size, seed, process_index,
               process_count):
    self.task = task
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.image_size = int(_get(data_cfg, "image_size"))
    self.mean = tuple(float(m) for m in _get(data_cfg, "mean"))
    self.std = tuple(float(s) for s in _get(data_cfg, "std"))
    self.channels = len(self.mean)
    if self.channels not in (1, 3):
      raise ValueError(f"config.data.mean has {self.channels} entries; tf.data sources "
                       "support 1 or 3 channels")
    self.image_shape = (self.image_size, self.image_size, self.channels)
    self.crop_scale = tuple(float(s) for s in _get(data_cfg, "crop_scale"))
    self.flip = bool(_get(data_cfg, "flip"))
    self.randaugment_layers = (int(_get(augment_cfg, "randaugment_layers"))
                               if task == "finetune" else 0)
    self.randaugment_magnitude = float(_get(augment_cfg, "randaugment_magnitude"))
    self.shuffle_buffer = int(_get(data_cfg, "shuffle_buffer"))
    self.cache = bool(_get(data_cfg, "cache"))
    self.stats = {"skipped_bad_images": 0}
    # Per (seed, process) key of all stateless randomness; 31 bits.
    state = np.random.SeedSequence([self.seed % (1 << 63), self.process_index, 0x5EED])
    self._key0 = int(state.generate_state(1, np.uint32)[0] >> 1)

  # --- subclass hooks
  def _decode(self, ex):
    raise NotImplementedError

  def _train_examples(self, start_step: int):
    raise NotImplementedError

  def _eval_examples(self):
    """(dataset of this process's eval examples, their count)."""
    raise NotImplementedError

  # --- preprocessing
  def _decode_random_crop(self, ex, seed):
    tf = tensorflow()
    data = ex["bytes"]

    def box(shape):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
          aspect_ratio_range=augment_jax.RATIO, area_range=self.crop_scale, max_attempts=10,
          use_image_if_no_bounding_boxes=True)
      return begin, size

    def jpeg():
      begin, size = box(tf.image.extract_jpeg_shape(data))
      window = tf.stack([begin[0], begin[1], size[0], size[1]])
      return _fix_channels(tf.io.decode_and_crop_jpeg(data, window, channels=self.channels),
                           self.channels)

    def other():
      image = self._decode(ex)
      begin, size = box(tf.shape(image))
      return tf.slice(image, begin, size)

    if not self._jpeg_fast_path:
      return other()
    use_jpeg = tf.io.is_jpeg(data)
    if "pil" in ex:
      use_jpeg = tf.logical_and(use_jpeg, tf.logical_not(ex["pil"]))
    image = tf.cond(use_jpeg, jpeg, other)
    image.set_shape([None, None, self.channels])
    return image

  def _normalise(self, image):
    tf = tensorflow()
    mean = tf.constant(self.mean, tf.float32) * 255.0
    std = tf.constant(self.std, tf.float32) * 255.0
    return (image - mean) / std

  def _preprocess_train(self, ex):
    tf = tensorflow()
    seed = tf.stack([tf.constant(self._key0, tf.int64), tf.cast(ex["key"], tf.int64)])
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = self._decode_random_crop(ex, seeds[0])
    image = _resize(image, [self.image_size, self.image_size])
    if self.flip:
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if self.randaugment_layers > 0:
      image = randaugment_tf.randaugment(image, seeds[2], self.randaugment_layers,
                              self.randaugment_magnitude)
    image = tf.ensure_shape(self._normalise(image), self.image_shape)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  def _preprocess_eval(self, ex):
    tf = tensorflow()
    image = self._decode(ex)
    s = self.image_size
    shape = tf.shape(image)
    h, w = shape[0], shape[1]

    def small():
      return _resize(image, [s, s])

    def large():
      short = tf.cast(tf.minimum(h, w), tf.float32)
      target = float(round(s / augment_jax.EVAL_CROP_FRACTION))
      nh = tf.maximum(tf.cast(tf.round(tf.cast(h, tf.float32) * target / short), tf.int32), s)
      nw = tf.maximum(tf.cast(tf.round(tf.cast(w, tf.float32) * target / short), tf.int32), s)
      resized = _resize(image, tf.stack([nh, nw]))
      top = tf.cast(tf.round(tf.cast(nh - s, tf.float32) / 2.0), tf.int32)
      left = tf.cast(tf.round(tf.cast(nw - s, tf.float32) / 2.0), tf.int32)
      return tf.slice(resized, [top, left, 0], [s, s, self.channels])

    image = tf.cond(tf.maximum(h, w) <= augment_jax.SMALL_IMAGE, small, large)
    image = tf.ensure_shape(self._normalise(image), self.image_shape)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  # --- the contract
  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Infinite {'image': float32 (B, S, S, C), 'label': int32 (B,)} from step start_step."""
    tf = tensorflow()
    ds = self._train_examples(int(start_step))
    ds = ds.map(self._preprocess_train, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.with_options(_options()).as_numpy_iterator()

  def eval_batches(self) -> Iterator[dict]:
    """One pass over this process's eval shard: `num_eval_batches` batches of
    {'image', 'label', 'mask'}; the tail is padded with zeros and mask 0."""
    tf = tensorflow()
    ds, count = self._eval_examples()
    total = self.num_eval_batches * self.batch_size
    if total == 0:
      return
    ds = ds.map(self._preprocess_eval, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pad = {"image": tf.zeros(self.image_shape, tf.float32), "label": tf.constant(0, tf.int32),
           "mask": tf.constant(0.0, tf.float32)}
    if total > count:
      ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(total - count))
    ds = ds.batch(self.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.with_options(_options()).as_numpy_iterator()


# ----------------------------------------------------------------------------- TFDS
def _limit_split(split: str, max_examples) -> str:
  if max_examples is None:
    return split
  if "[" in split or "+" in split:
    raise ValueError(f"config.data.max_examples needs a plain train_split name, not {split!r}"
                     f"; write the slice yourself, e.g. '{split.split('[')[0]}[:N]'")
  return f"{split}[:{int(max_examples)}]"


def _tfds_builder(data_cfg):
  name = datasets.for_source("tfds", _get(data_cfg, "name")).tfds_name
  tensorflow()  # hides the GPUs before TFDS touches TensorFlow
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = _get(data_cfg, "data_dir")
  manual_dir = _get(data_cfg, "manual_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # TFDS's own message lists every registered dataset (thousands of names).
    close = difflib.get_close_matches(str(name), tfds.list_builders(with_community_datasets=False),
                                      n=3)
    raise ValueError(f"TFDS has no dataset {name!r} (the tfds_name registered for "
                     f"config.data.name={_get(data_cfg, 'name')!r} in crate_mae_jax/datasets)"
                     + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                        "; see https://www.tensorflow.org/datasets/catalog")) from None
  if manual_dir:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  features = builder.info.features
  for key in ("image", "label"):
    if key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no {key!r} feature (features: "
                       f"{list(features)})")
  return builder


def _tfds_dataset(builder, split, decoders=None):
  try:
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  except (AssertionError, FileNotFoundError) as e:
    raise ValueError(f"TFDS dataset {builder.name!r} split {split!r} is not available in "
                     f"{builder.data_dir} ({e}); prepare it first (imagenet2012: set "
                     "config.data.manual_dir to the folder with the ILSVRC2012 tars)") from e


def _cardinality(builder, ds, split) -> int:
  n = int(ds.cardinality())
  if n >= 0:
    return n
  return int(builder.info.splits[split].num_examples)


def tfds_arrays(data_cfg) -> dict:
  """Loads the train and eval splits of a small TFDS dataset into numpy, once."""
  tf = tensorflow()
  builder = _tfds_builder(data_cfg)
  out = {}
  for split in (_get(data_cfg, "train_split"), _get(data_cfg, "eval_split")):
    ds = _tfds_dataset(builder, split).map(lambda ex: (ex["image"], ex["label"]))
    images, labels = [], []
    for x, y in ds.batch(4096).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      images.append(x)
      labels.append(y)
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
      raise ValueError(f"data.in_memory=True needs same-size images; {builder.name} has "
                       f"{sorted(shapes)[:4]}...; set config.data.in_memory=False")
    out[split] = (np.concatenate(images), np.concatenate(labels).astype(np.int32))
  return out


class TfdsSource(_TFSource):
  """The TFDS builder of the registered dataset `data.name` (in `data.data_dir`);
  see the module docstring."""

  def __init__(self, data_cfg, augment_cfg, **kwargs):
    super().__init__(data_cfg, augment_cfg, **kwargs)
    self.builder = _tfds_builder(data_cfg)  # imports TF quietly first
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self._feature = self.builder.info.features["image"]
    self._decoders = {"image": tfds.decode.SkipDecoding()}
    num_classes = _get(data_cfg, "num_classes")
    self.num_classes = int(num_classes or self.builder.info.features["label"].num_classes)
    train_split = _limit_split(_get(data_cfg, "train_split"),
                               _get(data_cfg, "max_examples"))
    eval_split = _get(data_cfg, "eval_split")
    split = functools.partial(tfds.split_for_jax_process, process_index=self.process_index,
                              process_count=self.process_count)
    self._train_split, self._eval_split = split(train_split), split(eval_split)
    count = lambda s: _cardinality(self.builder, self._dataset(s), s)
    self.num_train_examples = count(train_split)
    self._num_local = count(self._train_split)
    if self._num_local == 0:
      raise ValueError(f"TFDS {self.builder.name} {train_split!r}: process "
                       f"{self.process_index} of {self.process_count} has no examples")
    self.num_eval_examples = count(eval_split)
    self._num_eval_local = count(self._eval_split)
    self.num_eval_batches = data_arrays.num_eval_batches(
        self.num_eval_examples, self.batch_size, self.process_count)

  def _dataset(self, split):
    ds = _tfds_dataset(self.builder, split, self._decoders)
    return ds.map(lambda ex: {"bytes": ex["image"], "label": ex["label"]})

  def _decode(self, ex):
    return _fix_channels(self._feature.decode_example(ex["bytes"]), self.channels)

  def _train_examples(self, start_step):
    tf = tensorflow()
    n = self._num_local
    epoch0, offset = divmod(start_step * self.batch_size, n)
    base = self._dataset(self._train_split).enumerate()
    if self.cache:
      base = base.cache()
    buffer = min(self.shuffle_buffer, n)
    key0 = self._key0

    def epoch(e):
      ds = base
      if buffer > 1:
        ds = ds.shuffle(buffer, seed=key0 * 1_000_003 + e, reshuffle_each_iteration=False)
      return ds.map(lambda i, ex: {**ex, "key": e * n + i})

    ds = tf.data.Dataset.range(epoch0, 1 << 62).flat_map(epoch)
    return ds.skip(offset)

  def _eval_examples(self):
    return self._dataset(self._eval_split), self._num_eval_local


# ----------------------------------------------------------------------------- image folders
def _inspect_image(path: str):
  """-> (None, needs_pil) for a usable file, or (reason, None)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    if os.path.getsize(path) == 0:
      return "empty file (0 bytes)", None
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      # Above PIL's pixel limit an image is a decompression bomb: one such
      # file would decode to gigabytes, here and in every epoch.
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as im:
        im.verify()
      with Image.open(path) as im:
        fmt, mode = im.format, im.mode
        width, height = im.size
        if width < 1 or height < 1:
          return f"empty image ({width}x{height})", None
        if fmt == "JPEG":
          im.draft(None, (max(1, width // 8), max(1, height // 8)))
        im.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}", None
  if fmt == "PNG" or fmt == "GIF":
    needs_pil = False
  elif fmt == "JPEG":
    needs_pil = mode not in ("L", "RGB")
  elif fmt == "BMP":
    needs_pil = mode not in ("RGB", "RGBA")
  else:
    needs_pil = True
  return None, needs_pil


def class_files(folder: str, classes: list[str] | None = None):
  if not os.path.isdir(folder):
    raise ValueError(f"image folder {folder!r} does not exist")
  found = sorted(d for d in os.listdir(folder)
                 if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
  given = None if classes is None else list(classes)
  # The train folder's classes in their order, then any folder only this one has.
  classes = found if given is None else given + sorted(set(found) - set(given))
  per_class = []
  # Symlinked folders are followed once: a link loop, or two links to one
  # folder, would otherwise repeat images (and leak them into the held-out split).
  seen_dirs, seen_files = set(), set()
  for c in classes:
    files = []
    root = os.path.join(folder, c)
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
      real = os.path.realpath(dirpath)
      if real in seen_dirs:
        logging.warning("Skipping %s: it links to a folder already read (%s)", dirpath, real)
        dirnames[:] = []
        continue
      seen_dirs.add(real)
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for f in sorted(names):
        if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
          continue
        path = os.path.join(dirpath, f)
        try:
          path.encode("utf-8")
        except UnicodeEncodeError:
          raise ValueError(f"image file name {os.fsencode(path)!r} is not valid UTF-8; "
                           "rename it (e.g. convmv -f latin1 -t utf8)") from None
        if os.path.realpath(path) in seen_files:
          continue
        seen_files.add(os.path.realpath(path))
        files.append(path)
    per_class.append(sorted(files))
  # A folder without images (__MACOSX of an unzipped archive, a link to a class
  # already read) is no class: kept, it would add an output that no image has.
  extra = [c for c, f in zip(classes, per_class) if f and given is not None and c not in given]
  if extra:
    raise ValueError(f"image folder {folder!r} has classes {extra[:5]} that the train "
                     "folder lacks")
  keep = [i for i, (c, f) in enumerate(zip(classes, per_class))
          if f or (given is not None and c in given)]
  if len(keep) < len(classes) and keep and any(per_class):
    logging.warning("Image folder %s: leaving out %s (no images in them)", folder,
                    [c for i, c in enumerate(classes) if i not in keep])
    classes, per_class = [classes[i] for i in keep], [per_class[i] for i in keep]
  if not classes or not any(per_class):
    raise ValueError(f"image folder {folder!r} is empty: expected one sub-folder per class "
                     f"holding images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
  return classes, per_class


def _holdout(classes, per_class):
  train, held = [], []
  for c, files in zip(classes, per_class):
    rng = np.random.default_rng(zlib.crc32(c.encode("utf-8")))
    order = rng.permutation(len(files))
    n_eval = int(round(len(files) * HOLDOUT_FRACTION))
    chosen = set(order[:n_eval].tolist())
    train.append([f for i, f in enumerate(files) if i not in chosen])
    held.append([f for i, f in enumerate(files) if i in chosen])
  return train, held


class ImageFolderSource(_TFSource):
  """Class sub-folders of images under data.path; see the module docstring."""

  def __init__(self, data_cfg, augment_cfg, **kwargs):
    super().__init__(data_cfg, augment_cfg, **kwargs)
    root = _get(data_cfg, "path")
    if not root:
      raise ValueError("source='image_folder' needs config.data.path")
    self.root = root
    train_dir = os.path.join(root, _get(data_cfg, "train_split"))
    if os.path.isdir(train_dir):
      classes, train = class_files(train_dir)
      eval_name = _get(data_cfg, "eval_split")
      eval_dir = next((os.path.join(root, n) for n in (eval_name,) + _EVAL_ALIASES
                       if os.path.isdir(os.path.join(root, n))), None)
      if eval_dir is not None:
        _, held = class_files(eval_dir, classes)
      else:
        train, held = _holdout(classes, train)
    else:
      classes, train = class_files(root)
      train, held = _holdout(classes, train)
    self.class_names = tuple(classes)
    mode = _get(data_cfg, "bad_images")
    if mode not in ("skip", "fail"):
      raise ValueError(f"config.data.bad_images={mode!r}: use 'skip' or 'fail'")
    self._train = self._validate(train, mode)
    self._eval = self._validate(held, mode)
    max_examples = _get(data_cfg, "max_examples")
    if max_examples is not None:
      keep = np.sort(data_arrays.epoch_permutation(0, 0, len(self._train[0]))[:max_examples])
      self._train = tuple(a[keep] for a in self._train)
    if len(self._train[0]) == 0:
      raise ValueError(f"image folder {root!r}: no decodable training images")
    self.num_classes = int(_get(data_cfg, "num_classes") or len(classes))
    self.num_train_examples = len(self._train[0])
    self.num_eval_examples = len(self._eval[0])
    self.num_eval_batches = data_arrays.num_eval_batches(
        self.num_eval_examples, self.batch_size, self.process_count)

  def _validate(self, per_class, mode):
    items = [(path, label) for label, files in enumerate(per_class) for path in files]
    workers = min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      results = list(pool.map(_inspect_image, [p for p, _ in items]))
    paths, labels, pil = [], [], []
    for (path, label), (reason, needs_pil) in zip(items, results):
      if reason is not None:
        if mode == "fail":
          raise ValueError(f"bad image {path}: {reason} (config.data.bad_images='skip' "
                           "skips and counts such files)")
        logging.warning("Skipping bad image %s: %s", path, reason)
        self.stats["skipped_bad_images"] += 1
        continue
      paths.append(path)
      labels.append(label)
      pil.append(needs_pil)
    self.stats["pil_decoded_images"] = self.stats.get("pil_decoded_images", 0) + sum(pil)
    return (np.asarray(paths, dtype=object).astype(str) if paths else np.zeros((0,), str),
            np.asarray(labels, np.int64), np.asarray(pil, bool))

  def _decode(self, ex):
    tf = tensorflow()
    channels = self.channels

    def pil_decode(path):
      from PIL import Image  # pylint: disable=import-outside-toplevel
      with Image.open(path.decode("utf-8")) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.uint8)
      return arr.reshape(arr.shape[0], arr.shape[1], channels)

    def with_pil():
      out = tf.numpy_function(pil_decode, [ex["path"]], tf.uint8, stateful=False)
      out.set_shape([None, None, channels])
      return out

    def with_tf():
      return _fix_channels(tf.io.decode_image(ex["bytes"], channels=0, dtype=tf.uint8,
                                              expand_animations=False), channels)

    image = tf.cond(ex["pil"], with_pil, with_tf)
    image.set_shape([None, None, channels])
    return image

  def _lookup(self, files):
    tf = tensorflow()
    paths, labels, pil = (tf.constant(a) for a in files)

    def load(i):
      path = tf.gather(paths, i)
      return {"path": path, "bytes": tf.io.read_file(path), "label": tf.gather(labels, i),
              "pil": tf.gather(pil, i)}
    return load

  def _train_examples(self, start_step):
    tf = tensorflow()
    n, b = self.num_train_examples, self.batch_size
    seed, p, count = self.seed, self.process_index, self.process_count

    def steps():
      step = start_step
      while True:
        yield data_arrays.stream_indices(step, num_examples=n, batch_size=b, seed=seed,
                                         process_index=p, process_count=count)
        step += 1

    spec = tf.TensorSpec([b], tf.int64)
    ds = tf.data.Dataset.from_generator(steps, output_signature=(spec, spec)).unbatch()
    load = self._lookup(self._train)
    return ds.map(lambda i, pos: {**load(i), "key": pos},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _eval_examples(self):
    tf = tensorflow()
    start, end = data_arrays.eval_shard(self.num_eval_examples, self.process_index,
                                        self.process_count)
    ds = tf.data.Dataset.range(start, end)
    return ds.map(self._lookup(self._eval), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True), end - start
