"""Command-line conventions: help, config lookup, packaging, caches and quiet logs."""
import logging
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from crate_mae_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.update(extra)
  return env


def _assert_lists_config_fields(stdout: str):
  assert "--config.optim.base_lr" in stdout and "--workdir" in stdout
  assert "base.py" in stdout  # the shipped configs are named


def test_helpfull_exits_0_and_lists_config_fields(tmp_path):
  """(`--help` of the same entry point: test_help_lists_own_flags_and_imports_no_tensorflow.)"""
  proc = subprocess.run([sys.executable, "-m", "crate_mae_jax.main", "--helpfull"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _assert_lists_config_fields(proc.stdout)
  assert "--compilation_cache" in proc.stdout


@pytest.mark.parametrize("spelling", ["configs/quickstart.py", "quickstart",
                                      "crate_mae_jax/configs/quickstart.py"])
def test_config_spellings_resolve_to_the_shipped_file(spelling, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  resolved = cli.resolve_config_path(spelling + ":linear_probe")
  path, arg = resolved.split(":")
  assert arg == "linear_probe"
  assert os.path.samefile(path, ROOT / "configs" / "quickstart.py")


def test_existing_paths_and_unknown_names_are_left_alone(tmp_path):
  mine = tmp_path / "base.py"
  mine.write_text("")
  assert cli.resolve_config_path(str(mine)) == str(mine)
  assert cli.resolve_config_path("no_such_config") == "no_such_config"
  assert cli.rewrite_config_args(["p", "--config", "base", "--x"])[2].endswith("configs/base.py")


def test_shipped_config_name_works_from_another_folder(tmp_path):
  """Parsed and validated (an out-of-range value is then refused, before compiling)."""
  proc = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.main", "--config=quickstart:linear_probe",
       f"--workdir={tmp_path / 'w'}", "--config.model.mask_ratio=1.5"],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "mask_ratio" in proc.stderr and "config file" not in proc.stderr


# A flag each entry point defines itself, with (the start of) its description.
_OWN_FLAG = {
    "crate_mae_jax.main": ("--workdir", "Directory (local or gs://) for checkpoints and logs."),
    "crate_mae_jax.tools.analyze": ("--num_images", "images to analyse"),
    "crate_mae_jax.tools.evaluate": ("--max_train", "Train images for k-NN / probes (0: all)."),
    "crate_mae_jax.tools.plan": ("--topology", "Cloud TPU topology, e.g. v5p:4x4x4"),
    "crate_mae_jax.tools.quickstart": ("--workdir", "Where checkpoints and logs go."),
    "crate_mae_jax.tools.convert_torch": ("--checkpoint", "official .pth file"),
    "crate_mae_jax.tools.export_torch": ("--image_size", "image side of the official"),
    "crate_mae_jax.tools.benchmark": ("--batch_size", "global batch (comma list allowed)"),
}


def _console_scripts() -> dict[str, str]:
  import tomllib  # pylint: disable=import-outside-toplevel
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def _assert_lists_own_flag(stdout: str, module: str):
  name, description = _OWN_FLAG[module]
  listing = stdout.split("\nflags", 1)[-1]   # after the docstring and the usage line
  lines = [line for line in listing.splitlines() if line.startswith(f"  {name} ")]
  assert lines, f"{name} is not listed:\n{stdout[-3000:]}"
  assert description in lines[0], lines[0]   # on the flag's own line
  assert "Try --helpfull" not in stdout


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_console_script_help_lists_its_own_flags(script, tmp_path):
  """As the installed wrapper runs it: __main__ is then the wrapper, not the module
  that defines the flags (absl's main_module_help() finds none there). `--help` exits
  0 listing its own flags (train: the config fields too) and imports no TensorFlow
  (`python -m MODULE --help` is checked by the closed-pipe test below)."""
  target = _console_scripts()[script]
  module, function = target.split(":")
  code = (f"import sys; sys.argv[0] = {script!r}; "
          f"from {module} import {function}; {function}()")
  # -X importtime lists every imported module on stderr.
  proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, "--help"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  other = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
  assert proc.returncode == 0, "\n".join(other)[-2000:]
  assert not [line for line in other if "Traceback" in line], "\n".join(other)[-2000:]
  owner = "crate_mae_jax.tools.benchmark" if script == "crate-mae-benchmark" else module
  _assert_lists_own_flag(proc.stdout, owner)
  if module == "crate_mae_jax.main":
    _assert_lists_config_fields(proc.stdout)
  assert f"usage: {script} " in proc.stdout
  assert "crate_mae_jax.cli" in imported   # the probe works
  assert "tensorflow" not in imported and "tensorflow_datasets" not in imported


@pytest.mark.parametrize("module", sorted(_OWN_FLAG))
def test_help_into_a_closed_pipe_ends_quietly(module, tmp_path):
  """`--help | head`, where head has already gone: the first write meets EPIPE."""
  read_end, write_end = os.pipe()
  os.close(read_end)
  try:
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=_env(),
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
  finally:
    os.close(write_end)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_help_read_by_a_reader_that_stops_early():
  """`--help | head -3`: a few bytes read, then the pipe closed."""
  proc = subprocess.Popen([sys.executable, "-m", "crate_mae_jax.main", "--helpfull"],
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  first = proc.stdout.read(64)
  proc.stdout.close()
  stderr = proc.stderr.read().decode()
  assert proc.wait(timeout=300) == 0, stderr[-2000:]
  assert first and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


_CACHE_PROBE = ("import jax; from crate_mae_jax import cli; "
                "print(cli.enable_compilation_cache(), jax.config.jax_compilation_cache_dir, "
                "jax.config.jax_persistent_cache_min_compile_time_secs)")


@pytest.mark.parametrize("setting", ["default", "env", "off", "jax_min_time"])
def test_compilation_cache(setting, tmp_path):
  """Where the cache goes; programs under a second are not kept unless JAX's own
  variable for it is set."""
  env = _env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
  for name in list(env):
    if name.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")):
      env.pop(name)
  env.pop(cli.CACHE_ENV, None)
  if setting == "env":
    env[cli.CACHE_ENV] = str(tmp_path / "mine")
  elif setting == "off":
    env[cli.CACHE_ENV] = "off"
  elif setting == "jax_min_time":
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.25"
  proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  used, configured, min_secs = proc.stdout.split()
  default = str(tmp_path / "xdg" / "crate_mae_jax" / "jax_cache")
  expected = {"default": default, "env": str(tmp_path / "mine"), "off": "None",
              "jax_min_time": default}[setting]
  assert used == expected
  if setting != "off":
    assert configured == expected and os.path.isdir(expected)
    assert float(min_secs) == (0.25 if setting == "jax_min_time" else 1.0)


def test_quiet_startup_drops_only_the_known_noise(caplog):
  cli.quiet_startup()
  with caplog.at_level(logging.INFO):
    logging.getLogger("jax._src.xla_bridge").info(
        "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    logging.getLogger("absl").warning(
        'Item "%s" was found in the checkpoint, but could not be restored. Please provide',
        "train_state")
    logging.getLogger("absl").warning("something that matters")
  text = caplog.text
  assert "Unable to initialize" not in text and "could not be restored" not in text
  assert "something that matters" in text


def test_tensorflow_is_hidden_from_gpus(monkeypatch):
  tf = pytest.importorskip("tensorflow")
  calls = []
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda d, kind: calls.append((d, kind)))
  cli.import_tensorflow_quietly.cache_clear()
  try:
    assert cli.tensorflow() is tf
    assert cli.import_tensorflow_quietly() is tf   # cached: the devices are set once
  finally:
    cli.import_tensorflow_quietly.cache_clear()
  assert calls == [([], "GPU")]


@pytest.mark.parametrize("module,args,code", [
    # `--help` of every entry point: test_console_script_help_lists_its_own_flags.
    ("crate_mae_jax.main", ["--help"], 0),
    ("crate_mae_jax.main", ["--config=quickstart", "--workdir={tmp}/w",
                            "--config.model.mask_ratio=1.5"], 2),
    ("crate_mae_jax.main", ["--config=no_such_config", "--workdir={tmp}/w"], 2),
])
def test_help_lists_own_flags_and_imports_no_tensorflow(module, args, code, tmp_path):
  """`python -m MODULE --help` of every entry point exits 0 listing its own flags, with
  no traceback; neither it nor a config error imports TensorFlow."""
  # -X importtime lists every imported module on stderr, whatever way the process exits.
  args = [a.format(tmp=tmp_path) for a in args]
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  other = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
  assert proc.returncode == code, "\n".join(other)[-2000:]
  assert not [line for line in other if "Traceback" in line], "\n".join(other)[-2000:]
  if code == 0:
    _assert_lists_own_flag(proc.stdout, module)
  if module == "crate_mae_jax.main" and code == 0:
    _assert_lists_config_fields(proc.stdout)
  assert "crate_mae_jax.cli" in imported   # the probe works
  assert "tensorflow" not in imported and "tensorflow_datasets" not in imported
  if code == 2:
    assert len(other) == 1 and other[0].startswith("error:"), other


def test_tensorflow_is_imported_for_the_tf_pipeline_only_and_quietly(tmp_path):
  """The metric writer imports no TensorFlow (tensorboardX writes the event files of
  an in-memory run); where the tf.data pipeline has loaded it, CLU's writer is used,
  and the import prints none of TensorFlow's start-up lines."""
  pytest.importorskip("tensorflow")
  code = ("import sys\n"
          "from crate_mae_jax import cli\nfrom crate_mae_jax.training import summaries\n"
          "cli.quiet_startup()\n"
          "writer = summaries.create_writer(sys.argv[1] + '/memory', is_chief=True)\n"
          "assert 'tensorflow' not in sys.modules, 'the writer imported TF'\n"
          "assert type(writer).__name__ == '_TensorboardXWriter', type(writer)\n"
          "writer.write_scalars(0, {'x': 1.0}); writer.close()\n"
          "cli.tensorflow()  # as the tf.data pipeline does\n"
          "writer = summaries.create_writer(sys.argv[1] + '/tfdata', is_chief=True)\n"
          "assert type(writer).__name__ == 'AsyncMultiWriter', type(writer)\n"
          "writer.write_scalars(0, {'x': 1.0}); writer.close()\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "oneDNN" not in proc.stderr and "cpu_feature_guard" not in proc.stderr, proc.stderr
  for run in ("memory", "tfdata"):
    assert list((tmp_path / run).glob("events.out.tfevents.*")), run


def test_wheel_ships_configs_and_console_scripts(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                         "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0 and "No module named pip" in proc.stderr:
    pytest.skip("pip is not installed")
  assert proc.returncode == 0, proc.stderr[-2000:]
  wheel, = tmp_path.glob("crate_mae_jax-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
  for config in (ROOT / "configs").glob("*.py"):
    assert f"crate_mae_jax/configs/{config.name}" in names
  assert "crate_mae_jax/data/fashion_mnist_subset.npz" in names
  for module in (ROOT / "crate_mae_jax").rglob("*.py"):
    assert str(module.relative_to(ROOT)) in names, f"{module} is not in the wheel"
  for script in ("train", "analyze", "convert", "benchmark", "plan", "quickstart", "eval"):
    assert f"crate-mae-{script} = " in entry_points
