"""launch/: the Cloud TPU and GPU-cluster launch scripts, run with --dry-run.

A fake `gcloud` (and `python3`) that records any call sits first on PATH: a dry run
must print every command and execute none. The remote scripts that `tpu.sh` hands to
`gcloud ... ssh --command` are also run here, in a temporary home, against fakes.
"""
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU = LAUNCH / "tpu.sh"
GPU = LAUNCH / "gpu_cluster.sh"

GCLOUD_TPUS = ["gcloud", "compute", "tpus"]
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


@pytest.fixture
def fakes(tmp_path):
  """A bin/ with a `gcloud` and `python3` that log their calls and fail."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.log"
  for name in ("gcloud", "python3"):
    fake = bin_dir / name
    fake.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
    fake.chmod(0o755)
  yield bin_dir
  assert not calls.exists(), f"a dry run executed: {calls.read_text()}"


def launch(script, *args, fakes, **env):
  """Run a launch script with a clean environment (plus `env`); return the result."""
  full_env = {"PATH": f"{fakes}{os.pathsep}/usr/bin{os.pathsep}/bin",
              "HOME": str(fakes.parent), "LC_ALL": "C", **env}
  return subprocess.run([str(script), *args], env=full_env, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def with_dry_run(script, args):
  """args with --dry-run after tpu.sh's command (gpu_cluster.sh: first)."""
  at = 1 if script == TPU else 0
  return [*args[:at], "--dry-run", *args[at:]]


def dry_run(script, *args, fakes, **env):
  """The commands a --dry-run prints, each split back into its words."""
  res = launch(script, *with_dry_run(script, args), fakes=fakes, **env)
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), res.stdout
  return [shlex.split(line[2:]) for line in lines]


def remote(cmd):
  """The --command script of a `gcloud compute tpus tpu-vm ssh` command."""
  assert cmd[:5] == GCLOUD_TPUS + ["tpu-vm", "ssh"], cmd
  return cmd[cmd.index("--command") + 1]


def train_args(script):
  """The arguments the remote train script gives crate_mae_jax.main."""
  m = re.search(r"python3 -m crate_mae_jax\.main (.*)\) > ", script)
  assert m, script
  return shlex.split(m.group(1))


V4 = ["--name=crate-v4", "--zone=us-central2-b", "--project=my-proj"]
V4_WHERE = ["--zone=us-central2-b", "--project=my-proj"]


# ----------------------------------------------------------------- (a) v4-32 pod slice


def test_v4_pod_create(fakes):
  cmds = dry_run(TPU, "create", *V4, "--accelerator-type=v4-32", fakes=fakes)
  assert cmds == [GCLOUD_TPUS + [
      "tpu-vm", "create", "crate-v4", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", *V4_WHERE]]


def test_create_runs_the_planner_first(fakes):
  """With --topology the user sees the compiled plan before paying: the planner
  runs on this machine, then the slice is created."""
  cmds = dry_run(TPU, "create", *V4, "--accelerator-type=v4-32", "--topology=v4:2x2x4",
                 "--config=configs/large.py", "--config.batch_size=2048", fakes=fakes)
  assert cmds == [
      ["python3", "-m", "crate_mae_jax.tools.plan", "--config=configs/large.py",
       "--topology=v4:2x2x4", "--config.batch_size=2048"],
      GCLOUD_TPUS + ["tpu-vm", "create", "crate-v4", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base", *V4_WHERE]]


def test_plan_command_passes_mesh_json_and_overrides(fakes):
  cmds = dry_run(TPU, "plan", "--topology", "v5p:2x4x4", "--mesh=data=8,fsdp=4",
                 "--json", "plan.json", "--config.model.remat_policy=full", fakes=fakes)
  assert cmds == [["python3", "-m", "crate_mae_jax.tools.plan", "--config=configs/base.py",
                   "--topology=v5p:2x4x4", "--mesh=data=8,fsdp=4", "--json=plan.json",
                   "--config.model.remat_policy=full"]]
  res = launch(TPU, "plan", "--dry-run", fakes=fakes)
  assert res.returncode == 2 and "missing --topology" in res.stderr, res.stderr


def test_create_is_refused_when_the_plan_does_not_fit(fakes, tmp_path):
  """A planner that exits 1 (nothing fits) stops create before any gcloud call."""
  planner = tmp_path / "planner"
  planner.write_text(f'#!/bin/sh\necho "$*" > "{tmp_path}/planned"\nexit 1\n')
  planner.chmod(0o755)
  res = launch(TPU, "create", *V4, "--accelerator-type=v4-32", "--topology=v4:2x2x4",
               fakes=fakes, PYTHON=str(planner))
  assert res.returncode == 2, res.stderr
  assert "does not fit v4:2x2x4: nothing created" in res.stderr, res.stderr
  assert "--topology=v4:2x2x4" in (tmp_path / "planned").read_text()


def test_v4_pod_setup_from_git(fakes):
  cmds = dry_run(TPU, "setup", *V4, "--git-url", "https://github.com/me/crate-mae-jax.git",
                 "--git-ref=v0.1", fakes=fakes)
  assert len(cmds) == 1
  assert cmds[0][:6] == GCLOUD_TPUS + ["tpu-vm", "ssh", "crate-v4"]
  assert "--worker=all" in cmds[0] and set(V4_WHERE) <= set(cmds[0])
  script = remote(cmds[0])
  assert ("git clone -q https://github.com/me/crate-mae-jax.git crate-mae-jax"
          " && git -C crate-mae-jax checkout -q v0.1 && cd crate-mae-jax") in script
  assert f"python3 -m pip install -q -e '.[tf,tpu]' -f {LIBTPU_INDEX}" in script


def test_v4_pod_setup_from_tarball(fakes, tmp_path):
  tarball = tmp_path / "crate-mae-jax.tar.gz"
  tarball.touch()
  scp, ssh = dry_run(TPU, "setup", *V4, f"--tarball={tarball}", fakes=fakes)
  assert scp == GCLOUD_TPUS + ["tpu-vm", "scp", str(tarball), "crate-v4:crate-mae-jax.tar.gz",
                               "--worker=all", *V4_WHERE]
  assert "--worker=all" in ssh
  assert "tar -xf crate-mae-jax.tar.gz -C crate-mae-jax" in remote(ssh)
  assert f"pip install -q -e '.[tf,tpu]' -f {LIBTPU_INDEX}" in remote(ssh)


def test_v4_pod_train_passes_config_workdir_and_overrides(fakes):
  (cmd,) = dry_run(TPU, "train", *V4, "--config=configs/base.py", "--workdir", "gs://bkt/run1",
                   "--data_dir=gs://bkt/tfds", "--config.optim.base_lr=1e-4",
                   "--config.data.name=it's odd", "--", "--flagfile=extra.cfg", fakes=fakes)
  assert cmd[:6] == GCLOUD_TPUS + ["tpu-vm", "ssh", "crate-v4"]
  assert "--worker=all" in cmd and set(V4_WHERE) <= set(cmd)
  script = remote(cmd)
  assert "exec nohup python3 -m crate_mae_jax.main" in script
  assert "> crate-mae-train.log 2>&1 < /dev/null &" in script
  assert train_args(script) == [
      "--config=configs/base.py", "--workdir=gs://bkt/run1", "--config.data.data_dir=gs://bkt/tfds",
      "--config.optim.base_lr=1e-4", "--config.data.name=it's odd", "--flagfile=extra.cfg"]


def test_v4_pod_logs_stop_delete_ssh(fakes):
  (logs,) = dry_run(TPU, "logs", *V4, fakes=fakes)
  assert "--worker=0" in logs and remote(logs) == "tail -n 200 -F crate-mae-train.log"
  (logs3,) = dry_run(TPU, "logs", *V4, "--worker", "3", fakes=fakes)
  assert "--worker=3" in logs3
  (stop,) = dry_run(TPU, "stop", *V4, fakes=fakes)
  assert "--worker=all" in stop and "kill" in remote(stop)
  (delete,) = dry_run(TPU, "delete", *V4, fakes=fakes)
  assert delete == GCLOUD_TPUS + ["tpu-vm", "delete", "crate-v4", *V4_WHERE]
  (ssh,) = dry_run(TPU, "ssh", *V4, "--", "ls", "-la", fakes=fakes)
  assert "--worker=all" in ssh and remote(ssh) == "ls -la"


def test_parameters_from_environment(fakes):
  env = dict(TPU_NAME="crate-v4", ZONE="us-central2-b", PROJECT="my-proj", ACCELERATOR_TYPE="v4-32",
             RUNTIME_VERSION="tpu-ubuntu2204-base")
  assert dry_run(TPU, "create", fakes=fakes, **env) == dry_run(
      TPU, "create", *V4, "--accelerator-type=v4-32", fakes=fakes)


# ---------------------------------------------- (b) single v5e host, queued resource, spot


V5E = ["--name=crate-v5e", "--zone=us-west4-a", "--project=my-proj"]


def test_v5e_queued_spot_create_and_delete(fakes):
  cmds = dry_run(TPU, "create", *V5E, "--accelerator-type", "v5litepod-8", "--queued", "--spot",
                 fakes=fakes)
  assert cmds == [GCLOUD_TPUS + [
      "queued-resources", "create", "crate-v5e", "--node-id=crate-v5e",
      "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
      "--zone=us-west4-a", "--project=my-proj"]]
  assert dry_run(TPU, "delete", *V5E, "--queued", fakes=fakes) == [GCLOUD_TPUS + [
      "queued-resources", "delete", "crate-v5e", "--force", "--zone=us-west4-a", "--project=my-proj"]]


def test_v5e_tpu_vm_spot_and_explicit_runtime(fakes):
  (cmd,) = dry_run(TPU, "create", *V5E, "--accelerator-type=v5litepod-8", "--spot", fakes=fakes)
  assert cmd[3:6] == ["tpu-vm", "create", "crate-v5e"]
  assert "--version=v2-alpha-tpuv5-lite" in cmd and "--spot" in cmd
  (cmd,) = dry_run(TPU, "create", *V5E, "--accelerator-type=v5litepod-8",
                   "--runtime-version=v2-alpha-tpuv5-lite-custom", fakes=fakes)
  assert "--version=v2-alpha-tpuv5-lite-custom" in cmd and "--spot" not in cmd


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("command", ["create", "setup", "train", "logs", "stop", "delete", "ssh"])
@pytest.mark.parametrize("missing", ["--zone", "--name"])
def test_missing_zone_or_name_exits_2(fakes, command, missing):
  args = [a for a in V4 if not a.startswith(missing + "=")]
  res = launch(TPU, command, "--dry-run", *args, fakes=fakes)
  assert res.returncode == 2
  assert res.stdout == ""
  assert len(res.stderr.splitlines()) == 1 and f"missing {missing} " in res.stderr


@pytest.mark.parametrize("args, message", [
    (["create", *V4], "missing --accelerator-type"),
    (["create", *V4, "--accelerator-type=v9-8"], "pass --runtime-version"),
    (["setup", *V4], "missing --git-url or --tarball"),
    (["setup", *V4, "--tarball=/no/such.tar.gz"], "--tarball /no/such.tar.gz: no such file"),
    (["train", *V4], "missing --workdir"),
    (["train", *V4, "--workdir=/tmp/run"], "--workdir must be a gs:// URL"),
    (["ssh", *V4], "missing the command"),
    (["create", *V4, "--bogus"], "unknown flag --bogus"),
    (["create", *V4, "--accelerator-type"], "--accelerator-type needs a value"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_usage_errors_exit_2(fakes, args, message):
  res = launch(TPU, *with_dry_run(TPU, args), fakes=fakes)
  assert res.returncode == 2 and message in res.stderr and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", ["create", "setup", "train", "logs", "stop", "delete", "ssh"])
def test_help_per_command(fakes, command):
  res = launch(TPU, command, "--help", fakes=fakes)
  assert res.returncode == 0 and res.stdout.startswith(f"Usage: {TPU} {command} ")
  assert "--zone ZONE" in res.stdout and "--dry-run" in res.stdout


def test_help_overall(fakes):
  res = launch(TPU, "--help", fakes=fakes)
  assert res.returncode == 0 and all(c in res.stdout for c in ("create", "setup", "train", "ssh"))
  assert launch(TPU, fakes=fakes).returncode == 2


# ------------------------------------------- the remote scripts, run here against fakes


def _run_remote(script, home, bin_dir):
  return subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True,
                        timeout=30, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)})


def test_remote_setup_train_stop(fakes, tmp_path):
  """setup unpacks and pip-installs; train starts one nohup'ed process; stop kills it."""
  home = tmp_path / "home"
  home.mkdir()
  repo = tmp_path / "src"
  (repo / "configs").mkdir(parents=True)
  (repo / "setup.py").write_text("")
  tarball = tmp_path / "crate-mae-jax.tar.gz"
  subprocess.run(["tar", "-czf", str(tarball), "-C", str(repo), "."], check=True)
  scp, setup = dry_run(TPU, "setup", *V4, f"--tarball={tarball}", fakes=fakes)
  (train,) = dry_run(TPU, "train", *V4, "--workdir=gs://b/r", "--config.seed=3", fakes=fakes)
  (stop,) = dry_run(TPU, "stop", *V4, fakes=fakes)

  remote_bin = tmp_path / "remote-bin"
  remote_bin.mkdir()
  fake_python = remote_bin / "python3"
  fake_python.write_text('#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" >> "$HOME/python.argv"\n'
                         'case "$*" in *crate_mae_jax.main*) exec sleep 60;; esac\n')
  fake_python.chmod(0o755)
  shutil.copy(tarball, home / scp[scp.index(str(tarball)) + 1].split(":", 1)[1])

  res = _run_remote(remote(setup), home, remote_bin)
  assert res.returncode == 0, res.stderr
  assert (home / "crate-mae-jax" / "setup.py").exists()
  src = str(home / "crate-mae-jax")
  assert (home / "python.argv").read_text().split("\n")[:-1] == [
      src, "-m", "pip", "install", "-q", "-U", "pip",
      src, "-m", "pip", "install", "-q", "-e", ".[tf,tpu]", "-f", LIBTPU_INDEX]
  (home / "python.argv").unlink()

  pid = None
  try:
    res = _run_remote(remote(train), home, remote_bin)
    assert res.returncode == 0, res.stderr
    pid = int((home / "crate-mae-train.pid").read_text())
    for _ in range(100):
      if (home / "python.argv").exists():
        break
      time.sleep(0.05)
    assert (home / "python.argv").read_text().split("\n")[:-1] == [
        str(home / "crate-mae-jax"), "-m", "crate_mae_jax.main", "--config=configs/base.py",
        "--workdir=gs://b/r", "--config.seed=3"]
    assert (home / "crate-mae-train.log").exists()
    again = _run_remote(remote(train), home, remote_bin)
    assert again.returncode == 1 and "training is running" in again.stderr

    res = _run_remote(remote(stop), home, remote_bin)
    assert res.returncode == 0, res.stderr
    assert not (home / "crate-mae-train.pid").exists()
    for _ in range(100):
      if subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                        text=True).stdout.strip() in ("", "Z"):
        break
      time.sleep(0.05)
    else:
      pytest.fail("stop left the training process running")
    pid = None
  finally:
    if pid is not None:
      os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- GPU clusters


SLURM_2x8 = dict(SLURM_JOB_ID="4242", SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3",
                 SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-[007-008]")
TRAIN = ["--config=configs/base.py", "--workdir=/shared/run1"]


def test_gpu_slurm_one_process_per_gpu(fakes):
  (cmd,) = dry_run(GPU, "--", *TRAIN, fakes=fakes, **SLURM_2x8)
  assert cmd == ["env", "JAX_COORDINATOR_ADDRESS=gpu-007:61586", "JAX_NUM_PROCESSES=16",
                 "JAX_PROCESS_ID=11", "JAX_LOCAL_DEVICE_IDS=3",
                 "python3", "-m", "crate_mae_jax.main", *TRAIN]


def test_gpu_slurm_task_bound_to_one_gpu(fakes):
  (cmd,) = dry_run(GPU, "--", *TRAIN, fakes=fakes, CUDA_VISIBLE_DEVICES="3", **SLURM_2x8)
  assert "JAX_LOCAL_DEVICE_IDS=0" in cmd


def test_gpu_slurm_one_process_per_node(fakes):
  env = dict(SLURM_2x8, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
  (cmd,) = dry_run(GPU, "--", *TRAIN, fakes=fakes, SLURM_GPUS_ON_NODE="8", **env)
  assert cmd[1:5] == ["JAX_COORDINATOR_ADDRESS=gpu-007:61586", "JAX_NUM_PROCESSES=2",
                      "JAX_PROCESS_ID=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]
  res = launch(GPU, "--dry-run", "--", *TRAIN, fakes=fakes, **env)
  assert res.returncode == 2 and "missing --gpus-per-node" in res.stderr


def test_gpu_explicit_flags_override_slurm(fakes):
  args = ["--coordinator=10.0.0.1:1234", "--num-processes", "2", "--process-id=1",
          "--local-device-ids=0,1,2,3", "--python=/opt/py/bin/python"]
  expected = ["env", "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=2",
              "JAX_PROCESS_ID=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
              "/opt/py/bin/python", "-m", "crate_mae_jax.main", *TRAIN, "--config.seed=1"]
  assert dry_run(GPU, *args, "--", *TRAIN, "--config.seed=1", fakes=fakes) == [expected]
  assert dry_run(GPU, *args, "--", *TRAIN, "--config.seed=1", fakes=fakes, **SLURM_2x8) == [expected]


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-015],host2",
                                      "gpu-[007,009-012]"])
def test_gpu_coordinator_matches_jax_slurm_detection(fakes, monkeypatch, nodelist):
  slurm_cluster = pytest.importorskip("jax._src.clusters.slurm_cluster")
  env = dict(SLURM_2x8, SLURM_JOB_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  expected = slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  (cmd,) = dry_run(GPU, "--", *TRAIN, fakes=fakes, **env)
  assert cmd[1] == f"JAX_COORDINATOR_ADDRESS={expected}"


@pytest.mark.parametrize("args, message", [
    (["--num-processes=2", "--process-id=0"], "missing --coordinator"),
    (["--coordinator=h:1", "--process-id=0"], "missing --num-processes"),
    (["--coordinator=h:1", "--num-processes=2"], "missing --process-id"),
    (["--coordinator=h", "--num-processes=2", "--process-id=0"], "HOST:PORT"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2"], "--process-id must be"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=0", "--local-device-ids=a"],
     "--local-device-ids"),
    # Hostile values: a leading zero (bash reads 08 as bad octal), an absurd count, a
    # port out of range, shell characters in the host.
    (["--coordinator=h:1", "--num-processes=10", "--process-id=08"], "--process-id must be"),
    (["--coordinator=h:1", "--num-processes=99999999999999999999", "--process-id=1"],
     "--process-id must be"),
    (["--coordinator=h:99999", "--num-processes=2", "--process-id=0"], "port of 1 to 65535"),
    (["--coordinator=h;id:80", "--num-processes=2", "--process-id=0"], "HOST:PORT"),
    (["--coordinator=$(id):80", "--num-processes=2", "--process-id=0"], "HOST:PORT"),
])
def test_gpu_usage_errors_exit_2(fakes, args, message):
  res = launch(GPU, "--dry-run", *args, "--", *TRAIN, fakes=fakes)
  assert res.returncode == 2 and message in res.stderr and len(res.stderr.splitlines()) == 1


def test_gpu_hostile_slurm_values_exit_2(fakes):
  """SLURM values go into shell arithmetic: a non-number is one line, exit 2, and
  nothing is started (bash would otherwise stop on 'unbound variable')."""
  for var, value in (("SLURM_JOB_ID", "abc"), ("SLURM_NTASKS", "2;id"), ("SLURM_PROCID", "08")):
    res = launch(GPU, "--dry-run", "--", *TRAIN, fakes=fakes, **dict(SLURM_2x8, **{var: value}))
    assert res.returncode == 2, (var, res.stderr)
    assert f"{var}={value} is not a number" in res.stderr and len(res.stderr.splitlines()) == 1
    assert "crate_mae_jax.main" not in res.stdout


def test_gpu_ipv6_coordinator(fakes):
  hostile = "--workdir=/tmp/a b$(id);`id` 'x\""
  (cmd,) = dry_run(GPU, "--coordinator=[fd00::1]:1234", "--num-processes=2", "--process-id=1",
                   "--", "--config=configs/base.py", hostile, fakes=fakes)
  assert cmd[1] == "JAX_COORDINATOR_ADDRESS=[fd00::1]:1234"
  assert cmd[-1] == hostile   # verbatim, through no shell


def test_gpu_help(fakes):
  res = launch(GPU, "--help", fakes=fakes)
  assert res.returncode == 0 and "--coordinator HOST:PORT" in res.stdout


# ----------------------------------------------------------------------------- shellcheck


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(LAUNCH.glob("*.sh"))
  assert {p.name for p in scripts} >= {"common.sh", "tpu.sh", "gpu_cluster.sh"}
  res = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
