"""Evidence that it learns: CRATE-MAE vs ViT-MAE on full Fashion-MNIST.

    python -m experiments.study --workdir=DIR [--data_path=IDX_FOLDER] [--scale=1.0] \\
        [--archs=crate_mae,vit_mae] [--pixel_floor] [--tiny] [--data_source=quickstart]
    python -m experiments.study --workdir=DIR --report_only   # re-write the report

For each arch (`configs/fashion_mnist.py`: width 192, depth 6, heads 6, patch 4,
decoder mirroring the encoder, bf16 compute):

1. diagnostics of the untrained model (the exact initial parameters the
   pre-training run starts from): layer-wise coding rate and sparsity (CRATE-MAE
   only: ViT-MAE has no subspaces or sparse codes), masked-MSE on a fixed batch;
2. pre-training (masked autoencoding), then the same diagnostics, the
   reconstruction grid, the cls attention per head of the last encoder layer and
   a PCA of the patch features;
3. a linear probe (frozen encoder, mean-pooled features, BatchNorm + linear head);
4. end-to-end fine-tuning (layer-wise lr decay, light augmentation);

and, once, the raw-pixel floor: a linear classifier on the normalised pixels of
the same train/test images (`pixel_floor.linear_classifier`).

Writes into DIR: study.json (everything), study.md (the table), loss_curves.png;
per arch DIR/ARCH/: summary.json, layerwise.png (before above, after below),
layerwise_init.png, layerwise_pretrained.png, reconstruction.png, attention.png,
pca.png, and the train workdirs pretrain/, linear_probe/, finetune/ (checkpoints,
results.json, scalars.json, reconstruction_<step>.png); DIR/pixel_floor.json.

Loss curves: each stage's `train_and_evaluate` gets a `RecordingWriter` that
keeps every scalar in memory (saved to scalars.json) around the TF-free logging
writer of `summaries` (no clu, no TensorFlow: study.json records whether
TensorFlow was imported); `--tensorboard` wraps clu's writer instead
(TensorBoard event files, needs TensorFlow).

`--scale` multiplies every epoch count (pre-training, probe, fine-tuning, warm-up,
pixel floor); 0.01 is a CPU smoke test. A stage whose results.json exists is not
run again, so an interrupted study resumes where it stopped, and studies of
single archs run separately (`--archs=vit_mae --nopixel_floor`) can be merged by
copying their DIR/ARCH folders into one DIR and running `--report_only`.
"""
import importlib.util
import json
import math
import os
import signal
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.training import checkpoints
from crate_mae_jax import config_lib, models
from crate_mae_jax.analysis import diagnostics, figures, pixel_floor
from crate_mae_jax.models import patches
from experiments import plots

ARCHS = models.ARCHS
TASKS = config_lib.TASKS
NAMES = plots.NAMES
PIXEL_FLOOR_EPOCHS = 30
LEARNING_RATE = "train/learning_rate"   # the name the train steps log the lr under
TINY = dict(width=32, depth=2, heads=2, batch_size=64)
CONFIG_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs", "fashion_mnist.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory of the study (created).")
flags.DEFINE_string("data_path", None, "Fashion-MNIST IDX folder (default: the config's, "
                    "/usr/share/datasets/fashion-mnist).")
flags.DEFINE_enum("data_source", "fashion_mnist", ["fashion_mnist", "quickstart"],
                  "'quickstart': the 5,000 / 1,000 subset shipped in the package (tests).")
flags.DEFINE_float("scale", 1.0, "Multiplies every epoch count (0.01: CPU smoke test).")
flags.DEFINE_list("archs", list(ARCHS), "Archs to run: names in the config's ARCHS "
                  "(crate_mae, vit_mae, vit_mae_all, vit_mae_matched).")
flags.DEFINE_bool("pixel_floor", True, "Also fit the linear classifier on raw pixels.")
flags.DEFINE_bool("tiny", False, "Width 32, depth 2, heads 2, batch 64, float32 (tests).")
flags.DEFINE_integer("max_examples", None, "Truncate the train split (tests).")
flags.DEFINE_string("dtype", None, "Override model.dtype (float32 / bfloat16).")
flags.DEFINE_integer("batch_size", None, "Override the batch size of every stage.")
flags.DEFINE_integer("evals", None, "Evaluations per run (default: the config's, 4).")
flags.DEFINE_integer("diag_images", 64, "Test images for the layer-wise measures.")
flags.DEFINE_integer("figure_images", 8, "Test images in the figures.")
flags.DEFINE_bool("tensorboard", False, "Wrap clu's TensorBoard writer (needs TensorFlow).")
flags.DEFINE_bool("report_only", False, "Only rebuild study.json / study.md / figures "
                  "from what DIR holds.")
flags.DEFINE_string("config_file", CONFIG_FILE, "The study's config file.")


# ----------------------------------------------------------------------------- configs


def load_config_module(path: str = CONFIG_FILE):
  spec = importlib.util.spec_from_file_location("fashion_mnist_study_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def study_config(task: str, arch: str, *, scale: float = 1.0, data_source: str = "fashion_mnist",
                 data_path: str | None = None, tiny: bool = False,
                 max_examples: int | None = None, dtype: str | None = None,
                 batch_size: int | None = None, evals: int | None = None,
                 num_train_examples: int | None = None, config_file: str = CONFIG_FILE):
  """The config of one stage: `configs/fashion_mnist.py` with the study's overrides,
  epochs (and warm-up) times `scale`, intervals re-derived for the data size."""
  module = load_config_module(config_file)
  c = module.get_config(f"{task},{arch}")
  if data_source == "quickstart":
    c.data.source, c.data.path = "quickstart", None
  elif data_path:
    c.data.path = os.path.abspath(data_path)
  if max_examples:
    c.data.max_examples = int(max_examples)
  if tiny:
    module.model(c, arch, width=TINY["width"], depth=TINY["depth"], heads=TINY["heads"])
    c.model.dtype = "float32"
    c.batch_size = TINY["batch_size"]
    if task == "finetune":
      c.model.drop_path = 0.1
  if dtype:
    c.model.dtype = dtype
  if batch_size:
    c.batch_size = int(batch_size)
  c.num_epochs = float(c.num_epochs) * scale
  c.optim.warmup_epochs = float(c.optim.warmup_epochs) * scale
  if num_train_examples:
    module.schedule(c, int(num_train_examples), evals=evals or None)
  return c


def float32_model(model_cfg) -> models.ResolvedModel:
  """The model for measurements: float32 compute, no drop-path."""
  return models.with_fields(model_cfg, dtype="float32", drop_path=0.0)


def param_counts(model_cfg, image_size: int) -> dict:
  params = models.abstract_params(model_cfg, image_size)
  counts = {k: models.count_params(v) for k, v in params.items()}
  counts["total"] = int(sum(counts.values()))
  return counts


# ----------------------------------------------------------------------------- data


class Data:
  """Normalised, un-augmented train/test images of the study (through the eval path)."""

  def __init__(self, cfg):
    from crate_mae_jax.data import input_pipeline
    self.cfg = cfg
    source = input_pipeline.create(cfg.data, cfg.augment, task="linear_probe",
                                   batch_size=500, seed=cfg.seed)
    self.num_train = int(source.num_train_examples)   # after data.max_examples
    self.num_test = int(source.num_eval_examples)
    self.num_classes = int(cfg.data.num_classes or source.num_classes)
    self._test = None
    self._train = None

  def split(self, name: str):
    """(images (N, H, W, C) float32 normalised, labels (N,))."""
    from crate_mae_jax.data import input_pipeline
    images, labels, _ = input_pipeline.split_arrays(self.cfg.data, name, seed=self.cfg.seed)
    return images, labels

  @property
  def test(self):
    if self._test is None:
      self._test = self.split(self.cfg.data.eval_split)
    return self._test

  @property
  def train(self):
    if self._train is None:
      x, y = self.split(self.cfg.data.train_split)
      self._train = (x[:self.num_train], y[:self.num_train])
    return self._train


# ----------------------------------------------------------------------------- recording


class RecordingWriter:
  """Wraps a metric writer; keeps every scalar as scalars[name] = [[step, value], ...]."""

  def __init__(self, inner):
    self.inner = inner
    self.scalars: dict[str, list] = {}

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self.scalars.setdefault(key, []).append([int(step), float(value)])
    self.inner.write_scalars(step, scalars)

  def __getattr__(self, name):  # write_images, write_texts, flush, close, ...
    return getattr(self.inner, name)


def stage_writer(workdir: str, tensorboard: bool = False) -> RecordingWriter:
  """A recorder around the TF-free logging writer (or clu's TensorBoard writer)."""
  from crate_mae_jax.training import summaries
  inner = (summaries.create_writer(workdir, True) if tensorboard
           else summaries.LoggingWriter(workdir))
  return RecordingWriter(inner)


def stage_hooks(cfg, num_train: int, writer, workdir: str, tensorboard: bool = False) -> list:
  """Progress (steps/s, ETA) through `writer`; clu's hooks only with `tensorboard`."""
  from crate_mae_jax.training import summaries
  steps = (cfg.num_train_steps if cfg.num_train_steps > 0
           else max(1, math.ceil(cfg.num_epochs * num_train / cfg.batch_size)))
  every = 10.0 if steps < 5000 else 60.0
  if tensorboard:
    return summaries.progress_hooks(steps, writer, workdir, True, cfg.profile_steps, every)
  return [summaries.Progress(steps, writer, every)]


class StudyInterrupted(RuntimeError):
  """A stage was pre-empted (SIGTERM); its checkpoint is kept for a resumed run."""


def run_stage(cfg, workdir: str, tensorboard: bool = False, num_train: int | None = None) -> dict:
  """Runs one train_and_evaluate (unless its results.json exists) and returns
  {'results', 'scalars', 'seconds', 'steps', ...}."""
  from crate_mae_jax.training import train
  results_path = os.path.join(workdir, "results.json")
  scalars_path = os.path.join(workdir, "scalars.json")
  stage_path = os.path.join(workdir, "stage.json")
  if os.path.exists(results_path) and os.path.exists(stage_path):
    logging.info("%s: results.json exists, not run again", workdir)
    with open(stage_path) as f:
      return json.load(f)
  start = time.time()
  writer = stage_writer(workdir, tensorboard)
  hooks = stage_hooks(cfg, num_train or 1, writer, workdir, tensorboard)
  results = train.train_and_evaluate(cfg, workdir, writer=writer, hooks=hooks)
  seconds = time.time() - start
  scalars = writer.scalars
  with open(scalars_path, "w") as f:
    json.dump(scalars, f)
  if results.get("preempted"):  # SIGTERM: checkpoint saved, the stage is not complete
    raise StudyInterrupted(f"{workdir}: pre-empted at step {results.get('step')}; run the "
                           "same command again to resume")
  rates = [v for _, v in scalars.get("steps_per_sec", [])]
  stage = {
      "task": cfg.task, "workdir": os.path.abspath(workdir), "results": results,
      "seconds": seconds, "steps": int(results.get("step", 0)),
      "epochs": float(cfg.num_epochs), "batch_size": int(cfg.batch_size),
      "steps_per_sec": float(np.median(rates)) if rates else None,
      "train_loss": scalars.get("train/loss", []),
      "eval_loss": scalars.get("eval/loss", []),
      "eval_top1": scalars.get("eval/top1", []),
      "lr": scalars.get(LEARNING_RATE, []),
  }
  with open(stage_path, "w") as f:
    json.dump(config_lib.redacted(stage), f, indent=1, default=jsonable)
  return stage


def jsonable(x):
  """json.dump's `default`: numpy scalars and arrays as numbers and lists."""
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ----------------------------------------------------------------------------- diagnostics


def initial_params(cfg):
  """The exact parameters `train.train_and_evaluate(cfg)` starts from (same module,
  same seed and key split, through `state_lib.init_state`)."""
  import optax
  from crate_mae_jax import sharding
  from crate_mae_jax import config_lib
  from crate_mae_jax.training import setup as setup_lib, state_lib
  model, init_inputs, init_kwargs = setup_lib.build_model(cfg, config_lib.resolve_model(cfg.model))
  mesh = sharding.create_mesh(cfg.mesh.shape)
  state, _ = state_lib.init_state(model, optax.identity(), mesh, sharding.rules(cfg.mesh),
                                  init_inputs, init_kwargs, jax.random.key(cfg.seed))
  return jax.device_get(state.params)


def vit_cls_attention(model, params, images, layer: int = -1) -> np.ndarray:
  """ViT-MAE: the cls token's softmax(q kᵀ/√d) attention per head over the patches
  of encoder `layer`, (B, heads, gh, gw), from the captured qkv projections."""
  _, state = model.apply({"params": params}, jnp.asarray(images), method="encode",
                         capture_intermediates=lambda mdl, _: mdl.name == "qkv")
  encoder = state["intermediates"]["encoder"]
  names = sorted((k for k in encoder if k.startswith("layer_")), key=lambda k: int(k[6:]))
  qkv = encoder[names[range(len(names))[layer]]]["qkv"]["__call__"][0].astype(jnp.float32)
  q, k = qkv[:, :, 0], qkv[:, :, 1]                                  # (B, N, H, dh)
  logits = jnp.einsum("bhd,bkhd->bhk", q[:, 0], k,
                      precision=jax.lax.Precision.HIGHEST) * q.shape[-1]**-0.5
  attn = np.asarray(jax.nn.softmax(logits, axis=-1))[:, :, 1:]
  p = model.patch_size
  return attn.reshape(attn.shape[0], attn.shape[1], *patches.patch_grid(images, p))


def masked_loss(model, params, images, mask_ratio: float, seed: int = 0) -> float:
  p = model.patch_size
  noise = jax.random.uniform(jax.random.key(seed), (images.shape[0],
                             patches.num_patches(images, p)))
  out = model.apply({"params": params}, jnp.asarray(images), mask_ratio=mask_ratio, noise=noise)
  return float(out["loss"])


def diagnose(model_cfg, params, diag_images, figure_images, data_cfg, out_dir: str | None,
             tag: str, seed: int = 0) -> dict:
  """Layer-wise measures (CRATE-MAE), masked-MSE on the fixed batch and, with
  `out_dir`, the reconstruction / attention / PCA figures."""
  r = float32_model(model_cfg)
  model = models.build_mae(r)
  out: dict = {"masked_mse": masked_loss(model, params, diag_images, r["mask_ratio"], seed)}
  if r["arch"] == "crate_mae":
    measures = diagnostics.layerwise_measures(model, params, diag_images, mask_ratio=0.0)
    out["layerwise"] = diagnostics.nest_measures(measures)
    out["scalars"] = diagnostics.summary_scalars(measures)
    if out_dir:
      out["figures"] = {"layerwise": figures.save_layerwise(
          measures, os.path.join(out_dir, f"layerwise_{tag}.png"))}
  if not out_dir:
    return out
  x = jnp.asarray(figure_images)
  p = r["patch_size"]
  grid = patches.patch_grid(x, p)
  panels, _ = diagnostics.reconstruct(model, params, figure_images, r["mask_ratio"],
                                     jax.random.key(seed), data_cfg.mean, data_cfg.std)
  if r["arch"] == "crate_mae":
    features, intermediates = diagnostics.encode_with_intermediates(model, params, x)
    attention = diagnostics.cls_attention_from_intermediates(intermediates, -1, grid)
  else:
    features = model.apply({"params": params}, x, method="encode")
    attention = vit_cls_attention(model, params, x, -1)
  pca = diagnostics.pca_features(np.asarray(features, np.float32)[:, 1:], 3, grid=grid)
  figs = out.setdefault("figures", {})
  figs["reconstruction"] = figures.save_reconstruction(
      panels, os.path.join(out_dir, "reconstruction.png"))
  figs["attention"] = figures.save_attention(panels[0], attention,
                                             os.path.join(out_dir, "attention.png"))
  figs["pca"] = figures.save_pca(panels[0], pca, os.path.join(out_dir, "pca.png"))
  out["attention_layer"] = r["depth"] - 1
  return out


# ----------------------------------------------------------------------------- environment


def environment() -> dict:
  import flax
  import optax
  device = jax.devices()[0]
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "devices": jax.device_count(), "processes": jax.process_count(),
          "tensorflow_imported": "tensorflow" in sys.modules,
          "clu_imported": "clu" in sys.modules,
          "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ----------------------------------------------------------------------------- the study


def run_arch(arch: str, opts: dict, data: Data, workdir: str, tensorboard: bool = False,
             diag_images: int = 64, figure_images: int = 8) -> dict:
  root = os.path.join(workdir, arch)
  os.makedirs(root, exist_ok=True)
  start = time.time()
  cfgs = {task: study_config(task, arch, num_train_examples=data.num_train, **opts)
          for task in TASKS}
  pre_cfg = cfgs["pretrain"]
  resolved = models.resolve(pre_cfg.model)
  test_x, _ = data.test
  diag_x, fig_x = test_x[:diag_images], test_x[:figure_images]
  summary: dict = {"arch": arch, "name": NAMES.get(arch, arch),
                   "model": {k: v for k, v in resolved.items()},
                   "params": param_counts(pre_cfg.model, pre_cfg.data.image_size),
                   "configs": {t: json.loads(c.to_json_best_effort()) for t, c in cfgs.items()},
                   "stages": {}, "diagnostics": {}}

  def save():  # after every step, so that an interrupted study reports what it has
    summary["seconds"] = time.time() - start
    summary["environment"] = environment()
    with open(os.path.join(root, "summary.json"), "w") as f:
      json.dump(config_lib.redacted(summary), f, indent=1, default=jsonable)

  logging.info("%s: diagnostics of the untrained model", arch)
  init = initial_params(pre_cfg)
  summary["diagnostics"]["init"] = diagnose(pre_cfg.model, init, diag_x, fig_x, pre_cfg.data,
                                            None, "init", pre_cfg.seed)
  if "layerwise" in summary["diagnostics"]["init"]:
    figures.save_layerwise(plots.flat_measures(summary["diagnostics"]["init"]["layerwise"]),
                           os.path.join(root, "layerwise_init.png"))
  del init
  save()

  pre_dir = os.path.join(root, "pretrain")
  summary["stages"]["pretrain"] = run_stage(pre_cfg, pre_dir, tensorboard, data.num_train)
  params, _ = checkpoints.restore_params(pre_dir)
  trained = diagnose(pre_cfg.model, params, diag_x, fig_x, pre_cfg.data, root, "pretrained",
                     pre_cfg.seed)
  summary["diagnostics"]["pretrained"] = trained
  if "layerwise" in trained:
    trained["figures"]["layerwise_before_after"] = plots.save_layerwise_before_after(
        summary["diagnostics"]["init"]["layerwise"], trained["layerwise"],
        os.path.join(root, "layerwise.png"), NAMES.get(arch, arch))
  del params
  save()

  for task in ("linear_probe", "finetune"):
    cfg = cfgs[task]
    cfg.init_from = pre_dir
    summary["stages"][task] = run_stage(cfg, os.path.join(root, task), tensorboard,
                                       data.num_train)
    save()
  return summary


def run_pixel_floor(data: Data, workdir: str, scale: float) -> dict:
  path = os.path.join(workdir, "pixel_floor.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  start = time.time()
  train_x, train_y = data.train
  test_x, test_y = data.test
  epochs = max(1, int(round(PIXEL_FLOOR_EPOCHS * scale)))
  result = pixel_floor.linear_classifier(train_x, train_y, test_x, test_y, data.num_classes,
                                       epochs=epochs)
  result.update(epochs=epochs, num_train=int(len(train_x)), num_test=int(len(test_x)),
                params=int(np.prod(train_x.shape[1:])) * data.num_classes + data.num_classes,
                seconds=time.time() - start, environment=environment())
  with open(path, "w") as f:
    json.dump(config_lib.redacted(result), f, indent=1, default=jsonable)
  return result


def _pct(x) -> str:
  return "–" if x is None else f"{100 * float(x):.2f}%"


def _top1(stage: dict | None):
  return None if not stage else stage.get("results", {}).get("top1")


def markdown(study: dict) -> str:
  p = study["protocol"]
  env = study.get("environment", {})
  lines = [
      "# Fashion-MNIST: CRATE-MAE vs ViT-MAE of the same width, depth and patch size", "",
      f"Data: {p.get('data_source')} ({p.get('num_train')} train / {p.get('num_test')} test "
      f"images), scale {p.get('scale')}, tiny={p.get('tiny')}; run on "
      f"{env.get('devices', '?')} × {env.get('device_kind', '?')} ({env.get('backend', '?')}), "
      f"JAX {env.get('jax', '?')}, TensorFlow imported: {env.get('tensorflow_imported')}.", "",
      "| model | params: encoder / MAE total | pre-train eval loss (masked MSE) | "
      "linear probe top-1 | fine-tune top-1 | pre-train epochs / time |",
      "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for arch, s in study["archs"].items():
    stages = s.get("stages", {})
    pre = stages.get("pretrain") or {}
    loss = pre.get("results", {}).get("loss")
    rate = pre.get("steps_per_sec")
    timing = (f"{pre.get('epochs', 0):g} / {pre.get('seconds', 0):.0f} s"
              + (f" ({rate:.3g} steps/s)" if rate else "")) if pre else "–"
    lines.append(
        f"| {s.get('name', arch)} | {s['params']['encoder']:,} / {s['params']['total']:,} | "
        f"{'–' if loss is None else f'{loss:.4f}'} | {_pct(_top1(stages.get('linear_probe')))} | "
        f"{_pct(_top1(stages.get('finetune')))} | {timing} |")
  floor = study.get("pixel_floor")
  if floor:
    lines.append(f"| raw pixels, linear classifier (floor) | {floor['params']:,} (classifier) | "
                 f"– | {_pct(floor['test_accuracy'])} | – | {floor['epochs']} epochs / "
                 f"{floor['seconds']:.0f} s |")
  lines += ["", "Linear probe and fine-tuning: test top-1 of the final model (no selection "
            "on the test split). Parameters at 28 px; the pixel floor's are its weights "
            "and biases.", ""]
  for arch, s in study["archs"].items():
    d = s.get("diagnostics", {})
    init, trained = d.get("init", {}), d.get("pretrained", {})
    if "layerwise" in init and "layerwise" in trained:
      lines += [f"## Layer-wise compression and sparsity: {s.get('name', arch)} "
                f"({p.get('diag_images')} test images, no masking)", "",
                "| part | layer | coding rate: init | after pre-training | "
                "non-zero fraction: init | after pre-training |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
      for part in ("encoder", "decoder"):
        a, b = init["layerwise"].get(part, {}), trained["layerwise"].get(part, {})
        if not a or not b:
          continue
        for i, (ca, cb, sa, sb) in enumerate(zip(a["coding_rate"]["mean"],
                                                 b["coding_rate"]["mean"],
                                                 a["sparsity"]["mean"], b["sparsity"]["mean"])):
          lines.append(f"| {part} | {i} | {ca:.2f} | {cb:.2f} | {sa:.3f} | {sb:.3f} |")
      lines.append("")
  lines += ["## Masked MSE on a fixed test batch (same mask) before and after pre-training", "",
            "| model | untrained | pre-trained |", "| --- | ---: | ---: |"]
  for arch, s in study["archs"].items():
    d = s.get("diagnostics", {})
    a, b = d.get("init", {}).get("masked_mse"), d.get("pretrained", {}).get("masked_mse")
    if a is not None and b is not None:
      lines.append(f"| {s.get('name', arch)} | {a:.4f} | {b:.4f} |")
  lines += ["", "## Figures", "", "- `loss_curves.png`: pre-training loss (train line, eval "
            "dots), probe and fine-tuning train loss, against epochs"]
  for arch in study["archs"]:
    files = [f for f in ("layerwise.png", "reconstruction.png", "attention.png", "pca.png")
             if os.path.exists(os.path.join(study["workdir"], arch, f))]
    lines.append(f"- `{arch}/`: " + ", ".join(f"`{f}`" for f in files))
  return "\n".join(lines) + "\n"


def report(workdir: str) -> dict:
  """Builds study.json, study.md and loss_curves.png from what `workdir` holds."""
  archs = {}
  for arch in sorted(os.listdir(workdir), key=lambda a: (ARCHS.index(a) if a in ARCHS else 9, a)):
    path = os.path.join(workdir, arch, "summary.json")
    if os.path.isfile(path):
      with open(path) as f:
        archs[arch] = json.load(f)
  floor = None
  if os.path.isfile(os.path.join(workdir, "pixel_floor.json")):
    with open(os.path.join(workdir, "pixel_floor.json")) as f:
      floor = json.load(f)
  protocol = {}
  if os.path.isfile(os.path.join(workdir, "protocol.json")):
    with open(os.path.join(workdir, "protocol.json")) as f:
      protocol = json.load(f)
  envs = [s.get("environment", {}) for s in archs.values()] + (
      [floor.get("environment", {})] if floor else [])
  environment_ = dict(envs[0]) if envs else {}
  environment_["tensorflow_imported"] = any(e.get("tensorflow_imported") for e in envs)
  study = {"workdir": os.path.abspath(workdir), "protocol": protocol,
           "environment": environment_, "archs": archs, "pixel_floor": floor}
  study["figures"] = {"loss_curves": plots.save_loss_curves(archs, os.path.join(workdir,
                                                                          "loss_curves.png"))}
  study["table"] = markdown(study)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(config_lib.redacted(study["table"]))
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(config_lib.redacted(study), f, indent=1, default=jsonable)
  return study


def run_study(workdir: str, archs=ARCHS, pixel_floor: bool = True, tensorboard: bool = False,
              diag_images: int = 64, figure_images: int = 8, **opts) -> dict:
  """The whole study; `opts` are `study_config`'s keyword arguments."""
  known = load_config_module(opts.get("config_file", CONFIG_FILE)).ARCHS
  for arch in archs:
    if arch not in known:
      raise ValueError(f"--archs: {arch!r} is unknown; use {','.join(known)}")
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  first = study_config("pretrain", archs[0] if archs else ARCHS[0], **opts)
  data = Data(first)
  protocol = {**opts, "data_source": first.data.source, "data_path": first.data.path,
              "num_train": data.num_train, "num_test": data.num_test,
              "num_classes": data.num_classes, "diag_images": diag_images,
              "figure_images": figure_images, "archs": list(archs),
              "command": " ".join(sys.argv)}
  with open(os.path.join(workdir, "protocol.json"), "w") as f:
    json.dump(config_lib.redacted(protocol), f, indent=1, default=jsonable)
  try:
    for arch in archs:
      run_arch(arch, opts, data, workdir, tensorboard, diag_images, figure_images)
    if pixel_floor:
      run_pixel_floor(data, workdir, opts.get("scale", 1.0))
  except BaseException:
    logging.exception("study stopped; writing the report of what is complete")
    try:
      report(workdir)
    except Exception:  # pylint: disable=broad-except
      logging.exception("no report")
    raise
  study = report(workdir)
  logging.info("study done in %.1f min", (time.time() - start) / 60)
  return study


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from crate_mae_jax.training import summaries
  summaries.quiet_library_logs()

  def on_sigterm(signum, frame):  # outside a train loop (which saves and returns itself)
    del signum, frame
    raise StudyInterrupted("SIGTERM")
  signal.signal(signal.SIGTERM, on_sigterm)
  if FLAGS.report_only:
    study = report(FLAGS.workdir)
  else:
    study = run_study(
        FLAGS.workdir, archs=tuple(FLAGS.archs), pixel_floor=FLAGS.pixel_floor,
        tensorboard=FLAGS.tensorboard, diag_images=FLAGS.diag_images,
        figure_images=FLAGS.figure_images, scale=FLAGS.scale, data_source=FLAGS.data_source,
        data_path=FLAGS.data_path, tiny=FLAGS.tiny, max_examples=FLAGS.max_examples,
        dtype=FLAGS.dtype, batch_size=FLAGS.batch_size, evals=FLAGS.evals,
        config_file=FLAGS.config_file)
  print(study["table"])
  print(f"wrote {os.path.abspath(os.path.join(FLAGS.workdir, 'study.json'))}")


if __name__ == "__main__":
  app.run(main)
