"""Oxford Flowers-102 through TFDS, as an MAE transfer set: trained on train +
validation (2,040 images), evaluated on test; ImageNet statistics."""
from crate_mae_jax.data.datasets import imagenet2012
from crate_mae_jax.data.datasets.registry import Dataset, register

register(Dataset(name="oxford_flowers102", tfds_name="oxford_flowers102", num_classes=102,
                 image_size=224, channels=3, train_split="train+validation",
                 eval_split="test", mean=imagenet2012.MEAN, std=imagenet2012.STD))
