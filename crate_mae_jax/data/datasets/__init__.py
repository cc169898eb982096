"""Datasets, registered one file each.

Each module here describes one dataset family -- TFDS name, classes, splits,
image size and channels, normalisation, and for datasets read without TFDS the
loader -- and calls `register(Dataset(...))` at import. The input pipeline, the
config checks and the recipes look datasets up here (`get`, `for_source`); an
unknown name fails with one line listing the registered ones.

A new dataset: add `crate_mae_jax/data/datasets/<name>.py` that registers it (every
module of this package is imported below). Then `--config.data.source=tfds
--config.data.name=<name>` (loader 'tfds') or `--config.data.source=<name>`
(loader 'arrays') reads it.
"""
import importlib
import pkgutil

from crate_mae_jax.data.datasets.registry import (GENERIC_SOURCES, LOADERS, Dataset, for_source,
                                             get, names, register)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  importlib.import_module(f"{__name__}.{_module}")
