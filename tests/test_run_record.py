"""A run records itself: resolved config, command, versions, devices and mesh in the
workdir; hparams and event files for TensorBoard, with or without TensorFlow."""
import glob
import json
import os
import sys

import ml_collections
import pytest

from conftest import tiny_train_config
from crate_mae_jax.training import run_record, summaries, train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("recorded")
  cfg = tiny_train_config("pretrain", source="quickstart")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


def test_workdir_holds_config_command_versions_devices_and_mesh(finished):
  workdir, cfg = finished
  config = ml_collections.ConfigDict(json.load(open(workdir / "config.json")))
  assert config.model.width == cfg.model.width == 32 and config.task == "pretrain"
  info = json.load(open(workdir / "run.json"))
  assert info["command"] == sys.argv
  assert info["packages"]["jax"] and info["packages"]["flax"]
  assert info["devices"]["device_count"] >= 1 and info["devices"]["backend"] == "cpu"
  assert info["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} or sum(info["mesh"].values())
  assert info["git"] is None or len(info["git"]["commit"]) == 40
  # the kernels 'auto' resolved to on this backend (CPU: the exact paths)
  assert info["kernels"] == {"attention": "xla", "layernorm": "flax"}
  assert len(open(workdir / "runs.jsonl").read().splitlines()) == 1


def test_hparams_are_flat_scalars():
  cfg = tiny_train_config("pretrain", source="quickstart")
  flat = run_record.hparams(cfg)
  assert flat["model.width"] == 32 and flat["optim.base_lr"] == cfg.optim.base_lr
  assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_git_commit_outside_a_checkout_is_none(tmp_path):
  assert run_record.git_commit(str(tmp_path)) is None


def test_tensorboard_gets_hparams_and_scalars(finished):
  """The run's event files (tensorboardX: the in-memory source loads no TensorFlow)
  hold the train and eval scalars and the hparams plugin data."""
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_file_loader
  workdir, _ = finished
  files = glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
  tags = set()
  for path in files:
    for event in event_file_loader.EventFileLoader(path).Load():
      tags.update(v.tag for v in event.summary.value)
  assert "train/loss" in tags and "eval/loss" in tags, sorted(tags)
  assert any(t.startswith("_hparams_/") for t in tags), sorted(tags)


def test_without_tensorflow_event_files_are_still_written(tmp_path, monkeypatch):
  pytest.importorskip("tensorboardX")
  import clu
  # `from clu import metric_writers` fails, as it does without TensorFlow
  monkeypatch.setitem(sys.modules, "clu.metric_writers", None)
  monkeypatch.delattr(clu, "metric_writers", raising=False)
  writer = summaries.create_writer(str(tmp_path), is_chief=True)
  assert type(writer).__name__ == "_TensorboardXWriter"
  writer.write_hparams({"model.width": 32, "optim.name": "adamw"})
  writer.write_scalars(3, {"train/loss": 1.5})
  writer.write_images(3, {"reconstruction": __import__("numpy").zeros((1, 8, 8, 3), "uint8")})
  writer.flush()
  writer.close()
  files = glob.glob(os.path.join(tmp_path, "**", "events.out.tfevents.*"), recursive=True)
  assert files
  from tensorboard.backend.event_processing import event_file_loader
  tags = set()
  for path in files:
    for event in event_file_loader.EventFileLoader(path).Load():
      tags.update(v.tag for v in event.summary.value)
  assert {"train/loss", "reconstruction"} <= tags
  assert any("hparams" in t for t in tags)


def test_records_hold_only_the_fields_that_apply(finished):
  """A CRATE-MAE run on a registered dataset: no ViT-MAE-only field, no TFDS name."""
  workdir, cfg = finished
  saved = json.load(open(workdir / "config.json"))
  assert "encoder_sees" not in saved["model"] and "mlp_ratio" not in saved["model"]
  assert saved["model"]["ista_step"] == cfg.model.ista_step
  assert "name" not in saved["data"] and saved["data"]["source"] == "quickstart"
  assert "probe" not in saved and "finetune" not in saved and "init_from" not in saved
  flat = run_record.hparams(cfg)
  assert "model.encoder_sees" not in flat and "data.name" not in flat
  vit = cfg.copy_and_resolve_references()
  vit.model.arch, vit.task, vit.data.source = "vit_mae", "linear_probe", "tfds"
  shown = run_record.applying(vit)
  assert shown.model.encoder_sees == "visible" and "ista_step" not in shown.model
  assert shown.data.name == cfg.data.name and shown.probe.pool == cfg.probe.pool
  assert cfg.model.encoder_sees == "visible"  # the config itself keeps every field
  # a field that does not apply but was set stays visible (config_lib warns about it)
  vit.data.source, vit.data.name = "quickstart", "cifar10"
  assert run_record.applying(vit).data.name == "cifar10"


def test_parameter_table_goes_to_params_txt_not_the_console(finished):
  workdir, _ = finished
  table = (workdir / "params.txt").read_text()
  assert "encoder" in table and "Total" in table


class _Scalars:
  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars):
    self.written.append((step, dict(scalars)))


@pytest.fixture
def absl_info():
  """absl at INFO for the test (another test in the same process may have lowered it)."""
  from absl import logging as absl_logging
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  yield
  absl_logging.set_verbosity(level)


def test_progress_line_has_eta_in_seconds_throughput_and_the_run_rate(caplog, absl_info):
  """Per-device img/s, TFLOP/s and MFU (a chip of the planner's table); the last line
  gives the whole run's rate, not the last interval's."""
  import logging
  from crate_mae_jax import chips
  clock = iter([0.0, 10.0, 20.0, 25.0]).__next__  # the time at steps 1, 41, 81, 100
  writer = _Scalars()
  progress = summaries.Progress(100, writer, every_secs=5.0, flops_per_step=1e13,
                                global_batch=512, num_devices=4, device_kind="TPU v5 lite",
                                clock=clock)
  with caplog.at_level(logging.INFO):
    for step in (1, 41, 81, 100):
      progress(step)
  lines = [r.getMessage() for r in caplog.records]
  # 40 steps in 10 s: 4 steps/s, 512 img/s and 10 TFLOP/s per device; 59 steps to go.
  assert "step 41/100 (41.0%): 4.00 steps/s, 512 img/s per device, 10 TFLOP/s per device, " \
         f"MFU {100 * 1e13 / chips.CHIPS['TPU v5 lite'].peak_flops:.1f}%, ETA 15s" in lines
  step, scalars = writer.written[0]
  assert step == 41 and scalars["perf/img_per_sec_per_device"] == 512.0
  assert scalars["perf/mfu"] == 1e13 / chips.CHIPS["TPU v5 lite"].peak_flops
  # the last interval ran at 3.8 steps/s; the run (steps 1-100 in 25 s) at 3.96
  assert writer.written[-1][1]["steps_per_sec"] == 19 / 5
  assert "step 100/100: trained steps 1-100 in 25s, 3.96 steps/s, 507 img/s per device" \
      in lines[-1], lines


def test_unknown_chip_has_no_mfu_and_says_so_once(caplog, absl_info):
  import logging
  clock = iter([0.0, 10.0, 20.0]).__next__
  progress = summaries.Progress(50, _Scalars(), every_secs=5.0, flops_per_step=1e9,
                                global_batch=8, num_devices=1, device_kind="cpu", clock=clock)
  with caplog.at_level(logging.INFO):
    for step in (1, 11, 21):
      progress(step)
  lines = [r.getMessage() for r in caplog.records]
  assert sum("MFU not shown" in l and "'cpu'" in l for l in lines) == 1
  assert not any("MFU " in l for l in lines if l.startswith("step "))
  assert summaries.duration(192) == "3m12s" and summaries.duration(3725) == "1h02m"


def test_model_flops_per_step_is_the_benchmark_formula():
  from crate_mae_jax import models
  from crate_mae_jax.tools import benchmark
  cfg = tiny_train_config("pretrain", source="quickstart")
  r = models.resolve(cfg.model)
  fwd = benchmark.forward_flops(r, cfg.data.image_size, r["mask_ratio"], cfg.batch_size)
  assert summaries.model_flops_per_step(cfg, r) == 3 * fwd * cfg.batch_size
  assert summaries.model_flops_per_step(tiny_train_config("linear_probe"), r) is None
