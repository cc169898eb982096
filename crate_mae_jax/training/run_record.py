"""What a run leaves in its workdir about itself, so that a result can be traced back.

`record(workdir, config, mesh)` writes (on the chief process):
  config.json       the resolved config, readable and reloadable (`ConfigDict(json.load(f))`),
                    holding the fields that apply to the run (`applying`)
  run.json          command line, start time, package versions, git commit, devices, mesh,
                    the attention/LayerNorm kernels 'auto' resolved to
  runs.jsonl        one run.json line per start, so restarts and resumes stay visible
`record_start` adds params.txt (the parameter table) and the TensorBoard hparams;
the console gets neither (the log has both at debug level).
`hparams(config)` flattens the config into the scalar dict TensorBoard's hparams take.
Every one goes through `config_lib.redacted`: a password in a URL is never written.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

from absl import logging
import jax
import ml_collections

from crate_mae_jax.training import tasks

PACKAGES = ("crate-mae-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
            "ml-collections", "clu", "numpy", "tensorflow", "tensorflow-cpu",
            "tensorflow-datasets", "tensorboardX", "torch", "tokamax")


def package_versions(names=PACKAGES) -> dict:
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return versions


def git_commit(path: str | None = None) -> dict | None:
  """{'commit', 'dirty'} of the checkout holding this package, None outside one."""
  path = path or os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                            text=True, timeout=10)
    if commit.returncode != 0:
      return None
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=path, capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def devices() -> dict:
  local = jax.local_devices()
  return {"backend": jax.default_backend(), "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(), "process_index": jax.process_index(),
          "device_kind": local[0].device_kind if local else None}


def run_info(mesh=None, argv=None, kernels=None) -> dict:
  return {
      "command": list(sys.argv if argv is None else argv),
      "cwd": os.getcwd(),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": platform.node(),
      "python": platform.python_version(),
      "packages": package_versions(),
      "git": git_commit(),
      "devices": devices(),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "kernels": kernels,
  }


# Fields that only some runs read: (section, field) -> whether it applies to `config`.
# What a run does not read is left out of what it shows about itself.
_APPLIES = {
    ("model", "decoder_width"): lambda c: c.model.arch == "vit_mae",
    ("model", "mlp_ratio"): lambda c: c.model.arch == "vit_mae",
    ("model", "encoder_sees"): lambda c: c.model.arch == "vit_mae",
    ("model", "ista_step"): lambda c: c.model.arch == "crate_mae",
    ("model", "ista_lambda"): lambda c: c.model.arch == "crate_mae",
    ("model", "ista_fused"): lambda c: c.model.arch == "crate_mae",
    ("data", "name"): lambda c: c.data.source == "tfds",
    ("data", "data_dir"): lambda c: c.data.source == "tfds",
    ("data", "manual_dir"): lambda c: c.data.source == "tfds",
    ("data", "path"): lambda c: c.data.source != "tfds",
    ("optim", "b1"): lambda c: c.optim.name == "adamw",
    ("optim", "b2"): lambda c: c.optim.name == "adamw",
    ("optim", "momentum"): lambda c: c.optim.name in ("lars", "sgd"),
}


def _read_by_task(field: str):
  return lambda c: field in tasks.get(c.task).reads


# ... and the fields of the task table that only some tasks read.
_APPLIES.update({(tuple(f.split(".")) if "." in f else (None, f)): _read_by_task(f)
                 for f in tasks.TASK_FIELDS})


def applying(config) -> ml_collections.ConfigDict:
  """A copy of `config` without the fields this run does not read and that hold their
  default (a CRATE-MAE run has no `model.encoder_sees`, a registered dataset no TFDS
  `data.name`, ...), for what a run shows about itself; a field set to something
  else stays visible (`config_lib.warn_unread_data_fields` names it), and
  `config_lib.validate` still sees every field."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  default = config_lib.default_config()
  out = ml_collections.ConfigDict(config.copy_and_resolve_references().to_dict())
  for (section, field), applies in _APPLIES.items():
    try:
      keep = applies(config)
    except (AttributeError, KeyError):  # a config without that section: nothing to drop
      continue
    holder = out if section is None else out.get(section)
    if keep or holder is None or field not in holder:
      continue
    base = default if section is None else default.get(section)
    if base is None or field not in base or _same(holder[field], base[field]):
      del holder[field]
  return out


def _same(a, b) -> bool:
  """Equal as config values (a ConfigDict or tuple against its JSON form)."""
  to = lambda v: v.to_dict() if hasattr(v, "to_dict") else (list(v) if isinstance(
      v, tuple) else v)
  return to(a) == to(b)


def parameter_table(params) -> str:
  """Name, shape, size and sharding of every parameter (`clu.parameter_overview`);
  '' on a host without clu."""
  try:
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ""
  return parameter_overview.get_parameter_overview(params, include_stats="sharding")


def record_start(workdir: str, config, mesh, writer, params, is_chief: bool,
                 kernels=None) -> dict | None:
  """The workdir's record of this start: `record` (config.json, run.json, runs.jsonl),
  params.txt (the parameter table) and the config as TensorBoard hparams, on the
  chief. The console gets none of it: the log has the config and the table at debug
  level. Returns `record`'s run info (None off the chief)."""
  if not is_chief:
    return None
  from etils import epath  # pylint: disable=import-outside-toplevel
  info = record(workdir, config, mesh, kernels=kernels)
  flat = hparams(config)
  writer.write_hparams(flat)
  table = parameter_table(params)
  if table:
    (epath.Path(workdir) / "params.txt").write_text(table + "\n")
    logging.debug("parameters:\n%s", table)
  logging.debug("config: %s", flat)
  return info


def hparams(config, prefix: str = "") -> dict:
  """Flat {'optim.base_lr': 1.5e-4, ...}; values other than bool/int/float/str as text;
  passwords in URLs redacted (`config_lib.redacted`)."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  if not prefix and isinstance(config, ml_collections.ConfigDict):
    config = applying(config)
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(hparams(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = config_lib.redacted(value)
    else:
      flat[name] = config_lib.redacted(str(value))
  return flat


def write_text(path, text: str) -> None:
  """Writes `text` to `path` (local or gs://) whole or not at all: into a temporary
  file beside it, then renamed over it, so a crash never leaves half a file and a
  symbolic link at `path` is replaced, never written through."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.replace(path)


def record(workdir: str, config, mesh=None, argv=None, kernels=None) -> dict:
  """Writes config.json, run.json and a runs.jsonl line into `workdir` (local or gs://),
  passwords in URLs (config fields, the command line) redacted."""
  from etils import epath  # what Orbax writes with: local and cloud paths, no TensorFlow
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  info = config_lib.redacted(run_info(mesh, argv, kernels))
  config = config_lib.redacted(applying(config))
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  write_text(folder / "config.json", config.to_json_best_effort(indent=2, sort_keys=True)
             + "\n")
  write_text(folder / "run.json", json.dumps(info, indent=2) + "\n")
  history = folder / "runs.jsonl"
  # A link there is replaced, not read: its target's text stays out of the record.
  linked = os.path.islink(os.fspath(history))
  previous = history.read_text() if history.exists() and not linked else ""
  write_text(history, previous + json.dumps(info) + "\n")
  return info
