"""TF-free in-memory data: the npz loader and the array-backed source.

Used for `data.source` 'arrays' and the registered datasets with their own
loader (`crate_mae_jax.data.datasets`: 'fashion_mnist', 'quickstart') always, and
for small TFDS datasets with `data.in_memory=True` (`input_pipeline` loads those
once with `tfds.as_numpy` and hands the arrays over here).

Design (the simpler of the two options): the host does no augmentation.
`ArraySource.train_batches` and `eval_batches` yield the raw uint8 images as
stored, (B, H, W, C0), and `ArraySource.device_augment` -- a pure-JAX function
(`augment_jax.make_device_augment`) -- does the random resized crop, flip,
RandAugment (fine-tuning), channel conversion and normalisation inside the
jitted step (train=True), or the eval resize and normalisation (train=False).

Order and determinism: one global example stream shared by all processes. Epoch
e visits the train arrays in the order `epoch_permutation(seed, e, N)` (numpy
Generator seeded with SeedSequence([seed, e])); the stream is the concatenation
of the epochs. Global step s covers stream positions [s*G, (s+1)*G) with
G = batch_size * process_count, and process p takes the slice
[s*G + p*B, s*G + (p+1)*B). Batches may straddle an epoch boundary. Hence the
batch of step s is a pure function of (seed, s, process) and
`train_batches(k)` is exactly the tail of `train_batches(0)` from step k; the
processes read disjoint examples that together cover every epoch. The
augmentation randomness is the rng the train step passes to device_augment.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Iterator

import numpy as np


# ------------------------------------------------------------------ loaders
def to_uint8(images: np.ndarray, what: str) -> np.ndarray:
  """uint8 pixels from uint8, integer [0, 255], float [0, 255] or float [0, 1]
  arrays (the last scaled by 255: a float image in [0, 1] must not turn black);
  anything else is refused rather than clipped."""
  if images.dtype == np.uint8:
    return images
  if images.dtype.kind not in "iuf":
    raise ValueError(f"{what}: dtype {images.dtype} is not a pixel type; give uint8 "
                     "[0, 255] or float [0, 1] images")
  if images.size == 0:
    return images.astype(np.uint8)
  if images.dtype.kind == "f" and not np.all(np.isfinite(images)):
    raise ValueError(f"{what}: hold NaN or inf pixels; clean the array")
  lo, hi = float(images.min()), float(images.max())
  if lo < 0 or hi > 255:
    raise ValueError(f"{what}: pixel values span [{lo:g}, {hi:g}]; give uint8 [0, 255] "
                     "or float [0, 1] images (undo any normalisation)")
  if images.dtype.kind == "f" and hi <= 1.0:
    return np.round(images * 255.0).astype(np.uint8)
  return np.round(images).astype(np.uint8)


def check_labels(labels, what: str, num_classes: int | None = None) -> np.ndarray:
  """int32 class indices from integer (or whole-valued float) labels of shape (N,):
  a negative label, one at or above `num_classes` (config.data.num_classes), soft
  or one-hot labels are refused rather than silently dropped by one_hot."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{what}: shape {labels.shape}; expected (N,) integer class indices "
                     "(not one-hot: use labels.argmax(-1))")
  if labels.size == 0:
    return labels.astype(np.int32)
  if labels.dtype.kind == "f":
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise ValueError(f"{what}: hold non-integer values; give integer class indices")
  elif labels.dtype.kind not in "iub":
    raise ValueError(f"{what}: dtype {labels.dtype} is not an integer class index")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0:
    raise ValueError(f"{what}: label {lo} is negative; labels are class indices 0..K-1 "
                     "(relabel, e.g. np.unique(labels, return_inverse=True)[1])")
  if num_classes is not None and hi >= num_classes:
    raise ValueError(f"{what}: label {hi} but config.data.num_classes={num_classes} (labels "
                     f"0..{num_classes - 1}): the dataset has {hi + 1} classes; set "
                     f"--config.data.num_classes={hi + 1} or leave it unset")
  if hi > np.iinfo(np.int32).max:
    raise ValueError(f"{what}: label {hi} is too large for a class index")
  return labels.astype(np.int32)


def load_npz(path: str) -> dict:
  """An .npz with `{split}_images` (N, H, W[, C]) and `{split}_labels` (N,) arrays."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: array file does not exist")
  out = {}
  with np.load(path, allow_pickle=False) as f:
    for key in f.files:
      if key.endswith("_images"):
        split = key[:-len("_images")]
        if f"{split}_labels" not in f.files:
          raise ValueError(f"{path}: {key} has no matching {split}_labels")
        x = f[key]
        out[split] = (x[..., None] if x.ndim == 3 else x,
                      check_labels(f[f"{split}_labels"], f"{path}: {split}_labels"))
    if "class_names" in f.files:
      out["class_names"] = tuple(str(n) for n in f["class_names"])
  if not any(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], np.ndarray)
             for v in out.values()):
    raise ValueError(f"{path}: no '<split>_images' / '<split>_labels' arrays")
  return out


_ALIASES = {"validation": ("validation", "val", "test"), "val": ("val", "validation", "test"),
            "test": ("test", "validation", "val")}


def pick_split(arrays: dict, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
  """arrays[name], with validation/val/test standing in for each other."""
  for candidate in _ALIASES.get(name, (name,)):
    if candidate in arrays:
      return arrays[candidate]
  splits = sorted(k for k, v in arrays.items() if isinstance(v, tuple) and k != "class_names")
  raise ValueError(f"config.data.{what}={name!r}: the arrays have splits {splits}")


# ------------------------------------------------------------------ order
def _seed_entropy(seed: int) -> int:
  return int(seed) % (1 << 63)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  rng = np.random.default_rng(np.random.SeedSequence([_seed_entropy(seed), int(epoch)]))
  perm = rng.permutation(num_examples)
  perm.setflags(write=False)
  return perm


def stream_positions(step: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
  """Global stream positions of this process's slice of global step `step`."""
  start = (int(step) * process_count + process_index) * batch_size
  return start + np.arange(batch_size, dtype=np.int64)


def stream_indices(step: int, *, num_examples: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
  """(example indices, stream positions) of this process's share of step `step`."""
  pos = stream_positions(step, batch_size, process_index, process_count)
  epochs, offsets = np.divmod(pos, num_examples)
  idx = np.empty_like(pos)
  for e in np.unique(epochs):
    sel = epochs == e
    idx[sel] = epoch_permutation(seed, int(e), num_examples)[offsets[sel]]
  return idx, pos


def eval_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous [start, end) of this process (sizes differ by at most one)."""
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields: enough for the largest shard."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


# ------------------------------------------------------------------ source
class ArraySource:
  """The `input_pipeline` contract over in-memory arrays (see the module docstring)."""

  def __init__(self, train: tuple[np.ndarray, np.ndarray], eval_: tuple[np.ndarray, np.ndarray],
               *, batch_size: int, seed: int, image_size: int, mean, std, crop_scale=(0.2, 1.0),
               flip: bool = True, randaugment_layers: int = 0, randaugment_magnitude: float = 9.0,
               num_classes: int | None = None, process_index: int = 0, process_count: int = 1,
               max_examples: int | None = None, stats: dict | None = None):
    x, y = (np.asarray(a) for a in train)
    ex, ey = (np.asarray(a) for a in eval_)
    if max_examples is not None:
      x, y = x[:max_examples], y[:max_examples]
    for name, (a, b) in (("train", (x, y)), ("eval", (ex, ey))):
      if a.ndim == 3:
        a = a[..., None]
      if a.ndim != 4 or len(a) != len(b):
        raise ValueError(f"{name} arrays: images {a.shape} / labels {b.shape}; expected "
                         "(N, H, W[, C]) images and (N,) labels")
    if len(x) == 0:
      raise ValueError("the train arrays are empty")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self._x = x if x.ndim == 4 else x[..., None]
    self._y = check_labels(y, "train labels", num_classes)
    self._ex = ex if ex.ndim == 4 else ex[..., None]
    self._ey = check_labels(ey, "eval labels", num_classes)
    self._x = to_uint8(self._x, "train images")
    self._ex = to_uint8(self._ex, "eval images")
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.num_train_examples = len(self._x)
    self.num_eval_examples = len(self._ex)
    labels = np.concatenate([self._y, self._ey])
    self.num_classes = int(num_classes or (int(labels.max()) + 1 if labels.size else 0))
    channels = len(mean)
    self.image_shape = (int(image_size), int(image_size), channels)
    self.raw_image_shape = tuple(self._x.shape[1:])
    self.num_eval_batches = num_eval_batches(self.num_eval_examples, self.batch_size,
                                             self.process_count)
    self.stats = dict(stats or {})
    self.stats.setdefault("skipped_bad_images", 0)
    from crate_mae_jax.data import augment_jax  # jax only; no TF
    self.device_augment = augment_jax.make_device_augment(
        image_size=int(image_size), mean=tuple(mean), std=tuple(std),
        crop_scale=tuple(crop_scale), flip=bool(flip),
        randaugment_layers=int(randaugment_layers),
        randaugment_magnitude=float(randaugment_magnitude))

  @property
  def label_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(train labels, eval labels), e.g. to count the classes the data holds."""
    return self._y, self._ey

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Infinite raw batches {'image': uint8 (B, H, W, C0), 'label': int32 (B,)}."""
    step = int(start_step)
    while True:
      idx, _ = stream_indices(step, num_examples=self.num_train_examples,
                              batch_size=self.batch_size, seed=self.seed,
                              process_index=self.process_index,
                              process_count=self.process_count)
      yield {"image": self._x[idx], "label": self._y[idx]}
      step += 1

  def eval_batches(self) -> Iterator[dict]:
    """This process's contiguous eval shard, raw uint8, in `num_eval_batches`
    batches; the tail is padded (zeros, mask 0). mask is float32."""
    start, end = eval_shard(self.num_eval_examples, self.process_index, self.process_count)
    b = self.batch_size
    for i in range(self.num_eval_batches):
      lo, hi = min(start + i * b, end), min(start + (i + 1) * b, end)
      n = hi - lo
      image = np.zeros((b,) + self._ex.shape[1:], np.uint8)
      label = np.zeros((b,), np.int32)
      mask = np.zeros((b,), np.float32)
      image[:n], label[:n], mask[:n] = self._ex[lo:hi], self._ey[lo:hi], 1.0
      yield {"image": image, "label": label, "mask": mask}
