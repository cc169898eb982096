"""The recipes behind `configs/*.py`: MAE-paper training schedules as configs.

Each function returns a complete, validated-later ConfigDict; the files in
`configs/` only pick one (so every recipe is also importable and testable).
"""
import ml_collections

from crate_mae_jax import config_lib
from crate_mae_jax.data import datasets

# The paper's linear-probe / fine-tuning datasets (crate_mae_jax/datasets holds
# their TFDS names, classes, splits and normalisation).
TRANSFER = ("imagenet2012", "cifar10", "cifar100", "oxford_flowers102", "oxford_iiit_pet")


def pretrain_imagenet(variant: str = "base", arch: str = "crate_mae") -> ml_collections.ConfigDict:
  """MAE pre-training on ImageNet-1k at 224 px (He et al. 2022, Pai et al. 2024):
  AdamW β=(0.9, 0.95), wd 0.05, blr 1.5e-4 × batch/256, 40 warm-up epochs of 800,
  cosine, mask ratio 0.75, random resized crop (0.2–1) + flip, batch 4096."""
  c = config_lib.default_config()
  c.task = "pretrain"
  c.model.arch, c.model.variant = arch, variant
  c.model.dtype = "bfloat16"
  c.data.source, c.data.name = "tfds", "imagenet2012"
  c.data.train_split, c.data.eval_split = "train", "validation"
  c.data.crop_scale = (0.2, 1.0)
  c.batch_size, c.num_epochs = 4096, 800.0
  c.optim.update(name="adamw", base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05,
                 warmup_epochs=40.0)
  c.eval.max_batches = 10
  c.eval_every_steps, c.checkpoint_every_steps = 5_000, 1_000
  return c


def linear_probe(dataset: str = "imagenet2012", variant: str = "base",
                 arch: str = "crate_mae") -> ml_collections.ConfigDict:
  """MAE linear probe: frozen encoder, cls feature, BatchNorm (no affine) + linear
  head, LARS blr 0.1 × batch/256, wd 0, 10 warm-up epochs of 90 (ImageNet) or
  100 (transfer sets), crop (0.08–1) + flip."""
  c = config_lib.default_config()
  c.task = "linear_probe"
  c.model.arch, c.model.variant = arch, variant
  c.model.dtype = "bfloat16"
  _dataset(c, dataset)
  c.data.crop_scale = (0.08, 1.0)
  c.probe.pool, c.probe.head_norm = "cls", True
  c.optim.update(name="lars", base_lr=0.1, weight_decay=0.0, momentum=0.9, warmup_epochs=10.0)
  c.batch_size = 16_384 if dataset == "imagenet2012" else 1024
  c.num_epochs = 90.0 if dataset == "imagenet2012" else 100.0
  return c


def finetune(dataset: str = "imagenet2012", variant: str = "base",
             arch: str = "crate_mae") -> ml_collections.ConfigDict:
  """MAE end-to-end fine-tuning: AdamW blr 5e-4 (base) × batch/256, layer-wise lr
  decay 0.65, wd 0.05, drop path 0.1, mixup 0.8, cutmix 1.0, label smoothing 0.1,
  RandAugment (2, 9), 5 warm-up epochs of 100, mean-pooled features."""
  c = config_lib.default_config()
  c.task = "finetune"
  c.model.arch, c.model.variant = arch, variant
  c.model.dtype = "bfloat16"
  c.model.drop_path = 0.1
  _dataset(c, dataset)
  c.data.crop_scale = (0.08, 1.0)
  c.augment.update(randaugment_layers=2, randaugment_magnitude=9, mixup=0.8, cutmix=1.0,
                   label_smoothing=0.1)
  c.optim.update(name="adamw", base_lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.05,
                 layer_decay=0.65, warmup_epochs=5.0)
  c.finetune.pool = "mean"
  c.batch_size = 1024
  c.num_epochs = 100.0
  return c


def _dataset(c, name: str) -> None:
  if name not in TRANSFER:
    raise ValueError(f"dataset {name!r} is unknown; use one of {TRANSFER}")
  d = datasets.get(name)
  c.data.update(source="tfds", name=d.name, num_classes=d.num_classes,
                train_split=d.train_split, eval_split=d.eval_split,
                image_size=d.image_size, mean=d.mean, std=d.std)


def quickstart(task: str = "pretrain") -> ml_collections.ConfigDict:
  """A small CRATE-MAE on the Fashion-MNIST subset shipped with the package:
  28 px grayscale, patch 4 (49 patches), width 64, 3 + 3 layers, 16 epochs of
  5,000 images with the per-patch normalised pixel loss (norm_pix_loss: a
  narrower model trained for more steps, on a target that ignores patch
  brightness, is what makes its features beat a random encoder's within the
  CPU budget); then a linear probe (task='linear_probe'): frozen encoder,
  mean-pooled patch features, BatchNorm + linear head, AdamW (LARS, the MAE
  choice for batch 16k, trains this small probe poorly in a few epochs).
  Sized for a CPU run of a few minutes."""
  c = config_lib.default_config()
  c.task = task
  c.model.update(arch="crate_mae", variant="tiny", width=64, depth=3, heads=4,
                 patch_size=4, channels=1, norm_pix_loss=True)
  d = datasets.get("quickstart")
  c.data.update(source=d.name, image_size=d.image_size, mean=d.mean, std=d.std,
                in_memory=True, crop_scale=(0.5, 1.0), flip=True,
                train_split=d.train_split, eval_split=d.eval_split)
  c.eval.num_images = 8
  c.log_every_steps = 50
  c.keep_checkpoints = 2
  if task == "pretrain":
    c.batch_size, c.num_epochs = 128, 16.0
    c.optim.update(base_lr=1.5e-4 * 8, warmup_epochs=1.0, weight_decay=0.05)
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 10_000  # once, at the end
  else:
    c.batch_size, c.num_epochs = 256, 12.0
    c.data.crop_scale = (0.8, 1.0)
    c.probe.pool = "mean"
    c.optim.update(name="adamw", base_lr=2e-3, b2=0.999, weight_decay=0.0,
                   warmup_epochs=1.0)
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 10_000
  return c
