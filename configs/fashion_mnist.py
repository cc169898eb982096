"""Full Fashion-MNIST at a fixed budget: CRATE-MAE and ViT-MAE of the same size (issue 8).

    python -m crate_mae_jax.main --config=configs/fashion_mnist.py:pretrain,crate_mae \
        --workdir=DIR/pre [--config.data.path=/path/to/idx/folder]
    python -m crate_mae_jax.main --config=configs/fashion_mnist.py:linear_probe,crate_mae \
        --workdir=DIR/probe --config.init_from=DIR/pre
    python -m crate_mae_jax.main --config=configs/fashion_mnist.py:finetune,vit_mae \
        --workdir=DIR/ft --config.init_from=DIR/pre_vit

Argument: TASK,ARCH with TASK in pretrain | linear_probe | finetune | supervised
and ARCH in crate_mae | vit_mae | vit_mae_all | vit_mae_matched (default
pretrain,crate_mae).

Baselines (parameters at 28 px, encoder / whole MAE):
* vit_mae: ViT-MAE of the same width, depth, heads and patch, encoder on the
  visible patches (MAE): 2,673,024 / 5.38 M, 4x CRATE-MAE's.
* vit_mae_all: the same ViT-MAE with mask tokens in the encoder
  (`model.encoder_sees='all'`, the official repository's `mae_vit_*` baseline,
  laid out like CRATE-MAE): 2,673,216 / 5.35 M.
* vit_mae_matched: ViT-MAE parameter-matched to CRATE-MAE: same depth 6 and
  patch 4, width 96, heads 6 (head dim 16), decoder mirroring the encoder:
  672,960 / 1,355,152 against CRATE-MAE's 673,344 / 1,346,128 (-0.06 % /
  +0.7 %; width 92 or 100 would be -8 % / +8 %).
* supervised: the fine-tuning recipe from a random initialisation (no init_from),
  for any arch: the control that shows what pre-training adds. `python -m experiments.study`
runs all of them, the raw-pixel floor and the diagnostics (RESULTS.md).

Data: the 60,000 / 10,000 Fashion-MNIST IDX files (source 'fashion_mnist', read
TF-free by `crate_mae_jax.data.data_arrays`; Debian/Ubuntu: apt install
dataset-fashion-mnist), 28 px grayscale, held in memory, augmented on device.

Model: both archs width 192, depth 6, heads 6 (head dim 32), patch 4 (7x7 = 49
patches + cls). The ViT-MAE decoder mirrors its encoder (width 192, depth 6,
heads 6) like CRATE-MAE's does, so "same width, depth and patch size" holds for
encoder and decoder. Parameters (28 px): CRATE-MAE 0.67 M encoder / 1.35 M total;
ViT-MAE 2.67 M encoder / 5.38 M total. bf16 compute, f32 parameters.

Budget: estimated before the run as below; the measurement (RESULTS.md) is at
the end of this paragraph.
Matrix-product FLOPs per image of one pre-training forward pass (mask 0.75,
`benchmark.forward_flops`): CRATE-MAE 201 M (157 M as executed, fused ISTA),
ViT-MAE 348 M. A training step costs 3x the forward, so one epoch of 60,000
images is 36 TFLOP (CRATE-MAE) and 63 TFLOP (ViT-MAE). An H100 reaches ~800
TFLOP/s of bf16 on large products, but a width-192 model on 13 (encoder) / 50
(decoder) tokens is bound by kernel launches and elementwise work: assume ~50
TFLOP/s effective, i.e. ~1.25 s per ViT-MAE epoch (~10.7 ms per step of 512)
and ~0.6-0.7 s per CRATE-MAE epoch. 100 pre-training epochs: ~2.1 min ViT-MAE,
~1.2 min CRATE-MAE. The probe (20 epochs, frozen encoder on all 50 tokens:
ViT 277 M / CRATE 122 M FLOP per image forward) and fine-tuning (10 epochs, 3x
forward) cost ~5-10 s each at that rate. With ~15-30 s of XLA compilation per
run (6 runs) and the diagnostics, the whole study is estimated at ~6-8 min on
one H100: inside one 10-minute device command, with little margin (the study's
`--scale` shortens every schedule proportionally). Measured on one H100
(RESULTS.md): both archs ran at ~11-12 ms per step (launch-bound, so CRATE-MAE's
fewer FLOPs buy nothing), pre-training took 147 s (CRATE-MAE) and 162 s
(ViT-MAE), and the whole study took 9.1 min. It fits one 10-minute call, only
just; two calls of one arch each are the safe way (tools/run_study_on_gpu.sh).
"""
import math

import ml_collections

from crate_mae_jax import config_lib
from crate_mae_jax.data import datasets
from crate_mae_jax.data.datasets import fashion_mnist as fashion_mnist_data
NUM_TRAIN = 60_000

ARCHS = ("crate_mae", "vit_mae", "vit_mae_all", "vit_mae_matched")
TASKS = ("pretrain", "linear_probe", "finetune", "supervised")
# name -> (model.arch, model fields that differ from the shared WIDTH/DEPTH/HEADS)
BASELINES = {
    "crate_mae": ("crate_mae", {}),
    "vit_mae": ("vit_mae", {}),
    "vit_mae_all": ("vit_mae", dict(encoder_sees="all")),
    "vit_mae_matched": ("vit_mae", dict(width=96, heads=6)),
}
WIDTH, DEPTH, HEADS, PATCH = 192, 6, 6, 4
BATCH = 512
EPOCHS = {"pretrain": 100.0, "linear_probe": 20.0, "finetune": 10.0}
WARMUP = {"pretrain": 5.0, "linear_probe": 1.0, "finetune": 1.0}
EVALS = {"pretrain": 4, "linear_probe": 4, "finetune": 4}   # evaluations per run
LOG_POINTS = 200                                              # train-loss points per run


def model(c: ml_collections.ConfigDict, name: str, width: int | None = None,
          depth: int = DEPTH, heads: int | None = None) -> None:
  """Sets the model of `c`: baseline `name` (an entry of BASELINES) at
  width/depth/heads (default: the baseline's), decoder mirroring the encoder."""
  if name not in ARCHS:
    raise ValueError(f"arch {name!r} is unknown; use one of {ARCHS}")
  arch, fields = BASELINES[name]
  width = width or fields.get("width", WIDTH)
  heads = heads or fields.get("heads", HEADS)
  c.model.update(arch=arch, variant="tiny", width=width, depth=depth, heads=heads,
                 decoder_depth=depth, decoder_heads=heads, patch_size=PATCH, channels=1,
                 mask_ratio=0.75, norm_pix_loss=False, dtype="bfloat16",
                 attention_impl="xla")  # as in the H100 run of RESULTS.md
  if arch == "vit_mae":
    c.model.update(decoder_width=width, mlp_ratio=4.0,
                   encoder_sees=fields.get("encoder_sees", "visible"))


def schedule(c: ml_collections.ConfigDict, num_train_examples: int = NUM_TRAIN,
             evals: int | None = None, log_points: int = LOG_POINTS) -> int:
  """Log / eval / checkpoint intervals for `c.num_epochs` over `num_train_examples`:
  about `log_points` train-loss points, `evals` evaluations (the last at the end),
  a checkpoint at each evaluation. Returns the number of steps."""
  evals = evals or EVALS[c.task]
  steps = max(1, int(math.ceil(c.num_epochs * num_train_examples / c.batch_size)))
  c.log_every_steps = max(1, steps // log_points)
  c.eval_every_steps = max(1, int(math.ceil(steps / evals)))
  c.checkpoint_every_steps = c.eval_every_steps
  return steps


def fashion_mnist(task: str = "pretrain", arch: str = "crate_mae") -> ml_collections.ConfigDict:
  if task not in TASKS:
    raise ValueError(f"task {task!r} is unknown; use one of {TASKS}")
  if task == "supervised":   # the fine-tuning recipe from scratch
    return fashion_mnist("finetune", arch)
  c = config_lib.default_config()
  c.task = task
  model(c, arch)
  d = datasets.get("fashion_mnist")
  c.data.update(source=d.name, path=fashion_mnist_data.FASHION_MNIST_DIR,
                image_size=d.image_size, mean=d.mean, std=d.std, in_memory=True, flip=True,
                train_split=d.train_split, eval_split=d.eval_split,
                num_classes=d.num_classes)
  c.batch_size = BATCH
  c.num_epochs = EPOCHS[task]
  c.eval.num_images = 8
  c.keep_checkpoints = 2
  c.keep_best = False        # report the final model: no selection on the test split
  if task == "pretrain":
    # MAE recipe (AdamW β2 0.95, wd 0.05, cosine, mask 0.75) at lr 1e-3 for batch 512;
    # a gentler crop than ImageNet's 0.2-1 for 28 px images (as the quick start).
    c.data.crop_scale = (0.5, 1.0)
    c.optim.update(name="adamw", base_lr=5e-4, b1=0.9, b2=0.95, weight_decay=0.05,
                   warmup_epochs=WARMUP[task])
  elif task == "linear_probe":
    # Frozen encoder, mean-pooled patch features, BatchNorm (no affine) + linear head,
    # AdamW (LARS needs the MAE's batch of 16k and 90 epochs).
    c.data.crop_scale = (0.8, 1.0)
    c.probe.update(pool="mean", head_norm=True)
    c.optim.update(name="adamw", base_lr=2e-3, b1=0.9, b2=0.999, weight_decay=0.0,
                   warmup_epochs=WARMUP[task])
  else:
    # End-to-end, layer-wise lr decay, light augmentation (crop 0.8-1 + flip, label
    # smoothing 0.1, drop path 0.1; no RandAugment, mixup or cutmix), mean pooling.
    c.data.crop_scale = (0.8, 1.0)
    c.model.drop_path = 0.1
    c.augment.update(label_smoothing=0.1)
    c.finetune.pool = "mean"
    c.optim.update(name="adamw", base_lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.05,
                   layer_decay=0.75, warmup_epochs=WARMUP[task])
  schedule(c)
  return c


def get_config(arg: str | None = None):
  task, _, arch = (arg or "pretrain,crate_mae").partition(",")
  return fashion_mnist(task.strip() or "pretrain", arch.strip() or "crate_mae")
