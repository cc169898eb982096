"""The dataset registry: what the input pipeline and the recipes know about a
dataset, kept in one record per dataset (registered by its own file)."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

LOADERS = ("tfds", "arrays")
# Sources that read the user's own data; any other `config.data.source` names a
# registered dataset with its own loader.
GENERIC_SOURCES = ("tfds", "image_folder", "arrays")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset.

  loader 'tfds': read through TFDS (`config.data.source='tfds'`,
  `config.data.name=<name>`). loader 'arrays': read TF-free into memory by
  `load(config.data.path)` (`config.data.source=<name>`); `load(None)` reads the
  default location, and returns {split: (uint8 images (N, H, W, C), int labels)}
  (optionally 'class_names'). A dataset of either loader with a `tfds_name` can
  also be read through TFDS. `image_size`, `mean` and `std` are what the
  recipes train at and normalise with.
  """
  name: str
  num_classes: int
  image_size: int
  channels: int
  train_split: str
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  loader: str = "tfds"
  tfds_name: str | None = None
  load: Callable[[str | None], dict] | None = None

  def __post_init__(self):
    if self.loader not in LOADERS:
      raise ValueError(f"dataset {self.name!r}: loader={self.loader!r} is unknown; use one "
                       f"of {LOADERS}")
    if self.loader == "tfds" and not self.tfds_name:
      raise ValueError(f"dataset {self.name!r}: loader 'tfds' needs tfds_name")
    if self.loader == "arrays" and self.load is None:
      raise ValueError(f"dataset {self.name!r}: loader 'arrays' needs load(path)")
    if not len(self.mean) == len(self.std) == self.channels:
      raise ValueError(f"dataset {self.name!r}: mean/std need one entry per channel "
                       f"({self.channels})")
    if self.name in GENERIC_SOURCES:
      raise ValueError(f"dataset name {self.name!r} is taken by a generic source")


_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  """Makes `dataset` usable by name; a second dataset of the same name is refused."""
  if dataset.name in _REGISTRY and _REGISTRY[dataset.name] != dataset:
    raise ValueError(f"dataset {dataset.name!r} is registered twice")
  _REGISTRY[dataset.name] = dataset
  return dataset


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str, *, what: str = "dataset", kind: str = "dataset") -> Dataset:
  """The registered dataset `name`; otherwise one ValueError naming `what`, the
  closest names and every registered one."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  close = difflib.get_close_matches(str(name), names(), n=3)
  hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
  raise ValueError(f"{what}={name!r} is not a {kind} registered in crate_mae_jax/datasets "
                   f"({hint}registered: {', '.join(names())}); to add one, add a file there")


def for_source(source: str, name: str | None) -> Dataset:
  """The dataset `config.data` reads: `data.name` when `data.source` is 'tfds',
  else the dataset `data.source` names (not for 'image_folder' / 'arrays')."""
  if source == "tfds":
    dataset = get(name, what="config.data.name", kind="TFDS dataset")
    if dataset.tfds_name is None:
      raise ValueError(f"config.data.name={name!r} is not in TFDS; read it with "
                       f"--config.data.source={name!r}")
    return dataset
  if source in GENERIC_SOURCES:
    raise ValueError(f"config.data.source={source!r} reads the user's own files, not a "
                     "registered dataset")
  dataset = get(source, what="config.data.source",
                kind=f"source {GENERIC_SOURCES} or dataset")
  if dataset.loader != "arrays":
    raise ValueError(f"config.data.source={source!r}: this dataset is read through TFDS; set "
                     f"--config.data.source=tfds --config.data.name={source!r}")
  return dataset
