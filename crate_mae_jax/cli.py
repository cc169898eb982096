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
  return any(a in _HELP_FLAGS for a in argv[1:])


def print_help(argv, flag_values, config=None, out=sys.stdout) -> None:
  """absl's flag help (all modules' flags for --helpfull) and the config's fields."""
  program = os.path.basename(argv[0]) if argv else "crate-mae-train"
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  if doc:
    print(doc, file=out)
    print(file=out)
  print(f"usage: {program} --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]", file=out)
  print(file=out)
  full = "--helpfull" in argv
  text = (flag_values.get_help() if full else flag_values.main_module_help())
  print("flags:" if full else "flags (--helpfull for all modules'):", file=out)
  print(text, file=out)
  if config is not None:
    shipped = sorted({p.name for d in configs_dirs() if d.is_dir() for p in d.glob("[!_]*.py")})
    print(f"\nshipped configs (--config=NAME or configs/NAME): {', '.join(shipped)}", file=out)
    print("\nconfig fields (--config.FIELD=VALUE) and their defaults:", file=out)
    rows = config_fields(config)
    width = max(len(name) for name, _ in rows)
    for name, default in rows:
      print(f"  --{name.ljust(width)}  {default}", file=out)


# ------------------------------------------------------------------ runtime
def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "crate_mae_jax", "jax_cache")


def enable_compilation_cache(setting: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache so a restart does not recompile.

  `setting` (a flag value) or $CRATE_MAE_JAX_COMPILATION_CACHE: a folder, or `off`;
  unset: $JAX_COMPILATION_CACHE_DIR if the user set it, else the user's cache dir.
  Returns the folder in use, or None when off.
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


def benchmark() -> None:
  """Console script for crate_mae_jax.experiments.benchmark (its main returns the rows)."""
  from crate_mae_jax.experiments import benchmark as bench
  bench.main()
  sys.exit(0)
