"""The one train loop: masked pre-training, linear probing and fine-tuning.

`train_and_evaluate(config, workdir)` validates the config, builds a mesh, the
data source and a sharded train state, restores the latest checkpoint in
`workdir` if there is one (parameters, optimizer state, RNG, data position), and
runs the jitted step until `num_train_steps`, logging, evaluating and saving as
configured. SIGTERM saves a checkpoint at the current step and returns cleanly.
"""
import json
import os
import signal
import threading

from absl import logging
import jax
import ml_collections
import numpy as np

from crate_mae_jax import config_lib, evaluators, models, sharding
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.training import checkpoints, setup as setup_lib, tasks


PRIMARY_EVAL = "eval"   # the config.evals entry whose metrics pick the best checkpoint


class TrainingStopped(RuntimeError):
  """Raised when training cannot go on (non-finite values with nonfinite='stop')."""


class _Preemption:
  """Turns SIGTERM, Ctrl-C (SIGINT) and a closed terminal (SIGHUP) into a flag the
  loop polls between steps, so each saves a checkpoint at the current step;
  `interrupted` names a Ctrl-C or a hang-up.

  On several processes hosts receive SIGTERM at different steps, so the
  decision is Orbax's sync point (`CheckpointManager.reached_preemption`, fed
  by JAX's distributed pre-emption notifier, whose SIGTERM handler is left in
  place): every host then saves the same step.
  """

  def __init__(self, manager=None):
    self.requested = False
    self.interrupted = None
    self._manager = manager
    self._multi_host = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT, signal.SIGHUP) if self._multi_host else (
          signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def check(self, step: int) -> bool:
    """Whether to save at `step` and stop (the same answer on every host)."""
    if self._multi_host and not self.requested:
      self.requested = bool(self._manager.reached_preemption(step))
    return self.requested

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the current step, then exiting", name)
    self.requested = True
    if signum == signal.SIGINT:
      self.interrupted = "Ctrl-C"
    elif signum == signal.SIGHUP:
      self.interrupted = "SIGHUP: the terminal closed"

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def check_against_checkpoint(config, meta: dict, path: str, model) -> None:
  """Refuses, before any compile, a checkpoint of another model size or arch."""
  saved = meta.get("model", {})
  for key in ("arch", "width", "depth", "heads", "patch_size", "channels", "encoder_sees"):
    if key in saved and key in model and saved[key] != model[key]:
      raise ConfigError(
          f"config.model.{key}={model[key]!r} but checkpoint {path!r} has {saved[key]!r}; "
          f"set --config.model.{key}={saved[key]!r} (or pick the matching variant)")


# Fields a resumed run may change, and what the change does from the resumed step on.
RESUME_CHANGES = {
    "batch_size": "the data order, the epoch length and the learning rate (base_lr scaling) change",
    "seed": "the data order and the masks change",
    "num_train_steps": "the learning-rate schedule is recomputed over the new length",
    "num_epochs": "the learning-rate schedule is recomputed over the new length",
    "optim.base_lr": "the learning-rate schedule changes", "optim.lr": "the learning-rate schedule changes",
    "optim.warmup_epochs": "the learning-rate schedule changes",
    "optim.min_lr": "the learning-rate schedule changes",
    "model.mask_ratio": "the pre-training objective changes",
}


def resume_changes(config, saved: dict | None, step: int, total_steps: int) -> list[str]:
  """One line per field this run sets other than the run whose step it resumes
  (`saved`: that run's config as JSON), and one when it extends a finished run."""
  if not saved:
    return []
  lines = []
  for field, effect in RESUME_CHANGES.items():
    head, _, leaf = field.rpartition(".")
    theirs = (saved.get(head, {}) if head else saved).get(leaf)
    ours = (config[head] if head else config).get(leaf)
    if field == "num_epochs" and min(config.num_train_steps,
                                     saved.get("num_train_steps") or 0) > 0:
      continue                                 # both lengths set in steps: epochs unread
    if theirs is not None and ours is not None and theirs != ours:
      lines.append(f"resuming step {step}, written with {field}={theirs!r}, with "
                   f"{field}={ours!r}: {effect} from step {step} on")
  if step >= total_steps:
    lines.append(f"the checkpoint is at step {step}, the end of this run ({total_steps} steps): "
                 "nothing to train; to extend it set --config.num_train_steps above "
                 f"{step} (the learning-rate schedule is recomputed over the new length)")
  return lines


def _check_batch(config, mesh) -> int:
  """Per-process batch; refuses a batch that does not split over devices/hosts."""
  shards = sharding.num_batch_shards(mesh)
  micro = config.batch_size // config.accum_steps
  if micro % shards:
    raise ConfigError(
        f"config.batch_size={config.batch_size} (÷ accum_steps={config.accum_steps}) is "
        f"not divisible by the {shards} data-parallel devices; use a multiple of "
        f"{shards * config.accum_steps}")
  if config.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  return config.batch_size // jax.process_count()


def _pretrained_encoder(config, model, task):
  """The encoder parameters `config.init_from` gives the task (None: none)."""
  if not (task.encoder_from_init and config.init_from):
    return None
  path = config.init_from
  # One read: the step checked is the step loaded, also while a run writes `path`.
  params, _, _ = checkpoints.read(
      path, check=lambda meta: check_against_checkpoint(config, meta, path, model))
  if "encoder" not in params:
    raise ConfigError(f"config.init_from={path!r} holds no 'encoder' parameters")
  return params["encoder"]


def _open_source(config, local_batch: int):
  """The data source of the run, its size checked against the batch."""
  from crate_mae_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  try:
    source = input_pipeline.create(config.data, config.augment, task=config.task,
                                   batch_size=local_batch, seed=config.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  except ValueError as e:  # missing/empty dataset, a bad image with bad_images='fail'
    raise ConfigError(str(e) if str(e).startswith("config.") else f"config.data: {e}") from e
  config_lib.check_against_data(config, source, local_batch)
  if source.stats.get("skipped_bad_images"):
    logging.warning("Skipped %d bad images (logged above with their paths)",
                    source.stats["skipped_bad_images"])
  return source


def _restore_or_init(config, model, run, manager, latest, encoder, ckpt_dir):
  """The newest intact checkpoint of the workdir, else a fresh state (with the
  pre-trained encoder of `init_from` where the task takes one)."""
  if latest is not None:
    state, latest = manager.restore_newest(run.abstract_state, run.state_shardings,
                                           optimizer=config.optim.name)
    if state is not None:
      logging.info("Resuming from %s/%d", ckpt_dir, latest)
      for line in resume_changes(config, manager.saved_config(latest), latest,
                                 run.total_steps):
        logging.warning("%s", line)
      return state
    encoder = _pretrained_encoder(config, model, run.task)  # every step was damaged
  if encoder is not None:
    checkpoints.check_compatible(encoder, run.abstract_params["encoder"],
                                 where=config.init_from)
  override = None if encoder is None else (lambda params: {**params, "encoder": encoder})
  return run.init_state(jax.random.key(config.seed), params_override=override)


class _BestCheckpoint:
  """`checkpoints_best/`: the state whose primary evaluation is the best so far
  (by the task's metric, or `config.best_metric`); opened at the first eval so a
  resumed run keeps its best unless beaten."""

  def __init__(self, config, workdir: str, task):
    self.enabled = config.keep_best
    self.folder = os.path.join(workdir, "checkpoints_best")
    self.metric = config.best_metric or task.best_metric
    self.mode = task.best_mode
    self.manager, self.value = None, None

  def offer(self, state, meta: dict, results: dict) -> None:
    if not self.enabled:
      return
    if self.manager is None:
      self.manager = checkpoints.TrainCheckpoints(self.folder, best_metric=self.metric,
                                                  best_mode=self.mode)
      self.value = self.manager.best_value()
    value = results.get(self.metric)
    if value is None or (self.value is not None and not (
        value < self.value if self.mode == "min" else value > self.value)):
      return
    self.value = value
    self.manager.save(state, {**meta, "best": {self.metric: value}},
                      metrics={self.metric: value})

  def close(self) -> None:
    if self.manager is not None:
      self.manager.close()


def _evaluate(entry, state, results: dict, writer=None, step: int = 0) -> dict:
  """Runs one scheduled evaluator; its scalars join `results` (the primary one's
  unprefixed)."""
  out = entry.evaluator.run(state)
  if writer is not None:
    evaluators.write(writer, step, entry.prefix, out)
  scalars = evaluators.scalars_only(out)
  if entry.name == PRIMARY_EVAL:
    return {**results, **scalars}
  return {**results, **{f"{entry.prefix}{k}": v for k, v in scalars.items()}}


def _stop_if_nonfinite(config, state, manager, ckpt_dir) -> None:
  if config.nonfinite == "stop" and int(jax.device_get(state.nonfinite_count)):
    bad = int(jax.device_get(state.first_nonfinite_step))
    manager.wait()  # the last good checkpoint may still be in flight
    raise TrainingStopped(
        f"non-finite loss, gradient or updated state at step {bad}; training stopped, "
        f"the last good checkpoint in {ckpt_dir} is kept (set config.nonfinite='skip' to "
        "skip such updates, or lower config.optim.base_lr)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, writer=None,
                       hooks=None, resolved=None) -> dict:
  """Runs the configured task in `workdir`; returns the final metrics.

  `writer` (a clu metric writer; default: TensorBoard + logging in `workdir`)
  receives every scalar and image; `hooks` (callables of the step; default:
  progress and profiling) run after every step. The evaluations are those of
  `config.evals` (see `crate_mae_jax.evaluators`). `resolved`: what
  `config_lib.validate(config)` returned, when the caller has validated already.
  """
  model = config_lib.validate(config) if resolved is None else resolved
  config_lib.check_backend(config, jax.default_backend())
  from crate_mae_jax.training import run_record, summaries  # pylint: disable=import-outside-toplevel
  task = tasks.get(config.task)
  is_chief = jax.process_index() == 0
  mesh = sharding.create_mesh(config.mesh.shape)
  local_batch = _check_batch(config, mesh)
  config_lib.check_batch_memory(config, model["channels"], local_batch)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = (checkpoints.latest_step(ckpt_dir)
            if os.path.isdir(ckpt_dir) or ckpt_dir.startswith("gs://") else None)
  encoder = _pretrained_encoder(config, model, task) if latest is None else None
  source = _open_source(config, local_batch)
  num_classes = config.data.num_classes or source.num_classes
  run = setup_lib.setup(config, model, mesh, source.num_train_examples, num_classes,
                        source.device_augment)
  manager = checkpoints.TrainCheckpoints(ckpt_dir, keep=config.keep_checkpoints,
                                         asynchronous=config.checkpoint_async)
  state = _restore_or_init(config, model, run, manager, latest, encoder, ckpt_dir)
  start_step, total_steps = int(jax.device_get(state.step)), run.total_steps
  evals = evaluators.from_config(
      config, model, evaluators.predict_fns(run.module, model, task.classifies),
      source=source, jit=run.eval_jit(bool(state.batch_stats)), scope=run.scope)
  writer = writer or summaries.create_writer(workdir, is_chief)
  kernels = models.kernels(model)
  run_record.record_start(workdir, config, mesh, writer, state.params, is_chief, kernels)
  if hooks is None:
    hooks = summaries.progress_hooks(
        total_steps, writer, workdir, is_chief, config.profile_steps,
        every_secs=10.0 if total_steps < 5000 else 60.0,
        flops_per_step=summaries.model_flops_per_step(config, model),
        global_batch=config.batch_size)
  meta = {"model": model, "task": config.task, "config": config.to_json_best_effort(),
          "num_classes": num_classes if task.classifies else None, "data_position": "step"}
  best = _BestCheckpoint(config, workdir, task)
  logging.info("%s: %d steps (%.1f per epoch), global batch %d on %d devices, mesh %s, "
               "kernels %s", config.task, total_steps, run.steps_per_epoch, config.batch_size,
               jax.device_count(), dict(mesh.shape), kernels)
  if start_step < total_steps:
    logging.info("Compiling the %s train step for %d %s device(s) (this can take minutes on "
                 "CPU; the compilation cache makes restarts faster) ...", config.task,
                 jax.device_count(), jax.default_backend())
  train_iter = source.train_batches(start_step)
  results, pending, step = {}, [], start_step
  with _Preemption(manager.manager) as preemption:
    while step < total_steps:
      state, metrics = run.train_step(state, sharding.global_batch(next(train_iter), mesh))
      step += 1
      pending.append(metrics)
      for hook in hooks:
        hook(step)
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        fetched, pending = jax.device_get(pending), []
        scalars = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars["train/nonfinite_count"] = float(jax.device_get(state.nonfinite_count))
        writer.write_scalars(step, scalars)
        _stop_if_nonfinite(config, state, manager, ckpt_dir)
      due = [e for e in evals if e.due(step, last)]
      if due:
        _stop_if_nonfinite(config, state, manager, ckpt_dir)
      for entry in due:
        results = _evaluate(entry, state, results, writer, step)
        if entry.name == PRIMARY_EVAL:
          best.offer(state, meta, results)
      preempted = preemption.check(step)
      if step % config.checkpoint_every_steps == 0 or last or preempted:
        _stop_if_nonfinite(config, state, manager, ckpt_dir)
        manager.save(state, meta)
      if preempted:
        logging.warning("Pre-empted at step %d: checkpoint saved", step)
        break
  if not results and step >= total_steps:
    # A finished run started again trains nothing: evaluate the restored final state
    # (deterministic in seed and batch index) so it reports what the first run did.
    logging.info("Step %d of %d already done: evaluating the final checkpoint", step,
                 total_steps)
    for entry in (e for e in evals if e.due(step, True)):
      results = _evaluate(entry, state, results)
  manager.close()
  best.close()
  writer.flush()
  results = {k: float(v) for k, v in results.items()}
  if preemption.interrupted:
    results["interrupted"] = preemption.interrupted
  results.update(step=step, preempted=preemption.requested,
                 nonfinite_count=int(jax.device_get(state.nonfinite_count)),
                 skipped_bad_images=int(source.stats.get("skipped_bad_images", 0)))
  if is_chief:
    run_record.write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
  return results
