"""Fashion-MNIST: the 60,000 / 10,000 IDX files (TF-free, `data.source=
'fashion_mnist'`, or through TFDS with `data.source='tfds'`), and 'quickstart',
the class-balanced 5,000 / 1,000 subset shipped in the package
(`crate_mae_jax/data/fashion_mnist_subset.npz`, made by
tools/make_quickstart_subset.py)."""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from crate_mae_jax.data.data_arrays import load_npz
from crate_mae_jax.data.datasets.registry import Dataset, register

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)        # train-set pixel statistics
QUICKSTART_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "fashion_mnist_subset.npz")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Parses one IDX file (LeCun's MNIST format), gzipped or not."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise ValueError(f"{path}: damaged gzip file ({type(e).__name__}: {e}); download "
                       "it again") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: IDX header truncated")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  count = int(np.prod(shape)) if shape else 1
  if len(raw) - header != count * dtype.itemsize:
    raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, the header "
                     f"{shape} x {dtype.itemsize} needs {count * dtype.itemsize}")
  data = np.frombuffer(raw, dtype, count=count, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: str, prefix: str, kind: str) -> str:
  rank = 3 if kind == "images" else 1
  names = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
  for name in names:
    for candidate in (name, name + ".gz"):
      path = os.path.join(folder, candidate)
      if os.path.isfile(path):
        return path
  raise ValueError(f"{folder}: no {names[0]}[.gz] IDX file (Fashion-MNIST layout expected; "
                   "on Debian/Ubuntu: apt install dataset-fashion-mnist)")


def load_fashion_mnist(path: str | None = None) -> dict:
  """Fashion-MNIST (or MNIST) IDX files in `path` -> {'train': (x, y), 'test': (x, y)},
  x uint8 (N, 28, 28, 1), y int32."""
  folder = path or FASHION_MNIST_DIR
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: Fashion-MNIST folder does not exist (set data.path, or "
                     "apt install dataset-fashion-mnist)")
  out = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    x = read_idx(_find_idx(folder, prefix, "images"))
    y = read_idx(_find_idx(folder, prefix, "labels"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
    out[split] = (x.astype(np.uint8)[..., None], y.astype(np.int32))
  out["class_names"] = FASHION_MNIST_CLASSES
  return out


def load_quickstart(path: str | None = None) -> dict:
  """The Fashion-MNIST subset shipped with the package (5,000 train / 1,000 test),
  or an .npz of the same layout at `path`."""
  return load_npz(path if path and path.endswith(".npz") else QUICKSTART_PATH)


register(Dataset(name="fashion_mnist", loader="arrays", load=load_fashion_mnist,
                 tfds_name="fashion_mnist", num_classes=10, image_size=28, channels=1,
                 train_split="train", eval_split="test", mean=MEAN, std=STD))
register(Dataset(name="quickstart", loader="arrays", load=load_quickstart, num_classes=10,
                 image_size=28, channels=1, train_split="train", eval_split="test",
                 mean=MEAN, std=STD))
