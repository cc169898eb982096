"""The one train loop: masked pre-training, linear probing and fine-tuning.

`train_and_evaluate(config, workdir)` validates the config, builds a mesh, the
data source and a sharded train state, restores the latest checkpoint in
`workdir` if there is one (parameters, optimizer state, RNG, data position), and
runs the jitted step until `num_train_steps`, logging, evaluating and saving as
configured. SIGTERM saves a checkpoint at the current step and returns cleanly.
"""
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crate_mae_jax.training import checkpoints, optim, state_lib, steps
from crate_mae_jax import config_lib, evaluators, models, sharding
from crate_mae_jax.config_lib import ConfigError


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


def _sample_shape(config, resolved):
  size = config.data.image_size
  return (1, size, size, resolved["channels"])


def build_model(config, num_classes: int | None, resolved: dict | None = None):
  """(module, init inputs, init kwargs) for the config's task; `resolved`:
  `models.resolve(config.model)` when the caller has it."""
  resolved = models.resolve(config.model if resolved is None else resolved)
  x = jnp.zeros(_sample_shape(config, resolved), jnp.float32)
  if config.task == "pretrain":
    return models.build_mae(resolved), (x,), dict(mask_ratio=resolved["mask_ratio"])
  if config.task == "linear_probe":
    model = models.build_classifier(resolved, num_classes, pool=config.probe.pool,
                                    head_norm=config.probe.head_norm, frozen=True)
  else:
    model = models.build_classifier(resolved, num_classes, pool=config.finetune.pool,
                                    head_init_std=config.finetune.head_init_std)
  return model, (x,), {}


def check_against_checkpoint(config, meta: dict, path: str,
                             resolved: dict | None = None) -> None:
  """Refuses, before any compile, a checkpoint of another model size or arch."""
  saved = meta.get("model", {})
  ours = models.resolve(config.model if resolved is None else resolved)
  for key in ("arch", "width", "depth", "heads", "patch_size", "channels", "encoder_sees"):
    if key in saved and saved[key] != ours[key]:
      raise ConfigError(
          f"config.model.{key}={ours[key]!r} but checkpoint {path!r} has {saved[key]!r}; "
          f"set --config.model.{key}={saved[key]!r} (or pick the matching variant)")


def _num_steps(config, num_examples: int) -> tuple[int, float]:
  steps_per_epoch = num_examples / config.batch_size
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch))), steps_per_epoch


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


def _encoder_from(path: str, config, resolved) -> tuple[Any, dict]:
  meta, _ = checkpoints.read_meta(path)
  check_against_checkpoint(config, meta, path, resolved)
  params, meta = checkpoints.restore_params(path)
  if "encoder" not in params:
    raise ConfigError(f"config.init_from={path!r} holds no 'encoder' parameters")
  return params["encoder"], meta


def _record_run(workdir, config, mesh, writer, params, is_chief, kernels) -> None:
  """The workdir's record of this start (config, command, versions, devices), the
  config as TensorBoard hparams, and a table of the parameters in the log."""
  from crate_mae_jax.training import run_record
  if is_chief:
    run_record.record(workdir, config, mesh, kernels=kernels)
    writer.write_hparams(run_record.hparams(config))
  try:
    from clu import parameter_overview
  except ImportError:  # a host without clu: the record above still holds the config
    return
  parameter_overview.log_parameter_overview(params, include_stats="sharding",
                                            jax_logging_process=0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, writer=None,
                       hooks=None, resolved: dict | None = None) -> dict:
  """Runs the configured task in `workdir`; returns the final metrics.

  `writer` (a clu metric writer; default: TensorBoard + logging in `workdir`)
  receives every scalar and image; `hooks` (callables of the step; default:
  progress and profiling) run after every step. The evaluations are those of
  `config.evals` (see `crate_mae_jax.evaluators`). `resolved` is what
  `config_lib.validate(config)` returned, when the caller has validated already.
  """
  if resolved is None:
    resolved = config_lib.validate(config)
  config_lib.check_backend(config, jax.default_backend())
  from crate_mae_jax.data import input_pipeline
  from crate_mae_jax.training import summaries
  is_chief = jax.process_index() == 0
  mesh = sharding.create_mesh(config.mesh.shape)
  rules = sharding.rules(config.mesh)
  local_batch = _check_batch(config, mesh)
  config_lib.check_batch_memory(config, resolved["channels"], local_batch)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = None
  if os.path.isdir(ckpt_dir) or ckpt_dir.startswith("gs://"):
    latest = checkpoints.latest_step(ckpt_dir)
  encoder_params = None
  if latest is None and config.task != "pretrain" and config.init_from:
    encoder_params, _ = _encoder_from(config.init_from, config, resolved)

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
  num_classes = config.data.num_classes or source.num_classes
  total_steps, steps_per_epoch = _num_steps(config, source.num_train_examples)
  model, init_inputs, init_kwargs = build_model(config, num_classes, resolved)

  depth = resolved["depth"] if config.task == "finetune" else None
  boxed = state_lib.abstract_variables(model, init_inputs, init_kwargs)
  abstract_params = nn.meta.unbox(boxed["params"])
  trainable = None
  if config.task == "linear_probe":
    trainable = {k: jax.tree_util.tree_map(lambda _: k != "encoder", v)
                 for k, v in abstract_params.items()}
  tx, lr_schedule = optim.create(config, abstract_params, total_steps, steps_per_epoch,
                                 trainable=trainable, depth=depth)
  if encoder_params is not None:
    checkpoints.check_compatible(encoder_params, abstract_params["encoder"],
                                 where=config.init_from)

  def override(params):
    if encoder_params is None:
      return params
    return {**params, "encoder": encoder_params}

  abstract, shard = state_lib.state_shardings(model, tx, mesh, rules, init_inputs, init_kwargs)
  manager = checkpoints.TrainCheckpoints(ckpt_dir, keep=config.keep_checkpoints,
                                         asynchronous=config.checkpoint_async)
  state = None
  if latest is not None:
    state, latest = manager.restore_newest(abstract, shard, optimizer=config.optim.name)
  if state is not None:
    logging.info("Resuming from %s/%d", ckpt_dir, latest)
  else:
    if encoder_params is None and config.task != "pretrain" and config.init_from:
      # Every step of the workdir was damaged: start over from init_from.
      encoder_params, _ = _encoder_from(config.init_from, config, resolved)
      checkpoints.check_compatible(encoder_params, abstract_params["encoder"],
                                   where=config.init_from)
    state, _ = state_lib.init_state(model, tx, mesh, rules, init_inputs, init_kwargs,
                                    jax.random.key(config.seed), params_override=override)
  start_step = int(jax.device_get(state.step))

  mix = None
  if config.task == "finetune" and (config.augment.mixup or config.augment.cutmix):
    from crate_mae_jax.data import augment_jax
    mix = lambda k, x, y: augment_jax.mixup_cutmix(k, x, y, config.augment.mixup,
                                                   config.augment.cutmix)
  if config.task == "pretrain":
    step_fn = steps.make_pretrain_step(model, tx, resolved["mask_ratio"], config.accum_steps,
                                       source.device_augment, lr_schedule)
    best_mode = "min"
  else:
    step_fn = steps.make_classify_step(model, tx, num_classes, config.accum_steps,
                                       config.augment.label_smoothing, mix,
                                       source.device_augment, lr_schedule)
    best_mode = "max"
  best_metric = config.best_metric or ("loss" if config.task == "pretrain" else "top1")
  train_step = state_lib.jit_train_step(step_fn, shard, mesh, rules)
  variables_shard = (shard.params if config.task == "pretrain" else
                     ({"params": shard.params, "batch_stats": shard.batch_stats}
                      if state.batch_stats else {"params": shard.params}))
  evals = evaluators.from_config(config, evaluators.Context(
      config=config, model=model, resolved=resolved, source=source, mesh=mesh, rules=rules,
      variables_sharding=variables_shard, num_classes=num_classes))

  if writer is None:
    writer = summaries.create_writer(workdir, is_chief)
  _record_run(workdir, config, mesh, writer, state.params, is_chief, models.kernels(resolved))
  if hooks is None:
    hooks = summaries.progress_hooks(total_steps, writer, workdir, is_chief,
                                     config.profile_steps,
                                     every_secs=10.0 if total_steps < 5000 else 60.0)
  meta = {"model": resolved, "task": config.task, "config": config.to_json_best_effort(),
          "num_classes": num_classes if config.task != "pretrain" else None,
          "data_position": "step"}
  best_manager, best_value = None, None
  results: dict = {}
  logging.info("%s: %d steps (%.1f per epoch), global batch %d on %d devices, mesh %s, "
               "kernels %s", config.task, total_steps, steps_per_epoch, config.batch_size,
               jax.device_count(), dict(mesh.shape), models.kernels(resolved))

  def maybe_stop(state):
    if config.nonfinite == "stop" and int(jax.device_get(state.nonfinite_count)):
      bad = int(jax.device_get(state.first_nonfinite_step))
      manager.wait()  # the last good checkpoint may still be in flight
      raise TrainingStopped(
          f"non-finite loss, gradient or updated state at step {bad}; training stopped, "
          f"the last good checkpoint in {ckpt_dir} is kept (set config.nonfinite='skip' to "
          "skip such updates, or lower config.optim.base_lr)")

  if start_step < total_steps:
    logging.info("Compiling the %s train step for %d %s device(s) (this can take minutes on "
                 "CPU; the compilation cache makes restarts faster) ...", config.task,
                 jax.device_count(), jax.default_backend())
  train_iter = source.train_batches(start_step)
  pending: list = []
  step = start_step
  with _Preemption(manager.manager) as preemption:
    while step < total_steps:
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      pending.append(metrics)
      for hook in hooks:
        hook(step)
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        fetched = jax.device_get(pending)
        pending = []
        scalars = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars["train/nonfinite_count"] = float(jax.device_get(state.nonfinite_count))
        writer.write_scalars(step, scalars)
        maybe_stop(state)
      due = [e for e in evals if e.due(step, last)]
      if due:
        maybe_stop(state)
      for entry in due:
        out = entry.evaluator.run(state)
        evaluators.write(writer, step, entry.prefix, out)
        scalars = evaluators.scalars_only(out)
        if entry.name == PRIMARY_EVAL:
          results = {**results, **scalars}
        else:
          results.update({f"{entry.prefix}{k}": v for k, v in scalars.items()})
        if entry.name != PRIMARY_EVAL:
          continue
        if config.keep_best and best_manager is None:  # opened at the first eval
          best_manager = checkpoints.TrainCheckpoints(
              os.path.join(workdir, "checkpoints_best"), best_metric=best_metric,
              best_mode=best_mode)
          best_value = best_manager.best_value()  # a resumed run keeps its best unless beaten
        value = results.get(best_metric)
        improved = value is not None and (best_value is None or (
            value < best_value if best_mode == "min" else value > best_value))
        if config.keep_best and improved:
          best_value = value
          best_manager.save(state, {**meta, "best": {best_metric: value}},
                            metrics={best_metric: value})
      preempted = preemption.check(step)
      if step % config.checkpoint_every_steps == 0 or last or preempted:
        maybe_stop(state)
        manager.save(state, meta)
      if preempted:
        logging.warning("Pre-empted at step %d: checkpoint saved", step)
        break
  if not results and step >= total_steps:
    # A finished run started again trains nothing: evaluate the restored final state
    # (deterministic in seed and batch index) so it reports what the first run did.
    logging.info("Step %d of %d already done: evaluating the final checkpoint", step,
                 total_steps)
    for entry in evals:
      if not entry.due(step, True):
        continue
      scalars = evaluators.scalars_only(entry.evaluator.run(state))
      if entry.name == PRIMARY_EVAL:
        results = {**results, **scalars}
      else:
        results.update({f"{entry.prefix}{k}": v for k, v in scalars.items()})
  manager.close()
  if best_manager is not None:
    best_manager.close()
  writer.flush()
  results = {k: float(v) for k, v in results.items()}
  if preemption.interrupted:
    results["interrupted"] = preemption.interrupted
  results.update(step=step, preempted=preemption.requested,
                 nonfinite_count=int(jax.device_get(state.nonfinite_count)),
                 skipped_bad_images=int(source.stats.get("skipped_bad_images", 0)))
  if is_chief:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
