"""Oxford-IIIT Pet (37 breeds) through TFDS, as an MAE transfer set; ImageNet
statistics."""
from crate_mae_jax.data.datasets import imagenet2012
from crate_mae_jax.data.datasets.registry import Dataset, register

register(Dataset(name="oxford_iiit_pet", tfds_name="oxford_iiit_pet", num_classes=37,
                 image_size=224, channels=3, train_split="train", eval_split="test",
                 mean=imagenet2012.MEAN, std=imagenet2012.STD))
