"""Regenerates crate_mae_jax/data/fashion_mnist_subset.npz from the Fashion-MNIST
IDX files (Debian package dataset-fashion-mnist: /usr/share/datasets/fashion-mnist).

    python tools/make_quickstart_subset.py [--src DIR] [--out FILE]

A class-balanced subset: 500 train images per class (5,000) from the 60,000
training images and 100 per class (1,000) from the 10,000 test images, chosen
with numpy's default_rng(0) and stored in a seeded shuffled order (so a prefix,
as `data.max_examples` takes, stays close to balanced). Keys: train_images
(5000, 28, 28) uint8, train_labels (5000,) uint8, train_indices (positions in
the original split), test_images, test_labels, test_indices, class_names.
Deterministic: the same inputs give the same arrays.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from crate_mae_jax.data.datasets import fashion_mnist  # noqa: E402  (TF-free)

PER_CLASS = {"train": 500, "test": 100}


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"class {c} has only {len(members)} images, {per_class} needed")
    picked.append(rng.choice(members, per_class, replace=False))
  return rng.permutation(np.concatenate(picked))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--src", default=fashion_mnist.FASHION_MNIST_DIR)
  ap.add_argument("--out", default=fashion_mnist.QUICKSTART_PATH)
  args = ap.parse_args(argv)
  data = fashion_mnist.load_fashion_mnist(args.src)
  rng = np.random.default_rng(0)
  out = {"class_names": np.asarray(fashion_mnist.FASHION_MNIST_CLASSES)}
  for split, per_class in PER_CLASS.items():
    x, y = data[split]
    idx = balanced_subset(y, per_class, rng)
    out[f"{split}_images"] = x[idx, :, :, 0].astype(np.uint8)
    out[f"{split}_labels"] = y[idx].astype(np.uint8)
    out[f"{split}_indices"] = idx.astype(np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes, "
        + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
  main()
