"""Resume semantics (a run resumed with other settings says what changes;
extending a finished run continues from its last step) and links in a workdir
(replaced, never written through)."""
import logging

import pytest

from conftest import tiny_train_config

from crate_mae_jax.training import train


def test_resume_changes_names_each_field_and_a_finished_run():
  config = tiny_train_config("pretrain", source="quickstart", batch_size=16, seed=3)
  saved = {"batch_size": 8, "seed": 3, "num_train_steps": 4, "num_epochs": 1.0,
           "optim": {"base_lr": config.optim.base_lr, "lr": None},
           "model": {"mask_ratio": config.model.mask_ratio}}
  lines = train.resume_changes(config, saved, step=2, total_steps=4)
  assert len(lines) == 1 and "batch_size=8" in lines[0] and "batch_size=16" in lines[0]
  assert "from step 2 on" in lines[0]
  lines = train.resume_changes(config, {**saved, "batch_size": 16}, step=4, total_steps=4)
  assert len(lines) == 1 and "nothing to train" in lines[0]
  assert "--config.num_train_steps" in lines[0]
  assert train.resume_changes(config, None, step=4, total_steps=4) == []


@pytest.mark.slow
def test_resumed_runs_warn_and_extend(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  first = tiny_train_config("pretrain", source="quickstart", num_train_steps=4)
  assert train.train_and_evaluate(first, workdir)["step"] == 4

  caplog.set_level(logging.WARNING)
  again = tiny_train_config("pretrain", source="quickstart", num_train_steps=4, seed=7)
  assert train.train_and_evaluate(again, workdir)["step"] == 4
  text = caplog.text
  assert "written with seed=0, with seed=7" in text
  assert "nothing to train" in text

  caplog.clear()
  longer = tiny_train_config("pretrain", source="quickstart", num_train_steps=6)
  assert train.train_and_evaluate(longer, workdir)["step"] == 6
  assert "written with num_train_steps=4, with num_train_steps=6" in caplog.text
  assert "nothing to train" not in caplog.text


@pytest.mark.slow
def test_links_in_a_workdir_are_replaced_never_written_through(tmp_path):
  """A workdir whose record files are symbolic links to files elsewhere (a
  hostile or careless copy): the run writes its own files in their place and
  leaves the targets as they were; a link as the lock file is refused."""
  import os
  import pytest
  from crate_mae_jax.training import workdir_lock
  workdir = tmp_path / "run"
  workdir.mkdir()
  outside = {}
  for name in ("results.json", "config.json", "run.json", "runs.jsonl"):
    target = tmp_path / f"precious_{name}"
    target.write_text(f"do not touch {name}\n")
    os.symlink(target, workdir / name)
    outside[name] = target
  config = tiny_train_config("pretrain", source="quickstart", num_train_steps=2)
  assert train.train_and_evaluate(config, str(workdir))["step"] == 2
  for name, target in outside.items():
    assert target.read_text() == f"do not touch {name}\n"
    assert not os.path.islink(workdir / name) and (workdir / name).stat().st_size > 0
  assert "do not touch" not in (workdir / "runs.jsonl").read_text()

  linked = tmp_path / "linked"
  linked.mkdir()
  (tmp_path / "precious_lock").write_text("keep\n")
  os.symlink(tmp_path / "precious_lock", linked / ".lock")
  with pytest.raises(workdir_lock.WorkdirBusyError, match="symbolic link"):
    workdir_lock.acquire(str(linked))
  assert (tmp_path / "precious_lock").read_text() == "keep\n"
