"""Input pipelines: TFDS (mocked), image folders, Fashion-MNIST IDX, the shipped
quick-start subset, in-memory arrays, device augmentation and mixup/cutmix."""
import gzip
import io
import itertools
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from crate_mae_jax.data import augment_jax, data_arrays, input_pipeline
from crate_mae_jax import config_lib
from crate_mae_jax.data.datasets import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MEAN, CIFAR_STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _data(**kw):
  c = config_lib.default_config()
  c.data.update(**kw)
  return c.data, c.augment


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _pixel_ids(images, mean, std):
  """Constant images that encode an example id -> the ids."""
  raw = images * (np.asarray(std) * 255.0) + np.asarray(mean) * 255.0
  flat = raw.reshape(len(raw), -1)
  np.testing.assert_allclose(flat.min(1), flat.max(1), atol=0.05)  # still constant
  return np.round(flat[:, 0]).astype(int)


# ============================================================================ TFDS (mocked)
tfds = pytest.importorskip("tensorflow_datasets")


def _indexed_mock(sizes: dict, shape=(32, 32, 3)):
  """A mock `_as_dataset` that honours split slicing and per-process splits:
  example i of a split is a constant image of value i with label i % 10."""
  import tensorflow as tf
  from tensorflow_datasets.core import splits as splits_lib
  infos = {name: splits_lib.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
           for name, n in sizes.items()}

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kw):
    del self, read_config, shuffle_files, kw
    spec = splits_lib.AbstractSplit.from_spec(split) if isinstance(split, str) else split
    ids = []
    for part in spec.to_absolute(infos):
      n = sizes[part.splitname]
      ids.extend(range(part.from_ or 0, n if part.to is None else part.to))
    ids = np.asarray(ids, np.int64)
    encoded = bool(decoders)

    def make(i):
      image = tf.fill(shape, tf.cast(i, tf.uint8))
      return {"image": tf.io.encode_png(image) if encoded else image, "label": i % 10}

    ds = tf.data.Dataset.from_tensor_slices(ids).map(make)
    return ds.apply(tf.data.experimental.assert_cardinality(len(ids)))
  return as_dataset


def test_tfds_cifar10_shapes_normalisation_and_eval_padding():
  data, aug = _data(source="tfds", name="cifar10", image_size=32, train_split="train",
                    eval_split="test", mean=CIFAR_MEAN, std=CIFAR_STD, shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=20):
    src = input_pipeline.create(data, aug, task="pretrain", batch_size=8, seed=0)
    assert src.device_augment is augment_jax.identity_augment
    assert (src.num_train_examples, src.num_classes, src.image_shape) == (20, 10, (32, 32, 3))
    batches = _take(src.train_batches(0), 3)
    evals = list(src.eval_batches())
  lo = (0 - np.asarray(CIFAR_MEAN)) / np.asarray(CIFAR_STD)
  hi = (1 - np.asarray(CIFAR_MEAN)) / np.asarray(CIFAR_STD)
  for b in batches:
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert ((b["label"] >= 0) & (b["label"] < 10)).all()
    assert np.isfinite(b["image"]).all()
    assert (b["image"] >= lo - 1e-4).all() and (b["image"] <= hi + 1e-4).all()
    assert b["image"].std() > 0.1  # random mock images, not a constant
  assert len(evals) == src.num_eval_batches == 3
  np.testing.assert_array_equal(evals[-1]["mask"], [1, 1, 1, 1, 0, 0, 0, 0])
  assert sum(e["mask"].sum() for e in evals) == 20
  assert (evals[-1]["image"][4:] == 0).all()
  assert all(e["image"].shape == (8, 32, 32, 3) for e in evals)


@pytest.mark.parametrize("mean", [(0.286,), (0.286, 0.286, 0.286)])
def test_tfds_fashion_mnist_grayscale_channels(mean):
  data, aug = _data(source="tfds", name="fashion_mnist", image_size=28, mean=mean,
                    std=(0.353,) * len(mean), eval_split="test")
  with tfds.testing.mock_data(num_examples=10):
    src = input_pipeline.create(data, aug, task="linear_probe", batch_size=4, seed=1)
    b = next(src.train_batches(0))
    e = next(src.eval_batches())
  assert b["image"].shape == (4, 28, 28, len(mean)) == (4,) + src.image_shape
  assert e["image"].shape == (4, 28, 28, len(mean))
  if len(mean) == 3:  # grayscale tiled
    np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])


def test_tfds_finetune_randaugment_runs():
  data, aug = _data(source="tfds", name="cifar10", image_size=32, eval_split="test",
                    mean=CIFAR_MEAN, std=CIFAR_STD)
  aug.randaugment_layers = 2
  with tfds.testing.mock_data(num_examples=8):
    src = input_pipeline.create(data, aug, task="finetune", batch_size=8, seed=0)
    a = next(src.train_batches(0))
    b = next(src.train_batches(0))
  assert a["image"].shape == (8, 32, 32, 3) and np.isfinite(a["image"]).all()
  np.testing.assert_array_equal(a["image"], b["image"])


def test_tfds_resume_equals_tail_and_seed_matters():
  data, aug = _data(source="tfds", name="cifar10", image_size=32, eval_split="test",
                    mean=CIFAR_MEAN, std=CIFAR_STD, shuffle_buffer=16)
  with tfds.testing.mock_data(num_examples=20):  # 20 / 6: batches straddle epochs
    src = input_pipeline.create(data, aug, task="pretrain", batch_size=6, seed=3)
    full = _take(src.train_batches(0), 8)
    again = _take(src.train_batches(0), 8)
    tail = _take(src.train_batches(3), 5)
    other = next(input_pipeline.create(data, aug, task="pretrain", batch_size=6,
                                       seed=4).train_batches(0))
  _assert_same_batches(full, again)
  _assert_same_batches(full[3:], tail)
  assert not np.array_equal(full[0]["image"], other["image"])


def test_tfds_process_shards_differ_and_cover():
  data, aug = _data(source="tfds", name="cifar10", image_size=32, eval_split="test",
                    mean=CIFAR_MEAN, std=CIFAR_STD, shuffle_buffer=8)
  seen, seen_eval = [], []
  with tfds.testing.mock_data(as_dataset_fn=_indexed_mock({"train": 40, "test": 23})):
    for p in range(2):
      src = input_pipeline.create(data, aug, task="pretrain", batch_size=4, seed=0,
                                  process_index=p, process_count=2)
      assert src.num_train_examples == 40 and src.num_eval_examples == 23
      assert src.num_eval_batches == 3  # ceil(12 / 4) on both processes
      epoch = _take(src.train_batches(0), 5)  # 20 local examples = one local epoch
      ids = np.concatenate([_pixel_ids(b["image"], CIFAR_MEAN, CIFAR_STD) for b in epoch])
      np.testing.assert_array_equal(np.concatenate([b["label"] for b in epoch]), ids % 10)
      seen.append(ids)
      evals = list(src.eval_batches())
      assert len(evals) == 3
      for b in evals:
        keep = b["mask"] > 0
        seen_eval.append(_pixel_ids(b["image"][keep], CIFAR_MEAN, CIFAR_STD))
      assert sum(b["mask"].sum() for b in evals) == (12 if p == 0 else 11)
    # resumption inside the second local epoch on process 1
    tail = _take(src.train_batches(7), 2)
    full = _take(src.train_batches(0), 9)
  _assert_same_batches(full[7:], tail)
  assert len(set(seen[0])) == len(seen[0]) == 20 and len(set(seen[1])) == 20
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(40))
  assert sorted(np.concatenate(seen_eval)) == list(range(23))


def test_tfds_in_memory_uses_arrays_and_device_augment():
  data, aug = _data(source="tfds", name="cifar10", image_size=32, eval_split="test",
                    mean=CIFAR_MEAN, std=CIFAR_STD, in_memory=True)
  with tfds.testing.mock_data(as_dataset_fn=_indexed_mock({"train": 30, "test": 7})):
    src = input_pipeline.create(data, aug, task="pretrain", batch_size=5, seed=0)
  assert isinstance(src, data_arrays.ArraySource) and src.device_augment is not None
  assert src.num_train_examples == 30 and src.num_eval_examples == 7
  b = next(src.train_batches(0))
  assert b["image"].dtype == np.uint8 and b["image"].shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(b["image"][:, 0, 0, 0] % 10, b["label"])
  out = src.device_augment(jax.random.key(0), b["image"], True)
  assert out.shape == (5, 32, 32, 3) and out.dtype == jnp.float32


# ============================================================================ arrays
def _index_arrays(n, size=8):
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 1))
  return np.ascontiguousarray(x), (np.arange(n) % 10).astype(np.int32)


def test_arrays_resume_shards_and_eval_padding():
  x, y = _index_arrays(48)
  ex, ey = _index_arrays(21)
  data, aug = _data(source="arrays", image_size=8, mean=(0.5,), std=(0.5,), eval_split="test")
  arrays = {"train": (x, y), "test": (ex, ey)}
  src = input_pipeline.create(data, aug, task="pretrain", batch_size=8, seed=0, arrays=arrays)
  full = _take(src.train_batches(0), 12)
  _assert_same_batches(full[4:], _take(src.train_batches(4), 8))
  _assert_same_batches(full, _take(src.train_batches(0), 12))
  epoch0 = np.concatenate([b["image"][:, 0, 0, 0] for b in full[:6]])
  assert sorted(epoch0) == list(range(48))
  assert not np.array_equal(epoch0, np.concatenate([b["image"][:, 0, 0, 0] for b in full[6:]]))
  other = input_pipeline.create(data, aug, task="pretrain", batch_size=8, seed=1, arrays=arrays)
  assert not np.array_equal(full[0]["image"], next(other.train_batches(0))["image"])

  seen, seen_eval = [], []
  for p in range(2):
    s = input_pipeline.create(data, aug, task="pretrain", batch_size=8, seed=0, process_index=p,
                              process_count=2, arrays=arrays)
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(s.train_batches(0), 3)])
    seen.append(ids)
    evals = list(s.eval_batches())
    assert len(evals) == s.num_eval_batches == 2  # ceil(11 / 8)
    for b in evals:
      seen_eval.extend(b["image"][b["mask"] > 0][:, 0, 0, 0])
    assert evals[-1]["mask"].dtype == np.float32
    assert (evals[-1]["image"][evals[-1]["mask"] == 0] == 0).all()
  assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(48))
  # the two processes' slices of a step are the single-process global batch
  single = input_pipeline.create(data, aug, task="pretrain", batch_size=16, seed=0, arrays=arrays)
  np.testing.assert_array_equal(next(single.train_batches(0))["image"][:, 0, 0, 0],
                                np.concatenate([seen[0][:8], seen[1][:8]]))
  assert sorted(seen_eval) == list(range(21))


def test_arrays_max_examples_and_npz_path(tmp_path):
  x, y = _index_arrays(30)
  path = tmp_path / "a.npz"
  np.savez(path, train_images=x[..., 0], train_labels=y, test_images=x[:5, ..., 0],
           test_labels=y[:5])
  data, aug = _data(source="arrays", path=str(path), image_size=8, mean=(0.5,), std=(0.5,),
                    max_examples=12)
  src = input_pipeline.create(data, aug, task="pretrain", batch_size=4, seed=0)
  assert src.num_train_examples == 12 and src.num_eval_examples == 5  # 'validation' -> test
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(src.train_batches(0), 3)])
  assert sorted(ids) == list(range(12))


# ============================================================================ image folders
def _write_image(path, size, mode="RGB", fmt=None, seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path, fmt)


def _make_folder(root, per_class=10, classes=("cat", "dog", "eel")):
  for ci, c in enumerate(classes):
    d = root / c
    d.mkdir(parents=True)
    for i in range(per_class):
      kind = (ci * per_class + i) % 4
      size = (12 + i, 20 + 2 * ci)
      if kind == 0:
        _write_image(d / f"{i}.jpg", size, "RGB", "JPEG", seed=i)
      elif kind == 1:
        _write_image(d / f"{i}.png", size, "L", "PNG", seed=i)
      elif kind == 2:
        _write_image(d / f"{i}.png", size, "RGBA", "PNG", seed=i)
      else:
        _write_image(d / f"{i}.JPEG", size, "L", "JPEG", seed=i)


def test_image_folder_skips_and_counts_bad_files(tmp_path):
  _make_folder(tmp_path)
  (tmp_path / "cat" / "notes.jpg").write_text("this is not an image")
  (tmp_path / "dog" / "empty.png").write_bytes(b"")
  (tmp_path / "dog" / "README.txt").write_text("ignored: not an image extension")
  data, aug = _data(source="image_folder", path=str(tmp_path), image_size=16,
                    mean=CIFAR_MEAN, std=CIFAR_STD, bad_images="skip", shuffle_buffer=8)
  src = input_pipeline.create(data, aug, task="pretrain", batch_size=4, seed=0)
  assert src.stats["skipped_bad_images"] == 2
  assert src.num_classes == 3 and src.class_names == ("cat", "dog", "eel")
  assert src.num_train_examples + src.num_eval_examples == 30
  assert src.num_eval_examples == 3  # 10% of every class held out
  full = _take(src.train_batches(0), 10)
  for b in full:
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all() and set(b["label"]) <= {0, 1, 2}
  _assert_same_batches(full[6:], _take(src.train_batches(6), 4))
  evals = list(src.eval_batches())
  assert len(evals) == 1 and evals[0]["mask"].tolist() == [1, 1, 1, 0]
  assert sorted(evals[0]["label"][:3]) == [0, 1, 2]

  data.bad_images = "fail"
  with pytest.raises(ValueError, match="notes.jpg|empty.png"):
    input_pipeline.create(data, aug, task="pretrain", batch_size=4, seed=0)


def test_image_folder_truncated_and_split_folders_and_gray(tmp_path):
  _make_folder(tmp_path / "train", per_class=3, classes=("a", "b"))
  _make_folder(tmp_path / "val", per_class=2, classes=("b",))
  buf = io.BytesIO()
  _write_image(buf, (40, 40), "RGB", "JPEG")
  (tmp_path / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[:300])
  data, aug = _data(source="image_folder", path=str(tmp_path), image_size=8, mean=(0.5,),
                    std=(0.5,), eval_split="validation", bad_images="fail")
  with pytest.raises(ValueError, match="cut.jpg"):
    input_pipeline.create(data, aug, task="pretrain", batch_size=2, seed=0)
  data.bad_images = "skip"
  src = input_pipeline.create(data, aug, task="finetune", batch_size=2, seed=0)
  assert src.stats["skipped_bad_images"] == 1
  assert (src.num_train_examples, src.num_eval_examples) == (6, 2)
  b = next(src.train_batches(0))
  assert b["image"].shape == (2, 8, 8, 1)
  e = list(src.eval_batches())
  assert [x["label"].tolist() for x in e] == [[1, 1]]


def test_image_folder_missing_or_empty(tmp_path):
  missing = tmp_path / "nope"
  data, aug = _data(source="image_folder", path=str(missing), image_size=8)
  with pytest.raises(ValueError, match=str(missing)):
    input_pipeline.create(data, aug, task="pretrain", batch_size=2, seed=0)
  empty = tmp_path / "empty"
  empty.mkdir()
  data.path = str(empty)
  with pytest.raises(ValueError, match=str(empty)):
    input_pipeline.create(data, aug, task="pretrain", batch_size=2, seed=0)
  (empty / "cls").mkdir()
  (empty / "cls" / "x.txt").write_text("no images")
  with pytest.raises(ValueError, match=str(empty)):
    input_pipeline.create(data, aug, task="pretrain", batch_size=2, seed=0)


# ============================================================================ Fashion-MNIST IDX
def _write_idx(path, array, compress):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  raw = header + array.tobytes()
  if compress:
    path = str(path) + ".gz"
    raw = gzip.compress(raw)
  with open(path, "wb") as f:
    f.write(raw)


def test_fashion_mnist_idx_parsing(tmp_path):
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  train_y = (np.arange(12) % 10).astype(np.uint8)
  test_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  test_y = np.arange(5, dtype=np.uint8)
  _write_idx(tmp_path / "train-images-idx3-ubyte", train_x, compress=True)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", train_y, compress=True)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, compress=False)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, compress=False)
  loaded = fashion_mnist.load_fashion_mnist(str(tmp_path))
  np.testing.assert_array_equal(loaded["train"][0][..., 0], train_x)
  np.testing.assert_array_equal(loaded["test"][1], test_y)
  data, aug = _data(source="fashion_mnist", path=str(tmp_path), image_size=28, mean=(0.3,),
                    std=(0.35,))
  src = input_pipeline.create(data, aug, task="linear_probe", batch_size=4, seed=0)
  assert (src.num_train_examples, src.num_eval_examples, src.num_classes) == (12, 5, 10)
  e = next(src.eval_batches())
  np.testing.assert_array_equal(e["image"][..., 0], test_x[:4])
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + b"\x00" * 10)
  with pytest.raises(ValueError, match="bytes"):
    fashion_mnist.read_idx(str(bad))
  (tmp_path / "text").write_text("not an IDX file")
  with pytest.raises(ValueError, match="magic"):
    fashion_mnist.read_idx(str(tmp_path / "text"))


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_files():
  loaded = fashion_mnist.load_fashion_mnist()
  assert loaded["train"][0].shape == (60000, 28, 28, 1) and len(loaded["train"][1]) == 60000
  assert loaded["test"][0].shape == (10000, 28, 28, 1) and len(loaded["test"][1]) == 10000
  assert np.bincount(loaded["test"][1]).tolist() == [1000] * 10


# ============================================================================ quick start subset
def test_quickstart_subset():
  assert os.path.getsize(fashion_mnist.QUICKSTART_PATH) < 5 * 2**20
  loaded = fashion_mnist.load_quickstart()
  (x, y), (ex, ey) = loaded["train"], loaded["test"]
  assert x.shape == (5000, 28, 28, 1) and x.dtype == np.uint8
  assert ex.shape == (1000, 28, 28, 1)
  assert np.bincount(y).tolist() == [500] * 10 and np.bincount(ey).tolist() == [100] * 10
  assert len(loaded["class_names"]) == 10
  data, aug = _data(source="quickstart", image_size=28, mean=(0.286,), std=(0.353,),
                    eval_split="test")
  src = input_pipeline.create(data, aug, task="pretrain", batch_size=128, seed=0)
  assert (src.num_train_examples, src.num_eval_examples, src.num_classes) == (5000, 1000, 10)
  assert src.image_shape == (28, 28, 1) and src.num_eval_batches == 8
  b = next(src.train_batches(0))
  assert b["image"].shape == (128, 28, 28, 1) and b["label"].dtype == np.int32


# ============================================================================ device augmentation
def test_device_augment_shapes_determinism_and_eval():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
  aug = augment_jax.make_device_augment(image_size=32, mean=(0.5, 0.5, 0.5),
                                        std=(0.25, 0.25, 0.25), crop_scale=(0.2, 1.0))
  a = aug(jax.random.key(0), images, True)
  assert a.shape == (6, 32, 32, 3) and a.dtype == jnp.float32 and jnp.isfinite(a).all()
  np.testing.assert_array_equal(a, aug(jax.random.key(0), images, True))
  assert not np.array_equal(a, aug(jax.random.key(1), images, True))
  assert float(a.min()) >= -2.0 - 1e-5 and float(a.max()) <= 2.0 + 1e-5
  e = aug(jax.random.key(5), jnp.asarray(images, jnp.float32), False)
  assert e.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(e, aug(jax.random.key(6), images, False))
  # identity geometry: full crop, no flip, same size -> the normalised input
  same = augment_jax.make_device_augment(image_size=28, mean=(0.5,), std=(0.25,),
                                         crop_scale=(1.0, 1.0), flip=False)
  np.testing.assert_allclose(same(jax.random.key(0), images, True),
                             (images / 255.0 - 0.5) / 0.25, atol=1e-4)
  # large images: shorter side to size / 0.875, centre crop
  big = rng.integers(0, 256, (2, 80, 100, 3), dtype=np.uint8)
  rgb = augment_jax.make_device_augment(image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
  assert rgb(jax.random.key(0), big, False).shape == (2, 64, 64, 3)
  gray = augment_jax.make_device_augment(image_size=32, mean=(0.5,), std=(0.25,))
  assert gray(jax.random.key(0), big, True).shape == (2, 32, 32, 1)


def test_device_randaugment():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  aug = augment_jax.make_device_augment(image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3,
                                        crop_scale=(1.0, 1.0), flip=False,
                                        randaugment_layers=2, randaugment_magnitude=9)
  outs = [np.asarray(aug(jax.random.key(k), images, True)) for k in range(3)]
  assert all(o.shape == (4, 16, 16, 3) and np.isfinite(o).all() for o in outs)
  np.testing.assert_array_equal(outs[0], aug(jax.random.key(0), images, True))
  assert len({o.tobytes() for o in outs}) == 3
  assert min(o.min() for o in outs) >= -2.0 - 1e-5 and max(o.max() for o in outs) <= 2.0 + 1e-5


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix(mixup, cutmix):
  n, classes = 8, 10
  images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                            (n, 12, 12, 3))
  labels = jax.nn.one_hot(jnp.arange(n) % classes, classes)
  mix = jax.jit(augment_jax.mixup_cutmix, static_argnums=(3, 4))
  for k in range(4):
    x, y = mix(jax.random.key(k), images, labels, mixup, cutmix)
    assert x.shape == images.shape and x.dtype == images.dtype and y.shape == labels.shape
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    lam = np.asarray(y)[np.arange(n), np.arange(n) % classes]
    # every output is lam * x_i + (1 - lam) * x_reversed, on average over pixels
    expect = lam * np.arange(n) + (1 - lam) * np.arange(n)[::-1]
    np.testing.assert_allclose(np.asarray(x).mean(axis=(1, 2, 3)), expect, atol=1e-4)
  if not mixup and not cutmix:
    assert augment_jax.mixup_cutmix(jax.random.key(0), images, labels, 0, 0)[0] is images


# ============================================================================ layering
def test_no_tensorflow_for_array_sources():
  code = (
      "import sys\n"
      "import crate_mae_jax.data.input_pipeline as ip, crate_mae_jax.data.data_arrays, "
      "crate_mae_jax.data.augment_jax\n"
      "assert 'tensorflow' not in sys.modules, 'import loaded TF'\n"
      "from crate_mae_jax import config_lib\n"
      "c = config_lib.default_config()\n"
      "c.data.update(source='quickstart', image_size=28, mean=(0.3,), std=(0.35,))\n"
      "s = ip.create(c.data, c.augment, task='pretrain', batch_size=8, seed=0)\n"
      "next(s.train_batches(0)); next(s.eval_batches())\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorflow_datasets', 'tf_keras', 'keras'))\n"
      "assert not bad, bad\n"
      "print('ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
