"""Config and argument mistakes through the real command line.

Each row of MISTAKES runs `python -m crate_mae_jax.main` with one mistake on top
of a tiny quick-start config. Every one must end, before anything is compiled,
with exit code 2 and exactly one line on stderr, `error: ...`, naming the field
(or flag) and the fix; no traceback. JAX_LOG_COMPILES=1 makes any compilation
visible on stderr, so "one line" also proves "nothing compiled". Each case is
its own process, forked from one that has imported `crate_mae_jax.main` (and
printed nothing doing so): the import is what every case would spend most of
its time on; the argument parsing, validation and exit are each child's own.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import once_per_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = "configs/quickstart.py:linear_probe"

TINY = ["--config.model.width=32", "--config.model.depth=2", "--config.model.heads=2",
        "--config.model.decoder_depth=2", "--config.batch_size=8",
        "--config.num_train_steps=2"]

# (id, argv after the entry point, substrings the one error line must hold).
# {workdir} / {ckpt32} / {ckpt64} / {file} are filled in per run.
MISTAKES = [
    ("unknown_field", ["--config.modle.width=3"],
     ["--config.modle.width", "no field 'modle'", "did you mean 'model'"]),
    ("unknown_nested_field", ["--config.model.widht=32"],
     ["--config.model.widht", "no field 'widht'", "did you mean 'width'"]),
    ("wrong_type_int", ["--config.model.width=abc"],
     ["--config.model.width=abc", "type int"]),
    ("wrong_type_float", ["--config.optim.base_lr=fast"],
     ["--config.optim.base_lr=fast", "type float"]),
    ("unknown_variant", ["--config.model.variant=huge"],
     ["config.model.variant='huge'", "use one of", "tiny"]),
    ("unknown_task", ["--config.task=pretrian"],
     ["config.task", "'pretrian' is unknown", "pretrain"]),
    ("mixup_with_pretrain", ["--config.augment.mixup=0.8"],
     ["config.augment.mixup", "task='finetune' only", "--config.augment.mixup=0"]),
    ("decoder_width_crate", ["--config.model.decoder_width=64"],
     ["config.model.decoder_width=64", "must equal", "leave it unset"]),
    ("heads_not_dividing_width", ["--config.model.heads=5"],
     ["config.model.heads=5", "does not divide", "width=32"]),
    ("image_size_vs_patch", ["--config.data.image_size=30"],
     ["config.data.image_size", "not divisible by model.patch_size=4",
      "multiple of the patch size"]),
    ("mask_ratio_one", ["--config.model.mask_ratio=1.0"],
     ["config.model.mask_ratio=1.0", "[0, 1)"]),
    # 28 px / patch 4: 49 patches; int(49 * 0.01) = 0 kept (issue 24).
    ("mask_ratio_keeps_no_patch", ["--config.model.mask_ratio=0.99"],
     ["config.model.mask_ratio", "0.99 keeps 0 of the 49 patches",
      "--config.model.mask_ratio=0.9795"]),
    ("mask_ratio_masks_no_patch", ["--config.model.mask_ratio=0.0"],
     ["config.model.mask_ratio", "masks none of the 49 patches",
      "--config.model.mask_ratio=0.0001"]),
    ("negative_lr", ["--config.optim.base_lr=-0.1"],
     ["config.optim.base_lr", "must be positive"]),
    ("huge_batch", ["--config.batch_size=1000000000"],
     ["config.batch_size", "1000000000 images per process", "more than half of this host's",
      "use at most"]),
    ("zero_batch", ["--config.batch_size=0"],
     ["config.batch_size", "positive integer"]),
    ("accum_not_dividing_batch", ["--config.accum_steps=3"],
     ["config.accum_steps", "does not divide batch_size=8"]),
    ("zero_std", ["--config.data.std=(0.0,)"],
     ["config.data.std", "must be > 0"]),
    ("crop_scale_range", ["--config.data.crop_scale=(0.5,2.0)"],
     ["config.data.crop_scale", "0 < min <= max <= 1"]),
    ("unknown_nonfinite_mode", ["--config.nonfinite=ignore"],
     ["config.nonfinite", "'stop' or 'skip'"]),
    ("data_path_missing", ["--config.data.source=image_folder",
                           "--config.data.path=/nope/images"],
     ["config.data.path", "'/nope/images' does not exist"]),
    ("image_folder_in_memory", ["--config.data.source=image_folder",
                                "--config.data.path={tmpdir}"],
     ["config.data.in_memory", "--config.data.in_memory=False"]),
    ("init_from_missing", ["--config=" + PROBE, "--config.init_from=/nope"],
     ["config.init_from", "'/nope' does not exist"]),
    ("probe_without_init_from", ["--config=" + PROBE],
     ["config.init_from", "linear_probe needs init_from"]),
    ("init_from_other_size", ["--config=" + PROBE, "--config.init_from={ckpt64}"],
     ["config.model.width=32", "has 64", "--config.model.width=64"]),
    ("num_classes_below_dataset", ["--config=" + PROBE, "--config.init_from={ckpt32}",
                                   "--config.data.num_classes=5"],
     ["config.data.num_classes", "dataset has 10 classes", "--config.data.num_classes=10"]),
    ("batch_vs_devices", ["--config.batch_size=3", "DEVICES=2"],
     ["config.batch_size=3", "not divisible by the 2 data-parallel devices",
      "multiple of 2"]),
    ("missing_workdir", ["NO_WORKDIR"],
     ["--workdir is required"]),
    ("missing_config", ["NO_CONFIG"],
     ["--config is required", "configs/quickstart.py"]),
    ("config_file_missing", ["--config=configs/nope.py"],
     ["--config=configs/nope.py", "no such config file"]),
    ("unknown_flag", ["--lerning_rate=3"],
     ["lerning_rate", "--config.FIELD=VALUE"]),
    ("stray_argument", ["pretrain"],
     ["unexpected arguments", "--config.FIELD=VALUE"]),
    ("workdir_under_a_file", ["--workdir={file}/run"],
     ["--workdir", "part of its path is a file"]),
    # Non-finite numbers, wherever a float is expected.
    ("nan_lr", ["--config.optim.lr=nan"], ["config.optim.lr", "nan", "not a finite number"]),
    ("inf_base_lr", ["--config.optim.base_lr=inf"],
     ["config.optim.base_lr", "inf", "not a finite number"]),
    ("nan_weight_decay", ["--config.optim.weight_decay=nan"],
     ["config.optim.weight_decay", "not a finite"]),
    ("negative_clip_norm", ["--config.optim.clip_grad_norm=-1.0"],
     ["config.optim.clip_grad_norm", "must be > 0"]),
    ("zero_clip_norm", ["--config.optim.clip_grad_norm=0.0"],
     ["config.optim.clip_grad_norm", "must be > 0"]),
    ("quickstart_ignores_path", ["--config.data.path={tmpdir}"],
     ["config.data.path", "not used by source='quickstart'"]),
    # Meshes, config files, --config twice.
    ("mesh_vs_devices", ["--config.mesh.shape=(('data',2),('fsdp',1),('tensor',1))"],
     ["config.mesh.shape", "needs 2 devices but 1 are available"]),
    ("mesh_without_rule_axis", ["--config.mesh.shape=(('data',-1),('fsdp',1))"],
     ["config.mesh.rules", "'tensor'", "add ('tensor', 1)"]),
    ("config_file_raises", ["--config={raises}"],
     ["--config=", "raises.py", "RuntimeError: boom"]),
    ("config_returns_none", ["--config={none}"],
     ["none.py", "get_config() returned None"]),
    ("config_twice", ["SECOND_CONFIG"], ["--config is given 2 times"]),
    # Bad files.
    ("truncated_gz_idx", ["--config.data.source=fashion_mnist", "--config.data.path={fmnist}"],
     ["train-images-idx3-ubyte.gz", "damaged gzip file"]),
    ("nan_pixels_in_arrays", ["--config.data.source=arrays", "--config.data.path={nan_npz}"],
     ["NaN or inf pixels"]),
    ("image_name_not_utf8", ["--config.data.source=image_folder",
                             "--config.data.path={latin1}", "--config.data.in_memory=False"],
     ["not valid UTF-8", "caf\\xe9.png"]),
    ("unknown_tfds_name", ["--config.data.source=tfds", "--config.data.name=cifar100x",
                           "--config.data.in_memory=False", "--config.model.channels=3",
                           "--config.data.image_size=32", "--config.data.mean=(0.5,0.5,0.5)",
                           "--config.data.std=(0.2,0.2,0.2)"],
     ["config.data.name='cifar100x' is not a TFDS dataset", "did you mean 'cifar100'"]),
    # A second run in a workdir whose lock another process holds.
    ("workdir_in_use", ["HOLD_LOCK"],
     ["is in use by another run", "pid 4242 on otherhost", "pick another --workdir"]),
]


def _fake_checkpoint(path: pathlib.Path, width: int) -> str:
  """A params checkpoint whose meta says it holds a CRATE-MAE of `width`."""
  from crate_mae_jax.training import checkpoints
  meta = {"model": {"arch": "crate_mae", "width": width, "depth": 2, "heads": 2,
                    "patch_size": 4, "channels": 1}, "task": "pretrain"}
  params = {"encoder": {"w": np.zeros((width,), np.float32)}}
  checkpoints.save_params(str(path), params, meta)
  return str(path)


def _case(case, tmp: pathlib.Path) -> dict:
  """The argv, environment and lock of one row."""
  name, args, _ = case
  workdir = tmp / name
  fill = dict(workdir=str(workdir), ckpt32=str(tmp / "ckpt32"), ckpt64=str(tmp / "ckpt64"),
              file=str(tmp / "a_file"), tmpdir=str(tmp), raises=str(tmp / "raises.py"),
              none=str(tmp / "none.py"), fmnist=str(tmp / "fmnist"),
              nan_npz=str(tmp / "nan.npz"), latin1=str(tmp / "latin1"))
  held = None
  argv = ["--config=configs/quickstart.py", f"--workdir={workdir}"] + TINY
  devices = 1
  for a in args:
    if a == "NO_WORKDIR":
      argv = [x for x in argv if not x.startswith("--workdir=")]
    elif a == "NO_CONFIG":
      argv = [x for x in argv if not x.startswith("--config")]
    elif a == "SECOND_CONFIG":
      argv.append("--config=configs/tiny.py")
    elif a == "HOLD_LOCK":
      held = _hold_lock(workdir)
    elif a.startswith("DEVICES="):
      devices = int(a.split("=")[1])
    elif a.startswith("--config="):
      argv[0] = a.format(**fill)
    elif a.startswith("--workdir="):
      argv[1] = a.format(**fill)
    else:
      argv.append(a.format(**fill))
  return dict(name=name, argv=argv, workdir=str(workdir), held=held,
              xla_flags=f"--xla_force_host_platform_device_count={devices}")


# Imports the entry point once, then per line of stdin ({"name", "argv", "xla_flags",
# "out"}) forks a child that runs it as `python -m crate_mae_jax.main ARGV` would
# (sys.argv, its own stdout/stderr files, the process's exit code), a few at a
# time; prints one JSON line per finished child.
_FORK_SERVER = r"""
import json, os, sys, time
import crate_mae_jax.main as entry
sys.stdout.flush(); sys.stderr.flush()
running = {}
def reap():
  pid, status = os.wait()
  name, start = running.pop(pid)
  print(json.dumps(dict(name=name, rc=os.waitstatus_to_exitcode(status),
                        seconds=time.monotonic() - start)), flush=True)
for line in sys.stdin:
  case = json.loads(line)
  while len(running) >= 4:
    reap()
  start = time.monotonic()
  pid = os.fork()
  if pid == 0:
    os.environ["XLA_FLAGS"] = case["xla_flags"]
    for fd, path in ((1, case["out"] + ".stdout"), (2, case["out"] + ".stderr")):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [entry.__file__] + case["argv"]
    entry.run()
    sys.exit(0)
  running[pid] = (case["name"], start)
while running:
  reap()
"""


def _hold_lock(workdir: pathlib.Path):
  """The lock of a live run (this test process), as another host would leave it."""
  import fcntl
  import json
  workdir.mkdir(parents=True, exist_ok=True)
  f = open(workdir / ".lock", "w")  # pylint: disable=consider-using-with
  fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  json.dump({"pid": 4242, "host": "otherhost", "started": "2026-01-01T00:00:00+00:00"}, f)
  f.flush()
  return f


def _bad_files(tmp: pathlib.Path) -> None:
  import gzip
  (tmp / "raises.py").write_text("def get_config():\n  raise RuntimeError('boom')\n")
  (tmp / "none.py").write_text("def get_config():\n  return None\n")
  fmnist = tmp / "fmnist"
  fmnist.mkdir()
  header = bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">u4").tobytes()
  data = gzip.compress(header + bytes(10 * 28 * 28))
  (fmnist / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
  images = np.zeros((16, 28, 28, 1), np.float32)
  images[3, 4, 5] = np.nan
  np.savez(tmp / "nan.npz", train_images=images, train_labels=np.zeros(16, np.int32),
           test_images=images, test_labels=np.zeros(16, np.int32))
  for c in ("a", "b"):
    (tmp / "latin1" / c).mkdir(parents=True)
  name = os.path.join(os.fsencode(tmp / "latin1" / "a"), b"caf\xe9.png")
  with open(name, "wb") as f:  # the name is refused before anything is decoded
    f.write(b"\x89PNG not decoded")


def _run_all(tmp: pathlib.Path) -> None:
  _fake_checkpoint(tmp / "ckpt32", 32)
  _fake_checkpoint(tmp / "ckpt64", 64)
  (tmp / "a_file").write_text("not a folder\n")
  _bad_files(tmp)
  cases = [_case(case, tmp) for case in MISTAKES]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(ROOT))
  (tmp / "out").mkdir()
  lines = "".join(json.dumps(dict(name=c["name"], argv=c["argv"], xla_flags=c["xla_flags"],
                                  out=str(tmp / "out" / c["name"]))) + "\n" for c in cases)
  try:
    server = subprocess.run([sys.executable, "-c", _FORK_SERVER], input=lines, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
  finally:
    for c in cases:
      if c["held"] is not None:
        c["held"].close()
  # Importing the entry point printed nothing: every line a child's stderr holds is its own.
  assert server.returncode == 0 and not server.stderr, server.stderr[-3000:]
  finished = {r["name"]: r for r in map(json.loads, server.stdout.splitlines())}
  results = {}
  for c in cases:
    out = tmp / "out" / c["name"]
    results[c["name"]] = dict(
        rc=finished[c["name"]]["rc"], seconds=finished[c["name"]]["seconds"],
        stdout=pathlib.Path(f"{out}.stdout").read_text(errors="replace"),
        stderr=pathlib.Path(f"{out}.stderr").read_text(errors="replace"),
        argv=c["argv"], workdir=c["workdir"])
  (tmp / "outcomes.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """Every mistake's run, once per test run (shared by the xdist workers)."""
  out = once_per_run(tmp_path_factory, "config_errors", _run_all)
  results = json.loads((out / "outcomes.json").read_text())
  for r in results.values():
    r["workdir"] = pathlib.Path(r["workdir"])
  return results


def test_the_table_is_large_enough():
  assert len(MISTAKES) >= 15
  assert len({name for name, _, _ in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("case", MISTAKES, ids=[c[0] for c in MISTAKES])
def test_mistake_is_one_line_and_exit_code_2(case, outcomes):
  name, _, needles = case
  out = outcomes[name]
  lines = [line for line in out["stderr"].splitlines() if line.strip()]
  context = f"argv={out['argv']}\nstderr:\n{out['stderr'][-3000:]}"
  assert out["rc"] == 2, context
  assert "Traceback" not in out["stderr"], context
  assert len(lines) == 1, context  # no compile log, no usage text, no warnings
  line = lines[0]
  assert line.startswith("error: "), context
  for needle in needles:
    assert needle in line, f"{needle!r} not in {line!r}"
  # Before any compilation and any training: nothing was written to the workdir.
  assert not (out["workdir"] / "checkpoints").exists()
  assert out["seconds"] < 90, f"{name} took {out['seconds']:.0f}s"


# ---------------------------------------------------------------- mask ratio (issue 24)
def _pretrain(image_size: int, patch_size: int, ratio: float):
  from crate_mae_jax import recipes
  c = recipes.quickstart("pretrain")
  c.data.image_size, c.model.patch_size, c.model.mask_ratio = image_size, patch_size, ratio
  return c


def test_mask_ratio_that_keeps_no_patch_is_refused_naming_the_largest_usable():
  from crate_mae_jax import config_lib
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_pretrain(112, 16, 0.99))  # int(49 * 0.01) = 0 patches kept
  message = str(e.value)
  assert message.startswith("config.model.mask_ratio: ") and "\n" not in message
  assert "keeps 0 of the 49 patches" in message
  assert "--config.model.mask_ratio=0.9795" in message


@pytest.mark.parametrize("image_size,patch_size", [(112, 16), (224, 16), (28, 4), (32, 4),
                                                   (8, 4), (224, 14), (512, 16)])
def test_named_mask_ratios_work(image_size, patch_size):
  """The ratios the messages name pass validation and keep / mask one patch."""
  from crate_mae_jax import config_lib
  from crate_mae_jax.models import patches
  num = (image_size // patch_size) ** 2
  best = config_lib.largest_usable_mask_ratio(num)
  low = config_lib.smallest_masking_ratio(num)
  for ratio in (best, low):
    text = f"{ratio:.4f}".rstrip("0").rstrip(".")
    assert float(text) == ratio
    config_lib.validate(_pretrain(image_size, patch_size, float(text)))
  assert patches.num_kept(num, best) == 1
  assert patches.num_kept(num, low) == num - 1
  too_high = 1 - 0.99 / num  # keeps 0.99 of a patch: none
  with pytest.raises(config_lib.ConfigError, match="config.model.mask_ratio"):
    config_lib.validate(_pretrain(image_size, patch_size, too_high))


def test_mask_ratio_that_masks_no_patch_is_refused_for_pretraining_only():
  from crate_mae_jax import config_lib, recipes
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_pretrain(112, 16, 0.0))
  assert "masks none of the 49 patches" in str(e.value)
  assert "--config.model.mask_ratio=0.0001" in str(e.value)
  probe = recipes.quickstart("linear_probe")
  probe.model.mask_ratio, probe.init_from = 0.0, str(ROOT)  # the encoder never masks
  config_lib.validate(probe)


def test_one_patch_images_cannot_be_pretrained():
  from crate_mae_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="config.data.image_size: 16 gives 1 patch"):
    config_lib.validate(_pretrain(16, 16, 0.75))


def test_batch_memory_limit_is_named_and_usable():
  """The largest per-process batch the message names passes the same check."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.default_config()
  c.data.image_size, c.data.prefetch = 224, 2
  memory = 16 * 2**30
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size: .* use at most (\d+)"
                     ) as e:
    config_lib.check_batch_memory(c, 3, 100_000, memory)
  largest = int(re.search(r"use at most (\d+)", str(e.value)).group(1))
  config_lib.check_batch_memory(c, 3, largest, memory)
  with pytest.raises(config_lib.ConfigError):
    config_lib.check_batch_memory(c, 3, largest + 1, memory)


def test_a_batch_larger_than_the_train_split_is_one_warning(monkeypatch):
  """README "Sizes that do not fit": a per-process batch above the train split's size
  trains on, with one warning line naming both numbers and the batch that avoids it."""
  from crate_mae_jax import config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.default_config()
  c.batch_size, c.task = 64, "pretrain"
  warned = []
  monkeypatch.setattr(config_lib.logging, "warning",
                      lambda fmt, *args: warned.append(fmt % args))

  class Source:
    num_train_examples = 40
  config_lib.check_against_data(c, Source(), local_batch=64)
  assert len(warned) == 1, warned
  assert "64 images per process but the train split has 40" in warned[0], warned
  assert "a batch of at most 40 avoids it" in warned[0], warned
  warned.clear()
  config_lib.check_against_data(c, Source(), local_batch=40)
  assert warned == []
