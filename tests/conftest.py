"""Shared test setup: CPU only, the golden fixtures in tests/fixtures (see its README)."""
import os
import pathlib

import fcntl
import json
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The default ./test.sh run sets CRATE_MAE_JAX_TEST_SHARED_CACHE=1: one persistent
# compilation cache for the whole run, shared by the pytest-xdist workers and every
# process the tests start (the tiny models compile the same programs in test after
# test; a hit costs milliseconds, a train step's compile seconds). Never the user's
# cache; the process that makes the folder (pytest itself, before its workers start)
# removes it at the end. No size limit: the eviction scan a limit turns on made every
# later write of the run fail once one entry had lost its atime file (seen in our runs).
# Otherwise (./test.sh --full, CI) tests compile without a persistent cache.
_TEST_CACHE_ENV = "CRATE_MAE_JAX_TEST_CACHE"
_MADE_TEST_CACHE = False
if os.environ.get("CRATE_MAE_JAX_TEST_SHARED_CACHE") == "1":
  if _TEST_CACHE_ENV not in os.environ:
    os.environ[_TEST_CACHE_ENV] = tempfile.mkdtemp(prefix="crate-mae-jax-test-cache-")
    _MADE_TEST_CACHE = True
  os.environ.setdefault("CRATE_MAE_JAX_COMPILATION_CACHE", os.environ[_TEST_CACHE_ENV])
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_TEST_CACHE_ENV])
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
else:
  os.environ.setdefault("CRATE_MAE_JAX_COMPILATION_CACHE", "off")

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _MADE_TEST_CACHE:
    shutil.rmtree(os.environ[_TEST_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def official_tiny():
  path = FIXTURES / "crate_mae_official_tiny.npz"
  if not path.exists():
    pytest.fail(f"golden fixture missing: {path}")
  return dict(np.load(path))


@pytest.fixture(scope="session")
def official_tiny_pth():
  return FIXTURES / "crate_mae_official_tiny.pth"


# The quick start at a tiny size, run as `python -c TINY_QUICKSTART_SCRIPT WORKDIR`.
TINY_QUICKSTART_SCRIPT = """
import sys
from crate_mae_jax import recipes
from crate_mae_jax.tools import quickstart
full = recipes.quickstart
def tiny(task="pretrain"):
  c = full(task)
  c.model.update(width=32, depth=1, decoder_depth=1, heads=2)
  c.update(num_train_steps=3, batch_size=16, log_every_steps=3, checkpoint_every_steps=3)
  return c
recipes.quickstart = tiny
sys.argv = ["quickstart", "--workdir=" + sys.argv[1]]
quickstart.run()
"""


def tiny_train_config(task: str = "pretrain", source: str = "tfds", **overrides):
  """A seconds-sized config: 32 px (28 for Fashion-MNIST), patch 4, width 32."""
  from crate_mae_jax import recipes
  c = recipes.quickstart(task)
  c.model.update(width=32, depth=2, heads=2, decoder_depth=2, norm_pix_loss=False)
  if source == "tfds":
    c.data.update(source="tfds", name="cifar10", image_size=32, in_memory=False,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train_split="train",
                  eval_split="test", shuffle_buffer=64)
    c.model.channels = 3
    # tfds.testing.mock_data swaps the file system while a dataset is built; a
    # background checkpoint write at that moment would see a fake one.
    c.checkpoint_async = False
  else:
    c.data.source = source
  c.batch_size = 8
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.eval.max_batches = 1
  c.eval.num_images = 2
  c.optim.warmup_epochs = 0.0
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def once_per_run(tmp_path_factory, name: str, compute) -> pathlib.Path:
  """`compute(out_dir)` once per test run, even when pytest-xdist spreads this
  module's tests over several workers (each would otherwise run the module fixture);
  the others wait for it and share its folder, its skip or its failure."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not uid:
    out = tmp_path_factory.mktemp(name)
    compute(out)
    return out
  out = tmp_path_factory.getbasetemp().parent / f"{name}-{uid}"
  with open(f"{out}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    outcome = pathlib.Path(f"{out}.outcome.json")
    if not outcome.exists():
      out.mkdir(exist_ok=True)
      result = {"kind": "ok", "message": ""}
      try:
        compute(out)
      except pytest.skip.Exception as e:
        result = {"kind": "skip", "message": str(e)}
      except BaseException as e:  # pylint: disable=broad-except
        result = {"kind": "fail", "message": f"{type(e).__name__}: {e}"}
      outcome.write_text(json.dumps(result))
    result = json.loads(outcome.read_text())
  if result["kind"] == "skip":
    pytest.skip(result["message"])
  if result["kind"] == "fail":
    pytest.fail(result["message"], pytrace=False)
  return out
