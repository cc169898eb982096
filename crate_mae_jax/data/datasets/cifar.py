"""CIFAR-10 and CIFAR-100 through TFDS, as MAE transfer sets: upsampled to 224
px and normalised with the ImageNet statistics of the pre-trained encoder."""
from crate_mae_jax.data.datasets import imagenet2012
from crate_mae_jax.data.datasets.registry import Dataset, register

for _name, _classes in (("cifar10", 10), ("cifar100", 100)):
  register(Dataset(name=_name, tfds_name=_name, num_classes=_classes, image_size=224,
                   channels=3, train_split="train", eval_split="test",
                   mean=imagenet2012.MEAN, std=imagenet2012.STD))
