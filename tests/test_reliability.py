"""Nothing lost, nothing silent: failure classes of an adversarial pass, end to
end through the entry points (training runs are processes of
`tests/fault_worker.py` or `python -m crate_mae_jax.main`, as in test_faults.py,
sharing its tiny config and compilation cache).

Config and bad-file mistakes that end before any compile are rows of
tests/test_config_errors.py; here are the ones that need a training run or a
checkpoint: non-finite *updates*, damaged checkpoints, a changed optimizer,
Ctrl-C, a vanished checkpoint folder, the converter and analyzer on bad input.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_faults import (NUM_STEPS, ROOT, Run, _assert_finite, _complete_steps, _env,  # noqa: E402
                         _params, _results)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _one_error(run) -> str:
  errors = run.error_lines()
  assert len(errors) == 1, run.context()
  assert "Traceback" not in run.text(), run.context()
  return errors[0]


# ------------------------------------------------------------------ non-finite updates
@pytest.mark.slow
def test_nonfinite_update_is_skipped_and_never_saved(cache, tmp_path):
  """Loss and gradients finite, the optimizer's update NaN: the updated state is
  checked, so 'skip' skips those updates (exit 0, finite params) and 'stop'
  stops with the last good checkpoint."""
  skip = Run(cache, tmp_path / "skip", ["--config.nonfinite=skip"],
             FAULT_NAN_UPDATE_STEPS="2,5")
  stop = Run(cache, tmp_path / "stop", ["--config.nonfinite=stop"],
             FAULT_NAN_UPDATE_STEPS="3")
  assert skip.finish() == 0, skip.context()
  results = _results(skip.workdir)
  assert results["step"] == NUM_STEPS and results["nonfinite_count"] == 2, results
  _assert_finite(_params(skip.workdir))

  assert stop.finish() == 1, stop.context()
  line = _one_error(stop)
  assert "non-finite loss, gradient or updated state at step 3" in line, stop.context()
  assert max(_complete_steps(stop.workdir)) == 3
  _assert_finite(_params(stop.workdir))


# ------------------------------------------------------------------ damaged checkpoints
def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _analyze(cache, workdir, output, *extra, timeout=300):
  env = _env(cache)
  proc = subprocess.run([sys.executable, "-m", "crate_mae_jax.tools.analyze",
                         f"--checkpoint={workdir}", f"--output={output}", *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return proc


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_and_are_named(cache, tmp_path):
  workdir = tmp_path / "run"
  four = ["--config.num_train_steps=4", "--config.keep_checkpoints=3"]
  first = Run(cache, workdir, four)
  assert first.finish() == 0, first.context()
  assert _complete_steps(workdir) == [2, 3, 4]
  intact = tmp_path / "intact"
  shutil.copytree(workdir, intact)
  ckpt = workdir / "checkpoints"

  # Flipped bytes in an array file of step 4; a corrupt meta JSON in step 3.
  bad_array = _largest_array_file(ckpt / "4")
  data = bytearray(bad_array.read_bytes())
  data[len(data) // 2] ^= 0xFF
  bad_array.write_bytes(bytes(data))
  (ckpt / "3" / "meta" / "metadata").write_text("{ not json")

  # analyze names the bad file, one line, exit 2.
  proc = _analyze(cache, workdir, tmp_path / "analysis")
  lines = [l for l in proc.stderr.splitlines() if l.startswith("analyze:")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert str(bad_array) in lines[0] and "sha256" in lines[0], lines

  # init_from names it too (a probe run from the damaged workdir).
  probe = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.main", "--config=configs/quickstart.py:linear_probe",
       f"--workdir={tmp_path / 'probe'}", f"--config.init_from={workdir}",
       "--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
       "--config.model.decoder_depth=2"],
      cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=300)
  lines = [l for l in probe.stderr.splitlines() if l.startswith("error: ")]
  assert probe.returncode == 2 and len(lines) == 1, probe.stderr[-3000:]
  assert str(bad_array) in lines[0] and "Traceback" not in probe.stderr, lines

  # A resumed run falls back past both damaged steps, saying so, and finishes.
  again = Run(cache, workdir, ["--config.num_train_steps=5", "--config.keep_checkpoints=3"])
  assert again.finish() == 0, again.context()
  text = again.text()
  assert "Checkpoint step 4 is damaged" in text and str(bad_array) in text, again.context()
  assert "Checkpoint step 3 is damaged" in text and "meta/metadata" in text, again.context()
  assert "falling back to step 2" in text
  assert again.resumed_from() == 2, again.context()
  assert _results(workdir)["step"] == 5
  assert sorted(p.name.split(".")[0] for p in (tmp_path / "run" / "checkpoints_damaged")
                .iterdir()) == ["3", "4"]

  # An emptied step directory is damaged too.
  for p in (ckpt / "5").iterdir():
    shutil.rmtree(p) if p.is_dir() else p.unlink()
  empty = Run(cache, workdir, ["--config.num_train_steps=6", "--config.keep_checkpoints=3"])
  assert empty.finish() == 0, empty.context()
  assert empty.resumed_from() == 4, empty.context()
  assert _results(workdir)["step"] == 6

  # Resuming with another optimizer: one line, exit 2, nothing changed.
  before = _complete_steps(workdir)
  sgd = Run(cache, workdir, ["--config.num_train_steps=8", "--config.optim.name=sgd"],
            cli=True)
  assert sgd.finish() == 2, sgd.context()
  line = _one_error(sgd)
  assert "optim.name='adamw'" in line and "--config.optim.name=adamw" in line, line
  assert _complete_steps(workdir) == before

  # analyze --images: bad files are one line naming the file (intact checkpoint).
  bad = {"nan.npz": dict(images=np.full((2, 28, 28, 1), np.nan, np.float32)),
         "empty.npz": dict(images=np.zeros((0, 28, 28, 1), np.float32)),
         "object.npz": dict(images=np.array([None, 1], dtype=object))}
  for name, arrays in bad.items():
    np.savez(tmp_path / name, **arrays)
  (tmp_path / "text.npz").write_text("not an npz file\n")
  for name, needle in (("nan.npz", "NaN"), ("empty.npz", "empty"),
                       ("object.npz", "numeric"), ("text.npz", "not a readable .npz")):
    proc = _analyze(cache, intact, tmp_path / f"out_{name}", f"--images={tmp_path / name}")
    lines = [l for l in proc.stderr.splitlines() if l.startswith("analyze:")]
    assert proc.returncode == 2 and len(lines) == 1, (name, proc.stderr[-3000:])
    assert name in lines[0] and needle in lines[0], lines
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------ Ctrl-C, lost folders
@pytest.mark.parametrize("sig, code, said, hint", [
    (signal.SIGINT, 130, "Ctrl-C", "interrupted (Ctrl-C) at step"),
    (signal.SIGHUP, 129, "SIGHUP", "nohup")])
@pytest.mark.slow
def test_ctrl_c_and_hangup_save_the_current_step(cache, tmp_path, sig, code, said, hint):
  """Ctrl-C (exit 130) and the terminal or ssh session closing (SIGHUP, exit 129,
  the line naming nohup/setsid) save the current step and end with one line."""
  workdir = tmp_path / "run"
  run = Run(cache, workdir, ["--config.checkpoint_every_steps=1000"], FAULT_STEP_SECONDS=0.25)
  run.wait_for(lambda: run.last_step_logged() >= 3)
  run.signal(sig)
  assert run.finish() == code, run.context()
  line = _one_error(run)
  results = _results(workdir)
  stopped = results["step"]
  assert results["interrupted"].startswith(said) and 3 <= stopped < NUM_STEPS, results
  assert f"at step {stopped}" in line and hint in line, line
  assert _complete_steps(workdir) == [stopped]
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


@pytest.mark.slow
def test_losing_the_checkpoint_folder_is_one_error_line(cache, tmp_path):
  workdir = tmp_path / "run"
  run = Run(cache, workdir, FAULT_STEP_SECONDS=0.25)
  run.wait_for(lambda: 3 in _complete_steps(workdir))
  shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
  assert run.finish(timeout=240) == 1, run.context()
  errors = run.error_lines()
  assert len(errors) == 1 and "disappeared during training" in errors[0], run.context()
  assert run.text().rstrip().splitlines()[-1] == errors[0], run.context()


@pytest.mark.slow
def test_second_run_in_a_workdir_is_refused_and_a_stale_lock_is_not(cache, tmp_path):
  """The first run holds the lock while it trains; a second one is refused
  naming it; after the first is killed -9 a restart is not blocked."""
  workdir = tmp_path / "run"
  first = Run(cache, workdir, FAULT_STEP_SECONDS=0.25)
  first.wait_for(lambda: first.last_step_logged() >= 1)
  second = Run(cache, workdir, cli=True)
  assert second.finish() == 2, second.context()
  line = _one_error(second)
  assert f"pid {first.proc.pid}" in line and "is in use by another run" in line, line
  first.signal(signal.SIGKILL)
  first.finish()
  again = Run(cache, workdir)
  assert again.finish() == 0, again.context()
  assert _results(workdir)["step"] == NUM_STEPS


# ------------------------------------------------------------------ converter
def test_converter_output_is_a_file_exits_at_once(official_tiny_pth, tmp_path):
  target = tmp_path / "exists.txt"
  target.write_text("a file, not a folder\n")
  env = _env(tmp_path / "cache")
  proc = subprocess.run([sys.executable, "-m", "crate_mae_jax.tools.convert_torch",
                         f"--checkpoint={official_tiny_pth}", f"--output={target}", "--heads=4"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  lines = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and "is a file" in lines[0], proc.stderr[-3000:]
  assert target.read_text() == "a file, not a folder\n"


# ------------------------------------------------------------------ data and the best checkpoint
def test_image_folder_symlink_loop_reads_each_image_once(tmp_path):
  from crate_mae_jax.data import input_pipeline
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(3):
      (tmp_path / c / f"{i}.png").write_bytes(b"png")
  (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
  (tmp_path / "b" / "other").symlink_to(tmp_path / "a", target_is_directory=True)
  # pylint: disable-next=protected-access
  classes, per_class = input_pipeline.class_files(str(tmp_path))
  assert classes == ["a", "b"]
  assert [len(f) for f in per_class] == [3, 3], per_class
  everything = [os.path.realpath(f) for files in per_class for f in files]
  assert len(set(everything)) == len(everything) == 6


def test_float_arrays_in_0_1_are_scaled_not_blackened():
  from crate_mae_jax.data import data_arrays
  x = np.linspace(0.0, 1.0, 16 * 4 * 4, dtype=np.float32).reshape(16, 4, 4, 1)
  u8 = data_arrays.to_uint8(x, "train images")
  assert u8.dtype == np.uint8 and u8.max() == 255 and u8.min() == 0
  np.testing.assert_array_equal(u8, np.round(x * 255).astype(np.uint8))
  np.testing.assert_array_equal(data_arrays.to_uint8(x * 255, "x"), u8)
  for bad in (x - 0.5, x * 300, np.full_like(x, np.nan)):
    with pytest.raises(ValueError):
      data_arrays.to_uint8(bad, "train images")


def test_best_checkpoint_survives_a_resume_with_an_equal_metric(tmp_path):
  """The best store keeps its step when a resumed run sees an equal metric
  (Orbax's BestN preservation policy over the saved metric)."""
  import jax.numpy as jnp
  from crate_mae_jax.training import checkpoints, steps
  def state(step, value):
    return steps.TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full(3, value)},
                            opt_state={"m": jnp.zeros(3)}, batch_stats={},
                            rng=jnp.zeros(2, jnp.uint32), nonfinite_count=jnp.zeros((), jnp.int32),
                            first_nonfinite_step=-jnp.ones((), jnp.int32))
  best = checkpoints.TrainCheckpoints(str(tmp_path / "best"), best_metric="top1",
                                      best_mode="max")
  best.save(state(2, 1.0), {"best": {"top1": 0.5}}, metrics={"top1": 0.5})
  best.save(state(4, 2.0), {"best": {"top1": 0.75}}, metrics={"top1": 0.75})
  best.close()
  resumed = checkpoints.TrainCheckpoints(str(tmp_path / "best"), best_metric="top1",
                                         best_mode="max")
  assert resumed.best_value() == 0.75  # a later equal 0.75 is not "improved"
  assert resumed.manager.all_steps() == [4]
  resumed.save(state(6, 3.0), {"best": {"top1": 0.8}}, metrics={"top1": 0.8})
  resumed.close()
  assert checkpoints.TrainCheckpoints(str(tmp_path / "best"), best_metric="top1",
                                      best_mode="max").manager.all_steps() == [6]
  assert (tmp_path / "best" / "6" / checkpoints.MANIFEST).exists()


def test_nonfinite_state_is_never_saved(tmp_path):
  import jax.numpy as jnp
  from crate_mae_jax.training import checkpoints, steps
  bad = steps.TrainState(step=jnp.asarray(1, jnp.int32), params={"w": jnp.array([1.0, jnp.nan])},
                         opt_state={"m": jnp.zeros(2)}, batch_stats={},
                         rng=jnp.zeros(2, jnp.uint32), nonfinite_count=jnp.zeros((), jnp.int32),
                         first_nonfinite_step=-jnp.ones((), jnp.int32))
  store = checkpoints.TrainCheckpoints(str(tmp_path / "ckpt"), asynchronous=False)
  with pytest.raises(checkpoints.NonFiniteStateError):
    store.save(bad, {})
  store.close()
  assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name[0].isdigit()]
