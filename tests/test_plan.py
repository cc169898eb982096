"""The pod planner: the real train step compiled for a small Cloud TPU topology
(libtpu, no TPU needed), and its report checked against arithmetic."""
import json
import os
import subprocess
import sys
import pathlib
import re

import pytest

from crate_mae_jax.tools import plan
from crate_mae_jax import recipes, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _libtpu_missing() -> str | None:
  try:
    import libtpu  # noqa: F401  (the TPU compiler the planner needs)
  except ImportError:
    return "libtpu is not installed: pip install 'crate-mae-jax[tpu]' (jax[tpu]==jax)"
  return None


needs_libtpu = pytest.mark.skipif(_libtpu_missing() is not None,
                                  reason=str(_libtpu_missing()))


def small_config():
  c = recipes.pretrain_imagenet("tiny")
  c.model.update(width=64, depth=1, heads=4, decoder_depth=1)
  c.data.image_size = 32
  c.batch_size = 32
  return c


@pytest.fixture(scope="module")
def plans():
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other planners may run
  config = plan.for_tpu(small_config())
  devices = plan.topology_devices("v5e:2x2")
  return {name: plan.plan_one(config, "v5e:2x2", devices, sharding.parse_mesh(mesh, 4))
          for name, mesh in (("data", "data=4"), ("fsdp", "fsdp=4"))}


@needs_libtpu
def test_report_matches_the_arithmetic(plans):
  data, fsdp = plans["data"], plans["fsdp"]
  total = data.param_bytes_total
  # float32 parameters: 4 bytes each, whole on every chip of a data-parallel mesh.
  assert data.param_bytes_per_chip == total
  # FSDP over 4 chips: a quarter each (norm scales and biases of odd size stay whole).
  assert total / 4 <= fsdp.param_bytes_per_chip <= 1.05 * total / 4, fsdp
  # Adam keeps two moments of every parameter (plus a step count).
  for p in (data, fsdp):
    assert 2 * p.param_bytes_per_chip <= p.opt_state_bytes_per_chip <= \
        2 * p.param_bytes_per_chip + 64, p
    assert p.peak_bytes_per_chip >= p.param_bytes_per_chip + p.opt_state_bytes_per_chip
    assert p.chip == "TPU v5 lite" and p.hbm_bytes_per_chip == 16 * plan.GiB
    assert p.fits and p.advice is None
    assert p.step_seconds > 0 and p.flops_per_chip > 0
    assert p.images_per_second == pytest.approx(32 / p.step_seconds)
    assert p.mfu == pytest.approx(p.flops_per_chip / p.step_seconds / 197e12)
  # Data parallel all-reduces every gradient once; the bfloat16 matmuls' weight
  # gradients travel in bfloat16 (2 of the parameter's 4 bytes).
  assert total / 2 <= data.collectives["all-reduce"]["bytes"] <= 1.1 * total
  assert "all-gather" not in data.collectives
  assert data.mosaic_kernels == 0 and data.bytes_accessed_per_chip > 0
  # FSDP gathers the parameters (at least once, forward) instead.
  assert fsdp.collectives["all-gather"]["bytes"] >= total / 2


@pytest.mark.slow
@needs_libtpu
def test_splash_attention_compiles_into_the_train_step_per_shard():
  """`--config.model.attention_impl=splash`: the Pallas TPU kernel in the real
  train step, per device under data and data × tensor meshes (no activation
  gathered for it), and the report says XLA's numbers leave it out."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = small_config()
  config.model.attention_impl = "splash"
  config = plan.for_tpu(config)
  assert config.model.attention_impl == "splash"
  devices = plan.topology_devices("v5e:2x2")
  data = plan.plan_one(config, "v5e:2x2", devices, sharding.parse_mesh("data=4", 4))
  tensor = plan.plan_one(config, "v5e:2x2", devices, sharding.parse_mesh("data=2,tensor=2", 4))
  for p in (data, tensor):
    # Encoder and decoder layer: forward, dq and dkv kernels each.
    assert p.mosaic_kernels >= 6, p
    assert p.fits and p.flops_per_chip > 0
  assert "all-gather" not in data.collectives
  assert "Pallas kernel calls" in plan.format_plan(data)


def test_advice_names_the_smallest_change():
  base = dict(topology="v5e:2x2", chip="TPU v5 lite", num_chips=4, global_batch=64,
              param_bytes_total=8 * plan.GiB, collectives={}, step_seconds=1.0,
              step_time_source="test", images_per_second=64.0, flops_per_chip=1.0, mfu=0.1,
              hbm_bytes_per_chip=16 * plan.GiB, fits=False)
  config = small_config()
  config.batch_size = 64
  # The state fits easily; activations need about 3x the room left -> accum 4.
  tight = plan.Plan(mesh={"data": 4, "fsdp": 1, "tensor": 1}, param_bytes_per_chip=plan.GiB,
                    opt_state_bytes_per_chip=2 * plan.GiB, activation_bytes_per_chip=36 * plan.GiB,
                    peak_bytes_per_chip=39 * plan.GiB, **base)
  line = plan.advice(tight, config)
  assert "--config.accum_steps=4" in line and "--config.batch_size=16" in line, line
  # Parameters + Adam moments alone exceed half the chip: shard them.
  big = plan.Plan(mesh={"data": 4, "fsdp": 1, "tensor": 1}, param_bytes_per_chip=8 * plan.GiB,
                  opt_state_bytes_per_chip=16 * plan.GiB, activation_bytes_per_chip=plan.GiB,
                  peak_bytes_per_chip=25 * plan.GiB, **base)
  assert "fsdp=4" in plan.advice(big, config), plan.advice(big, config)


def test_mesh_flags_and_candidates():
  assert sharding.parse_mesh("data=2,fsdp=4", 8) == (("data", 2), ("fsdp", 4), ("tensor", 1))
  with pytest.raises(plan.ConfigError, match="--mesh"):
    sharding.parse_mesh("model=8", 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.parse_mesh("data=4", 8)
  shapes = plan.candidate_meshes(64, 4096)
  assert shapes[0] == (("data", 64), ("fsdp", 1), ("tensor", 1))
  assert (("data", 1), ("fsdp", 64), ("tensor", 1)) in shapes
  assert (("data", 8), ("fsdp", 8), ("tensor", 1)) in shapes
  assert (("data", 16), ("fsdp", 1), ("tensor", 4)) in shapes
  # A batch that does not split over 64 data shards rules out the pure layouts.
  assert all(d * f <= 16 for (_, d), (_, f), _ in plan.candidate_meshes(64, 16))


def test_cli_refuses_a_bad_mesh_in_one_line():
  out = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.tools.plan", "--config=configs/tiny.py",
       "--topology=v5e:2x2", "--mesh=rows=4"], cwd=ROOT, capture_output=True, text=True,
      timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--mesh" in errors[0], out.stderr[-2000:]


@pytest.mark.parametrize("args,names", [
    (["--topology=v5e:2x2", "--mesh=data=-1,fsdp=-1"], "at most one -1"),
    (["--topology=v5e:2x2", "--mesh=data=4", "--json=/nonexistent/dir/plan.json"],
     "does not exist or is not writable"),
    (["--topology=v5e:2x2", "--mesh=data=4", "--config.batch_size=6"],
     "does not split over the 4 batch shards"),
    (["--topology=nonsense"], "name a Cloud TPU topology"),
])
def test_cli_refuses_bad_planner_inputs_before_compiling(args, names):
  """Hostile planner inputs: one line naming the input and the fix, exit 2, no
  compile (the timeout is far below one compile of the step)."""
  if not any(a.startswith("--json") for a in args) and _libtpu_missing():
    pytest.skip(_libtpu_missing())   # the others are known once the topology is
  out = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.tools.plan", "--config=configs/tiny.py", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and names in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_mesh_shape_takes_at_most_one_free_axis():
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape((("data", -1), ("fsdp", -1)), 8)
  with pytest.raises(ValueError, match="must be positive"):
    sharding.mesh_shape((("data", 0), ("fsdp", 8)), 8)
  assert sharding.mesh_shape((("data", -1), ("fsdp", 2)), 8) == (("data", "fsdp"), (4, 2))


def _report(mesh, peak, seconds, accum=1, topology="v5e:2x2", model=None):
  p = plan.Plan(topology=topology, chip="TPU v5 lite", num_chips=4, mesh=mesh, global_batch=64,
                param_bytes_total=plan.GiB, param_bytes_per_chip=plan.GiB,
                opt_state_bytes_per_chip=2 * plan.GiB, activation_bytes_per_chip=plan.GiB,
                peak_bytes_per_chip=peak, hbm_bytes_per_chip=16 * plan.GiB,
                fits=peak <= plan.HBM_USABLE * 16 * plan.GiB, collectives={},
                step_seconds=seconds, step_time_source="test",
                images_per_second=64 / seconds, flops_per_chip=1.0, mfu=0.1,
                accum_steps=accum).to_json()
  return {"topology": topology, "model": model or {"arch": "crate_mae"}, "plans": [p],
          "recommended": p if p["fits"] else None}


def test_merge_recommends_over_separately_compiled_layouts(tmp_path):
  data = _report({"data": 4, "fsdp": 1, "tensor": 1}, 20 * plan.GiB, 1.0)  # too big
  fsdp = _report({"data": 1, "fsdp": 4, "tensor": 1}, 10 * plan.GiB, 2.0)
  accum = _report({"data": 4, "fsdp": 1, "tensor": 1}, 12 * plan.GiB, 1.5, accum=2)
  old = dict(data)  # a report written before plans recorded accum_steps
  old["plans"] = [{k: v for k, v in data["plans"][0].items() if k != "accum_steps"}]
  merged = plan.merge_reports([old, fsdp, accum])
  assert len(merged["plans"]) == 3 and merged["plans"][0]["accum_steps"] == 1
  # The fastest that fits: data parallel in two micro-batches, not the faster one that doesn't fit.
  assert merged["recommended"]["accum_steps"] == 2
  assert merged["recommended"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert plan.merge_reports([data])["recommended"] is None
  with pytest.raises(plan.ConfigError, match="differ in topology"):
    plan.merge_reports([data, _report({"data": 4}, plan.GiB, 1.0, topology="v4:2x2x1")])
  # A field one report lacks (written before it existed) is no difference; a value is.
  newer = _report({"data": 4}, plan.GiB, 1.0, model={"arch": "crate_mae", "norm_impl": "flax"})
  assert len(plan.merge_reports([data, newer])["plans"]) == 2
  with pytest.raises(plan.ConfigError, match="differ in model.arch"):
    plan.merge_reports([data, _report({"data": 4}, plan.GiB, 1.0, model={"arch": "vit_mae"})])
  # The command line: files in, one merged JSON out, exit 0 when one fits.
  paths = []
  for i, r in enumerate((data, fsdp)):
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(r))
  out = subprocess.run(
      [sys.executable, "-m", "crate_mae_jax.tools.plan", "--merge=" + ",".join(map(str, paths)),
       f"--json={tmp_path / 'merged.json'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "recommended: fsdp=4" in out.stdout, out.stdout
  merged = json.loads((tmp_path / "merged.json").read_text())
  assert merged["recommended"]["mesh"]["fsdp"] == 4 and len(merged["plans"]) == 2


def test_pod_table_prints_only_the_reports_numbers():
  import importlib.util
  spec = importlib.util.spec_from_file_location("pod_table", ROOT / "tools" / "pod_table.py")
  pod_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pod_table)
  fsdp = _report({"data": 1, "fsdp": 4, "tensor": 1}, 10 * plan.GiB, 0.5)
  accum = _report({"data": 4, "fsdp": 1, "tensor": 1}, 12 * plan.GiB, 0.25, accum=2)
  row = pod_table.row("CRATE-MAE-Base", "v5e:2x2", "v5e-4", plan.merge_reports([fsdp, accum]))
  assert "**data 4, accum 2**" in row and "12.00 of 16" in row and "| 256 |" in row, row
  assert "searched: 2 layouts (fsdp 4; data 4, accum 2)" in row and "| 250.0 |" in row, row
  big = _report({"data": 4, "fsdp": 1, "tensor": 1}, 20 * plan.GiB, 1.0)
  assert "none fits (least: data 4, 20.00 of 16 GiB)" in pod_table.row("x", "t", "a", big)
  assert "not compiled" in pod_table.row("x", "t", "a", None)


def test_hbm_oom_message_is_parsed():
  msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
         "of memory in memory space hbm. Used 15.29G of 15.25G hbm. Exceeded hbm capacity by 45.38M.")
  assert plan.hbm_oom_bytes(msg) == int(15.29 * plan.GiB)
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (65.36G) exceeds available HBM (15.75G).")
  assert plan.hbm_oom_bytes(msg) == int(65.36 * plan.GiB)
  assert plan.hbm_oom_bytes("INTERNAL: something else") is None


@needs_libtpu
def test_a_layout_xla_cannot_fit_is_a_plan_with_advice():
  # Its input batch alone (32,768 images of 224 px per chip) outgrows a v5e chip's 16 GiB:
  # XLA:TPU refuses to compile it; the planner reports that layout instead of failing.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = small_config()
  config.data.image_size = 224
  config.model.patch_size = 32
  config.batch_size = 4 * 32768
  report = plan.plan(config, "v5e:2x2", "data=4", log=lambda _: None)
  p = report["plans"][0]
  assert report["recommended"] is None and not p["fits"]
  assert p["peak_bytes_per_chip"] > 15 * plan.GiB and p["step_seconds"] is None
  assert p["step_time_source"].startswith("not compiled: XLA:TPU ran out of HBM")
  assert "--config.accum_steps=" in p["advice"], p["advice"]
  text = plan.format_plan(plan.Plan(**p))
  assert "does NOT fit" in text and "ran out of HBM" in text and "collectives" not in text, text


def test_layout_search_prints_a_line_per_layout_with_an_eta(monkeypatch):
  """Without --mesh: one line per compiled layout (layout, compile time, fits or not,
  what is left and its ETA), then its report; plans come back in the layouts' order,
  compiled one at a time or in threads."""
  shapes = [(("data", d), ("fsdp", f), ("tensor", 1)) for d, f in ((4, 1), (1, 4), (2, 2))]
  peaks = {4: 2, 1: 20, 2: 3}  # GiB by data size: fsdp=4 does not fit in 16 GiB

  def fake_plan_one(config, topology, devices, shape, num_train_examples, resolved):
    mesh = dict(shape)
    return plan.Plan(**_report(mesh, peaks[mesh["data"]] * plan.GiB, 0.1)["plans"][0])

  monkeypatch.setattr(plan, "plan_one", fake_plan_one)
  for workers in (1, 2):
    lines = []
    plans = plan.search(None, "v5e:2x2", None, shapes, 0, None, log=lines.append,
                        workers=workers)
    assert [p.mesh for p in plans] == [dict(s) for s in shapes]
    assert lines[0] == f"compiling 3 layouts for v5e:2x2 ({workers} at a time; --mesh=... " \
                       "compiles one)"
    progress = [l for l in lines if l.startswith("layout ")]
    assert [l.split(" ")[1] for l in progress] == ["1/3", "2/3", "3/3"], progress
    assert all(re.search(r"compiled in \d+s, ", l) for l in progress), progress
    assert any("fsdp=4: compiled in" in l and "does NOT fit (peak 20.0 of 16.0 GiB)" in l
               for l in progress), progress
    assert re.search(r"; 2 left, ETA \d+s$", progress[0]) and "left" not in progress[-1]
    assert len(lines) == 1 + 2 * len(shapes)  # each line followed by its report
  one = []
  plan.search(None, "v5e:2x2", None, shapes[:1], 0, None, log=one.append)
  assert len(one) == 1 and one[0].startswith("v5e:2x2")  # --mesh: the report alone
