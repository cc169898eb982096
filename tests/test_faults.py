"""Faults and guarantees of the train loop, end to end through the entry point:
kill -9 at arbitrary moments (during asynchronous checkpoint writes
too), SIGTERM, non-finite values, bad data, a read-only or full disk.

Training runs are separate processes of `tests/fault_worker.py`, which calls the
real entry point (`crate_mae_jax.main.run`: its flags, exit codes, messages and
signal handling) and can inject faults; bad-data runs use `python -m
crate_mae_jax.main` itself. All runs share one tiny config (the quick-start
recipe at width 32, depth 2) and a persistent compilation cache, so only the
first run of each program compiles. Runs that need no timing run in a small
background pool while the timing-sensitive ones (kills, signals, disks) run in
the test itself.
"""
import concurrent.futures
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
WORKER = HERE.parent / "fault_worker.py"
NUM_STEPS = 10
TOL = 1e-6

FLAGS = [
    "--config=configs/quickstart.py",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
    "--config.model.decoder_depth=2", "--config.batch_size=8",
    f"--config.num_train_steps={NUM_STEPS}", "--config.optim.warmup_epochs=0",
    "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
    "--config.eval_every_steps=1000", "--config.eval.max_batches=1",
    "--config.eval.num_images=2", "--config.eval.diagnostics=False",
]
STEP_LINE = re.compile(r"\] \[(\d+)\] train/")
RESUME_LINE = re.compile(r"Resuming from (\S+)/(\d+)")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


# ------------------------------------------------------------------ helpers
def _env(cache: pathlib.Path, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "FAULT_", "XLA_FLAGS"))}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             FAULT_NO_TF="1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


class Run:
  """One training process; its stdout+stderr go to a log file we can poll."""

  def __init__(self, cache, workdir, extra=(), cli=False, log_dir=None, **env):
    self.workdir = pathlib.Path(workdir)
    self.workdir.parent.mkdir(parents=True, exist_ok=True)
    log_dir = pathlib.Path(log_dir or self.workdir.parent)
    self.log = log_dir / f"{self.workdir.name}.{time.monotonic_ns()}.log"
    program = ([sys.executable, "-m", "crate_mae_jax.main"] if cli
               else [sys.executable, str(WORKER), "--"])
    self.argv = program + FLAGS + [f"--workdir={self.workdir}"] + list(extra)
    with open(self.log, "w") as f:
      self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=_env(cache, **env), stdout=f,
                                   stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log.read_text(errors="replace")

  def last_step_logged(self) -> int:
    steps = STEP_LINE.findall(self.text())
    return int(steps[-1]) if steps else 0

  def wait_for(self, predicate, timeout=240.0, poll=0.002) -> bool:
    """Polls until predicate() holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if predicate():
        return True
      if self.proc.poll() is not None:
        return predicate()
      time.sleep(poll)
    raise AssertionError(f"timed out; log tail:\n{self.text()[-3000:]}")

  def signal(self, sig) -> None:
    if self.proc.poll() is None:
      os.kill(self.proc.pid, sig)

  def finish(self, timeout=300) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise AssertionError(f"run did not end; log tail:\n{self.text()[-3000:]}")

  def resumed_from(self) -> int | None:
    match = RESUME_LINE.search(self.text())
    return int(match.group(2)) if match else None

  def error_lines(self) -> list[str]:
    return [line for line in self.text().splitlines() if line.startswith("error: ")]

  def context(self) -> str:
    return f"argv={self.argv}\nlog tail:\n{self.text()[-4000:]}"


def _ckpt_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints"


def _complete_steps(workdir) -> list[int]:
  d = _ckpt_dir(workdir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _tmp_steps(workdir) -> list[int]:
  d = _ckpt_dir(workdir)
  if not d.is_dir():
    return []
  try:
    names = os.listdir(d)
  except FileNotFoundError:
    return []
  return sorted(int(n.split(".")[0]) for n in names
                if TMP_SUFFIX in n and n.split(".")[0].isdigit())


def _params(workdir) -> dict:
  import jax
  from crate_mae_jax.training import checkpoints
  params, _ = checkpoints.restore_params(str(workdir))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _assert_params_close(a: dict, b: dict, tol=TOL):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


def _assert_finite(params: dict):
  for k, v in params.items():
    assert np.all(np.isfinite(v)), k


def _results(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def _can_mount() -> bool:
  if os.environ.get("FAULT_TESTS_NO_MOUNT") == "1" or not sys.platform.startswith("linux"):
    return False
  probe = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"mount_probe_{os.getpid()}"
  probe.mkdir(exist_ok=True)
  try:
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
      subprocess.run(["umount", str(probe)], check=True)
    return ok
  except (OSError, subprocess.CalledProcessError):
    return False
  finally:
    probe.rmdir()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def pool():
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
    yield executor


def _run_to_end(cache, workdir, extra=(), cli=False, **env) -> Run:
  run = Run(cache, workdir, extra, cli=cli, **env)
  run.finish()
  return run


@pytest.fixture(scope="module")
def baseline(cache, pool, tmp_path_factory):
  """The uninterrupted run every interrupted one must reproduce (started at once,
  in the background)."""
  workdir = tmp_path_factory.mktemp("baseline") / "run"
  future = pool.submit(_run_to_end, cache, workdir)

  def get():
    run = future.result()
    assert run.proc.returncode == 0, run.context()
    assert _results(workdir)["step"] == NUM_STEPS
    return _params(workdir)
  return get


# Which test reads each background run: only the runs of selected tests are started.
BACKGROUND_READERS = {
    "diverge": "test_nonfinite_stop_names_step_exits_1_and_keeps_last_good_checkpoint",
    "skip": "test_nonfinite_skip_counts_and_carries_on",
    "bad_skip": "test_bad_images_are_skipped_counted_and_logged",
    "bad_fail": "test_bad_image_with_fail_names_path_exit_2",
    "empty": "test_empty_dataset_names_path_exit_2",
}


@pytest.fixture(scope="module")
def background(cache, pool, tmp_path_factory, request):
  """Runs that need no timing, started together in the background (behind the
  baseline where a selected test has asked for it first), each only where the test
  that reads it was selected."""
  selected = {item.originalname for item in request.session.items}
  tmp = tmp_path_factory.mktemp("background")
  data = _image_folder(tmp / "images")
  (tmp / "empty").mkdir()
  def image_flags(path):
    return ["--config.data.source=image_folder", f"--config.data.path={path}",
            "--config.data.in_memory=False",
            "--config.num_train_steps=1", "--config.batch_size=4"]
  jobs = {
      "diverge": (tmp / "diverge", ["--config.optim.lr=1e30", "--config.nonfinite=stop"],
                  False, {}),
      "skip": (tmp / "skip", ["--config.nonfinite=skip", "--config.checkpoint_every_steps=5"],
               False, {"FAULT_NAN_STEPS": "2,5"}),
      "bad_skip": (tmp / "bad_skip", image_flags(data["root"]), True, {}),
      "bad_fail": (tmp / "bad_fail", image_flags(data["root"]) + [
          "--config.data.bad_images=fail"], True, {}),
      "empty": (tmp / "empty_run", image_flags(tmp / "empty"), True, {}),
  }
  futures = {name: pool.submit(_run_to_end, cache, w, extra, cli, **env)
             for name, (w, extra, cli, env) in jobs.items()
             if BACKGROUND_READERS[name] in selected}
  return dict(futures=futures, data=data, empty=tmp / "empty")


def _png(array) -> bytes:
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _image_folder(root: pathlib.Path) -> dict:
  """Two classes of small grayscale PNGs, one undecodable file and one whose
  pixel data does not have the shape its header declares."""
  import struct
  import zlib
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (root / c).mkdir(parents=True)
    for i in range(10):
      (root / c / f"{i}.png").write_bytes(
          _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
  undecodable = root / "a" / "corrupt.jpg"
  undecodable.write_bytes(b"\xff\xd8 this is not really a JPEG " * 20)
  small = _png(rng.integers(0, 256, (4, 4), dtype=np.uint8))
  at = small.index(b"IHDR")
  header = bytearray(small[at:at + 17])
  header[4:12] = struct.pack(">II", 28, 28)  # claims 28x28, holds 4x4 pixels
  wrong_shape = root / "b" / "wrong_shape.png"
  wrong_shape.write_bytes(small[:at] + bytes(header)
                          + struct.pack(">I", zlib.crc32(bytes(header)))
                          + small[at + 21:])
  return dict(root=root, bad=[str(undecodable), str(wrong_shape)])


# ------------------------------------------------------------------ 1. kill -9
@pytest.mark.slow
def test_kill9_anywhere_resumes_from_last_complete_checkpoint(cache, baseline, tmp_path):
  """SIGKILL after the log line of a step, while a checkpoint is being written
  (its orbax tmp folder exists) and at random moments; each restart must resume
  from the newest complete checkpoint, never from a partial one, and the final
  params must equal the uninterrupted run's."""
  workdir = tmp_path / "run"
  rng = np.random.default_rng(20240607)
  plan = [("after_step_log", 2), ("during_write", None), ("after_step_log", 4),
          ("random", None)]
  caught_mid_write = []
  for kind, arg in plan:
    before = _complete_steps(workdir)
    stale = set(_tmp_steps(workdir))
    run = Run(cache, workdir)
    if kind == "after_step_log":
      run.wait_for(lambda: run.last_step_logged() >= arg)
    elif kind == "during_write":
      newest = max(before, default=0)
      run.wait_for(lambda: any(s > newest and s not in stale for s in _tmp_steps(workdir)),
                   poll=0.0005)
    else:
      run.wait_for(lambda: run.last_step_logged() >= 1)
      time.sleep(float(rng.uniform(0.0, 1.5)))
    run.signal(signal.SIGKILL)
    rc = run.finish()
    after, tmp = _complete_steps(workdir), _tmp_steps(workdir)
    if rc == 0:  # the run won the race and finished: nothing left to test
      break
    assert rc == -signal.SIGKILL, run.context()
    # It resumed from the newest complete checkpoint of the previous run.
    assert run.resumed_from() == (max(before) if before else None), run.context()
    print(f"kill -9 ({kind}): complete before {before}, resumed from "
          f"{run.resumed_from()}, logged step {run.last_step_logged()}, complete after "
          f"{after}, partial {tmp}")
    if kind == "during_write" and tmp and max(tmp) > max(after, default=0):
      caught_mid_write.append((max(after, default=0), max(tmp)))
  assert caught_mid_write, "no kill landed while a checkpoint was being written"

  last_complete = max(_complete_steps(workdir))
  partial = set(_tmp_steps(workdir))
  # A partial checkpoint the resumed run will not write over (a step it never
  # saves): copied from a real one a kill left behind.
  if partial:
    shutil.copytree(_ckpt_dir(workdir) / f"{max(partial)}{TMP_SUFFIX}",
                    _ckpt_dir(workdir) / f"{10 * NUM_STEPS}{TMP_SUFFIX}")
  final = Run(cache, workdir)
  assert final.finish() == 0, final.context()
  assert final.resumed_from() == last_complete, final.context()
  assert final.resumed_from() not in partial
  assert _results(workdir)["step"] == NUM_STEPS
  assert max(_complete_steps(workdir)) == NUM_STEPS
  assert _tmp_steps(workdir) == []  # partial checkpoints are cleaned up on restart
  _assert_params_close(_params(workdir), baseline())


# ------------------------------------------------------------------ 2. SIGTERM
@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_0(cache, baseline, tmp_path):
  workdir = tmp_path / "run"
  # Periodic checkpoints off: the only mid-run checkpoint is the SIGTERM one.
  # Steps slowed down a little so that the signal lands mid-run.
  extra = ["--config.checkpoint_every_steps=1000"]
  run = Run(cache, workdir, extra, FAULT_STEP_SECONDS=0.25)
  run.wait_for(lambda: run.last_step_logged() >= 3)
  run.signal(signal.SIGTERM)
  assert run.finish() == 0, run.context()
  results = _results(workdir)
  stopped = results["step"]
  assert results["preempted"] is True and 3 <= stopped < NUM_STEPS, results
  assert _complete_steps(workdir) == [stopped]
  assert f"Pre-empted at step {stopped}: checkpoint saved" in run.text()
  assert not run.error_lines()

  again = Run(cache, workdir, extra)
  assert again.finish() == 0, again.context()
  assert again.resumed_from() == stopped
  results = _results(workdir)
  assert results["step"] == NUM_STEPS and results["preempted"] is False, results
  _assert_params_close(_params(workdir), baseline())


# ------------------------------------------------------------------ 3. non-finite
@pytest.mark.slow
def test_nonfinite_stop_names_step_exits_1_and_keeps_last_good_checkpoint(background):
  """A learning rate of 1e30 makes the second step overflow: no mocking."""
  run = background["futures"]["diverge"].result()
  assert run.proc.returncode == 1, run.context()
  errors = run.error_lines()
  assert len(errors) == 1, run.context()
  match = re.search(r"non-finite loss, gradient or updated state at step (\d+); training "
                    r"stopped", errors[0])
  assert match and "nonfinite='skip'" in errors[0], errors
  bad = int(match.group(1))
  # The bad update was never applied nor saved: the newest checkpoint holds the
  # state after the `bad` good updates, complete and loadable, finite.
  assert max(_complete_steps(run.workdir)) == bad, run.context()
  assert not _tmp_steps(run.workdir)
  _assert_finite(_params(run.workdir))
  from crate_mae_jax.training import checkpoints
  meta, step = checkpoints.read_meta(str(run.workdir))
  assert step == bad and meta["task"] == "pretrain"
  assert not (run.workdir / "results.json").exists()


@pytest.mark.slow
def test_nonfinite_skip_counts_and_carries_on(background):
  """Steps 2 and 5 get a NaN loss (fault_worker); with nonfinite='skip' both
  updates are skipped and counted, the run finishes with finite params."""
  run = background["futures"]["skip"].result()
  assert run.proc.returncode == 0, run.context()
  results = _results(run.workdir)
  assert results["step"] == NUM_STEPS and results["nonfinite_count"] == 2, results
  assert np.isfinite(results["loss"])
  text = run.text()
  # Logged per step: the poisoned steps (0-based 2, 5 = log lines 3, 6) are not
  # finite, the count rises, later steps are finite again.
  lines = {int(m.group(1)): line for line in text.splitlines()
           if (m := STEP_LINE.search(line))}
  assert "train/finite=0" in lines[3] and "train/nonfinite_count=1" in lines[3]
  assert "train/finite=0" in lines[6] and "train/nonfinite_count=2" in lines[6]
  assert "train/finite=1" in lines[NUM_STEPS] and "nonfinite_count=2" in lines[NUM_STEPS]
  _assert_finite(_params(run.workdir))


# ------------------------------------------------------------------ 4. bad data
@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_logged(background):
  run = background["futures"]["bad_skip"].result()
  assert run.proc.returncode == 0, run.context()
  text = run.text()
  for path in background["data"]["bad"]:
    assert f"Skipping bad image {path}" in text, run.context()
  assert "Skipped 2 bad images" in text
  assert _results(run.workdir)["skipped_bad_images"] == 2


def test_bad_image_with_fail_names_path_exit_2(background):
  run = background["futures"]["bad_fail"].result()
  assert run.proc.returncode == 2, run.context()
  errors = run.error_lines()
  assert len(errors) == 1 and "Traceback" not in run.text(), run.context()
  assert "bad image" in errors[0] and "bad_images='skip'" in errors[0]
  assert any(path in errors[0] for path in background["data"]["bad"]), errors
  assert not _ckpt_dir(run.workdir).exists()


def test_empty_dataset_names_path_exit_2(background):
  run = background["futures"]["empty"].result()
  assert run.proc.returncode == 2, run.context()
  errors = run.error_lines()
  assert len(errors) == 1 and "Traceback" not in run.text(), run.context()
  assert str(background["empty"]) in errors[0] and "is empty" in errors[0], errors
  # (a missing data.path is in tests/test_config_errors.py: data_path_missing)


# ------------------------------------------------------------------ 6. disks
class _Disk:
  """A small tmpfs we can make read-only or fill up, or (without mount rights)
  the fault worker's simulation of one."""

  def __init__(self, root: pathlib.Path, logs: pathlib.Path, real: bool):
    self.root, self.logs, self.real = root, logs, real
    root.mkdir(parents=True, exist_ok=True)
    if real:
      subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)], check=True)

  def make_read_only(self):
    # A file open for writing makes the remount busy for a moment: retry.
    for _ in range(200):
      if subprocess.run(["mount", "-o", "remount,ro", str(self.root)],
                        capture_output=True).returncode == 0:
        return
      time.sleep(0.01)
    raise AssertionError(f"could not remount {self.root} read-only")

  def fill(self):
    with open(self.root / "filler", "wb") as f:
      chunk = b"\0" * (1 << 20)
      try:
        while True:
          f.write(chunk)
          f.flush()
      except OSError as e:
        assert e.errno == errno.ENOSPC
    # Whatever the filesystem keeps back, take it too.
    for i in range(1000):
      try:
        (self.root / f"filler_{i}").write_bytes(b"\0" * 4096)
      except OSError:
        break

  def free(self):
    for p in self.root.glob("filler*"):
      p.unlink()

  def close(self):
    if self.real:
      subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path):
  d = _Disk(tmp_path / "disk", tmp_path, real=_can_mount())
  yield d
  d.close()


def _break_mid_run(cache, disk, workdir, how: str) -> tuple[Run, int]:
  """Trains until checkpoint 3 is complete, then the disk goes read-only/full."""
  if disk.real:
    run = Run(cache, workdir, log_dir=disk.logs)
    run.wait_for(lambda: 3 in _complete_steps(workdir))
    disk.make_read_only() if how == "EROFS" else disk.fill()
  else:
    run = Run(cache, workdir, log_dir=disk.logs, FAULT_DISK_ERROR=how, FAULT_DISK_AFTER=3)
  assert run.finish() == 1, run.context()
  return run, max(_complete_steps(workdir))


def _assert_disk_error(run, workdir, words, last):
  errors = run.error_lines()
  assert len(errors) == 1, run.context()
  line = errors[0]
  assert run.text().rstrip().splitlines()[-1] == line  # the last word is ours
  assert f"cannot write to --workdir '{workdir}'" in line and words in line, line
  assert f"the last complete checkpoint, step {last}" in line, line


@pytest.mark.slow
def test_workdir_turning_read_only_keeps_last_checkpoint(cache, disk):
  workdir = disk.root / "run"
  run, last = _break_mid_run(cache, disk, workdir, "EROFS")
  assert (3 if disk.real else 1) <= last < NUM_STEPS
  _assert_disk_error(run, workdir, "read-only file system", last)
  params = _params(workdir)  # the last complete checkpoint restores
  _assert_finite(params)
  if disk.real:
    # A workdir that is read-only at the start is refused at once (usage error).
    again = Run(cache, workdir, log_dir=disk.logs)
    assert again.finish() == 2, again.context()
    assert again.error_lines() == [
        f"error: --workdir '{workdir}' is on a read-only file system; pick a folder on a "
        "writable disk with free space"], again.context()
    assert max(_complete_steps(workdir)) == last


@pytest.mark.slow
def test_full_disk_stops_cleanly_and_resumes_after_freeing_space(cache, disk, baseline):
  workdir = disk.root / "run"
  run, last = _break_mid_run(cache, disk, workdir, "ENOSPC")
  _assert_disk_error(run, workdir, "no space left", last)
  if disk.real:
    disk.free()
  again = Run(cache, workdir, log_dir=disk.logs)
  assert again.finish() == 0, again.context()
  assert again.resumed_from() == last
  assert _results(workdir)["step"] == NUM_STEPS
  _assert_params_close(_params(workdir), baseline())


def test_failure_message_names_the_newest_step_across_both_folders(tmp_path):
  """A failed final save names the newest complete step, also when only
  checkpoints_best/ holds it, and says where a rerun resumes from. (In a
  subprocess: `main` defines absl flags that other test modules define too.)"""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))
  os.makedirs(os.path.join(workdir, "checkpoints", "40.orbax-checkpoint-tmp-1"))
  os.makedirs(os.path.join(workdir, "checkpoints_best", "30"))
  code = ("import errno, sys; from crate_mae_jax import errors; "
          "print(errors.failure_message(OSError(errno.ENOSPC, 'full'), sys.argv[1]))")
  def line():
    return subprocess.run([sys.executable, "-c", code, workdir], capture_output=True,
                          text=True, check=True, timeout=120).stdout
  out = line()
  assert "step 30 in" in out and "checkpoints_best" in out, out
  assert "resumes from step 10" in out, out
  os.makedirs(os.path.join(workdir, "checkpoints", "50"))
  out = line()
  assert "step 50 in" in out and "checkpoints_best" not in out, out
