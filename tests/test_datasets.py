"""The dataset registry: one file per dataset, looked up by the input pipeline,
the config checks and the recipes; a dataset registered elsewhere works too."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from crate_mae_jax import config_lib, recipes
from crate_mae_jax.data import datasets, input_pipeline
from crate_mae_jax.data.datasets import registry

EXPECTED = ("cifar10", "cifar100", "fashion_mnist", "imagenet2012", "oxford_flowers102",
            "oxford_iiit_pet", "quickstart")


@pytest.fixture
def scratch_registry(monkeypatch):
  """Datasets registered by a test vanish after it."""
  current = dict(registry._REGISTRY)  # pylint: disable=protected-access
  monkeypatch.setattr(registry, "_REGISTRY", current)


def _data(**kw):
  c = config_lib.default_config()
  c.data.update(**kw)
  return c


def test_the_registry_lists_the_expected_datasets():
  assert datasets.names() == EXPECTED
  assert datasets.get("imagenet2012").num_classes == 1000
  assert datasets.get("oxford_flowers102").train_split == "train+validation"
  assert datasets.get("fashion_mnist").loader == "arrays"
  assert datasets.get("quickstart").tfds_name is None
  for name in EXPECTED:
    d = datasets.get(name)
    assert len(d.mean) == len(d.std) == d.channels


def test_recipes_take_the_registered_values():
  probe = recipes.linear_probe("oxford_iiit_pet")
  assert (probe.data.source, probe.data.name, probe.data.num_classes) == (
      "tfds", "oxford_iiit_pet", 37)
  assert (probe.data.train_split, probe.data.eval_split, probe.data.image_size) == (
      "train", "test", 224)
  assert tuple(probe.data.mean) == datasets.get("imagenet2012").mean
  quick = recipes.quickstart()
  assert (quick.data.source, tuple(quick.data.mean)) == ("quickstart", (0.2860,))


@pytest.mark.parametrize("source,name,field", [
    ("tfds", "cifar100x", "config.data.name='cifar100x' is not a TFDS dataset"),
    ("cifar100x", None, "config.data.source='cifar100x' is not a source"),
])
def test_an_unknown_name_fails_with_one_line_listing_the_registered(source, name, field):
  for call in (lambda: datasets.for_source(source, name),
               lambda: input_pipeline.create(_data(source=source, name=name).data, None,
                                             task="pretrain", batch_size=8, seed=0)):
    with pytest.raises(ValueError) as e:
      call()
    message = str(e.value)
    assert field in message and "did you mean 'cifar100'" in message and "\n" not in message
    assert "registered: " + ", ".join(EXPECTED) in message
  with pytest.raises(config_lib.ConfigError, match="is not a"):
    config_lib.validate(_data(source=source, name=name))


def test_a_dataset_is_read_the_way_it_is_registered():
  with pytest.raises(ValueError, match="--config.data.source='quickstart'"):
    datasets.for_source("tfds", "quickstart")
  with pytest.raises(ValueError, match="--config.data.source=tfds --config.data.name='cifar10'"):
    datasets.for_source("cifar10", None)


def test_a_bad_registration_is_refused(scratch_registry):
  good = dict(name="x", num_classes=2, image_size=8, channels=1, train_split="train",
              eval_split="test", mean=(0.5,), std=(0.5,))
  with pytest.raises(ValueError, match="loader 'tfds' needs tfds_name"):
    datasets.Dataset(**good)
  with pytest.raises(ValueError, match="one entry per channel"):
    datasets.Dataset(**{**good, "channels": 3}, tfds_name="x")
  with pytest.raises(ValueError, match="needs load"):
    datasets.Dataset(**good, loader="arrays")
  datasets.register(datasets.Dataset(**good, tfds_name="x"))
  with pytest.raises(ValueError, match="registered twice"):
    datasets.register(datasets.Dataset(**{**good, "num_classes": 3}, tfds_name="x"))


@pytest.mark.slow
def test_a_dataset_registered_elsewhere_is_read_through_tfds(scratch_registry):
  datasets.register(datasets.Dataset(
      name="my_cifar", tfds_name="cifar10", num_classes=10, image_size=32, channels=3,
      train_split="train", eval_split="test", mean=(0.5,) * 3, std=(0.25,) * 3))
  cfg = _data(source="tfds", name="my_cifar", image_size=32, eval_split="test",
              mean=(0.5,) * 3, std=(0.25,) * 3, shuffle_buffer=16)
  cfg.model.update(channels=3, patch_size=4)
  config_lib.validate(cfg)
  with tfds.testing.mock_data(num_examples=12):
    src = input_pipeline.create(cfg.data, cfg.augment, task="pretrain", batch_size=4, seed=0)
    assert (src.num_train_examples, src.num_classes, src.image_shape) == (12, 10, (32, 32, 3))
    batch = next(src.train_batches(0))
  assert batch["image"].shape == (4, 32, 32, 3) and np.isfinite(batch["image"]).all()


def test_a_dataset_registered_elsewhere_is_read_by_its_own_loader(scratch_registry):
  rng = np.random.default_rng(0)
  arrays = {split: (rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                    np.arange(n, dtype=np.int32) % 3) for split, n in (("train", 9), ("test", 5))}
  seen = []

  def load(path):
    seen.append(path)
    return arrays
  datasets.register(datasets.Dataset(
      name="tiny_gray", loader="arrays", load=load, num_classes=3, image_size=8, channels=1,
      train_split="train", eval_split="test", mean=(0.5,), std=(0.5,)))
  cfg = _data(source="tiny_gray", image_size=8, eval_split="test", mean=(0.5,), std=(0.5,))
  cfg.model.update(channels=1, patch_size=4)
  config_lib.validate(cfg)
  src = input_pipeline.create(cfg.data, cfg.augment, task="linear_probe", batch_size=4, seed=0)
  assert (src.num_train_examples, src.num_eval_examples, src.num_classes) == (9, 5, 3)
  np.testing.assert_array_equal(next(src.eval_batches())["image"], arrays["test"][0][:4])
  assert seen == [None]
