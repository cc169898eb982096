"""The one config schema every run uses, and the checks that guard it.

`configs/*.py` start from `default_config()` and change what their recipe needs.
Every field is overridable on the command line (`--config.optim.base_lr=1e-4`).
`validate()` runs before anything is compiled and raises `ConfigError` with one
line naming the field and the fix.
"""
import functools
import json
import math
import os
import re

from absl import logging
import ml_collections

from crate_mae_jax import models
from crate_mae_jax.data import datasets
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.training import tasks

TASKS = tuple(tasks.TASKS)
_IMAGENET = datasets.get("imagenet2012")


@functools.lru_cache(maxsize=1)
def _data_and_augment_defaults() -> dict:
  c = default_config()
  return {**c.data.to_dict(), **c.augment.to_dict()}  # disjoint keys


def value_or_default(cfg, key: str):
  """cfg[key] of a `config.data` / `config.augment` (a ConfigDict, a plain dict or
  None); unset or None: the value of `default_config()`, the one home of defaults."""
  value = None
  if cfg is not None:
    try:
      value = cfg[key]
    except (KeyError, AttributeError, TypeError):
      value = getattr(cfg, key, None)
  return _data_and_augment_defaults()[key] if value is None else value


def default_config() -> ml_collections.ConfigDict:
  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.model = models.model_config("base", "crate_mae")

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",                 # 'tfds', 'image_folder', 'arrays' or a registered
                                     # dataset with its own loader (crate_mae_jax/datasets)
      name=_IMAGENET.name,           # registered dataset read through TFDS (source='tfds')
      data_dir=placeholder(str),     # TFDS data dir, local or gs://
      manual_dir=placeholder(str),   # TFDS manual dir (imagenet2012)
      path=placeholder(str),         # image folder root / Fashion-MNIST IDX folder
      train_split="train",
      eval_split="validation",
      image_size=224,
      num_classes=placeholder(int),  # from the dataset when unset
      mean=_IMAGENET.mean,           # per-channel normalisation of inputs
      std=_IMAGENET.std,
      crop_scale=(0.2, 1.0),         # random resized crop (pre-training: 0.2–1)
      flip=True,
      in_memory=False,               # hold arrays on device, augment there (no TF)
      shuffle_buffer=16_384,
      cache=False,
      prefetch=2,                    # batches prefetched to the devices
      bad_images="skip",             # image folders: 'skip' (count, log) or 'fail'
      max_examples=placeholder(int), # truncate the train split (quick runs)
  ))
  c.augment = ml_collections.ConfigDict(dict(
      randaugment_layers=0,          # fine-tuning: 2
      randaugment_magnitude=9,
      mixup=0.0,                     # fine-tuning: 0.8
      cutmix=0.0,                    # fine-tuning: 1.0
      label_smoothing=0.0,           # fine-tuning: 0.1
  ))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",                  # 'adamw', 'lars' or 'sgd'
      base_lr=1.5e-4,                # lr = base_lr * batch_size / 256
      lr=placeholder(float),         # absolute lr; overrides base_lr when set
      b1=0.9,
      b2=0.95,
      momentum=0.9,                  # lars / sgd
      weight_decay=0.05,             # not applied to norms, biases, tokens
      warmup_epochs=40.0,
      min_lr=0.0,
      layer_decay=placeholder(float),  # fine-tuning: layer-wise lr decay, e.g. 0.65
      clip_grad_norm=placeholder(float),
  ))
  c.batch_size = 4096                # global batch (all hosts, all accumulation steps)
  c.accum_steps = 1                  # gradient accumulation micro-steps per update
  c.num_epochs = 800.0
  c.num_train_steps = -1             # > 0 overrides num_epochs
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3
  c.checkpoint_async = True          # write checkpoints in a background thread
  c.keep_best = True                 # also keep the best checkpoint by c.best_metric
  c.best_metric = ""                 # '' = the task's default (loss / top-1)
  c.profile_steps = 0                # > 0: trace this many steps (clu Profile)

  c.init_from = placeholder(str)     # probe / fine-tune: pre-training workdir or checkpoint
  c.probe = ml_collections.ConfigDict(dict(pool="cls", head_norm=True))
  c.finetune = ml_collections.ConfigDict(dict(pool="mean", head_init_std=2e-5))

  c.nonfinite = "stop"               # 'stop' (keep last good checkpoint) or 'skip'
  c.eval = ml_collections.ConfigDict(dict(
      num_images=8,                  # reconstruction grid images
      diagnostics=True,              # compression / sparsity per layer
      max_batches=placeholder(int),
  ))
  # Evaluations: {name: {type, every_steps, prefix, **options}} (crate_mae_jax.evaluators);
  # empty: the task's default ('eval': masked loss + reconstruction, or top-1/top-5;
  # 'diag': coding rate / sparsity per layer of a CRATE-MAE pre-training run).
  c.evals = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(
      # Axis sizes; -1 takes the remaining devices.
      shape=(("data", -1), ("fsdp", 1), ("tensor", 1)),
      # Logical axis -> mesh axes. Data parallel by default; FSDP shards
      # parameters and optimizer state over 'fsdp' when that axis is > 1.
      rules=(
          ("activation_batch", ("data", "fsdp")),
          ("activation_length", None),
          ("activation_embed", "tensor"),
          ("embed", "fsdp"),
          ("heads", "tensor"),
          ("head_dim", None),
          ("dict", "tensor"),
          ("mlp", "tensor"),
          ("decoder_embed", "tensor"),  # the ViT decoder width
          ("patch", None),
          ("pixels", None),
          ("classes", None),
          ("norm", None),
      ),
  ))
  return c


# The userinfo (`user:password@`) of a URL anywhere in a string: up to the last '@'
# before the host, stopping at what ends an authority (or a JSON/Python string).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/?#@\s\"'<>]*@)+")


def redacted(value):
  """A copy of `value` (a ConfigDict, dict, list, tuple or string, nested) in which
  the userinfo of every URL in every string is replaced: 'gs://user:pw@bucket/x' ->
  'gs://***@bucket/x'. Everything a run writes about its config goes through this,
  so a password given in a path never reaches a record, a checkpoint or TensorBoard."""
  if isinstance(value, str):
    return _URL_USERINFO.sub(r"\g<scheme>***@", value)
  if isinstance(value, ml_collections.FrozenConfigDict):
    return ml_collections.FrozenConfigDict(redacted(ml_collections.ConfigDict(value)))
  if isinstance(value, ml_collections.ConfigDict):
    out = value.copy_and_resolve_references()
    _redact_in_place(out)
    return out
  if isinstance(value, dict):
    return {k: redacted(v) for k, v in value.items()}
  if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
    return type(value)(*(redacted(v) for v in value))
  if isinstance(value, (tuple, list)):
    return type(value)(redacted(v) for v in value)
  return value


def _redact_in_place(c: ml_collections.ConfigDict) -> None:
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      _redact_in_place(value)
    else:
      new = redacted(value)
      if new != value:
        c[key] = new


def redacted_json(text: str) -> str:
  """`redacted` of a JSON document (e.g. `config.to_json_best_effort()`), as JSON;
  text that does not parse is redacted as a string."""
  try:
    parsed = json.loads(text)
  except ValueError:
    return redacted(text)
  clean = redacted(parsed)
  return text if clean == parsed else json.dumps(clean)


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def _numbers(value) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) > 0
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def host_memory_bytes() -> int | None:
  """Physical memory of this host (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def check_batch_memory(c: ml_collections.ConfigDict, channels: int, local_batch: int,
                       memory: int | None = None) -> None:
  """Refuses, before anything is allocated, a per-process batch whose images
  alone (float32, the batches the pipeline holds at once: `data.prefetch` + 2)
  would take more than half of this host's memory."""
  memory = host_memory_bytes() if memory is None else memory
  if not memory:
    return
  held = (max(int(c.data.prefetch), 0) + 2) * c.data.image_size ** 2 * channels * 4
  largest = max(1, memory // 2 // held)
  if local_batch > largest:
    _fail("batch_size", f"{c.batch_size} is {local_batch} images per process, about "
          f"{local_batch * held / 2**30:,.1f} GiB of batches in host memory "
          f"({c.data.image_size}² px × {channels} channels, float32, data.prefetch + 2 "
          f"batches held), more than half of this host's {memory / 2**30:.1f} GiB; use at "
          f"most {largest} per process (or more processes)")


def check_against_data(c: ml_collections.ConfigDict, source, local_batch: int | None = None
                       ) -> None:
  """Checks that need the dataset (after it is read, before any compile)."""
  examples = getattr(source, "num_train_examples", None)
  if local_batch is not None and examples and local_batch > examples:
    logging.warning("config.batch_size=%d is %d images per process but the train split has "
                    "%d: every step repeats examples; a batch of at most %d avoids it",
                    c.batch_size, local_batch, examples, examples)
  if not tasks.get(c.task).classifies or c.data.num_classes is None:
    return
  found = dataset_num_classes(source)
  if found is not None and c.data.num_classes < found:
    _fail("data.num_classes", f"{c.data.num_classes} but the dataset has {found} classes "
          f"(labels 0..{found - 1}); set --config.data.num_classes={found} or leave it unset")


def dataset_num_classes(source) -> int | None:
  """Classes the dataset itself holds, whatever config.data.num_classes says."""
  names = getattr(source, "class_names", None)
  if names:
    return len(names)
  builder = getattr(source, "builder", None)
  if builder is not None:
    return int(builder.info.features["label"].num_classes)
  labels = [y for y in getattr(source, "label_arrays", ()) if len(y)]
  if labels:
    return int(max(int(y.max()) for y in labels)) + 1
  return None


def _nonfinite_fields(node, prefix: str = ""):
  """Dotted names of every NaN/inf float in a config (tuples included)."""
  items = node.items() if hasattr(node, "items") else ()
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _nonfinite_fields(value, name + ".")
    elif isinstance(value, float) and not math.isfinite(value):
      yield name, value
    elif isinstance(value, (tuple, list)) and any(
        isinstance(v, float) and not math.isfinite(v) for v in value):
      yield name, value


def check_mesh(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """The mesh fits the devices and names every axis the sharding rules use."""
  from crate_mae_jax import sharding  # pylint: disable=import-outside-toplevel
  try:
    sharding.mesh_shape(c.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  axes = {name for name, _ in c.mesh.shape}
  for logical, mesh_axes in c.mesh.rules:
    named = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    missing = [a for a in named if a not in axes]
    if missing:
      _fail("mesh.rules", f"rule {logical!r} -> {mesh_axes!r} names mesh axis "
            f"{missing[0]!r}, which config.mesh.shape {tuple(sorted(axes))} lacks; add "
            f"({missing[0]!r}, 1) to config.mesh.shape or change the rule")


def check_backend(c: ml_collections.ConfigDict, platform: str) -> None:
  """The kernels a config names explicitly run on this backend (`platform`:
  'tpu', 'gpu', 'cpu'); 'auto' always does."""
  if c.model.get("attention_impl") == "splash" and platform not in ("tpu", "cpu"):
    _fail("model.attention_impl", f"'splash' is the Pallas TPU kernel and cannot run on "
          f"this {platform} backend; use 'auto' (or 'cudnn' / 'xla')")
  if c.model.get("attention_impl") == "mssa" and platform == "tpu":
    _fail("model.attention_impl", "'mssa' is our Pallas Triton kernel for NVIDIA GPUs and "
          "cannot run on this tpu backend; use 'auto' (or 'xla' / 'splash')")


def _ratio_text(ratio: float) -> str:
  return f"{ratio:.4f}".rstrip("0").rstrip(".")


def largest_usable_mask_ratio(num_patches: int) -> float:
  """The largest mask ratio, at 4 decimals, that still keeps one of `num_patches`
  (`patches.num_kept` truncates, so 1 - 1/L itself may keep none)."""
  from crate_mae_jax.models import patches  # pylint: disable=import-outside-toplevel
  ratio = math.floor((1 - 1 / num_patches) * 10_000) / 10_000
  while ratio > 0 and patches.num_kept(num_patches, ratio) < 1:
    ratio = round(ratio - 1e-4, 4)
  return ratio


def smallest_masking_ratio(num_patches: int) -> float:
  """The smallest mask ratio, at 4 decimals, that masks one of `num_patches`."""
  from crate_mae_jax.models import patches  # pylint: disable=import-outside-toplevel
  ratio = 1e-4
  while patches.num_kept(num_patches, ratio) >= num_patches:
    ratio = round(ratio + 1e-4, 4)
  return ratio


def _check_mask_ratio(task: str, ratio: float, image_size: int, patch_size: int) -> None:
  """The mask ratio keeps at least one patch of the image (the encoder needs a
  token) and, for pre-training, masks at least one (the loss is over masked ones)."""
  from crate_mae_jax.models import patches  # pylint: disable=import-outside-toplevel
  num = (image_size // patch_size) ** 2
  kept = patches.num_kept(num, ratio)
  where = f"{num} patches ({image_size} px / patch {patch_size})"
  if task == "pretrain" and num < 2:
    _fail("data.image_size", f"{image_size} gives {num} patch of model.patch_size="
          f"{patch_size}; pre-training keeps one patch and masks another, so it needs "
          "at least 2: use a larger image or a smaller patch")
  if kept < 1:
    best = largest_usable_mask_ratio(num)
    _fail("model.mask_ratio", f"{ratio} keeps {kept} of the {where}; the largest ratio "
          f"that keeps one is {_ratio_text(best)}: use "
          f"--config.model.mask_ratio={_ratio_text(best)} or lower")
  if task == "pretrain" and kept >= num:
    low = smallest_masking_ratio(num)
    _fail("model.mask_ratio", f"{ratio} masks none of the {where}, so pre-training has "
          f"no hidden patch to reconstruct (the masked-patch loss is 0/0); the smallest ratio that masks "
          f"one is {_ratio_text(low)}: use --config.model.mask_ratio={_ratio_text(low)} or "
          "higher (MAE: 0.75)")


def resolve_model(model) -> "models.ResolvedModel":
  """The model config with every size filled in and checked: the one place a
  model config is resolved (`validate`, and the tools that read a checkpoint's)."""
  try:
    return models.resolve(model)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate(c: ml_collections.ConfigDict) -> dict:
  """Checks a config before any compile; returns the resolved model dict."""
  for name, value in _nonfinite_fields(c):
    _fail(name, f"{value!r} is not a finite number; give a finite value")
  task = tasks.get(c.task)
  resolved = resolve_model(c.model)
  warn_unread_data_fields(c)
  d = c.data
  if d.source not in ("image_folder", "arrays"):
    try:
      datasets.for_source(d.source, d.name)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if not isinstance(d.image_size, int) or d.image_size <= 0:
    _fail("data.image_size", f"{d.image_size!r} must be a positive integer")
  if d.image_size % resolved["patch_size"]:
    _fail("data.image_size", f"{d.image_size} is not divisible by model.patch_size="
          f"{resolved['patch_size']}; pick a multiple of the patch size")
  _check_mask_ratio(c.task, resolved["mask_ratio"], d.image_size, resolved["patch_size"])
  for key in ("mean", "std", "crop_scale"):
    if not _numbers(d[key]):
      _fail(f"data.{key}", f"{d[key]!r} must be a tuple of numbers, e.g. "
            f"--config.data.{key}='{tuple(default_config().data[key])}'")
  if len(d.mean) != resolved["channels"] or len(d.std) != resolved["channels"]:
    _fail("data.mean", f"mean/std have {len(d.mean)}/{len(d.std)} entries but "
          f"model.channels={resolved['channels']}; give one per channel")
  if min(d.std) <= 0:
    _fail("data.std", f"{tuple(d.std)}: every std must be > 0 (inputs are divided by it)")
  if len(d.crop_scale) != 2:
    _fail("data.crop_scale", f"{tuple(d.crop_scale)} must be a pair (min, max)")
  lo, hi = d.crop_scale
  if not 0 < lo <= hi <= 1:
    _fail("data.crop_scale", f"{tuple(d.crop_scale)} must satisfy 0 < min <= max <= 1")
  if d.num_classes is not None and (not isinstance(d.num_classes, int) or d.num_classes < 1):
    _fail("data.num_classes", f"{d.num_classes!r} must be a positive integer (or unset: "
          "taken from the dataset)")
  if d.max_examples is not None and (not isinstance(d.max_examples, int)
                                     or d.max_examples < 1):
    _fail("data.max_examples", f"{d.max_examples!r} must be a positive integer (or unset)")
  if d.bad_images not in ("skip", "fail"):
    _fail("data.bad_images", f"{d.bad_images!r} is unknown; use 'skip' or 'fail'")
  if d.source in ("image_folder",) and not d.path:
    _fail("data.path", "source='image_folder' needs data.path (a folder with one "
          "sub-folder per class)")
  if d.path and d.source in ("image_folder", "fashion_mnist") and not d.path.startswith(
      "gs://") and not os.path.isdir(d.path):
    _fail("data.path", f"{d.path!r} does not exist"
          + ("" if not os.path.exists(d.path) else " as a folder")
          + "; point it at the dataset folder")
  if d.source == "image_folder" and d.in_memory:
    _fail("data.in_memory", "True is not supported for source='image_folder' (images of "
          "any size); set --config.data.in_memory=False")
  if d.source == "arrays" and not d.path:
    _fail("data.path", "source='arrays' needs data.path naming an .npz with "
          "<split>_images / <split>_labels arrays")
  if d.path and d.source == "quickstart" and not d.path.endswith(".npz"):
    _fail("data.path", f"{d.path!r} is not used by source='quickstart' (it reads the "
          "bundled subset, or an .npz of the same layout); unset data.path, or set "
          "data.source to 'image_folder', 'fashion_mnist' or 'arrays'")
  if d.path and d.source in ("arrays", "quickstart") and not os.path.isfile(d.path) and (
      d.source == "arrays" or d.path.endswith(".npz")):
    _fail("data.path", f"{d.path!r} does not exist; point it at an .npz file")
  if not isinstance(c.seed, int):
    _fail("seed", f"{c.seed!r} must be an integer")
  if not isinstance(c.batch_size, int) or c.batch_size <= 0:
    _fail("batch_size", f"{c.batch_size!r} must be a positive integer")
  if not isinstance(c.accum_steps, int) or c.accum_steps <= 0:
    _fail("accum_steps", f"{c.accum_steps!r} must be a positive integer")
  if c.batch_size % c.accum_steps:
    _fail("accum_steps", f"{c.accum_steps} does not divide batch_size={c.batch_size}")
  o = c.optim
  if o.name not in ("adamw", "lars", "sgd"):
    _fail("optim.name", f"{o.name!r} is unknown; use 'adamw', 'lars' or 'sgd'")
  if (o.lr is None and o.base_lr <= 0) or (o.lr is not None and o.lr <= 0):
    _fail("optim.base_lr", "the learning rate must be positive")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", f"{o.weight_decay} must be >= 0")
  if not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1:
    _fail("optim.b2", f"betas ({o.b1}, {o.b2}) must lie in [0, 1)")
  if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
    _fail("optim.layer_decay", f"{o.layer_decay} must lie in (0, 1]")
  if o.clip_grad_norm is not None and not o.clip_grad_norm > 0:
    _fail("optim.clip_grad_norm", f"{o.clip_grad_norm} must be > 0 (a non-positive norm "
          "would flip or zero the gradients); unset it to disable clipping")
  if o.warmup_epochs < 0:
    _fail("optim.warmup_epochs", f"{o.warmup_epochs} must be >= 0")
  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    _fail("num_epochs", "set num_epochs > 0 or num_train_steps > 0")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    if not isinstance(c[key], int) or c[key] <= 0:
      _fail(key, f"{c[key]!r} must be a positive integer")
  if c.nonfinite not in ("stop", "skip"):
    _fail("nonfinite", f"{c.nonfinite!r} is unknown; use 'stop' or 'skip'")
  if c.init_from and not c.init_from.startswith("gs://") and not os.path.exists(c.init_from):
    _fail("init_from", f"{c.init_from!r} does not exist")
  a = c.augment
  if not 0 <= a.label_smoothing < 1:
    _fail("augment.label_smoothing", f"{a.label_smoothing} must lie in [0, 1)")
  if a.mixup < 0 or a.cutmix < 0:
    _fail("augment.mixup", "mixup/cutmix alphas must be >= 0")
  task.check(c)
  if c.eval.max_batches is not None and (not isinstance(c.eval.max_batches, int)
                                         or c.eval.max_batches < 1):
    _fail("eval.max_batches", f"{c.eval.max_batches!r} must be a positive integer (or unset)")
  names = [name for name, _ in c.mesh.shape]
  if len(set(names)) != len(names):
    _fail("mesh.shape", f"axis names {names} repeat")
  if sum(1 for _, size in c.mesh.shape if size == -1) > 1:
    _fail("mesh.shape", "at most one axis may be -1")
  for name, size in c.mesh.shape:
    if not isinstance(size, int) or (size < 1 and size != -1):
      _fail("mesh.shape", f"axis {name!r} has size {size!r}; use a positive int or -1")
  return resolved


# Which optional data fields each kind of source reads; the others are ignored.
_TFDS_ONLY_DATA_FIELDS = ("data_dir", "manual_dir")
_WARNED_UNREAD: set = set()


def unread_data_fields(c) -> list[str]:
  """The `config.data` fields set by the user that `config.data.source` never
  reads: data_dir/manual_dir for every source but 'tfds', path for 'tfds', name
  (when not the default) for a source other than 'tfds'."""
  d = c.data
  if d.source == "tfds":
    return ["path"] if d.get("path") else []
  unread = [f for f in _TFDS_ONLY_DATA_FIELDS if d.get(f)]
  if d.get("name") and d.name != _IMAGENET.name:
    unread.append("name")
  return unread


def warn_unread_data_fields(c) -> list[str]:
  """Logs one warning per field (once per process) for each `unread_data_fields`
  entry, naming the source and what it reads instead; returns the fields."""
  fields = unread_data_fields(c)
  reads = "data.name, data.data_dir, data.manual_dir" if c.data.source == "tfds" \
      else "data.path"
  for field in fields:
    key = (c.data.source, field)
    if key in _WARNED_UNREAD:
      continue
    _WARNED_UNREAD.add(key)
    logging.warning("config.data.%s=%r is not read by data.source=%r (it reads %s); "
                    "remove it or pick the source that reads it", field,
                    redacted(c.data[field]), c.data.source, reads)
  return fields
