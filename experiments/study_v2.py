"""Where CRATE-MAE stands on Fashion-MNIST: baselines, layer-wise probes, controls, seeds.

    python -m experiments.study_v2 --workdir=DIR [--data_path=IDX_FOLDER] \\
        [--workers=6] [--seeds=0,1,2] [--pretrain_epochs=20] [--finetune_epochs=5] \\
        [--deadline_s=540] [--tiny --data_source=quickstart]
    python -m experiments.study_v2 --workdir=DIR --report_only [--docs=OUT]

Runs (a list, `run_list`; the first seed of every model comes first, so what
finishes under a deadline is a complete first seed):

* `mae`: for each variant of VARIANTS (CRATE-MAE at λ 0.5 and 5.0, ViT-MAE with a
  visible-only encoder, with mask tokens in the encoder, parameter-matched) and
  seed: the layer-wise k-NN and ridge probe (every encoder layer, cls and mean,
  `crate_mae_jax.evaluators`) and, for CRATE-MAE, coding rate and sparsity per
  layer at mask ratio 0 and 0.75, of the randomly initialised encoder (the exact
  parameters the run starts from: the control) and of the pre-trained one;
  then a short fine-tune from the pre-trained encoder;
* `supervised`: the fine-tuning recipe from a random initialisation
  (SUPERVISED_VARIANTS);
* `pixel_floor`: the linear classifier on raw pixels, once.

Small models are launch-bound on a GPU, so `--workers=N` starts N processes on
the one device (each with 0.9/N of its memory, no preallocation), each taking
the next unclaimed run from the list. A run whose results.json exists is skipped,
so running the same command again resumes. A worker starts a run only if the
runs it finished so far say it will end before `--deadline_s`; SIGTERM makes a
running stage save its checkpoint and the worker stop. The report
(`study_v2_report`) reads whatever results.json files exist.

Writes DIR/runs/<run>/results.json (everything of one run), the stage workdirs
next to it, DIR/protocol.json and DIR/worker_<i>.log.
"""
import json
import os
import signal
import subprocess
import sys
import time

from absl import app, flags, logging
import numpy as np

from experiments import study

# name -> (arch of configs/fashion_mnist.py, model overrides)
VARIANTS = {
    "crate_mae_lam0.5": ("crate_mae", {"ista_lambda": 0.5}),
    "crate_mae_lam5": ("crate_mae", {"ista_lambda": 5.0}),
    "vit_mae": ("vit_mae", {}),
    "vit_mae_all": ("vit_mae_all", {}),
    "vit_mae_matched": ("vit_mae_matched", {}),
}
SUPERVISED_VARIANTS = ("crate_mae_lam0.5", "vit_mae_matched")
DIAG_MASK_RATIOS = (0.0, 0.75)

FLAGS = flags.FLAGS
# --workdir, --data_path, --data_source, --tiny, --max_examples, --batch_size, --evals,
# --diag_images, --pixel_floor and --report_only are the flags of `study` (imported above).
flags.DEFINE_list("variants", list(VARIANTS), "Pre-trained models (names of VARIANTS).")
flags.DEFINE_list("supervised", list(SUPERVISED_VARIANTS), "Variants also trained from scratch.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every model.")
flags.DEFINE_float("pretrain_epochs", 20.0, "Pre-training epochs.")
flags.DEFINE_float("finetune_epochs", 5.0, "Fine-tuning (and supervised) epochs.")
flags.DEFINE_float("pixel_floor_epochs", 10.0, "Epochs of the raw-pixel classifier.")
flags.DEFINE_integer("max_train", 0, "Train images of k-NN / probes (0: all).")
flags.DEFINE_integer("workers", 1, "Processes sharing the device (1: run in this process).")
flags.DEFINE_integer("worker", None, "Internal: the index of this worker process.")
flags.DEFINE_float("deadline_s", 0.0, "Start no run expected to end later than this many "
                   "seconds after launch (0: no deadline).")
flags.DEFINE_float("deadline", 0.0, "Internal: the deadline as a Unix time.")
flags.DEFINE_string("claim_token", None, "Internal: the launch's claim folder.")
flags.DEFINE_string("docs", None, "Report folder (default DIR/report).")


# ----------------------------------------------------------------------------- runs


def run_list(variants, seeds, supervised=(), pixel_floor: bool = True) -> list[str]:
  """Run names, most informative first: every model's first seed, then the next."""
  runs = []
  for i, seed in enumerate(seeds):
    runs += [f"mae-{v}-s{seed}" for v in variants]
    runs += [f"supervised-{v}-s{seed}" for v in supervised]
    if i == 0 and pixel_floor:
      runs.append("pixel_floor")
  return runs


def parse_run(name: str) -> tuple[str, str | None, int | None]:
  """'mae-vit_mae-s1' -> ('mae', 'vit_mae', 1); 'pixel_floor' -> ('pixel_floor', None, None)."""
  if name == "pixel_floor":
    return name, None, None
  kind, rest = name.split("-", 1)
  variant, seed = rest.rsplit("-s", 1)
  return kind, variant, int(seed)


def variant_config(task: str, variant: str, seed: int, epochs: float, opts: dict,
                   num_train: int, evals: int):
  """The study config of `task` for `variant` and `seed`, `epochs` long (warm-up
  scaled with it), intervals for `num_train` images and `evals` evaluations."""
  if variant not in VARIANTS:
    raise ValueError(f"--variants: {variant!r} is unknown; use {','.join(VARIANTS)}")
  arch, overrides = VARIANTS[variant]
  module = study.load_config_module()
  base = module.EPOCHS["finetune" if task == "supervised" else task]
  cfg = study.study_config(task, arch, scale=epochs / base, **opts)
  cfg.model.update(overrides)
  cfg.seed = int(seed)
  module.schedule(cfg, num_train, evals=evals)
  return cfg


def stage_opts() -> dict:
  return dict(data_source=FLAGS.data_source, data_path=FLAGS.data_path, tiny=FLAGS.tiny,
              max_examples=FLAGS.max_examples, batch_size=FLAGS.batch_size)


# ----------------------------------------------------------------------------- evaluations


class Evaluation:
  """The train/test images of the study, loaded once per worker; per model config
  the layer-wise k-NN + ridge probe (features extracted once for both) and the
  CRATE-MAE coding rate / sparsity at DIAG_MASK_RATIOS."""

  def __init__(self, cfg, max_train: int | None, diag_images: int):
    from crate_mae_jax.data import input_pipeline
    limit = [m for m in (max_train, cfg.data.max_examples) if m]
    train_x, train_y, _ = input_pipeline.split_arrays(
        cfg.data, cfg.data.train_split, max_examples=min(limit) if limit else None)
    test_x, test_y, _ = input_pipeline.split_arrays(cfg.data, cfg.data.eval_split)
    self.arrays = ((train_x, train_y), (test_x, test_y))
    self.diag_images = test_x[:diag_images]

  def layerwise(self, cfg, params) -> dict:
    """{'knn': {'cls/layer_00': acc, ..., 'mean/best': acc}, 'linear_probe': {...}}."""
    from crate_mae_jax.evaluators import common, features, knn, linear_probe
    data = features.SplitFeatures(cfg.data, arrays=self.arrays)
    encode_fn = features.make_extract_fn(features.feature_encoder(cfg.model))
    train, test = data.features(encode_fn, common.encoder_params(params))
    names = features.layer_names(len(train[features.POOLS[0]]) - 1)
    out = {}
    for kind, fit in (("knn", knn.knn_accuracy),
                      ("linear_probe", lambda *a: linear_probe.ridge_probe_accuracy(*a)[0])):
      acc = {pool: [fit(train[pool][i], data.train_y, test[pool][i], data.test_y,
                        data.num_classes) for i in range(len(names))]
             for pool in features.POOLS}
      out[kind] = features.per_layer_scalars(acc, names)
    return out

  def white_box(self, cfg, params) -> dict:
    """Coding rate and sparsity per layer at every ratio of DIAG_MASK_RATIOS."""
    from crate_mae_jax.analysis import diagnostics
    from crate_mae_jax import models
    from crate_mae_jax.evaluators import diagnostics as diag_eval
    if cfg.model.arch != "crate_mae":
      return {}
    model = models.build_mae(study.float32_model(cfg.model))
    out = {}
    for ratio in DIAG_MASK_RATIOS:
      measures = diagnostics.layerwise_measures(model, params, self.diag_images,
                                                mask_ratio=ratio)
      out[f"mask_{ratio:g}"] = diag_eval.layer_scalars(measures)
    return out

  def all(self, cfg, params) -> dict:
    return {**self.layerwise(cfg, params), "white_box": self.white_box(cfg, params)}


# ----------------------------------------------------------------------------- one run


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(study.config_lib.redacted(obj), f, indent=1, default=study.jsonable)
  os.replace(tmp, path)


def _stage_summary(stage: dict) -> dict:
  keep = ("results", "seconds", "steps", "epochs", "batch_size", "steps_per_sec",
          "train_loss", "eval_loss", "eval_top1")
  return {k: stage.get(k) for k in keep}


def run_mae(root: str, variant: str, seed: int, evaluation: Evaluation, num_train: int,
            opts: dict, epochs: dict, evals: int) -> dict:
  from crate_mae_jax.training import checkpoints
  pre = variant_config("pretrain", variant, seed, epochs["pretrain"], opts, num_train, evals)
  out = {"kind": "mae", "variant": variant, "seed": seed, "arch": pre.model.arch,
         "params": study.param_counts(pre.model, pre.data.image_size),
         "ista_lambda": float(pre.model.ista_lambda) if pre.model.arch == "crate_mae" else None}
  out["random_init"] = evaluation.all(pre, study.initial_params(pre))
  pre_dir = os.path.join(root, "pretrain")
  out["pretrain"] = _stage_summary(study.run_stage(pre, pre_dir, num_train=num_train))
  params, _ = checkpoints.restore_params(pre_dir)
  out["pretrained"] = evaluation.all(pre, params)
  del params
  ft = variant_config("finetune", variant, seed, epochs["finetune"], opts, num_train, evals)
  ft.init_from = pre_dir
  out["finetune"] = _stage_summary(study.run_stage(ft, os.path.join(root, "finetune"),
                                                   num_train=num_train))
  return out


def run_supervised(root: str, variant: str, seed: int, num_train: int, opts: dict,
                   epochs: dict, evals: int) -> dict:
  cfg = variant_config("supervised", variant, seed, epochs["finetune"], opts, num_train, evals)
  cfg.init_from = None
  return {"kind": "supervised", "variant": variant, "seed": seed, "arch": cfg.model.arch,
          "supervised": _stage_summary(study.run_stage(cfg, os.path.join(root, "train"),
                                                       num_train=num_train))}


def execute(workdir: str, name: str, evaluation_fn, num_train: int, opts: dict,
            epochs: dict, evals: int) -> dict:
  """Runs `name` into workdir/runs/name unless its results.json exists."""
  root = os.path.join(workdir, "runs", name)
  path = os.path.join(root, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  os.makedirs(root, exist_ok=True)
  start = time.time()
  kind, variant, seed = parse_run(name)
  if kind == "mae":
    out = run_mae(root, variant, seed, evaluation_fn(), num_train, opts, epochs, evals)
  elif kind == "supervised":
    out = run_supervised(root, variant, seed, num_train, opts, epochs, evals)
  else:
    cfg = variant_config("pretrain", "crate_mae_lam0.5", 0, 1.0, opts, num_train, evals)
    floor = study.run_pixel_floor(study.Data(cfg), root,
                                  epochs["pixel_floor"] / study.PIXEL_FLOOR_EPOCHS)
    out = {"kind": "pixel_floor", "pixel_floor": floor}
  out.update(name=name, seconds=time.time() - start, environment=study.environment())
  _write_json(path, out)
  return out


# ----------------------------------------------------------------------------- workers


def claim(workdir: str, name: str, token: str) -> bool:
  """Atomically claims `name` for this launch (`token`); False if taken."""
  folder = os.path.join(workdir, "claims", token)
  os.makedirs(folder, exist_ok=True)
  try:
    os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def work(workdir: str, runs: list[str], token: str, deadline: float, opts: dict,
         epochs: dict, evals: int, max_train: int | None, diag_images: int) -> list[str]:
  """Takes unclaimed, unfinished runs in order until none is left or the deadline
  is too close for another (judged by the runs this worker finished)."""
  first = variant_config("pretrain", "crate_mae_lam0.5", 0, 1.0, opts, 1, evals)
  num_train = study.Data(first).num_train
  cache = {}

  def evaluation():
    if "e" not in cache:
      cache["e"] = Evaluation(first, max_train, diag_images)
    return cache["e"]

  done, durations = [], {}   # run kind -> seconds of this worker's finished runs
  for name in runs:
    if os.path.exists(os.path.join(workdir, "runs", name, "results.json")):
      continue
    kind = parse_run(name)[0]
    seen = durations.get(kind) or [s for v in durations.values() for s in v]
    expected = float(np.max(seen)) if seen else 0.0
    if deadline and time.time() + expected > deadline:
      logging.warning("deadline: not starting %s (expected %.0f s)", name, expected)
      break
    if not claim(workdir, name, token):
      continue
    logging.info("run %s", name)
    start = time.time()
    execute(workdir, name, evaluation, num_train, opts, epochs, evals)
    durations.setdefault(kind, []).append(time.time() - start)
    logging.info("run %s done in %.0f s", name, durations[kind][-1])
    done.append(name)
  return done


def launch(workdir: str, runs: list[str], workers: int, deadline: float, argv: list[str]) -> int:
  """Starts `workers` copies of this command as worker processes sharing the device."""
  token = f"launch_{int(time.time() * 1000)}"
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / workers:.3f}")
  threads = str(max(1, (os.cpu_count() or 1) // workers))
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    env.setdefault(var, threads)
  procs = []
  for i in range(workers):
    log = open(os.path.join(workdir, f"worker_{i}.log"), "a")
    cmd = [sys.executable, "-m", "experiments.study_v2", *argv,
           f"--worker={i}", f"--deadline={deadline}", f"--claim_token={token}"]
    procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))

  def forward(signum, frame):
    del frame
    for p, _ in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = []
  for p, log in procs:
    codes.append(p.wait())
    log.close()
  logging.info("workers exited with %s", codes)
  return max((abs(c) for c in codes), default=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from experiments import study_v2_report
  if FLAGS.report_only:
    study_v2_report.report(FLAGS.workdir, FLAGS.docs or os.path.join(FLAGS.workdir, "report"))
    return
  for v in list(FLAGS.variants) + list(FLAGS.supervised):
    if v not in VARIANTS:
      raise app.UsageError(f"--variants/--supervised: {v!r} is unknown; use {','.join(VARIANTS)}")
  from crate_mae_jax.training import summaries
  summaries.quiet_library_logs()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  runs = run_list(FLAGS.variants, [int(s) for s in FLAGS.seeds], FLAGS.supervised,
                  FLAGS.pixel_floor)
  epochs = {"pretrain": FLAGS.pretrain_epochs, "finetune": FLAGS.finetune_epochs,
            "pixel_floor": FLAGS.pixel_floor_epochs}
  if FLAGS.worker is None and FLAGS.workers > 1:
    deadline = time.time() + FLAGS.deadline_s if FLAGS.deadline_s else 0.0
    _write_json(os.path.join(FLAGS.workdir, "protocol.json"), {
        "runs": runs, "epochs": epochs, "evals": FLAGS.evals or 2, "workers": FLAGS.workers,
        "max_train": FLAGS.max_train, "diag_images": FLAGS.diag_images,
        "diag_mask_ratios": DIAG_MASK_RATIOS, **stage_opts(), "command": " ".join(sys.argv)})
    forwarded = [a for a in sys.argv[1:] if not a.startswith(("--workers", "--deadline_s"))]
    rc = launch(FLAGS.workdir, runs, FLAGS.workers, deadline, forwarded)
    sys.exit(rc)

  def on_sigterm(signum, frame):  # outside a train loop (which saves and returns itself)
    del signum, frame
    raise study.StudyInterrupted("SIGTERM")
  signal.signal(signal.SIGTERM, on_sigterm)
  deadline = FLAGS.deadline or (time.time() + FLAGS.deadline_s if FLAGS.deadline_s else 0.0)
  if FLAGS.worker is None:
    _write_json(os.path.join(FLAGS.workdir, "protocol.json"), {
        "runs": runs, "epochs": epochs, "evals": FLAGS.evals or 2, "workers": 1,
        "max_train": FLAGS.max_train, "diag_images": FLAGS.diag_images,
        "diag_mask_ratios": DIAG_MASK_RATIOS, **stage_opts(), "command": " ".join(sys.argv)})
  token = FLAGS.claim_token if FLAGS.worker is not None else f"single_{int(time.time() * 1e3)}"
  try:
    done = work(FLAGS.workdir, runs, token, deadline, stage_opts(), epochs,
                FLAGS.evals or 2, FLAGS.max_train or None, FLAGS.diag_images)
  except study.StudyInterrupted as e:
    logging.warning("stopped: %s", e)
    sys.exit(3)
  logging.info("worker %s finished %d runs: %s", FLAGS.worker, len(done), done)


if __name__ == "__main__":
  app.run(main)
