"""What every command-line entry point shares: finding configs, help, caches, quiet logs.

Configs live in the repository's top-level `configs/` and are installed with the
package as `crate_mae_jax.configs`, so `--config=configs/base.py` works in a
checkout, and `--config=base` (or `configs/base.py`) works anywhere after
`pip install`.
"""
import functools
import logging as std_logging
import os
import pathlib
import sys

from absl import logging

CACHE_ENV = "CRATE_MAE_JAX_COMPILATION_CACHE"
_HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")


# ------------------------------------------------------------------ configs
def configs_dirs() -> list[pathlib.Path]:
  """Where shipped configs may be: the installed package data, then the checkout's."""
  here = pathlib.Path(__file__).resolve().parent
  return [here / "configs", here.parent / "configs"]


def resolve_config_path(value: str) -> str:
  """`configs/base.py[:ARG]`, `base[:ARG]` or `crate_mae_jax/configs/base.py[:ARG]` to
  an existing file; anything that is already a file (or matches nothing) is kept."""
  path, sep, arg = value.partition(":")
  if not path or os.path.exists(path):
    return value
  name = pathlib.PurePath(path).name
  if not name.endswith(".py"):
    name += ".py"
  for folder in configs_dirs():
    if (folder / name).is_file():
      return str(folder / name) + sep + arg
  return value


def rewrite_config_args(argv: list[str], flag: str = "config") -> list[str]:
  """argv with the value of --FLAG (both `--FLAG=V` and `--FLAG V`) resolved."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{flag}="):
      out[i] = f"--{flag}=" + resolve_config_path(arg.split("=", 1)[1])
    elif arg == f"--{flag}" and i + 1 < len(out):
      out[i + 1] = resolve_config_path(out[i + 1])
  return out


def config_fields(config, prefix: str = "config") -> list[tuple[str, str]]:
  """(dotted name, default) for every leaf of a ConfigDict."""
  rows = []
  for key in sorted(config.keys()):
    value = config[key]
    name = f"{prefix}.{key}"
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      rows.extend(config_fields(value, name))
    else:
      rows.append((name, repr(value)))
  return rows


def wants_help(argv) -> bool:
  """Whether the command line (program name first) asks for help."""
  return any(a in _HELP_FLAGS for a in argv[1:])


def _module(module):
  """The module object of `module` (an object, or a name such as a caller's __name__)."""
  if module is None:
    return sys.modules["__main__"]
  return sys.modules[module] if isinstance(module, str) else module


def own_flags(flag_values, module) -> list:
  """The flags `module` defined itself, found by its name (`crate_mae_jax.main`, as under
  a console script) or by its file (absl names `python -m`'s flags after sys.argv[0])."""
  mod = _module(module)
  names = {mod.__name__, getattr(getattr(mod, "__spec__", None), "name", None)}
  path = getattr(mod, "__file__", None)
  found = []
  for key, flag_list in flag_values.flags_by_module_dict().items():
    mine = key in names
    if not mine and path and key.endswith(".py") and os.path.exists(key):
      try:
        mine = os.path.samefile(key, path)
      except OSError:
        mine = False
    if mine:
      found.extend(f for f in flag_list if f not in found)
  return sorted(found, key=lambda f: f.name)


def flag_lines(flag_list) -> list[str]:
  """One line per flag: `  --name  description (default: ...)`, names aligned."""
  rows = []
  for f in flag_list:
    name = f"--[no]{f.name}" if f.boolean else f"--{f.name}"
    text = " ".join(str(f.help or "").split())
    if f.default_as_str not in (None, "'None'"):
      text += f" (default: {f.default_as_str})"
    rows.append((name, text))
  width = max((len(name) for name, _ in rows), default=0)
  return [f"  {name.ljust(width)}  {text}" for name, text in rows]


def _program(argv, mod) -> str:
  arg0 = argv[0] if argv else ""
  spec = getattr(getattr(mod, "__spec__", None), "name", None)
  if (not arg0 or arg0.endswith(".py")) and spec:
    return f"python -m {spec}"
  return os.path.basename(arg0) or "crate-mae-train"


def write_help(text: str, out=None) -> None:
  """Writes `text`; a reader that stops early (`| head`) ends the process quietly
  with status 0 (the pattern of the `signal` module docs' "Note on SIGPIPE")."""
  out = sys.stdout if out is None else out
  try:
    out.write(text)
    out.flush()
  except BrokenPipeError:
    # Python flushes the standard streams at exit: point stdout at devnull so
    # that flush does not raise (and print a traceback) again.
    try:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, out.fileno())
    except (OSError, ValueError, AttributeError):
      pass
    sys.exit(0)


def print_help(argv, flag_values, config=None, out=None, *, module=None,
               usage: str | None = None) -> None:
  """The help of one entry point: `module`'s docstring, a usage line, the flags
  `module` defines (one line each; --helpfull adds every other module's) and, with
  `config`, the shipped configs and every config field with its default.

  `module` is the entry point's module (its __name__ will do); default: __main__,
  which under a console script is the wrapper, so entry points pass theirs.
  Imports nothing heavy, and a closed stdout (`| head`) ends quietly."""
  mod = _module(module)
  program = _program(argv, mod)
  lines = []
  doc = (mod.__doc__ or "").strip()
  if doc:
    lines += [doc, ""]
  lines += [f"usage: {program} " + (usage or "[--FLAG=VALUE ...]"), ""]
  mine = own_flags(flag_values, mod)
  if not mine:  # defined elsewhere: every flag but absl's own
    mine = sorted((f for key, fl in flag_values.flags_by_module_dict().items()
                   if not key.startswith("absl.") for f in fl), key=lambda f: f.name)
  full = "--helpfull" in argv
  lines.append("flags:" if full else "flags (--helpfull for all modules'):")
  lines += flag_lines(mine)
  if full:
    for key, flag_list in sorted(flag_values.flags_by_module_dict().items()):
      others = [f for f in flag_list if f not in mine]
      if others:
        lines += ["", f"{key}:"] + flag_lines(sorted(others, key=lambda f: f.name))
  if config is not None:
    shipped = sorted({p.name for d in configs_dirs() if d.is_dir() for p in d.glob("[!_]*.py")})
    lines.append(f"\nshipped configs (--config=NAME or configs/NAME): {', '.join(shipped)}")
    lines.append("\nconfig fields (--config.FIELD=VALUE) and their defaults:")
    rows = config_fields(config)
    width = max(len(name) for name, _ in rows)
    lines += [f"  --{name.ljust(width)}  {default}" for name, default in rows]
  write_help("\n".join(lines) + "\n", out)


# ------------------------------------------------------------------ runtime
def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "crate_mae_jax", "jax_cache")


def enable_compilation_cache(setting: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache so a restart does not recompile.

  `setting` (a flag value) or $CRATE_MAE_JAX_COMPILATION_CACHE: a folder, or `off`;
  unset: $JAX_COMPILATION_CACHE_DIR if the user set it, else the user's cache dir.
  Returns the folder in use, or None when off. Programs that compile in under a second
  are not kept unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise.
  """
  import jax
  setting = setting or os.environ.get(CACHE_ENV, "")
  if setting.lower() in ("off", "none", "0", "false", "no"):
    return None
  folder = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
  if not folder.startswith("gs://"):
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      logging.warning("compilation cache %s unusable (%s): compiling without it", folder, e)
      return None
  jax.config.update("jax_compilation_cache_dir", folder)
  # Small programs compile fast; only keep what is worth a disk read.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder


class _DropMessages:
  """Drops log records whose message contains one of the given fragments."""

  def __init__(self, fragments: tuple[str, ...]):
    self.fragments = fragments

  def filter(self, record) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(f in message for f in self.fragments)


_NOISE = (
    # JAX probes every installed platform; a CPU or GPU host has no TPU.
    "Unable to initialize backend 'tpu'",
    # Orbax, when a parameters-only restore leaves the other saved items alone.
    "was found in the checkpoint, but could not be restored",
)


def quiet_startup() -> None:
  """Hides start-up noise that says nothing wrong: TF's C++ info lines and the log
  lines in _NOISE. Imports nothing heavy: TensorFlow is imported (quietly, by
  `import_tensorflow_quietly`) only where the tf.data pipeline or CLU's writers need it,
  so `--help` and config errors stay fast."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  drop = _DropMessages(_NOISE)
  for name in ("absl", "jax._src.xla_bridge", ""):
    std_logging.getLogger(name).addFilter(drop)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(drop)


@functools.cache
def import_tensorflow_quietly():
  """TensorFlow, imported with the process's stderr closed and hidden from the GPUs;
  None when it is not installed or does not import (it is optional).

  Call it wherever TensorFlow may be imported first (the tf.data sources, TFDS,
  CLU's TensorBoard writer). TF 2.21 prints its oneDNN notice from C++ before its
  logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hide it. The GPUs belong to
  JAX: TF would otherwise reserve their memory for tf.data.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
    return None
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were already initialised by someone else
    logging.warning("TensorFlow already initialised its devices; it may hold GPU memory")
  return tf


def tensorflow():
  """TensorFlow for tf.data only, imported quietly and hidden from the GPUs (which
  belong to JAX); raises TensorFlow's own ImportError where it is missing."""
  tf = import_tensorflow_quietly()
  if tf is None:  # not installed, or broken: raise its own ImportError here
    import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name
  return tf


def usage_error(prog: str, message) -> int:
  """Prints `prog: error: message` on one line; returns exit code 2."""
  print(f"{prog}: error: " + " ".join(str(message).split()), file=sys.stderr)
  return 2


def parse_tool_flags(prog: str, flag_values, argv, usage: str, module: str,
                     required=()) -> int | None:
  """Parses a tool's own absl flags from `argv` (without the program name; None:
  the command line's): None when the tool should run, else its exit code (0 after
  --help, 2 after one line naming the mistake)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else list(argv)
  full = [sys.argv[0], *argv]
  if wants_help(full):
    print_help(full, flag_values, module=module, usage=usage)
    return 0
  try:
    rest = flag_values([prog, *argv])
  except flags.Error as e:
    return usage_error(prog, e)
  if len(rest) > 1:
    return usage_error(prog, f"unexpected arguments {rest[1:]}")
  for name in required:
    if flag_values[name].value is None:
      return usage_error(prog, f"--{name} is required")
  return None


def run_tool(prog: str, flag_values, argv, body, *, usage: str, module: str,
             required=()) -> int:
  """A tool's main: parses its flags (see `parse_tool_flags`), then `body(flags)`;
  a ValueError or OSError (bad input, a checkpoint or config error) becomes one
  line `prog: error: ...` and exit code 2."""
  code = parse_tool_flags(prog, flag_values, argv, usage=usage, module=module,
                          required=required)
  if code is not None:
    return code
  try:
    return body(flag_values)
  except (ValueError, OSError) as e:
    return usage_error(prog, e)


def run_absl_app(main, flag_values, *, module: str, usage: str, quiet: bool = True) -> None:
  """A console script's entry: quiet imports (unless `quiet` is False), `--help`
  printing the module's own flags and exiting 0, else `absl.app.run(main)`."""
  from absl import app  # pylint: disable=import-outside-toplevel
  if quiet:
    quiet_startup()
  if wants_help(sys.argv):
    print_help(sys.argv, flag_values, module=module, usage=usage)
    sys.exit(0)
  app.run(main)


def exit_process(code: int) -> None:
  """Ends the process with `code` at once, even where a failed Orbax save left its
  (non-daemon) writer threads behind."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
