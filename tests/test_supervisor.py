"""The supervising parent of a multi-process run (crate_mae_jax/supervisor.py): it
exits with its training child's code, passes signals on, and ends with our one line
when a signal (JAX's abort, the OOM killer) ended the child. Fast: no JAX here; the
two-process cases through the real command line are in tests/test_multihost.py."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from crate_mae_jax import errors, supervisor

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A child that does what its first argument says, under supervise().
SCRIPT = r"""
import importlib.util, os, signal, sys, time
# The module alone, by path: importing the package would pull in JAX (seconds per process).
spec = importlib.util.spec_from_file_location("supervisor", sys.argv[2])
supervisor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(supervisor)
supervisor.supervise(lambda tail, signum: f"ended by {signum}; lost: {supervisor.lost_member(tail)!r}")
what = sys.argv[1]
print("child", os.getpid(), flush=True)
if what == "exit3":
  sys.exit(3)
if what == "abort":
  sys.stderr.write("F1207 client.h:80] Terminating process because the JAX distributed service "
                   "detected fatal errors. ... tasks are unhealthy (stopped sending heartbeats):\n1\n"
                   "The tasks have crashed.\n")
  sys.stderr.flush()
  os.abort()
if what == "term":
  signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), sys.exit(0)))
  print("ready", flush=True)
  time.sleep(60)
  sys.exit(5)
"""


def _start(what: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", SCRIPT, what, supervisor.__file__],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(ROOT))


def test_parent_exits_with_the_child_code():
  proc = _start("exit3")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 3, err
  assert "error:" not in err


def test_a_signal_that_ends_the_child_is_our_last_line_and_exit_1():
  proc = _start("abort")
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 1, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ended by 6; lost: 'process 1 of the job stopped sending"), err
  assert "Terminating process" in err  # the child's stderr is passed on before our line


def test_sigterm_to_the_parent_reaches_the_child():
  proc = _start("term")
  assert proc.stdout.readline().startswith("child ")
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert "child got SIGTERM" in out and proc.returncode == 0, (out, err)


def test_the_child_dies_with_the_parent():
  proc = _start("term")
  child = int(proc.stdout.readline().split()[1])
  proc.kill()
  proc.wait(timeout=30)
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline:
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  os.kill(child, signal.SIGKILL)
  pytest.fail("the training child outlived its killed parent")


@pytest.mark.parametrize("tail, words", [
    ("... tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.",
     "process 1 of the job stopped sending heartbeats"),
    ("... tasks are unhealthy (stopped sending heartbeats):\n2, 3\nThe tasks",
     "processes 2, 3 of the job stopped sending heartbeats"),
    ("F1207 client.h:80] Terminating process because the JAX distributed service detected "
     "fatal errors. ... Failed to send RPC to coordination service. ... calling "
     "/xla.coordination.CoordinationService/PollForError: ... Socket closed",
     "the job's coordinator, process 0, is gone"),
    ("the JAX distributed service detected fatal errors", "another process of the job died"),
    ("Killed", ""),
])
def test_jax_reports_name_the_lost_process(tail, words):
  assert supervisor.lost_member(tail).startswith(words) if words else (
      supervisor.lost_member(tail) == "")


def test_the_line_names_the_last_checkpoint_and_the_rerun(tmp_path):
  (tmp_path / "checkpoints" / "8").mkdir(parents=True)
  line = errors.ended_by_signal_message("the job's coordinator, process 0, is gone",
                                        signal.SIGABRT, str(tmp_path))
  assert line.startswith("training stopped: the job lost a member: the job's coordinator")
  assert "(SIGABRT" in line and "step 8 in" in line and "rerun every process" in line
  line = errors.ended_by_signal_message("", signal.SIGKILL, str(tmp_path))
  assert "out-of-memory killer" in line and "step 8" in line


def test_a_peer_timeout_below_one_second_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path / 'w'}", "--distributed=on", "--peer_timeout=0"],
      capture_output=True, text=True, cwd=str(ROOT), timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --peer_timeout=0: must be at least 1 second (JAX's default is 100)"), proc.stderr
