"""Datasets, registered one file each.

Each module here describes one dataset family -- TFDS name, classes, splits,
image size and channels, normalisation, and for datasets read without TFDS the
loader -- and calls `register(Dataset(...))` at import. The input pipeline, the
config checks and the recipes look datasets up here (`get`, `for_source`); an
unknown name fails with one line listing the registered ones.

A new dataset: add `crate_mae_jax/datasets/<name>.py` that registers it, and
import it below. Then `--config.data.source=tfds --config.data.name=<name>`
(loader 'tfds') or `--config.data.source=<name>` (loader 'arrays') reads it.
"""
from crate_mae_jax.datasets.registry import (GENERIC_SOURCES, LOADERS, Dataset, for_source,
                                             get, names, register)
from crate_mae_jax.datasets import (  # pylint: disable=unused-import  (registers them)
    cifar, fashion_mnist, imagenet2012, oxford_flowers102, oxford_iiit_pet)
