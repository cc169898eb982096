"""Readers of a workdir that a live run holds, and hostile inputs of the readers.

`crate-mae-eval` and `crate-mae-analyze` on a workdir whose run is writing it:
they read the newest complete, verified step (a step being deleted by the
run's retention, or not yet sealed, is passed over) without Orbax warnings, and
write nothing into that workdir.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import once_per_run, tiny_train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
        "--config.model.decoder_depth=2"]


def _train(out: pathlib.Path) -> None:
  from crate_mae_jax.training import train
  train.train_and_evaluate(tiny_train_config("pretrain", source="quickstart", keep_best=False),
                           str(out / "run"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny pre-training workdir with complete steps 2 and 4."""
  return once_per_run(tmp_path_factory, "readers_run", _train) / "run"


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _tool(module, *args, cwd):
  return subprocess.run([sys.executable, "-m", f"crate_mae_jax.tools.{module}", *args],
                        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _listing(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _live_copy(trained, tmp_path) -> pathlib.Path:
  """A copy of the run as a reader of a live run finds it: the lock held, and a
  newer step 6 half gone (retention deletes it: no manifest, no Orbax metadata)."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  ckpt = workdir / "checkpoints"
  shutil.copytree(ckpt / "4", ckpt / "6")
  for rel in ("manifest.sha256.json", "_CHECKPOINT_METADATA", "meta/metadata"):
    (ckpt / "6" / rel).unlink()
  (ckpt / "8.orbax-checkpoint-tmp-1").mkdir()   # a save in progress
  return workdir


@pytest.mark.slow
def test_analyze_and_evaluate_on_a_live_workdir(trained, tmp_path):
  from crate_mae_jax.training import workdir_lock
  workdir = _live_copy(trained, tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  lock = workdir_lock.acquire(str(workdir))   # the "live run"
  try:
    assert workdir_lock.held(str(workdir))
    before = _listing(workdir)
    analysis = tmp_path / "analysis"
    proc = _tool("analyze", f"--checkpoint={workdir}", f"--output={analysis}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analyze: step 4," in proc.stdout, proc.stdout
    assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((analysis / "measures.json").read_text())["step"] == 4

    proc = _tool("evaluate", f"--config={ROOT / 'configs/quickstart.py'}", *TINY,
                 f"--checkpoint={workdir}", "--evals=knn", "--max_train=100", "--max_test=50",
                 cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-3000:]
    saved = json.loads((elsewhere / "evals_run_step_4.json").read_text())
    assert saved["evals"] == ["knn"] and "knn" in saved["results"]
    assert _listing(workdir) == before   # nothing written into the live workdir
  finally:
    lock.close()
  assert not workdir_lock.held(str(workdir))


def _params_checkpoint(root: pathlib.Path, steps=(2, 4)) -> pathlib.Path:
  """A params-only checkpoint root (as convert_torch writes) with the given steps."""
  import numpy as np
  from crate_mae_jax.training import checkpoints
  for step in steps:
    checkpoints.save_params(str(root), {"encoder": {"w": np.full(3, step, np.float32)}},
                            {"task": "pretrain"}, step=step)
  return root


def test_a_step_deleted_while_read_gives_the_next_newest(tmp_path, monkeypatch):
  """Retention deletes the picked step between the pick and the read of its arrays."""
  from crate_mae_jax.training import checkpoints, workdir_lock
  workdir = tmp_path / "run"
  _params_checkpoint(workdir / "checkpoints")
  real = checkpoints._restore_params_at   # pylint: disable=protected-access
  deleted = []

  def delete_then_read(directory, step, target):
    if not deleted:
      deleted.append(step)
      shutil.rmtree(os.path.join(directory, str(step)))
    return real(directory, step, target)

  monkeypatch.setattr(checkpoints, "_restore_params_at", delete_then_read)
  lock = workdir_lock.acquire(str(workdir))
  try:
    params, meta, step = checkpoints.read(str(workdir))
  finally:
    lock.close()
  assert deleted == [4] and step == 2 and meta["task"] == "pretrain"
  assert float(params["encoder"]["w"][0]) == 2.0


def test_a_damaged_step_that_stays_is_still_named(tmp_path):
  """Not a deletion: the newest step is damaged and no run holds the workdir."""
  from crate_mae_jax.training import checkpoints
  root = _params_checkpoint(tmp_path / "ckpt")
  (root / "4" / "meta" / "metadata").write_text("{ not json")
  with pytest.raises(checkpoints.CheckpointError, match="step 4 is damaged"):
    checkpoints.read(str(root))


def test_study_and_report_files_redact_credentials(tmp_path):
  """The study drivers' JSON and Markdown go through `config_lib.redacted`."""
  from experiments import study_v2
  path = tmp_path / "run.json"
  study_v2._write_json(str(path), {"data_dir": "gs://user:PASSWORD@bucket/x"})  # pylint: disable=protected-access
  text = path.read_text()
  assert "PASSWORD" not in text and "gs://***@bucket/x" in text


def test_data_fields_the_source_does_not_read_are_warned_about_once(monkeypatch):
  from crate_mae_jax import config_lib, recipes
  monkeypatch.setattr(config_lib, "_WARNED_UNREAD", set())
  lines = []
  monkeypatch.setattr(config_lib.logging, "warning", lambda msg, *a: lines.append(msg % a))
  c = recipes.quickstart("pretrain")
  assert config_lib.warn_unread_data_fields(c) == [] and lines == []
  c.data.data_dir = "gs://user:PASSWORD@bucket/tfds"
  assert config_lib.warn_unread_data_fields(c) == ["data_dir"]
  assert config_lib.warn_unread_data_fields(c) == ["data_dir"]   # a second validate
  assert len(lines) == 1, lines
  assert "config.data.data_dir=" in lines[0] and "data.source='quickstart'" in lines[0]
  assert "data.path" in lines[0] and "PASSWORD" not in lines[0] and "***@bucket" in lines[0]
  t = recipes.quickstart("pretrain")
  t.data.update(source="tfds", name="cifar10", path="/data/images")
  assert config_lib.warn_unread_data_fields(t) == ["path"]
  assert "data.source='tfds'" in lines[-1] and len(lines) == 2
