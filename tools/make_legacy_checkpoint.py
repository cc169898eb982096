"""Writes tests/fixtures/checkpoint_548c67d with the package as it was at commit 548c67d.

    git worktree add /tmp/legacy 548c67d
    JAX_PLATFORMS=cpu PYTHONPATH=/tmp/legacy:/tmp/legacy/tests python tools/make_legacy_checkpoint.py OUT
    # then copy OUT/{pretrain,linear_probe}/{checkpoints,config.json} into the fixture folder
"""
import os
import shutil
import sys
sys.path.insert(0, "/tmp/legacy"); sys.path.insert(0, "/tmp/legacy/tests")
import crate_mae_jax; assert crate_mae_jax.__file__.startswith("/tmp/legacy"), crate_mae_jax.__file__
from conftest import tiny_train_config
from crate_mae_jax import train
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
for task in ("pretrain", "linear_probe"):
  kw = dict(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2, keep_checkpoints=1,
            keep_best=False)
  if task == "linear_probe":
    kw["init_from"] = os.path.join(out, "pretrain")
  cfg = tiny_train_config(task, source="quickstart", **kw)
  cfg.model.update(width=16, depth=1, heads=2, decoder_depth=1)
  cfg.eval.diagnostics = False
  print(train.train_and_evaluate(cfg, os.path.join(out, task)))
