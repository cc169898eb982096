"""Orbax checkpoint layout shared by training, conversion, probing and analysis.

A checkpoint directory is an Orbax `CheckpointManager` root with numbered steps.
Each step holds up to three items:
  * `params`      – the model parameters (a PyTree), always present;
  * `train_state` – step, optimizer state, RNG and data position (training only);
  * `meta`        – JSON: the resolved model config, the task and free-form notes.
Keeping `params` apart lets a probe or the analyzer restore only what it needs,
and a converted official checkpoint is simply a step with `params` and `meta`.
"""
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS, TRAIN_STATE, META = "params", "train_state", "meta"


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or belongs to another model."""


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


def save_params(directory: str, params: Any, meta: dict, step: int = 0) -> str:
  """Writes a params-only checkpoint (e.g. a converted official model)."""
  with ocp.CheckpointManager(os.path.abspath(directory),
                             item_names=(PARAMS, META)) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        META: ocp.args.JsonSave(meta)}), force=True)
    manager.wait_until_finished()
  return os.path.join(os.path.abspath(directory), str(step))


def latest_step(directory: str) -> int | None:
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    return manager.latest_step()


def read_meta(path: str, step: int | None = None) -> tuple[dict, int]:
  """(meta, step) of the given or latest step of a checkpoint root or workdir."""
  directory = os.path.abspath(checkpoint_dir(path))
  if not _is_dir(directory):
    raise CheckpointError(f"checkpoint {path!r} does not exist; pass a workdir of a "
                          "training run or the output of crate_mae_jax.convert_torch")
  with ocp.CheckpointManager(directory, item_names=(PARAMS, META)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint under {directory!r}")
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  return dict(meta[META]), step


def restore_params(path: str, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
  """Restores (params, meta). With `target` (arrays or ShapeDtypeStructs, optionally
  sharded) the params come back with its structure and shardings and any
  mismatch raises a CheckpointError naming the differing entries."""
  meta, step = read_meta(path, step)
  directory = os.path.abspath(checkpoint_dir(path))
  # Handlers, not just item names: without them `item_metadata` returns None
  # for every item and the compatibility check could not see the saved tree.
  handlers = {PARAMS: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    saved = manager.item_metadata(step)[PARAMS]
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
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(target)}))
  return restored[PARAMS], meta


def _shape_of(x) -> tuple:
  return tuple(getattr(x, "shape", ()))


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises CheckpointError listing missing, unexpected and wrongly shaped entries."""
  flat_saved = {jax.tree_util.keystr(k): _shape_of(v)
                for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  flat_target = {jax.tree_util.keystr(k): _shape_of(v)
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


def dumps(meta: dict) -> str:
  return json.dumps(meta, indent=2, sort_keys=True, default=str)
