"""Sharding: one device, data parallel, FSDP and data × fsdp meshes train the same
model to the same numbers, and checkpoints move between meshes and device counts.

Emulated CPU devices (`--xla_force_host_platform_device_count`) must be set before
JAX starts, and the pytest session has already started it with one device, so every
check runs this file as a script in a subprocess with the device count it needs
(`python tests/test_sharding.py MODE OUT_DIR`); the tests compare what it writes.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import once_per_run

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TOL = 1e-5
pytestmark = pytest.mark.slow

# Meshes of the equivalence check: name -> ((axis, size), ...); "single" is one device.
LAYOUTS = {
    "single": (("data", 1), ("fsdp", 1), ("tensor", 1)),
    "data8": (("data", 8), ("fsdp", 1), ("tensor", 1)),
    "fsdp8": (("data", 1), ("fsdp", 8), ("tensor", 1)),
    "data2_fsdp4": (("data", 2), ("fsdp", 4), ("tensor", 1)),
    # Tensor parallelism alone, on the first 2 / 4 devices.
    "tensor2": (("data", 1), ("fsdp", 1), ("tensor", 2)),
    "tensor4": (("data", 1), ("fsdp", 1), ("tensor", 4)),
}
# Meshes whose lowered train step is inspected for activation constraints.
CONSTRAINED = {
    "data8": (("data", 8), ("fsdp", 1), ("tensor", 1)),
    "fsdp8": (("data", 1), ("fsdp", 8), ("tensor", 1)),
    "tensor2": (("data", 1), ("fsdp", 1), ("tensor", 2)),
    "mixed": (("data", 2), ("fsdp", 2), ("tensor", 2)),
}


# --------------------------------------------------------------------------- parent side

def device_env(num_devices: int) -> dict:
  """The environment of a CPU-only JAX subprocess with `num_devices` devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if num_devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  # Compiling dominates these runs on CPU; the least-optimised backend halves it
  # (all runs that are compared share the flag).
  flags.append("--xla_backend_optimization_level=0")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE.parent)] + (
      [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def run_scripts(jobs: list, timeout: float, log_dir: pathlib.Path):
  """Runs `python THIS_FILE args...` for each (args, env) job at the same time (XLA
  compiles on one core, so two jobs use both cores of a small machine); fails the
  test with the output of any job that fails or runs past `timeout` seconds."""
  procs = []
  for i, (args, env) in enumerate(jobs):
    cmd = [sys.executable, str(HERE), *map(str, args)]
    log = log_dir / f"{args[0]}_{i}.log"
    with open(log, "w") as f:
      procs.append((cmd, log, subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=f,
                                               stderr=subprocess.STDOUT)))
  deadline = time.monotonic() + timeout
  failures = []
  for cmd, log, proc in procs:
    try:
      code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      code = f"timeout after {timeout}s"
    if code != 0:
      failures.append(f"{' '.join(cmd)}: {code}\n{log.read_text(errors='replace')[-8000:]}")
  if failures:
    pytest.fail("\n\n".join(failures))


def assert_trees_close(a: dict, b: dict, tol: float = TOL, what: str = ""):
  assert sorted(a) == sorted(b), f"{what}: different parameter sets"
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol,
                               err_msg=f"{what}: {k} (largest difference {worst:.2e})")


def load_flat(path) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
  def compute(out):
    halves = (["single", "fsdp8", "tensor2"], ["data8", "data2_fsdp4", "tensor4"])
    run_scripts([(["equivalence", out, *names], device_env(8)) for names in halves],
                timeout=400, log_dir=out)
  out = once_per_run(tmp_path_factory, "equivalence", compute)
  facts = {"layouts": {}}
  for name in LAYOUTS:
    facts["layouts"][name] = json.loads((out / f"facts_{name}.json").read_text())
  facts["out"] = str(out)
  params = {name: load_flat(out / f"params_{name}.npz") for name in LAYOUTS}
  return facts, params


def test_all_meshes_reach_the_same_loss_and_parameters(equivalence):
  facts, params = equivalence
  assert all(f["device_count"] == 8 for f in facts["layouts"].values())
  ref_losses = facts["layouts"]["single"]["losses"]
  assert len(ref_losses) == 3 and all(np.isfinite(ref_losses))
  init = load_flat(pathlib.Path(facts["out"]) / "params_init.npz")
  moved = max(float(np.max(np.abs(params["single"][k] - init[k]))) for k in init)
  assert moved > 100 * TOL, "the steps barely changed the parameters: nothing is compared"
  for name in LAYOUTS:
    np.testing.assert_allclose(facts["layouts"][name]["losses"], ref_losses, rtol=TOL,
                               atol=TOL, err_msg=f"losses of mesh {name}")
    np.testing.assert_allclose(facts["layouts"][name]["grad_norms"],
                               facts["layouts"]["single"]["grad_norms"], rtol=1e-4,
                               err_msg=f"gradient norms of mesh {name}")
    assert_trees_close(params[name], params["single"], what=f"mesh {name} vs one device")


def test_fsdp_shards_parameters_and_adam_moments(equivalence):
  facts, _ = equivalence
  for name, fsdp in (("fsdp8", 8), ("data2_fsdp4", 4)):
    f = facts["layouts"][name]
    d = f["dictionary"]
    assert "fsdp" in d["spec"][0], (name, d)
    assert d["shard_shape"] == [64 // fsdp, 64], (name, d)
    assert d["num_distinct_shards"] == fsdp, (name, d)
    for moment in ("mu", "nu"):
      m = f["moments"][moment]
      assert "fsdp" in m["spec"][0], (name, moment, m)
      assert m["shard_shape"] == [64 // fsdp, 64], (name, moment, m)
    # Most of the model's parameter bytes live in one shard per fsdp device.
    assert f["param_bytes_per_device"] < f["param_bytes_total"] / (fsdp / 2), (name, f)
  for name in ("single", "data8"):
    d = facts["layouts"][name]["dictionary"]
    assert d["shard_shape"] == [64, 64] and d["num_distinct_shards"] == 1, (name, d)


def test_batch_is_split_over_the_data_axes(equivalence):
  facts, _ = equivalence
  for name, shards in (("single", 1), ("data8", 8), ("fsdp8", 8), ("data2_fsdp4", 8)):
    b = facts["layouts"][name]["batch"]
    assert b["num_distinct_shards"] == shards, (name, b)
    assert b["shard_shape"] == [16 // shards, 16, 16, 3], (name, b)
    if shards > 1:
      assert b["spec"][0] == ["data", "fsdp"], (name, b)


def test_tensor_parallelism_splits_the_activations(equivalence):
  """Same batch per device on 1, 2 and 4 tensor devices: the heads (attention
  logits and per-head projections) and the embedding of the ISTA/residual
  activations are split, so XLA's temporary bytes per device shrink."""
  facts, _ = equivalence
  temp = {n: facts["layouts"][n]["temp_bytes_per_device"] for n in
          ("single", "tensor2", "tensor4")}
  assert temp["tensor2"] < 0.75 * temp["single"], temp
  assert temp["tensor4"] < 0.75 * temp["tensor2"], temp
  # The 4 heads of the attention projections are split over the tensor devices.
  for name, tensor in (("single", 1), ("tensor2", 2), ("tensor4", 4)):
    assert facts["layouts"][name]["heads_per_device"] == 4 // tensor, (name, facts)


def test_activation_constraints_land_in_the_lowered_step(tmp_path):
  """Every `layers.constrain` becomes a sharding constraint of the lowered train
  step on the mesh axes the rules name (they were silently dropped before)."""
  run_scripts([(["constraints", tmp_path], device_env(8))], timeout=300, log_dir=tmp_path)
  facts = json.loads((tmp_path / "constraints.json").read_text())
  counts = {name: f["count"] for name, f in facts.items()}
  assert all(c > 0 for c in counts.values()), counts
  assert len(set(counts.values())) == 1, f"some constraints vanish on some meshes: {counts}"
  axes = {name: set(f["axes"]) for name, f in facts.items()}
  assert axes["data8"] == {"data"}, axes
  assert axes["fsdp8"] == {"fsdp"}, axes
  assert axes["tensor2"] == {"tensor"}, axes
  assert axes["mixed"] == {"data", "fsdp", "tensor"}, axes


def test_checkpoint_moves_between_meshes_and_device_counts(tmp_path):
  """Saved on 8 devices (fsdp=8) at step 4; resumed to step 6 on one device and on a
  data 2 × fsdp 4 mesh; both end where an uninterrupted 6-step one-device run ends."""
  saved, on_one, on_mesh, reference = (tmp_path / n for n in ("saved", "one", "mesh", "ref"))
  run_scripts([(["save_on_8", saved], device_env(8))], timeout=300, log_dir=tmp_path)
  shutil.copytree(saved, on_one)
  shutil.copytree(saved, on_mesh)
  # The two runs of the one-device job compile the same programs: share them.
  env = device_env(1)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  run_scripts([(["resume_on_1", on_one, reference], env),
               (["resume_on_2x4", on_mesh], device_env(8))], timeout=400, log_dir=tmp_path)

  saved_facts = json.loads((saved / "facts.json").read_text())
  assert saved_facts["results"]["step"] == 4 and saved_facts["steps_on_disk"] == [2, 4]
  assert saved_facts["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  ref = load_flat(reference / "final.npz")
  for workdir, mesh in ((on_one, {"data": 1, "fsdp": 1, "tensor": 1}),
                        (on_mesh, {"data": 2, "fsdp": 4, "tensor": 1})):
    facts = json.loads((workdir / "facts.json").read_text())
    assert facts["mesh"] == mesh
    assert facts["restored_step"] == 4, facts      # resumed, not restarted
    assert facts["results"]["step"] == 6 and facts["steps_on_disk"][-1] == 6, facts
    assert 0 < facts["results"]["loss"] < 10, facts
    assert_trees_close(load_flat(workdir / "final.npz"), ref,
                       what=f"resumed on {mesh} vs uninterrupted on one device")
  at4 = load_flat(saved / "final.npz")
  assert max(float(np.max(np.abs(at4[k] - ref[k]))) for k in ref) > 100 * TOL


# --------------------------------------------------------------------------- subprocess side

def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layout_facts(x) -> dict:
  spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
  return {"spec": spec, "shard_shape": list(x.addressable_shards[0].data.shape),
          "num_distinct_shards": len({str(s.index) for s in x.addressable_shards})}


def _equivalence(out: pathlib.Path, names: list):
  import jax
  from crate_mae_jax import config_lib, models, sharding
  from crate_mae_jax.training import optim, state_lib, steps

  c = config_lib.default_config()
  c.model.update(variant="tiny", width=64, depth=2, heads=4, patch_size=4, channels=3)
  c.batch_size = 16
  c.optim.update(lr=1e-3, warmup_epochs=0.0)
  model = models.build_mae(c.model)
  tx, lr = optim.create(c, None, 100, 10)
  init_inputs = (np.zeros((1, 16, 16, 3), np.float32),)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.standard_normal((16, 16, 16, 3)).astype(np.float32)}
             for _ in range(3)]
  for name in names:
    shape = LAYOUTS[name]
    devices = jax.devices()[:math.prod(size for _, size in shape)]
    mesh = sharding.create_mesh(shape, devices)
    rules = sharding.rules(c.mesh)
    state, shard = state_lib.init_state(model, tx, mesh, rules, init_inputs,
                                        dict(mask_ratio=0.75), jax.random.key(0))
    if name == "single":
      np.savez(out / "params_init.npz", **_flat(state.params))
    step = state_lib.jit_train_step(
        steps.make_pretrain_step(model, tx, 0.75, 1, schedule=lr), shard, mesh, rules)
    compiled = step.lower(state, sharding.global_batch(batches[0], mesh)).compile()
    losses, grad_norms = [], []
    for local in batches:
      batch = sharding.global_batch(local, mesh)
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
    dictionary = state.params["encoder"]["layer_0"]["ista"]["dictionary"]
    moments = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
      key = jax.tree_util.keystr(path)
      for moment in ("mu", "nu"):
        if f".{moment}" in key and "['encoder']['layer_0']['ista']['dictionary']" in key:
          moments[moment] = _layout_facts(leaf)
    leaves = jax.tree_util.tree_leaves(state.params)
    facts = {
        "device_count": jax.device_count(), "losses": losses, "grad_norms": grad_norms,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "dictionary": _layout_facts(dictionary), "moments": moments,
        "batch": _layout_facts(batch["image"]),
        "temp_bytes_per_device": int(compiled.memory_analysis().temp_size_in_bytes),
        "heads_per_device": _head_split(compiled.as_text()),
        "param_bytes_total": int(sum(x.nbytes for x in leaves)),
        "param_bytes_per_device": int(sum(x.addressable_shards[0].data.nbytes
                                          for x in leaves)),
    }
    np.savez(out / f"params_{name}.npz", **_flat(state.params))
    (out / f"facts_{name}.json").write_text(json.dumps(facts, indent=1))


def _head_split(hlo: str) -> int:
  """Heads per device of the decoder's per-head projections in the compiled step,
  f32[batch 16, tokens 17, heads, head_dim 16] (16 patches of 4 px + cls)."""
  import re
  found = {int(h) for h in re.findall(r"f32\[16,17,(\d+),16\]", hlo)}
  return found.pop() if len(found) == 1 else sorted(found)


def _constraints(out: pathlib.Path):
  """Lowers the train step on each CONSTRAINED mesh: how many sharding
  constraints it holds and which mesh axes they name."""
  import re
  import jax
  from crate_mae_jax import config_lib, models, sharding
  from crate_mae_jax.training import optim, state_lib, steps

  c = config_lib.default_config()
  c.model.update(variant="tiny", width=64, depth=2, heads=4, patch_size=4, channels=3)
  model = models.build_mae(c.model)
  tx, lr = optim.create(c, None, 100, 10)
  facts = {}
  for name, shape in CONSTRAINED.items():
    mesh = sharding.create_mesh(shape, jax.devices()[:math.prod(n for _, n in shape)])
    rules = sharding.rules(c.mesh)
    abstract, shard = state_lib.state_shardings(
        model, tx, mesh, rules, (np.zeros((1, 16, 16, 3), np.float32),), dict(mask_ratio=0.75))
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
    batch = {"image": jax.ShapeDtypeStruct((16, 16, 16, 3), np.float32,
                                           sharding=sharding.batch_sharding(mesh, 4))}
    step = state_lib.jit_train_step(steps.make_pretrain_step(model, tx, 0.75, 1, schedule=lr),
                                    shard, mesh, rules)
    lines = [l for l in step.lower(state, batch).as_text().splitlines()
             if "sharding_constraint" in l]
    axes = {a for l in lines for a in re.findall(r'"(\w+)"', l.split('<@', 1)[-1])}
    facts[name] = {"count": len(lines), "axes": sorted(axes)}
  (out / "constraints.json").write_text(json.dumps(facts, indent=1))


def _train(workdir: pathlib.Path, mesh_shape, num_train_steps: int) -> dict:
  """train_and_evaluate on the shipped Fashion-MNIST subset; records the resume step
  and the final params.

  Not mock TFDS: `tfds.testing.mock_data` swaps the file system functions of the whole
  process for a temporary one while a dataset is built, which can catch orbax's
  background checkpoint writes from the step before.
  """
  import jax
  from conftest import tiny_train_config
  from crate_mae_jax.training import checkpoints, train
  from crate_mae_jax import sharding

  cfg = tiny_train_config("pretrain", "quickstart", num_train_steps=num_train_steps)
  cfg.mesh.shape = mesh_shape
  cfg.batch_size = 16
  # A constant learning rate: the cosine schedule depends on num_train_steps, so a
  # 4-step run resumed to 6 would otherwise not follow a 6-step run.
  cfg.optim.update(lr=1e-3, min_lr=1e-3, warmup_epochs=0.0)
  cfg.eval.diagnostics = False
  cfg.eval_every_steps = 100
  ckpt_dir = workdir / "checkpoints"
  restored = checkpoints.latest_step(str(ckpt_dir)) if ckpt_dir.is_dir() else None
  results = train.train_and_evaluate(cfg, str(workdir))
  params, _ = checkpoints.restore_params(str(workdir))
  np.savez(workdir / "final.npz", **_flat(params))
  mesh = sharding.create_mesh(cfg.mesh.shape)
  facts = {"results": results, "restored_step": restored,
           "mesh": {k: int(v) for k, v in mesh.shape.items()},
           "device_count": jax.device_count(),
           "steps_on_disk": sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())}
  (workdir / "facts.json").write_text(json.dumps(facts, indent=1))
  return facts


def _main(argv):
  mode, out = argv[0], pathlib.Path(argv[1])
  import warnings
  warnings.filterwarnings("error", category=DeprecationWarning, module="crate_mae_jax")
  import jax
  if mode == "constraints":
    _constraints(out)
  elif mode == "equivalence":
    assert jax.device_count() == 8, jax.devices()
    _equivalence(out, argv[2:])
  elif mode == "save_on_8":
    assert jax.device_count() == 8, jax.devices()
    _train(out, (("data", 1), ("fsdp", 8), ("tensor", 1)), 4)
  elif mode == "resume_on_1":
    assert jax.device_count() == 1, jax.devices()
    _train(out, (("data", -1), ("fsdp", 1), ("tensor", 1)), 6)
    _train(pathlib.Path(argv[2]), (("data", -1), ("fsdp", 1), ("tensor", 1)), 6)
  elif mode == "resume_on_2x4":
    assert jax.device_count() == 8, jax.devices()
    _train(out, (("data", 2), ("fsdp", 4), ("tensor", 1)), 6)
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  _main(sys.argv[1:])
