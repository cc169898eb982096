"""ImageNet-1k (ILSVRC 2012) through TFDS; its statistics normalise every
transfer dataset too (the encoder was pre-trained on them)."""
from crate_mae_jax.data.datasets.registry import Dataset, register

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

register(Dataset(name="imagenet2012", tfds_name="imagenet2012", num_classes=1000,
                 image_size=224, channels=3, train_split="train", eval_split="validation",
                 mean=MEAN, std=STD))
