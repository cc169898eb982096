"""What a run leaves in its workdir about itself, so that a result can be traced back.

`record(workdir, config, mesh)` writes (on the chief process):
  config.json       the resolved config, readable and reloadable (`ConfigDict(json.load(f))`)
  run.json          command line, start time, package versions, git commit, devices, mesh,
                    the attention/LayerNorm kernels 'auto' resolved to
  runs.jsonl        one run.json line per start, so restarts and resumes stay visible
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

import jax

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


def hparams(config, prefix: str = "") -> dict:
  """Flat {'optim.base_lr': 1.5e-4, ...}; values other than bool/int/float/str as text;
  passwords in URLs redacted (`config_lib.redacted`)."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
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


def record(workdir: str, config, mesh=None, argv=None, kernels=None) -> dict:
  """Writes config.json, run.json and a runs.jsonl line into `workdir` (local or gs://),
  passwords in URLs (config fields, the command line) redacted."""
  from etils import epath  # what Orbax writes with: local and cloud paths, no TensorFlow
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  info = config_lib.redacted(run_info(mesh, argv, kernels))
  config = config_lib.redacted(config)
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True)
                                       + "\n")
  (folder / "run.json").write_text(json.dumps(info, indent=2) + "\n")
  history = folder / "runs.jsonl"
  previous = history.read_text() if history.exists() else ""
  history.write_text(previous + json.dumps(info) + "\n")
  return info
