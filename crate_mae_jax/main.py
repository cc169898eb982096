r"""Command line entry point: parses flags and hands the config to `train`.

    python -m crate_mae_jax.main --config=configs/base.py --workdir=DIR \
        [--config.optim.base_lr=1e-4 ...]
    crate-mae-train --config=base --workdir=DIR        # installed: configs ship with it
    crate-mae-train --helpfull                         # every flag and config field

Mistakes in the config or arguments (flag parsing included: unknown fields,
wrong types, a missing config file) and data that cannot be used are reported
as one line `error: ...` naming the field and the fix, with exit code 2, before
anything is compiled. Training that has to stop (non-finite values with
config.nonfinite='stop', a workdir that became read-only or full) ends with one
line `error: ...` and exit code 1; the last complete checkpoint is kept. SIGTERM
saves a checkpoint at the current step and exits with 0; Ctrl-C does the same and
exits with 130. A workdir another live run holds (its lock) is refused, exit 2.
Failures end the process with os._exit, so no background writer can hang it.
"""
import contextlib
import errno
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from crate_mae_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file: configs/NAME.py[:ARG], or just "
                                "NAME[:ARG] for one shipped with the package (base, "
                                "quickstart, finetune:cifar10,base, ...).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and logs.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): 'auto' does so when the environment "
                  "shows several processes (Cloud TPU pods, SLURM, JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_string("compilation_cache", None,
                    "Folder of JAX's persistent compilation cache, or 'off' (default: "
                    "$CRATE_MAE_JAX_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/crate_mae_jax/jax_cache), so that restarts do not recompile.")


def _multi_process_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
    return True
  if int(env.get("JAX_NUM_PROCESSES", "1")) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def _fail(message: str, code: int = 2) -> None:
  message = " ".join(str(message).split())  # one line, whatever the exception held
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


# ------------------------------------------------------------------ flag parsing
_FIELD_HELP = "the fields are in crate_mae_jax/config_lib.py (default_config)"


def _config_override(argv, missing: str) -> str | None:
  """The --config.a.b=v argument whose path names the missing field."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0].split(".")
      if missing in path:
        return arg
  return None


def _flag_error_message(e: Exception, argv) -> str:
  """One line naming the flag and the fix for an error raised while parsing."""
  text = str(e)
  if isinstance(e, AttributeError) and "has no attribute 'get_config'" in text:
    return _config_file_message(e, argv, what="the file defines no get_config()")
  if isinstance(e, (KeyError, AttributeError)) and "'NoneType'" in text:
    return _config_file_message(e, argv, what=_RETURNED_NONE)
  if isinstance(e, (KeyError, AttributeError)):
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    # ml_collections: "'modle'\nDid you mean "model" instead of "modle"?"
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    match = re.search(r"""['"]([^'"\\\n]+)['"]""", text)
    field = (suggestion.group(2) if suggestion else match.group(1) if match
             else " ".join(text.split()))
    arg = _config_override(argv, field) or "--config"
    hint = (f"did you mean {suggestion.group(1)!r}?" if suggestion else _FIELD_HELP)
    return f"{arg}: the config has no field {field!r}; {hint}"
  if isinstance(e, flags.UnrecognizedFlagError):
    return (f"{' '.join(text.split())}; settings go through --config.FIELD=VALUE, the "
            "other flags are --config, --workdir, --distributed and --compilation_cache")
  if isinstance(e, flags.IllegalFlagValueError):
    one = " ".join(text.split())
    if one.startswith("flag --config=") or "parsing config file" in one:
      return _config_file_message(e, argv)
    kind = re.search(r"for (int|float)\(\)|convert string to (float|int)", one)
    if kind:
      return f"{one}; give a value of type {kind.group(1) or kind.group(2)}"
    return one
  if isinstance(e, (OSError, SyntaxError)) or "parsing config file" in text:
    return _config_file_message(e, argv)
  return f"{type(e).__name__}: {' '.join(text.split())}"


_RETURNED_NONE = ("its get_config() returned None; return the ConfigDict (e.g. "
                  "`return recipes.quickstart('pretrain')`)")


def _config_file_message(e, argv, what: str | None = None) -> str:
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  text = str(e or "")
  if what is None and "No such file" in text:
    what = "no such config file"
  elif what is None:
    last = [line.strip() for line in text.splitlines() if line.strip()]
    what = (f"the config file cannot be loaded ({type(e).__name__}: "
            f"{last[-1] if last else ''})")
  return (f"--config={value}: {what}; pass one of configs/*.py (optionally with :ARG, "
          "e.g. configs/quickstart.py:linear_probe)")


@contextlib.contextmanager
def _absl_errors_only():
  """ml_collections logs its own warning (e.g. get_config() returned None) beside the
  one line we print; keep the absl logger to errors while the config is loaded."""
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _parse_flags(argv):
  """absl's parser, but every mistake is one line and exit code 2; --help exits 0."""
  argv = cli.rewrite_config_args(argv)
  if cli.wants_help(argv):
    from crate_mae_jax import config_lib
    cli.print_help(argv, FLAGS, config_lib.default_config(), module=__name__,
                   usage="--config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]")
    sys.exit(0)
  given = [a for a in argv[1:] if a.startswith("--config=") or a == "--config"]
  if len(given) > 1:
    _fail(f"--config is given {len(given)} times ({', '.join(given)}); give one config "
          "file and change fields with --config.FIELD=VALUE")
  try:
    with _absl_errors_only():
      return FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_error_message(e, argv))
  except (KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError) as e:
    # ml_collections raises these for unknown fields, bad overrides and bad files.
    _fail(_flag_error_message(e, argv))
  except Exception as e:  # pylint: disable=broad-except
    # The config file's own code raised: name the file and the exception.
    _fail(_config_file_message(e, argv, what=(
        f"its get_config() raised {type(e).__name__}: {' '.join(str(e).split())[:300]}")))


# ------------------------------------------------------------------ the workdir
_DISK_ERRNOS = {
    errno.EROFS: "is on a read-only file system",
    errno.ENOSPC: "has no space left on its device",
    errno.EDQUOT: "is over its disk quota (no space left for this user)",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
    errno.ENOTDIR: "cannot be created: part of its path is a file, not a folder",
    errno.ENOENT: "cannot be created (a parent folder is missing or vanished)",
}
# Orbax/TensorStore report OS failures in background threads as ValueError text.
_DISK_TEXT = {
    errno.EROFS: ("Read-only file system", "os_error_code='30'"),
    errno.ENOSPC: ("No space left on device", "os_error_code='28'"),
    errno.EDQUOT: ("Disk quota exceeded", "os_error_code='122'"),
}


def disk_problem(e: BaseException) -> int | None:
  """The errno of a full or read-only disk behind `e` (its chain included)."""
  seen = set()
  stack = [e]
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno in _DISK_TEXT:
      return x.errno
    text = str(x)
    for code, needles in _DISK_TEXT.items():
      if any(n in text for n in needles):
        return code
    stack.extend([x.__cause__, x.__context__])
    stack.extend(getattr(x, "exceptions", ()) or ())
  return None


def _check_workdir(workdir: str) -> None:
  """Creates the workdir and proves it writable (root ignores permission bits,
  so try a write rather than asking os.access)."""
  if workdir.startswith("gs://"):
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    reason = _DISK_ERRNOS.get(e.errno, f"is not usable ({e.strerror})")
    _fail(f"--workdir {workdir!r} {reason}; pick a folder on a writable disk "
          "with free space")


def _last_complete_step_in(folder: str) -> int | None:
  try:
    return max((int(d) for d in os.listdir(folder) if d.isdigit()), default=None)
  except OSError:
    return None


def _last_complete_step(workdir: str) -> tuple[int, str] | None:
  """(step, folder) of the newest finalised step folder in the workdir's
  `checkpoints/` or `checkpoints_best/`, read without writing anything."""
  found = []
  for rank, name in enumerate(("checkpoints", "checkpoints_best")):
    folder = os.path.join(workdir, name)
    step = _last_complete_step_in(folder)
    if step is not None:
      found.append((step, -rank, folder))
  if not found:
    return None
  step, _, folder = max(found)
  return step, folder


def _failure_message(e: BaseException, workdir: str) -> str:
  """One line for a failure during training (the traceback goes to the log)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = _last_complete_step(workdir)
  kept = (f"the last complete checkpoint, step {last[0]} in {last[1]!r}, is intact"
          if last is not None else "no checkpoint had been completed")
  if last is not None and last[1] != ckpt_dir:  # only the best-checkpoint folder is newer
    resume = _last_complete_step_in(ckpt_dir)
    kept += (f" (a rerun resumes from step {resume} of {ckpt_dir!r})" if resume is not None
             else " (a rerun starts from scratch; init_from or crate-mae-eval can read it)")
  code = disk_problem(e)
  if code is not None:
    logging.error("%s", e)
    return (f"cannot write to --workdir {workdir!r}: it {_DISK_ERRNOS[code]} "
            f"({os.strerror(code)}); training stopped, {kept}; free space or make the "
            "disk writable, then rerun the same command to resume")
  if not workdir.startswith("gs://") and not os.path.isdir(ckpt_dir):
    return (f"the checkpoint folder {ckpt_dir!r} disappeared during training (deleted or "
            "unmounted?); training stopped; restore it and rerun to resume, or rerun to "
            "start from scratch")
  logging.exception("training failed")
  return (f"training failed: {type(e).__name__}: {' '.join(str(e).split())[:400]} (traceback "
          f"in the log above); {kept}; rerun the same command to resume from it")


def _exit(message: str, code: int, threads_may_write: bool = True) -> None:
  """Prints `error: message` and ends the process at once.

  Orbax's writer threads are not daemons: after a failed save they can keep
  the interpreter alive forever, and their teardown tracebacks would follow
  our line. So stderr is closed to them and the process ends with os._exit.
  Such a thread may also be half-way through a line when we take stderr over
  (seen in CI: `...Event loop is closed')error: ...`), so after training has
  started our line begins on a fresh line of its own.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  err = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  lead = "\n" if threads_may_write else ""
  try:
    os.write(err, f"{lead}error: {' '.join(str(message).split())}\n".encode())
  except OSError:  # the terminal is gone (SIGHUP): the log and results.json still say it
    pass
  os._exit(code)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings go through --config.FIELD=VALUE")
  with _absl_errors_only():
    config = FLAGS.config
  if type(config).__name__ == "_ErrorConfig":  # ml_collections defers file errors
    _fail(_config_file_message(vars(config).get("_error"), sys.argv))
  if config is None and any(a.startswith("--config=") for a in sys.argv):
    _fail(_config_file_message(None, sys.argv, what=_RETURNED_NONE))
  if config is None:
    _fail("--config is required: a configs/*.py file, e.g. --config=configs/quickstart.py")
  if FLAGS.workdir is None:
    _fail("--workdir is required (a local folder or gs:// path for checkpoints and logs)")
  if FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and _multi_process_env()):
    import jax
    # Explicit settings (launch/gpu_cluster.sh) win; otherwise JAX detects
    # Cloud TPU and SLURM by itself.
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
  from crate_mae_jax.training import checkpoints, summaries, train, workdir_lock
  from crate_mae_jax import config_lib
  summaries.quiet_library_logs()
  cli.enable_compilation_cache(FLAGS.compilation_cache)
  workdir = FLAGS.workdir
  try:
    resolved = config_lib.validate(config)
    import jax  # pylint: disable=import-outside-toplevel
    config_lib.check_mesh(config, jax.device_count())
    _check_workdir(workdir)
    lock = workdir_lock.acquire(workdir, jax.process_index())  # held until exit
    results = train.train_and_evaluate(config, workdir, resolved=resolved)
  except (config_lib.ConfigError, checkpoints.CheckpointError,
          workdir_lock.WorkdirBusyError) as e:
    _exit(str(e), 2, threads_may_write=False)
  except (train.TrainingStopped, checkpoints.NonFiniteStateError,
          checkpoints.CheckpointFolderLost) as e:
    logging.error("%s", e)
    _exit(str(e), 1)
  except KeyboardInterrupt:
    _exit("interrupted (Ctrl-C) before training started; nothing was saved", 130)
  except Exception as e:  # pylint: disable=broad-except
    _exit(_failure_message(e, workdir), 1)
  if results.get("interrupted"):
    hangup = results["interrupted"].startswith("SIGHUP")
    _exit(f"interrupted ({results['interrupted']}) at step {results['step']}: a checkpoint "
          f"was saved in {os.path.join(workdir, 'checkpoints')!r}; rerun the same command "
          "to resume" + ("; for runs that outlive the terminal use nohup, setsid or tmux"
                         if hangup else ""), 129 if hangup else 130)
  del lock
  logging.info("final: %s", results)


def run():
  """Console-script entry point."""
  cli.quiet_startup()
  from crate_mae_jax.training import xla_defaults  # before JAX creates its backends
  xla_defaults.apply()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
