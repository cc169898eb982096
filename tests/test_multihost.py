"""Two processes on this machine train through the real entry point and share one
checkpoint; a single process then restores it and trains on.

Each process is `tests/multihost_worker.py`, which runs `crate_mae_jax.main
--distributed=on` (jax.distributed.initialize with JAX_COORDINATOR_ADDRESS=
localhost:PORT, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i; CPU collectives are gloo, the
default of this JAX) with 2 CPU devices per process, i.e. a 4-device fsdp mesh whose
parameter shards live in both processes. The worker records the state the run
ended with (gathered over both processes) and digests of the examples each process
fed, so the tests can compare numbers.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import once_per_run

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
WORKER = HERE.parent / "multihost_worker.py"
TOL = 1e-5
# Resumed-vs-uninterrupted parameters: the first four steps ran on two processes, whose
# gradient sums (and the now-effective activation constraints) add in another order
# than one process does; Adam's normalisation turns that float32 rounding into a few
# 1e-5 after a handful of steps. A wrong resume (data order, state) is off by > 1e-3.
RESUME_TOL = 1e-4
pytestmark = pytest.mark.slow

# The quick-start recipe (Fashion-MNIST subset shipped in the package), made tiny.
# The learning rate is constant (min_lr = lr) so that 4 steps resumed to 6 follow
# an uninterrupted 6-step run (the cosine schedule depends on num_train_steps).
COMMON_FLAGS = [
    "--config=configs/quickstart.py",
    "--config.batch_size=16",
    "--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
    "--config.model.decoder_depth=2",
    "--config.checkpoint_every_steps=2", "--config.eval_every_steps=4",
    "--config.log_every_steps=2",
    "--config.eval.max_batches=1", "--config.eval.num_images=2",
    "--config.eval.diagnostics=False",
    "--config.optim.warmup_epochs=0.0", "--config.optim.lr=0.001",
    "--config.optim.min_lr=0.001",
    "--config.mesh.shape=(('data', 1), ('fsdp', -1), ('tensor', 1))",
]

# Can this platform run two JAX CPU processes with collectives at all?
PROBE = """
import os
import jax, numpy as np
from jax.experimental import multihost_utils
jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                           process_id=int(os.environ["JAX_PROCESS_ID"]))
x = multihost_utils.process_allgather(np.full((2,), jax.process_index(), np.float32))
assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
assert x.tolist() == [[0.0, 0.0], [1.0, 1.0]], x
print("probe ok")
"""


def _env(num_devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags += [f"--xla_force_host_platform_device_count={num_devices}",
            "--xla_backend_optimization_level=0"]  # compiling dominates; all runs share it
  env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                       if os.environ.get("PYTHONPATH") else [])))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path: pathlib.Path, n: int = 6000) -> str:
  text = path.read_text(errors="replace") if path.exists() else ""
  return text[-n:]


def _run_processes(cmds: list, envs: list, logs: list, timeout: float) -> list:
  """Starts all commands, waits for all (killing the rest at the deadline or when
  one fails, since its peers would wait for it); returns their exit codes."""
  procs = []
  for cmd, env, log in zip(cmds, envs, logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=f,
                                    stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        time.sleep(2 if failed else 0)  # let a failing peer finish its report
        for p in procs:
          if p.poll() is None:
            p.kill()
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [None if time.monotonic() > deadline and p.returncode < 0 else p.returncode
          for p in procs]


def _two_processes(args: list, out: pathlib.Path, timeout: float, name: str):
  port = _free_port()
  cmds, envs, logs = [], [], []
  for i in range(2):
    cmds.append([sys.executable, *args])
    envs.append(_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                     JAX_PROCESS_ID=i))
    logs.append(out / f"{name}_{i}.log")
  codes = _run_processes(cmds, envs, logs, timeout)
  return codes, logs


def _start_two(args: list, out: pathlib.Path, name: str):
  """Starts `python ARGS` as processes 0 and 1 of a 2-process job (logs in
  `out/NAME_i.log`) and returns (processes, logs) without waiting."""
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    logs.append(out / f"{name}_{i}.log")
    with open(logs[-1], "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, *map(str, args)], cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT,
          env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                   JAX_PROCESS_ID=i)))
  return procs, logs


def _fail(what: str, codes, logs):
  report = "\n".join(f"--- {log.name} (exit {code})\n{_tail(log)}"
                     for code, log in zip(codes, logs))
  pytest.fail(f"{what} failed (exit codes {codes}; None = timed out)\n{report}")


def _compute(base: pathlib.Path):
  """Runs everything the tests look at into `base`."""
  # 0. Two processes, gloo collectives, nothing of ours.
  codes, logs = _two_processes(["-c", PROBE], base, 120, "probe")
  if codes != [0, 0]:
    pytest.skip("this platform cannot run two JAX CPU processes on localhost "
                f"(jax.distributed.initialize + gloo allgather failed, exit codes {codes}):"
                f"\n{_tail(logs[0], 1500)}")

  # 1. Two processes train 4 steps through `crate_mae_jax.main --distributed=on`.
  workdir, out2 = base / "workdir", base / "two"
  t0 = time.monotonic()
  args = [str(WORKER), out2, "--", *COMMON_FLAGS, f"--workdir={workdir}",
          "--distributed=on", "--config.num_train_steps=4"]
  codes, logs = _two_processes(args, base, 420, "train")
  if codes != [0, 0]:
    _fail("the 2-process training run", codes, logs)
  two_secs = time.monotonic() - t0

  # 2. One process, one device: restore the params, resume to step 6 in a copy,
  #    then train 6 steps from scratch with the same config as a reference.
  resumed, out1 = base / "resumed", base / "one"
  shutil.copytree(workdir, resumed)
  t0 = time.monotonic()
  args = [str(WORKER), out1, f"--restore_first={workdir}", f"--reference={base / 'ref'}",
          "--", *COMMON_FLAGS, f"--workdir={resumed}", "--distributed=off",
          "--config.num_train_steps=6"]
  env = _env(1, JAX_COMPILATION_CACHE_DIR=base / "jax_cache",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1)
  log = base / "single.log"
  codes = _run_processes([[sys.executable, *map(str, args)]], [env], [log], 420)
  if codes != [0]:
    _fail("the single-process restore/resume run", codes, [log])
  one_secs = time.monotonic() - t0
  (base / "secs.json").write_text(json.dumps({"two_processes": two_secs,
                                              "one_process": one_secs}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = once_per_run(tmp_path_factory, "multihost", _compute)
  workdir, resumed, out1, out2 = (base / n for n in ("workdir", "resumed", "one", "two"))
  load = lambda p: dict(np.load(p))
  return {
      "workdir": workdir, "resumed": resumed,
      "two": [json.loads((out2 / f"facts_{i}.json").read_text()) for i in range(2)],
      "one": json.loads((out1 / "facts_0.json").read_text()),
      "two_final": load(out2 / "final_params.npz"),
      "restored": load(out1 / "restored_params.npz"),
      "resumed_final": load(out1 / "final_params.npz"),
      "reference_final": load(out1 / "reference_params.npz"),
      "untargeted": (load(out1 / "restored_untargeted_params.npz")
                     if (out1 / "restored_untargeted_params.npz").exists() else None),
      "secs": json.loads((base / "secs.json").read_text()),
  }


def _all_finite(params: dict) -> bool:
  return all(np.all(np.isfinite(v)) for v in params.values())


def test_two_processes_train_and_write_one_checkpoint(runs):
  for i, facts in enumerate(runs["two"]):
    assert facts["process_index"] == i and facts["process_count"] == 2, facts
    assert facts["local_devices"] == 2 and facts["devices"] == 4, facts
    assert facts["saved_steps"][:2] == [2, 4] and facts["saved_steps"][-1] == 4, facts
  steps = sorted(int(d) for d in os.listdir(runs["workdir"] / "checkpoints") if d.isdigit())
  assert steps == [2, 4], steps
  results = json.loads((runs["workdir"] / "results.json").read_text())  # chief only
  assert results["step"] == 4 and results["nonfinite_count"] == 0, results
  assert 0 < results["loss"] < 10, results  # eval on normalised pixels, both shards
  assert results["examples"] == 16, results  # eval.max_batches=1 of 8 per process
  assert _all_finite(runs["two_final"])
  assert set(k.split("]")[0] for k in runs["two_final"]) == {"['encoder'", "['decoder'"}


def test_each_process_feeds_its_own_slice_of_the_global_batch(runs):
  p0, p1 = (facts["batches"] for facts in runs["two"])
  single = runs["one"]["reference_batches"]  # one process feeds whole global batches
  assert len(p0) == len(p1) == 4 and len(single) == 6
  for step in range(4):
    assert p0[step]["shape"] == p1[step]["shape"] == [8, 28, 28, 1]  # 16 / 2 processes
    assert not set(p0[step]["examples"]) & set(p1[step]["examples"]), step
    assert p0[step]["examples"] + p1[step]["examples"] == single[step]["examples"], step


def test_one_process_restores_the_two_process_checkpoint(runs):
  assert runs["one"]["restored_checkpoint_step"] == 4
  assert runs["one"]["restored_task"] == "pretrain"
  restored, two = runs["restored"], runs["two_final"]
  assert sorted(restored) == sorted(two)
  assert _all_finite(restored)
  for k in two:
    np.testing.assert_array_equal(restored[k], two[k], err_msg=k)  # identical


def test_one_process_resumes_and_matches_an_uninterrupted_single_process_run(runs):
  one = runs["one"]
  assert one["process_count"] == 1 and one["devices"] == 1
  assert one["restored_step"] == 4, one                       # resumed, not restarted
  assert one["saved_steps"][-1] == 6
  assert [b["shape"] for b in one["batches"]] == [[16, 28, 28, 1]] * 2  # steps 5 and 6
  assert [b["examples"] for b in one["batches"]] == [
      b["examples"] for b in one["reference_batches"][4:]]
  resumed, ref, two = runs["resumed_final"], runs["reference_final"], runs["two_final"]
  assert _all_finite(resumed)
  worst = max(float(np.max(np.abs(resumed[k] - ref[k]))) for k in ref)
  for k in ref:
    np.testing.assert_allclose(resumed[k], ref[k], rtol=RESUME_TOL, atol=RESUME_TOL,
                               err_msg=f"{k} (largest difference {worst:.2e})")
  assert max(float(np.max(np.abs(resumed[k] - two[k]))) for k in two) > 100 * TOL


def test_restore_params_without_target_on_another_topology(runs):
  assert runs["one"]["untargeted_restore_error"] is None, runs["one"]["untargeted_restore_error"]
  for k, v in runs["two_final"].items():
    np.testing.assert_array_equal(runs["untargeted"][k], v, err_msg=k)


@pytest.mark.parametrize("hosts", ["one", "every"])
def test_preemption_saves_the_same_step_on_all(tmp_path, hosts):
  """SIGTERM reaches one of two processes (or every one) mid-run, through the launched
  process and its supervisor: through the pre-emption sync point both stop after the
  same step, save it, and exit cleanly."""
  codes, logs = _two_processes(["-c", PROBE], tmp_path, 120, "probe")
  if codes != [0, 0]:
    pytest.skip(f"this platform cannot run two JAX CPU processes (exit codes {codes})")
  workdir, out = tmp_path / "workdir", tmp_path / "out"
  args = [str(WORKER), out, "--", *COMMON_FLAGS, f"--workdir={workdir}", "--distributed=on",
          "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
          "--config.eval_every_steps=100000", "--config.log_every_steps=1"]
  procs, logs = _start_two(args, tmp_path, "preempt")
  try:
    deadline = time.monotonic() + 400
    # Training is under way once process 0 has logged a few steps' metrics.
    while "step 3" not in _tail(logs[0], 100_000) and "[3]" not in _tail(logs[0], 100_000):
      assert all(p.poll() is None for p in procs), _tail(logs[0]) + _tail(logs[1])
      assert time.monotonic() < deadline, "training did not start in time"
      time.sleep(0.5)
    for p in (procs if hosts == "every" else procs[1:]):
      p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=max(deadline - time.monotonic(), 10)) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if codes != [0, 0]:
    _fail("the pre-empted 2-process run", codes, logs)
  facts = [json.loads((out / f"facts_{i}.json").read_text()) for i in range(2)]
  saved = [f["saved_steps"] for f in facts]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = saved[0][0]
  assert 3 <= step < 100000, saved
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [step]
  results = json.loads((workdir / "results.json").read_text())
  assert results["preempted"] and results["step"] == step, results


def _training_child(launched: subprocess.Popen) -> int:
  """The pid of the process that trains under a launched multi-process `main` (its
  supervising parent forks it; crate_mae_jax/supervisor.py)."""
  children = pathlib.Path(f"/proc/{launched.pid}/task/{launched.pid}/children")
  pids = children.read_text().split() if children.exists() else []
  assert len(pids) == 1, f"expected one training child of {launched.pid}, found {pids}"
  return int(pids[0])


@pytest.mark.parametrize("fault", ["worker_killed", "coordinator_killed", "worker_frozen"])
def test_a_lost_peer_ends_the_other_process_with_our_line(tmp_path, fault):
  """kill -9 of one of two processes mid-run (or SIGSTOP of its training process: a
  hung host): the other ends in bounded time with our one line and exit 1, on every
  path. Inside a collective a killed peer resets the connection at once (`error:
  training failed: ... Connection reset by peer ...`); otherwise JAX's coordination
  service aborts the survivor from C++ (at once when the coordinator is gone, after
  --peer_timeout seconds without heartbeats when another process is: the frozen case,
  whose survivor waits inside a collective that never fails), and the supervising
  parent (crate_mae_jax/supervisor.py) ends the run with `error: training stopped: the
  job lost a member: ...`, naming the lost process. Either way the line names the last
  complete checkpoint, which stays complete, and the rerun."""
  victim = 0 if fault == "coordinator_killed" else 1
  codes, logs = _two_processes(["-c", PROBE], tmp_path, 120, "probe")
  if codes != [0, 0]:
    pytest.skip(f"this platform cannot run two JAX CPU processes (exit codes {codes})")
  workdir = tmp_path / "workdir"
  peer_timeout = 20
  args = ["-m", "crate_mae_jax.main", *COMMON_FLAGS, f"--workdir={workdir}",
          "--distributed=on", f"--peer_timeout={peer_timeout}",
          "--config.num_train_steps=100000", "--config.checkpoint_every_steps=2",
          "--config.eval_every_steps=100000", "--config.log_every_steps=1"]
  procs, logs = _start_two(args, tmp_path, "killed")
  survivor = 1 - victim
  try:
    deadline = time.monotonic() + 400
    while not (workdir / "checkpoints" / "4").exists():
      assert all(p.poll() is None for p in procs), _tail(logs[0]) + _tail(logs[1])
      assert time.monotonic() < deadline, "training did not start in time"
      time.sleep(0.5)
    if fault == "worker_frozen":
      os.kill(_training_child(procs[victim]), signal.SIGSTOP)
    else:
      procs[victim].kill()  # the launched process; its training child dies with it
    killed_at = time.monotonic()
    code = procs[survivor].wait(timeout=peer_timeout + 120)
    waited = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = logs[survivor].read_text(errors="replace")
  last = [l for l in text.splitlines() if l.strip()][-1]
  print(f"survivor (process {survivor}): exit {code} {waited:.0f} s after the kill: {last}")
  assert code == 1 and waited < peer_timeout + 60, (code, waited, text[-3000:])
  assert last.startswith("error: training "), text[-3000:]
  assert "is intact" in last and "rerun" in last, last
  if fault == "worker_frozen":
    assert "process 1 of the job stopped sending heartbeats" in last, last
    # A process heartbeats every peer_timeout / 2 and is declared lost once its last
    # heartbeat is peer_timeout old, so a freeze is noticed between peer_timeout / 2 and
    # peer_timeout after it (CI saw 12 s of 20). Sooner than that would mean the flag
    # did not reach JAX (its own default is 100 s, which the upper bound above excludes).
    assert waited > peer_timeout / 2 - 3, waited
  if "the job lost a member" in last:  # not inside a collective: JAX's report, then ours
    lost = ("the job's coordinator, process 0, is gone" if victim == 0 else
            "process 1 of the job stopped sending heartbeats")
    assert lost in last, last
  else:
    assert last.startswith("error: training failed: "), last
  step = int(re.search(r"checkpoint, step (\d+) in", last).group(1))
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert step >= 4 and step in steps, (step, steps)
