"""One training process of tests/test_faults.py: runs the real command line entry
point (`crate_mae_jax.main.run`) in this process, with optional fault injection.

    python tests/fault_worker.py -- --config=configs/quickstart.py --workdir=... [...]

Everything after `--` goes to `crate_mae_jax.main` unchanged (exit codes, messages
and signal handling are the entry point's own). Environment switches:

* FAULT_NO_TF=1 – hide `clu`, so the metric writer takes its TensorFlow-free
  fallback (logging + PNG files). Only to start faster: importing TensorFlow
  costs seconds per process and none of the faults under test involve it.
* FAULT_NAN_STEPS=2,5 – the loss of those (0-based) train steps is made NaN
  inside the jitted step, a deterministic stand-in for a transient numerical
  fault; everything after that (the finite check, skipping, counting, stopping)
  is the train loop's own code.
* FAULT_NAN_UPDATE_STEPS=2,5 – the optimizer's update at those steps is NaN
  while loss and gradients stay finite (the updated state must be checked).
* FAULT_STEP_SECONDS=0.25 – each train step takes at least that long (a sleep
  when its batch is handed over), so that a signal can land mid-run.
* FAULT_DISK_ERROR=ENOSPC|EROFS and FAULT_DISK_AFTER=k – once the train loop has
  saved k checkpoints, creating files or directories under the workdir fails
  with that errno, as on a full or read-only disk (for hosts where the tests
  cannot mount a small tmpfs themselves).
"""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hide_clu():
  sys.modules["clu"] = None  # `from clu import ...` raises ImportError
  # ... and the tensorboardX writer too: the logging-only writer keeps no file open
  # in the workdir, so the tests' tmpfs can be remounted read-only at any moment.
  sys.modules["tensorboardX"] = None


def _poison_steps(bad_steps):
  import jax.numpy as jnp
  from crate_mae_jax.training import steps
  original = steps._apply  # pylint: disable=protected-access

  def _apply(state, tx, grads, loss, batch_stats=None):
    bad = jnp.isin(state.step, jnp.asarray(bad_steps, jnp.int32))
    loss = jnp.where(bad, jnp.nan, loss)
    return original(state, tx, grads, loss, batch_stats)
  steps._apply = _apply  # pylint: disable=protected-access


def _poison_updates(bad_steps):
  """Finite loss and gradients, but the optimizer's update turns NaN (as a NaN
  learning rate or an overflowing moment would)."""
  import jax
  import jax.numpy as jnp
  from crate_mae_jax.training import steps
  original = steps._apply  # pylint: disable=protected-access

  def _apply(state, tx, grads, loss, batch_stats=None):
    bad = jnp.isin(state.step, jnp.asarray(bad_steps, jnp.int32))

    class Poisoned:
      @staticmethod
      def update(g, s, p):
        updates, new_s = tx.update(g, s, p)
        return jax.tree_util.tree_map(lambda u: jnp.where(bad, jnp.nan, u), updates), new_s
    return original(state, Poisoned, grads, loss, batch_stats)
  steps._apply = _apply  # pylint: disable=protected-access


def _slow_steps(seconds: float):
  import time
  from crate_mae_jax import sharding
  original = sharding.global_batch

  def global_batch(*args, **kwargs):
    time.sleep(seconds)
    return original(*args, **kwargs)
  sharding.global_batch = global_batch


def _break_disk(code: int, after: int, workdir: str):
  """OSError(code) for writes under `workdir` once `after` saves have started."""
  import builtins
  import pathlib
  from crate_mae_jax.training import checkpoints
  root = os.path.abspath(workdir)
  saves = {"n": 0}
  original_save = checkpoints.TrainCheckpoints.save

  def counting_save(*args, **kwargs):
    saves["n"] += 1
    return original_save(*args, **kwargs)
  checkpoints.TrainCheckpoints.save = counting_save

  def broken(path) -> bool:
    try:
      path = os.path.abspath(os.fspath(path))
    except TypeError:
      return False
    return saves["n"] > after and (path == root or path.startswith(root + os.sep))

  def fail(path):
    raise OSError(code, os.strerror(code), os.fspath(path))

  def guard(fn, writes=lambda *a, **k: True):
    def wrapped(path, *args, **kwargs):
      if writes(*args, **kwargs) and broken(path):
        fail(path)
      return fn(path, *args, **kwargs)
    return wrapped

  def opens_for_write(mode="r", *args, **kwargs):
    del args, kwargs
    return any(c in mode for c in "wax+")

  builtins.open = guard(builtins.open, opens_for_write)
  os.mkdir = guard(os.mkdir)
  os.makedirs = guard(os.makedirs)
  os.rename = guard(os.rename)
  os.replace = guard(os.replace)
  pathlib.Path.mkdir = guard(pathlib.Path.mkdir)
  pathlib.Path.write_text = guard(pathlib.Path.write_text)
  pathlib.Path.write_bytes = guard(pathlib.Path.write_bytes)
  pathlib.Path.rename = guard(pathlib.Path.rename)


def main():
  argv = sys.argv[1:]
  if "--" in argv:
    argv = argv[argv.index("--") + 1:]
  if os.environ.get("FAULT_NO_TF") == "1":
    _hide_clu()
  if os.environ.get("FAULT_NAN_STEPS"):
    _poison_steps([int(s) for s in os.environ["FAULT_NAN_STEPS"].split(",")])
  if os.environ.get("FAULT_NAN_UPDATE_STEPS"):
    _poison_updates([int(s) for s in os.environ["FAULT_NAN_UPDATE_STEPS"].split(",")])
  if os.environ.get("FAULT_STEP_SECONDS"):
    _slow_steps(float(os.environ["FAULT_STEP_SECONDS"]))
  if os.environ.get("FAULT_DISK_ERROR"):
    workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
    _break_disk(getattr(errno, os.environ["FAULT_DISK_ERROR"]),
                int(os.environ.get("FAULT_DISK_AFTER", "0")), workdir)
  from crate_mae_jax import main as entry
  sys.argv = [entry.__file__] + argv
  entry.run()


if __name__ == "__main__":
  main()
