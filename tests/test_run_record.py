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
  """With TensorFlow: CLU's writer; the event files hold the hparams plugin data."""
  pytest.importorskip("tensorflow")
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = finished
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  tags = acc.Tags()["tensors"]
  assert "train/loss" in tags and "eval/loss" in tags
  assert "_hparams_/session_start_info" in tags


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
