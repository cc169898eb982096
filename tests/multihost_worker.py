"""One process of tests/test_multihost.py: runs the real command line entry point
(`crate_mae_jax.main`) in this process, watching what it does.

    python tests/multihost_worker.py OUT_DIR [--restore_first=WORKDIR]
        [--reference=WORKDIR] -- --config=configs/quickstart.py --workdir=... [...]

Everything after `--` goes to `crate_mae_jax.main` unchanged: with
`--distributed=on` it calls `jax.distributed.initialize()`, which takes the
coordinator from JAX_COORDINATOR_ADDRESS and main takes the process count and id
from JAX_NUM_PROCESSES / JAX_PROCESS_ID. The worker only adds spies:

* `checkpoints.TrainCheckpoints.save` – keeps the state of the last save, i.e. the state the run ended
  with; afterwards its params are gathered from all processes
  (`multihost_utils.process_allgather`) and written to OUT_DIR/final_params.npz;
* `sharding.global_batch` – per train step, a digest of each example this process
  fed (to show that each process read its own slice of the global batch);
* `checkpoints.TrainCheckpoints.restore` – the step a run resumed from.

`--restore_first=WORKDIR` first restores that checkpoint's params with
`checkpoints.restore_params` (OUT_DIR/restored_params.npz); `--reference=WORKDIR`
afterwards trains the same config from scratch in WORKDIR without the entry point
(OUT_DIR/reference_params.npz). Facts go to OUT_DIR/facts_<process>.json.
"""
import hashlib
import json
import os
import pathlib
import sys

import numpy as np


def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _gathered_params(state) -> dict:
  """The full params of a (possibly multi-process) sharded state, on every process."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(state.params, tiled=True)
  else:
    params = jax.device_get(state.params)
  return _flat(params)


class Spies:
  def __init__(self):
    from crate_mae_jax.training import checkpoints
    from crate_mae_jax import sharding
    self.last_saved = None
    self.saved_steps = []
    self.restored_step = None
    self.batches = []  # per train step: [sha1 of each local example]
    store = checkpoints.TrainCheckpoints
    self._save, self._restore = store.save, store.restore
    self._global_batch = sharding.global_batch
    spies = self

    def save(manager, state, meta, metrics=None):
      import jax
      spies.last_saved = state
      spies.saved_steps.append(int(jax.device_get(state.step)))
      return spies._save(manager, state, meta, metrics)

    def restore(manager, step, abstract, shard, optimizer=""):
      spies.restored_step = int(step)
      return spies._restore(manager, step, abstract, shard, optimizer)
    store.save, store.restore = save, restore
    sharding.global_batch = self.global_batch

  def global_batch(self, local, mesh):
    if "mask" not in local:  # eval batches carry a padding mask, train batches do not
      images = np.asarray(local["image"])
      self.batches.append({
          "shape": list(images.shape),
          "examples": [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
                       for x in images]})
    return self._global_batch(local, mesh)

  def reset(self):
    self.last_saved, self.saved_steps, self.restored_step, self.batches = None, [], None, []


def _restore(workdir: str, out: pathlib.Path) -> dict:
  """Restores the params of `workdir`'s latest checkpoint onto this process's first
  device with `checkpoints.restore_params`; also records whether a restore without
  a target (as `train` does for `config.init_from`) works on this topology."""
  import jax
  import orbax.checkpoint as ocp
  from crate_mae_jax.training import checkpoints
  facts = {}
  try:
    params, _ = checkpoints.restore_params(workdir)
    np.savez(out / "restored_untargeted_params.npz", **_flat(params))
    facts["untargeted_restore_error"] = None
  except Exception as e:  # pylint: disable=broad-except
    facts["untargeted_restore_error"] = f"{type(e).__name__}: {e}"[:600]
  meta, step = checkpoints.read_meta(workdir)
  directory = os.path.abspath(checkpoints.checkpoint_dir(workdir))
  handlers = {checkpoints.PARAMS: ocp.StandardCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    saved = manager.item_metadata(step)[checkpoints.PARAMS]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
      getattr(saved, "tree", saved))
  params, meta = checkpoints.restore_params(workdir, target=target)
  np.savez(out / "restored_params.npz", **_flat(params))
  facts.update(restored_checkpoint_step=step, restored_task=meta.get("task"))
  return facts


def _run_main(argv: list) -> None:
  from crate_mae_jax import main
  sys.argv = ["crate_mae_jax.main", *argv]
  try:
    main.run()
  except SystemExit as e:
    if e.code not in (None, 0):
      raise


def _main() -> None:
  args = sys.argv[1:]
  split = args.index("--")
  own, main_argv = args[:split], args[split + 1:]
  out = pathlib.Path(own[0])
  options = dict(a[2:].split("=", 1) for a in own[1:])
  out.mkdir(parents=True, exist_ok=True)

  restore_facts = {}
  if "restore_first" in options:
    restore_facts = _restore(options["restore_first"], out)

  spies = Spies()
  _run_main(main_argv)

  import jax
  facts = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "local_devices": jax.local_device_count(), "devices": jax.device_count(),
           "saved_steps": spies.saved_steps, "restored_step": spies.restored_step,
           "batches": spies.batches, **restore_facts}
  if spies.last_saved is None:
    raise SystemExit("the run saved no checkpoint")
  final = _gathered_params(spies.last_saved)  # a collective: every process takes part
  if jax.process_index() == 0:
    np.savez(out / "final_params.npz", **final)

  if "reference" in options:
    from crate_mae_jax import main
    from crate_mae_jax.training import train
    config = main.FLAGS.config.copy_and_resolve_references()
    spies.reset()
    train.train_and_evaluate(config, options["reference"])
    np.savez(out / "reference_params.npz", **_gathered_params(spies.last_saved))
    facts["reference_batches"] = spies.batches
    facts["reference_saved_steps"] = spies.saved_steps

  (out / f"facts_{jax.process_index()}.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
  _main()
