"""The one-line errors of the command line, and the exception our own code raises.

`ConfigError` is what config, argument and data checks raise, its message naming
the field and the fix. The rest turns what a run can meet (a flag the parser
refuses, a config file that cannot load, a full or read-only disk, a failed
step) into one line `error: ...` with the exit code the README lists.
"""
import contextlib
import errno
import logging as std_logging
import os
import re
import signal
import sys
import tempfile

from absl import flags, logging


class ConfigError(ValueError):
  """A config or argument mistake; the message names the field and the fix."""


def fail(message: str, code: int = 2) -> None:
  message = " ".join(str(message).split())  # one line, whatever the exception held
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


# ------------------------------------------------------------------ flag parsing
FIELD_HELP = "the fields are in crate_mae_jax/config_lib.py (default_config)"


def config_override(argv, missing: str) -> str | None:
  """The --config.a.b=v argument whose path names the missing field."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0].split(".")
      if missing in path:
        return arg
  return None


def flag_error_message(e: Exception, argv) -> str:
  """One line naming the flag and the fix for an error raised while parsing.

  ml_collections raises bare KeyError/AttributeError/ValueError for unknown fields
  and bad overrides, with the field only in their text: that text is all it offers.
  """
  text = str(e)
  if isinstance(e, AttributeError) and "has no attribute 'get_config'" in text:
    return config_file_message(e, argv, what="the file defines no get_config()")
  if isinstance(e, (KeyError, AttributeError)) and "'NoneType'" in text:
    return config_file_message(e, argv, what=RETURNED_NONE)
  if isinstance(e, (KeyError, AttributeError)):
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    # ml_collections: "'modle'\nDid you mean "model" instead of "modle"?"
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    match = re.search(r"""['"]([^'"\\\n]+)['"]""", text)
    field = (suggestion.group(2) if suggestion else match.group(1) if match
             else " ".join(text.split()))
    arg = config_override(argv, field) or "--config"
    hint = (f"did you mean {suggestion.group(1)!r}?" if suggestion else FIELD_HELP)
    return f"{arg}: the config has no field {field!r}; {hint}"
  if isinstance(e, flags.UnrecognizedFlagError):
    return (f"{' '.join(text.split())}; settings go through --config.FIELD=VALUE, the "
            "other flags are --config, --workdir, --distributed, --peer_timeout and "
            "--compilation_cache")
  if isinstance(e, flags.IllegalFlagValueError):
    one = " ".join(text.split())
    if one.startswith("flag --config=") or "parsing config file" in one:
      return config_file_message(e, argv)
    kind = re.search(r"for (int|float)\(\)|convert string to (float|int)", one)
    if kind:
      return f"{one}; give a value of type {kind.group(1) or kind.group(2)}"
    return one
  if isinstance(e, (OSError, SyntaxError)) or "parsing config file" in text:
    return config_file_message(e, argv)
  return f"{type(e).__name__}: {' '.join(text.split())}"


RETURNED_NONE = ("its get_config() returned None; return the ConfigDict (e.g. "
                  "`return recipes.quickstart('pretrain')`)")


def config_file_message(e, argv, what: str | None = None) -> str:
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


# ------------------------------------------------------------------ the workdir
DISK_ERRNOS = {
    errno.EROFS: "is on a read-only file system",
    errno.ENOSPC: "has no space left on its device",
    errno.EDQUOT: "is over its disk quota (no space left for this user)",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
    errno.ENOTDIR: "cannot be created: part of its path is a file, not a folder",
    errno.ENOENT: "cannot be created (a parent folder is missing or vanished)",
}
# Orbax/TensorStore report OS failures in background threads as ValueError text.
DISK_TEXT = {
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
    if isinstance(x, OSError) and x.errno in DISK_TEXT:
      return x.errno
    text = str(x)
    for code, needles in DISK_TEXT.items():
      if any(n in text for n in needles):
        return code
    stack.extend([x.__cause__, x.__context__])
    stack.extend(getattr(x, "exceptions", ()) or ())
  return None


def check_workdir(workdir: str) -> None:
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
    reason = DISK_ERRNOS.get(e.errno, f"is not usable ({e.strerror})")
    fail(f"--workdir {workdir!r} {reason}; pick a folder on a writable disk "
          "with free space")


def last_complete_step_in(folder: str) -> int | None:
  try:
    return max((int(d) for d in os.listdir(folder) if d.isdigit()), default=None)
  except OSError:
    return None


def last_complete_step(workdir: str) -> tuple[int, str] | None:
  """(step, folder) of the newest finalised step folder in the workdir's
  `checkpoints/` or `checkpoints_best/`, read without writing anything."""
  found = []
  for rank, name in enumerate(("checkpoints", "checkpoints_best")):
    folder = os.path.join(workdir, name)
    step = last_complete_step_in(folder)
    if step is not None:
      found.append((step, -rank, folder))
  if not found:
    return None
  step, _, folder = max(found)
  return step, folder


def kept_checkpoint(workdir: str) -> str:
  """'the last complete checkpoint, step N in DIR, is intact' (and where a rerun resumes)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = last_complete_step(workdir)
  kept = (f"the last complete checkpoint, step {last[0]} in {last[1]!r}, is intact"
          if last is not None else "no checkpoint had been completed")
  if last is not None and last[1] != ckpt_dir:  # only the best-checkpoint folder is newer
    resume = last_complete_step_in(ckpt_dir)
    kept += (f" (a rerun resumes from step {resume} of {ckpt_dir!r})" if resume is not None
             else " (a rerun starts from scratch; init_from or crate-mae-eval can read it)")
  return kept


def ended_by_signal_message(lost: str, signum: int, workdir: str) -> str:
  """One line for a process of a multi-process job that a signal ended (see
  `supervisor`): `lost` says what JAX's report names ('' if there is none)."""
  try:
    name = signal.Signals(signum).name
  except ValueError:
    name = f"signal {signum}"
  if lost:
    cause = (f"the job lost a member: {lost}; JAX's distributed runtime then ended this "
             f"process too ({name}, its report is above)")
  elif signum == signal.SIGKILL:
    cause = ("this process was killed (SIGKILL: the kernel's out-of-memory killer, or "
             "kill -9)")
  else:
    cause = f"this process was ended by {name}"
  return (f"training stopped: {cause}; {kept_checkpoint(workdir)}; rerun every process of "
          "the job with the same command to resume from it")


def failure_message(e: BaseException, workdir: str) -> str:
  """One line for a failure during training (the traceback goes to the log)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  kept = kept_checkpoint(workdir)
  code = disk_problem(e)
  if code is not None:
    logging.error("%s", e)
    return (f"cannot write to --workdir {workdir!r}: it {DISK_ERRNOS[code]} "
            f"({os.strerror(code)}); training stopped, {kept}; free space or make the "
            "disk writable, then rerun the same command to resume")
  if not workdir.startswith("gs://") and not os.path.isdir(ckpt_dir):
    return (f"the checkpoint folder {ckpt_dir!r} disappeared during training (deleted or "
            "unmounted?); training stopped; restore it and rerun to resume, or rerun to "
            "start from scratch")
  logging.exception("training failed")
  return (f"training failed: {type(e).__name__}: {' '.join(str(e).split())[:400]} (traceback "
          f"in the log above); {kept}; rerun the same command to resume from it")


def exit_now(message: str, code: int, threads_may_write: bool = True) -> None:
  """Prints `error: message` and ends the process at once.

  Orbax's writer threads are not daemons: after a failed save they can keep
  the interpreter alive forever, and their teardown tracebacks would follow
  our line. So stderr is closed to them and the process ends with os._exit.
  Such a thread may also be half-way through a line when we take stderr over
  (`...Event loop is closed')error: ...`), so after training has
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


@contextlib.contextmanager
def absl_errors_only():
  """ml_collections logs its own warning (e.g. get_config() returned None) beside the
  one line we print; keep the absl logger to errors while the config is loaded."""
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def parse_flags(flag_values, argv):
  """absl's parser, but every mistake is one line `error: ...` and exit code 2."""
  given = [a for a in argv[1:] if a.startswith("--config=") or a == "--config"]
  if len(given) > 1:
    fail(f"--config is given {len(given)} times ({', '.join(given)}); give one config "
         "file and change fields with --config.FIELD=VALUE")
  try:
    with absl_errors_only():
      return flag_values(argv)
  except flags.Error as e:
    fail(flag_error_message(e, argv))
  except (KeyError, AttributeError, ValueError, TypeError, OSError, SyntaxError) as e:
    fail(flag_error_message(e, argv))  # ml_collections: unknown fields, bad overrides
  except Exception as e:  # pylint: disable=broad-except
    # The config file's own code raised: name the file and the exception.
    fail(config_file_message(e, argv, what=(
        f"its get_config() raised {type(e).__name__}: {' '.join(str(e).split())[:300]}")))


def loaded_config(config, argv):
  """The config the --config flag loaded, or one line saying why there is none."""
  if type(config).__name__ == "_ErrorConfig":  # ml_collections defers file errors
    fail(config_file_message(vars(config).get("_error"), argv))
  if config is None and any(a.startswith("--config=") for a in argv):
    fail(config_file_message(None, argv, what=RETURNED_NONE))
  if config is None:
    fail("--config is required: a configs/*.py file, e.g. --config=configs/quickstart.py")
  return config


def interrupted_message(results: dict, workdir: str) -> tuple[str, int]:
  """(line, exit code) of a run that Ctrl-C or a closed terminal stopped and saved."""
  hangup = results["interrupted"].startswith("SIGHUP")
  return (f"interrupted ({results['interrupted']}) at step {results['step']}: a checkpoint "
          f"was saved in {os.path.join(workdir, 'checkpoints')!r}; rerun the same command "
          "to resume" + ("; for runs that outlive the terminal use nohup, setsid or tmux"
                         if hangup else ""), 129 if hangup else 130)
