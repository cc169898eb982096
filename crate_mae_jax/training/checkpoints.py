"""Orbax checkpoint layout and I/O shared by training, conversion, probing and analysis.

A checkpoint directory is an Orbax `CheckpointManager` root with numbered steps.
Each step holds up to three items:
  * `params`      – the model parameters (a PyTree), always present;
  * `train_state` – step, optimizer state, RNG and data position (training only);
  * `meta`        – JSON: the resolved model config, the task and free-form notes.
Keeping `params` apart lets a probe or the analyzer restore only what it needs,
and a converted official checkpoint is simply a step with `params` and `meta`.

Integrity. Orbax stores no checksums of array data, so once a step is final
(renamed from its temporary folder) we write `MANIFEST` into it: size and
sha256 of every file. Every restore verifies the manifest first, so flipped
bytes, a truncated array file, an emptied step or a damaged JSON are found
before anything is loaded, and the error names the file. A resumed run falls
back to the newest step that verifies, moving damaged ones to
`<dir>_damaged/`. Steps without a manifest (killed between the rename and the
manifest, or written by older versions) are restored unverified.
"""
import contextlib
import hashlib
import json
import logging as logging_std
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp

from crate_mae_jax.training import native_memory, state_lib, tensorstore_json

# tensorstore's JSON conversions, which Orbax calls on every save, leak every key
# and value they return (about 100 KB a save of the tiny model): wrapped once here.
tensorstore_json.install()

PARAMS, TRAIN_STATE, META = "params", "train_state", "meta"
MANIFEST = "manifest.sha256.json"
# A file the run puts in its checkpoint folder: gone means the folder was
# deleted, even when a re-created folder gets the old inode number back.
FOLDER_MARKER = ".train_checkpoints"
_ALL_FINITE = jax.jit(state_lib.all_finite)


def _redacted_meta(meta: dict) -> dict:
  """`meta` as written: passwords in URLs redacted (`config_lib.redacted`), also in
  meta['config'], the JSON text of the run's config."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  out = config_lib.redacted(dict(meta))
  if isinstance(meta.get("config"), str):
    out["config"] = config_lib.redacted_json(meta["config"])
  return out


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, damaged or belongs to another model."""


def checkpoint_dir(path: str) -> str:
  """Accepts a workdir (with a `checkpoints/` folder) or a checkpoint root."""
  path = os.fspath(path)
  sub = os.path.join(path, "checkpoints")
  if _is_dir(sub):
    return sub
  return path


def _is_dir(path: str) -> bool:
  from etils import epath
  return epath.Path(path).is_dir()


def _local(path: str) -> bool:
  return "://" not in path


# ------------------------------------------------------------------ integrity
def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for dirpath, dirnames, names in os.walk(step_dir):
    dirnames.sort()
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
      if rel != MANIFEST:
        out.append(rel)
  return out


def write_manifest(step_dir: str) -> None:
  """Records size and sha256 of every file of a finished step (atomically)."""
  if not _local(step_dir) or os.path.exists(os.path.join(step_dir, MANIFEST)):
    return
  files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """None when the step matches its manifest (or has none and is not empty);
  otherwise the reason, naming the bad file."""
  if not _local(step_dir):
    return None
  if not os.path.isdir(step_dir):
    return f"{step_dir} is missing"
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(manifest):
    return None if _files(step_dir) else f"{step_dir} is empty"
  try:
    with open(manifest) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{manifest} is unreadable ({type(e).__name__})"
  for rel, want in sorted(files.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"{path} is missing"
    size = os.path.getsize(path)
    if size != want["bytes"]:
      return f"{path} has {size} bytes, {want['bytes']} were written"
    if _sha256(path) != want["sha256"]:
      return f"{path} does not match its sha256 (bytes changed on disk)"
  return None


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(step))


def _verified(directory: str, step: int) -> None:
  reason = verify(_step_dir(directory, step))
  if reason is not None:
    raise CheckpointError(f"checkpoint {directory!r} step {step} is damaged: {reason}; "
                          "pick another step or re-create the checkpoint")


def _finished_steps(directory: str) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except OSError:
    return []


def seal(directory: str, skip: int | None = None) -> None:
  """Writes the manifest of every finished step that lacks one (process 0)."""
  if jax.process_index() != 0 or not _local(directory):
    return
  for step in _finished_steps(directory):
    if step != skip:
      write_manifest(_step_dir(directory, step))


# ------------------------------------------------------------------ training
def _split_state(state) -> tuple[Any, dict]:
  rest = dict(step=state.step, opt_state=state.opt_state, batch_stats=state.batch_stats,
              rng=state.rng, nonfinite_count=state.nonfinite_count,
              first_nonfinite_step=state.first_nonfinite_step)
  return state.params, rest


def _with_sharding(abstract, shard):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)


def _handlers():
  return {PARAMS: ocp.StandardCheckpointHandler(),
          TRAIN_STATE: ocp.StandardCheckpointHandler(),
          META: ocp.JsonCheckpointHandler()}


class NonFiniteStateError(RuntimeError):
  """A state about to be saved holds NaN/inf parameters or optimizer state."""


class CheckpointFolderLost(RuntimeError):
  """The checkpoint folder vanished while training (deleted, unmounted)."""


class TrainCheckpoints:
  """The checkpoints of one training run: save, verify, restore, keep the best.

  `best_mode` ('min'/'max') makes this the best-checkpoint store: Orbax's
  preservation policy keeps the single best step by the saved metric.
  """

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True,
               best_metric: str | None = None, best_mode: str = "min"):
    self.directory = os.path.abspath(directory) if _local(directory) else directory
    self.best_metric, self.best_mode = best_metric, best_mode
    if best_metric:
      from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
      policy = pp.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                        reverse=best_mode == "min", keep_checkpoints_without_metrics=False)
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policy, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=True)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
          save_interval_steps=1,
          cleanup_tmp_directories=True)  # partial saves of a killed run: removed
    self._async = asynchronous and not best_metric
    self._options = options
    self.manager = self._open()
    if _local(self.directory):
      try:
        with open(os.path.join(self.directory, FOLDER_MARKER), "a"):
          pass
      except OSError:
        pass  # a read-only folder: the inode alone identifies it
    self._folder = self._identity()

  def _identity(self):
    """(device, inode, marker present) of a local folder: a folder that lost
    the marker made at the start was replaced."""
    try:
      info = os.stat(self.directory)
    except OSError:
      return None
    return (info.st_dev, info.st_ino,
            os.path.exists(os.path.join(self.directory, FOLDER_MARKER)))

  def _open(self):
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_handlers=_handlers())

  # -- saving
  def save(self, state, meta: dict, metrics: dict | None = None) -> None:
    if _local(self.directory) and self._identity() != self._folder:
      # Orbax quietly re-creates it (a new inode): every earlier checkpoint is gone.
      raise CheckpointFolderLost(
          f"the checkpoint folder {self.directory!r} disappeared during training (deleted "
          "or unmounted?); training stopped; restore it and rerun to resume, or rerun to "
          "start from scratch")
    params, rest = _split_state(state)
    if not bool(jax.device_get(_ALL_FINITE((params, rest["opt_state"])))):
      raise NonFiniteStateError(
          f"step {int(jax.device_get(state.step))}: parameters or optimizer state are not "
          "finite; nothing was saved")
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():  # e.g. a better best at a step a resumed run redoes
      self.manager.wait_until_finished()
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        TRAIN_STATE: ocp.args.StandardSave(rest),
        META: ocp.args.JsonSave(_redacted_meta(meta))}), metrics=metrics, force=True)
    # Orbax finished every earlier save before starting this one.
    seal(self.directory, skip=step if self._async else None)
    native_memory.release_free_memory()  # what the earlier saves' threads freed

  def wait(self) -> None:
    self.manager.wait_until_finished()
    seal(self.directory)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def best_value(self) -> float | None:
    """The metric of the kept best step (so a resumed run only replaces it by a better one)."""
    step = self.manager.best_step() if self.best_metric else None
    if step is None:
      return None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(**{
          META: ocp.args.JsonRestore()}))[META]
      return float(meta["best"][self.best_metric])
    except Exception:  # pylint: disable=broad-except
      return None

  # -- restoring
  def restore_newest(self, abstract, shard, optimizer: str = ""):
    """(state, step) of the newest step that verifies and restores, or (None, None).

    Damaged steps are moved to `<dir>_damaged/` with one warning line each; a
    checkpoint of another optimizer or model is refused (CheckpointError).
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = verify(_step_dir(self.directory, step))
      if reason is None:
        try:
          return self.restore(step, abstract, shard, optimizer), step
        except CheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
      self._quarantine(step, reason)
    return None, None

  def saved_config(self, step: int) -> dict | None:
    """The config the run that wrote `step` had (redacted), None where unreadable."""
    return saved_config(self.manager, step)

  def _quarantine(self, step: int, reason: str) -> None:
    older = [s for s in self.manager.all_steps() if s < step]
    target = os.path.join(f"{self.directory}_damaged", f"{step}.{int(time.time())}")
    _sync("quarantine_check")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(_step_dir(self.directory, step), target)
    _sync("quarantine_done")
    logging.warning("Checkpoint step %d is damaged (%s); moved to %s; falling back to %s",
                    step, reason, target,
                    f"step {max(older)}" if older else "a fresh start (no older step)")
    self.manager.reload()

  def restore(self, step: int, abstract, shard, optimizer: str = ""):
    from crate_mae_jax.training import state_lib  # the train state type
    target = _with_sharding(abstract, shard)
    params_t, rest_t = _split_state(target)
    where = f"{self.directory}/{step}"
    saved = self.manager.item_metadata(step)
    if saved is not None and saved.get(PARAMS) is not None:
      check_compatible(saved[PARAMS], params_t, where=where)
    if saved is not None and saved.get(TRAIN_STATE) is not None:
      try:
        check_compatible(saved[TRAIN_STATE], rest_t, where=where)
      except CheckpointError:
        theirs = _saved_optimizer(self.manager, step)
        raise CheckpointError(
            f"checkpoint {where!r} holds the optimizer state of optim.name={theirs!r}, "
            f"which does not fit this run's optim.name={optimizer!r}; resume with "
            f"--config.optim.name={theirs}, or start a new --workdir (with "
            "config.init_from to reuse the parameters)") from None
    out = self.manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(params_t),
        TRAIN_STATE: ocp.args.StandardRestore(rest_t)}))
    return state_lib.TrainState(params=out[PARAMS], **out[TRAIN_STATE])


def saved_config(manager, step: int) -> dict | None:
  """The config (as JSON) the run that wrote `step` had, None where unreadable."""
  try:
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return json.loads(meta[META]["config"])
  except Exception:  # pylint: disable=broad-except
    return None


def _saved_optimizer(manager, step: int) -> str:
  config = saved_config(manager, step)
  try:
    return str(config["optim"]["name"])
  except (TypeError, KeyError):
    return "another optimizer"


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ params only
def save_params(directory: str, params: Any, meta: dict, step: int = 0) -> str:
  """Writes a params-only checkpoint (e.g. a converted official model)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"{directory!r} exists and is a file; pass a folder path")
  with ocp.CheckpointManager(directory, item_names=(PARAMS, META)) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        META: ocp.args.JsonSave(_redacted_meta(meta))}), force=True)
    manager.wait_until_finished()
  seal(directory)
  return _step_dir(directory, step)


def latest_step(directory: str) -> int | None:
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    return manager.latest_step()


def _damaged(directory: str, step: int, e: Exception) -> CheckpointError:
  return CheckpointError(
      f"checkpoint {directory!r} step {step} cannot be read "
      f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); pick another step or "
      "re-create the checkpoint")


def _reader(directory: str, handlers: dict | None = None):
  """A manager that only reads: it creates nothing and reads no step's metadata
  up front (a step that the writing run's retention deletes meanwhile would
  otherwise log Orbax warnings for files that are gone)."""
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False,
                                         lightweight_initialize=True)
  if handlers is None:
    return ocp.CheckpointManager(directory, options=options, item_names=(PARAMS, META))
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class _OrbaxMissingFileFilter(logging_std.Filter):
  """Drops Orbax's warnings about files of a step that is being deleted; the
  reader names a missing file itself (`verify`) or moves to an older step."""

  def filter(self, record):
    return "Metadata file does not exist" not in str(record.msg)


@contextlib.contextmanager
def _quiet_reads():
  logger, quiet = logging_std.getLogger("absl"), _OrbaxMissingFileFilter()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _live(directory: str) -> bool:
  """A run holds the workdir of this checkpoint folder (it may delete steps)."""
  from crate_mae_jax.training import workdir_lock  # pylint: disable=import-outside-toplevel
  return _local(directory) and workdir_lock.held(os.path.dirname(directory))


def _vanished(step_dir: str, live: bool, wait_s: float = 5.0) -> bool:
  """The step is gone or going: the writing run's retention deletes it."""
  deadline = time.monotonic() + (wait_s if live else 0.0)
  while True:
    if not os.path.isdir(step_dir):
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.1)


def _candidates(directory: str, live: bool) -> list[int]:
  """Finished steps, newest first; in a live workdir, those with a manifest
  first (a step without one is being sealed or deleted)."""
  steps = _finished_steps(directory)[::-1]
  if live:
    sealed = [s for s in steps if os.path.exists(os.path.join(_step_dir(directory, s), MANIFEST))]
    steps = sealed + [s for s in steps if s not in sealed]
  return steps


def _read_meta_at(manager, directory: str, step: int) -> dict:
  _verified(directory, step)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return dict(meta[META])
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(directory, step, e) from None


def _restore_params_at(directory: str, step: int, target: Any) -> Any:
  # Handlers, not just item names: without them `item_metadata` returns None
  # for every item and the compatibility check could not see the saved tree.
  handlers = {PARAMS: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
  with _reader(directory, handlers) as manager:
    try:
      saved = manager.item_metadata(step)[PARAMS]
    except Exception as e:  # pylint: disable=broad-except
      raise _damaged(directory, step, e) from None
    if saved is None:
      raise CheckpointError(f"checkpoint {directory!r} step {step} has no params")
    saved = getattr(saved, "tree", saved)
    if target is not None:
      check_compatible(saved, target, where=directory)
    else:
      # Restore onto this host's first device, whatever mesh wrote the
      # checkpoint (e.g. pre-trained on a pod slice, probed on one host).
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          PARAMS: ocp.args.StandardRestore(target)}))
    except Exception as e:  # pylint: disable=broad-except
      raise _damaged(directory, step, e) from None
  return restored[PARAMS]


def _directory(path: str) -> str:
  directory = os.path.abspath(checkpoint_dir(path))
  if not _is_dir(directory):
    raise CheckpointError(f"checkpoint {path!r} does not exist; pass a workdir of a "
                          "training run or the output of crate_mae_jax.tools.convert_torch")
  return directory


def read(path: str, step: int | None = None, target: Any = None,
         check: Callable[[dict], None] | None = None, params: bool = True):
  """(params or None, meta, step) of the given step, or of the newest complete
  one of a checkpoint root or workdir. `check(meta)` runs before the params are
  read (it raises to refuse them). Safe on a workdir that a run is writing: a
  step that its retention deletes meanwhile is passed over for the next newest;
  a damaged step that stays is a CheckpointError naming the bad file."""
  directory = _directory(path)
  live = _live(directory)
  with _quiet_reads():
    if step is not None:
      steps = [step]
    elif _local(directory):
      steps = _candidates(directory, live)
    else:
      with _reader(directory) as manager:
        steps = [s for s in [manager.latest_step()] if s is not None]
    for candidate in steps:
      try:
        with _reader(directory) as manager:
          meta = _read_meta_at(manager, directory, candidate)
        if check is not None:
          check(meta)
        restored = _restore_params_at(directory, candidate, target) if params else None
        return restored, meta, candidate
      except Exception:  # pylint: disable=broad-except
        if step is not None or not _local(directory) or \
            not _vanished(_step_dir(directory, candidate), live):
          raise
        logging.info("Checkpoint step %d was deleted while being read; reading the "
                     "next newest", candidate)
  raise CheckpointError(f"no complete checkpoint under {directory!r}")


def read_meta(path: str, step: int | None = None) -> tuple[dict, int]:
  """(meta, step) of the given or newest complete step (see `read`)."""
  _, meta, step = read(path, step, params=False)
  return meta, step


def restore_params(path: str, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
  """Restores (params, meta) of the given or newest complete step (see `read`).
  With `target` (arrays or ShapeDtypeStructs, optionally sharded) the params come
  back with its structure and shardings and any mismatch raises a CheckpointError
  naming the differing entries."""
  params, meta, _ = read(path, step, target)
  return params, meta


def _shape_of(x) -> tuple:
  return tuple(getattr(x, "shape", ()))


def _path(keys) -> str:
  """'a/0/mu' for dict keys, indices and attributes alike (Orbax's metadata
  stores a namedtuple's fields as a dict)."""
  parts = []
  for k in keys:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises CheckpointError listing missing, unexpected and wrongly shaped entries."""
  flat_saved = {_path(k): _shape_of(v) for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  flat_target = {_path(k): _shape_of(v)
                 for k, v in jax.tree_util.tree_leaves_with_path(target)}
  missing = sorted(set(flat_target) - set(flat_saved))
  unexpected = sorted(set(flat_saved) - set(flat_target))
  shapes = sorted(f"{k}: checkpoint {flat_saved[k]} vs model {flat_target[k]}"
                  for k in set(flat_saved) & set(flat_target)
                  if flat_saved[k] != flat_target[k])
  if missing or unexpected or shapes:
    raise CheckpointError(
        f"checkpoint {where!r} does not fit this model (is it another size or "
        f"architecture? set config.model to match it): missing {missing[:8]}, "
        f"unexpected {unexpected[:8]}, wrong shape {shapes[:8]}")
