"""Pod planner: the real train step compiled for a Cloud TPU topology, on any host.

    python -m crate_mae_jax.tools.plan --config=configs/base.py --topology=v5p:4x4x4 \
        [--mesh=data=8,fsdp=8] [--json=OUT.json] [--config.batch_size=...]

libtpu (`pip install crate-mae-jax[tpu]`) describes the chips of a topology
without any TPU attached (`jax.experimental.topologies`); the train step that
`train.py` runs, with its optimizer state and shardings, is lowered against a
mesh of those chips and compiled ahead of time. The report gives, per chip:
parameter, optimizer-state and activation bytes, peak memory against the
chip's HBM, the collectives of the program and their bytes, XLA's estimated
step time, the img/s of the global batch and the FLOP utilisation that implies.
Every number is XLA's compile-time estimate, not a measurement on hardware.

Without --mesh a few data × fsdp (× tensor) layouts are compiled and the
fastest that fits is recommended. A config that fits none gets one line with
the smallest change that would fit. Layouts compiled one `--mesh` run at a
time (each result then survives on its own) are joined, and the recommendation
made over all of them, by `--merge=a.json,b.json --json=cell.json`.
"""
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from crate_mae_jax import config_lib, models, sharding
from crate_mae_jax.errors import ConfigError
from crate_mae_jax.chips import CHIPS, GiB, Chip  # noqa: F401  (plan.Chip, plan.GiB: its API)
from crate_mae_jax.training import setup as setup_lib, tasks

# Training on ImageNet-1k unless told otherwise (only the LR schedule uses it).
IMAGENET_TRAIN_EXAMPLES = 1_281_167
# What a chip's HBM may be planned up to: XLA and the runtime keep some for themselves.
HBM_USABLE = 0.95

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(?P<shape>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES) +
                 r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def topology_devices(name: str):
  """The chips of a TPU topology such as 'v5p:4x4x4' (needs libtpu, no TPU)."""
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # libtpu missing, or a topology it does not know
    hint = ("install the TPU extra: pip install 'crate-mae-jax[tpu]'"
            if importlib.util.find_spec("libtpu") is None else
            "name a Cloud TPU topology such as v5p:4x4x4, v5e:16x16, v4:2x2x4")
    raise ConfigError(f"--topology={name!r}: {' '.join(str(e).split())[:300]} ({hint})") from e


def candidate_meshes(num_devices: int, batch: int) -> list[tuple[tuple[str, int], ...]]:
  """Layouts worth compiling: pure data, pure FSDP, FSDP within groups of 8
  (a host's chips) and data × tensor 4; only those whose batch axes divide
  the batch."""
  out = []
  for fsdp, tensor in ((1, 1), (num_devices, 1), (8, 1), (1, 4)):
    if fsdp * tensor > num_devices or num_devices % (fsdp * tensor):
      continue
    data = num_devices // (fsdp * tensor)
    shape = (("data", data), ("fsdp", fsdp), ("tensor", tensor))
    if batch % (data * fsdp) == 0 and shape not in out:
      out.append(shape)
  return out


def for_tpu(config: ml_collections.ConfigDict, resolved=None) -> ml_collections.ConfigDict:
  """The config as it would run on a TPU: the attention and LayerNorm kernels
  resolved for the TPU backend (the planner's own backend is the CPU)."""
  config = ml_collections.ConfigDict(config.to_dict())
  resolved = config_lib.resolve_model(config.model if resolved is None else resolved)
  kernels = models.kernels(resolved, platform="tpu")
  config.model.attention_impl = kernels["attention"]
  config.model.norm_impl = kernels["layernorm"]
  return config


def lower_train_step(config, mesh, num_train_examples: int = IMAGENET_TRAIN_EXAMPLES,
                     resolved=None):
  """The train step of `train.train_and_evaluate` for `config`, built by the same
  `training.setup` and lowered on `mesh` with abstract inputs: (lowered, abstract
  state, its shardings). The tf.data pipeline delivers augmented float32 images."""
  model = config_lib.resolve_model(config.model if resolved is None else resolved)
  num_classes = (config.data.num_classes or 1000) if tasks.get(config.task).classifies else None
  run = setup_lib.setup(config, model, mesh, num_train_examples, num_classes)
  lowered = run.train_step.lower(run.abstract_sharded_state(), run.abstract_batch(config))
  return lowered, run.abstract_state, run.state_shardings


def per_device_bytes(abstract, shard) -> int:
  """Bytes one device holds of a sharded tree."""
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
             for a, s in zip(jax.tree_util.tree_leaves(abstract),
                             jax.tree_util.tree_leaves(shard)))


def total_bytes(abstract) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(abstract))


def _array_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
          for dt, dims in _ARRAY.findall(text)]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective ops of a compiled HLO module: count and result bytes per kind.

  Async pairs count once, at `-start`: an all-reduce-start yields the reduced
  arrays, the other starts a tuple that also holds the operand (the largest
  array is the result). Ops in loop bodies count once per program.
  """
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    sizes = _array_bytes(m.group("shape"))
    one_result = m.group("start") and m.group("op") != "all-reduce"
    nbytes = max(sizes) if one_result else sum(sizes)
    entry = out.setdefault(m.group("op"), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += nbytes
  return out


def device_share(chip: Chip | None, devices) -> Chip | None:
  """What one JAX device gets of a chip: all of it, or half where the topology
  shows each of the chip's two TensorCores as a device (v4 without megacore)."""
  if chip is None:
    return None
  per_chip = len(devices) // len({tuple(d.coords) for d in devices})
  if per_chip == 1:
    return chip
  return Chip(chip.peak_flops / per_chip, chip.hbm_bytes // per_chip,
              chip.hbm_bandwidth / per_chip, chip.ici_bandwidth / per_chip)


def step_time(cost: dict, comm: dict, chip: Chip | None) -> tuple[float | None, str]:
  """XLA's estimate of one step's seconds, and where it came from.

  The TPU compiler's own `optimal_seconds` when it gives one; for programs it
  cannot time (it reports a negative value) a roofline over its cost analysis:
  the slowest of the FLOPs at peak, the bytes accessed at HBM bandwidth and the
  collective bytes at ICI bandwidth, i.e. assuming they overlap perfectly.
  """
  seconds = cost.get("optimal_seconds")
  if seconds is not None and seconds > 0:
    return float(seconds), "xla optimal_seconds"
  if chip is None:
    return None, "unknown chip"
  comm_bytes = sum(v["bytes"] for v in comm.values())
  roof = max(float(cost.get("flops", 0.0)) / chip.peak_flops,
             float(cost.get("bytes accessed", 0.0)) / chip.hbm_bandwidth,
             comm_bytes / chip.ici_bandwidth)
  return (roof or None), "roofline of xla cost_analysis (flops, bytes accessed, collectives)"


@dataclasses.dataclass
class Plan:
  topology: str
  chip: str
  num_chips: int
  mesh: dict
  global_batch: int
  param_bytes_total: int
  param_bytes_per_chip: int
  opt_state_bytes_per_chip: int
  activation_bytes_per_chip: int     # XLA's temporaries: activations, gradients, workspace
  peak_bytes_per_chip: int
  hbm_bytes_per_chip: int
  fits: bool
  collectives: dict
  step_seconds: float | None
  step_time_source: str
  images_per_second: float | None
  flops_per_chip: float
  mfu: float | None
  advice: str | None = None
  accum_steps: int = 1               # micro-batches per step (global batch unchanged)
  bytes_accessed_per_chip: float | None = None  # XLA's cost analysis (HBM traffic)
  # Pallas/Mosaic kernels in the program: XLA's cost analysis and step time
  # do not see inside them (no FLOPs, bytes or time of theirs are counted).
  mosaic_kernels: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def plan_one(config, topology: str, devices, mesh_shape,
             num_train_examples: int = IMAGENET_TRAIN_EXAMPLES, resolved=None) -> Plan:
  """Compiles the train step for one mesh of `devices` and reads its numbers."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.shape = mesh_shape
  mesh = sharding.create_mesh(mesh_shape, devices)
  lowered, abstract, shard = lower_train_step(config, mesh, num_train_examples, resolved)
  chip_name = devices[0].device_kind
  chip = device_share(CHIPS.get(chip_name), devices)
  params = per_device_bytes(abstract.params, shard.params)
  opt = per_device_bytes(abstract.opt_state, shard.opt_state)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    used = hbm_oom_bytes(str(e))
    if used is None:
      raise
    return oom_plan(config, topology, devices, mesh, total_bytes(abstract.params),
                    params, opt, chip, used)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hbm = chip.hbm_bytes if chip else None
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)
  flops = float(cost.get("flops", 0.0))
  hlo_text = compiled.as_text()
  comm = collectives(hlo_text)
  seconds, source = step_time(cost, comm, chip)
  plan = Plan(
      topology=topology, chip=chip_name, num_chips=len(devices),
      mesh={k: int(v) for k, v in mesh.shape.items()}, global_batch=config.batch_size,
      param_bytes_total=total_bytes(abstract.params), param_bytes_per_chip=params,
      opt_state_bytes_per_chip=opt, activation_bytes_per_chip=int(memory.temp_size_in_bytes),
      peak_bytes_per_chip=int(peak), hbm_bytes_per_chip=int(hbm or 0),
      fits=hbm is None or peak <= HBM_USABLE * hbm,
      collectives=comm, step_seconds=seconds, step_time_source=source,
      images_per_second=config.batch_size / seconds if seconds else None,
      flops_per_chip=flops,
      mfu=flops / seconds / chip.peak_flops if seconds and chip else None,
      accum_steps=config.accum_steps,
      bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
      mosaic_kernels=hlo_text.count('custom_call_target="tpu_custom_call"'))
  if not plan.fits:
    plan.advice = advice(plan, config)
  return plan


# XLA:TPU's two wordings: while scheduling, and for temporaries alone.
_HBM_OOM = re.compile(r"Ran out of memory (?:in memory space hbm\. Used |on HBM, the total "
                      r"memory required for [^(]*\()([0-9.]+)([KMGT]?)")


def hbm_oom_bytes(message: str) -> int | None:
  """The HBM bytes XLA:TPU says a program needs when it refuses to compile it
  for want of HBM (at least that much: it stops counting there); else None."""
  m = _HBM_OOM.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def oom_plan(config, topology, devices, mesh, params_total: int, params: int, opt: int,
             chip, used: int) -> Plan:
  """A plan for a layout the TPU compiler refused for want of HBM: what the
  state takes (`params`, `opt`: bytes per chip), the peak XLA reported, and the
  advice; no step time."""
  hbm = chip.hbm_bytes if chip else 0
  peak = used  # XLA:TPU's own figure, a lower bound (its limit is below the chip's HBM)
  plan = Plan(
      topology=topology, chip=devices[0].device_kind, num_chips=len(devices),
      mesh={k: int(v) for k, v in mesh.shape.items()}, global_batch=config.batch_size,
      param_bytes_total=params_total, param_bytes_per_chip=params,
      opt_state_bytes_per_chip=opt, activation_bytes_per_chip=max(peak - params - opt, 0),
      peak_bytes_per_chip=peak, hbm_bytes_per_chip=int(hbm), fits=False, collectives={},
      step_seconds=None, step_time_source="not compiled: XLA:TPU ran out of HBM "
      f"(needs at least {used / GiB:.2f} GiB)", images_per_second=None, flops_per_chip=0.0,
      mfu=None, accum_steps=config.accum_steps)
  plan.advice = advice(plan, config)
  return plan


def advice(plan: Plan, config) -> str:
  """The smallest change that would fit, from the plan's own arithmetic: state
  bytes shrink with the fsdp size, activation bytes with the micro-batch."""
  budget = HBM_USABLE * plan.hbm_bytes_per_chip
  fsdp = plan.mesh.get("fsdp", 1)
  state = plan.param_bytes_per_chip + plan.opt_state_bytes_per_chip
  rest = plan.peak_bytes_per_chip - state
  if state > budget / 2:
    need = 2 ** math.ceil(math.log2(max(fsdp * state / (budget / 2), fsdp + 1)))
    return (f"parameters + optimizer state take {state / GiB:.1f} GiB per chip: shard them "
            f"over more chips, --mesh=...,fsdp={min(need, plan.num_chips)}")
  factor = rest / max(budget - state, 1)
  accum = config.accum_steps * 2 ** math.ceil(math.log2(max(factor, 1.0001)))
  return (f"activations need {factor:.1f}x the room left: --config.accum_steps={accum} "
          f"(same global batch, smaller micro-batches), or "
          f"--config.model.remat_policy=full, or --config.batch_size="
          f"{config.batch_size * config.accum_steps // accum}")


def recommend(plans: list[Plan]) -> Plan | None:
  """The fastest plan that fits (XLA's step time; the least memory breaks ties)."""
  fitting = [p for p in plans if p.fits]
  if not fitting:
    return None
  return min(fitting, key=lambda p: (p.step_seconds or math.inf, p.peak_bytes_per_chip))


def format_plan(p: Plan) -> str:
  gib = lambda b: f"{b / GiB:.2f} GiB"
  mesh = " × ".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "one chip"
  accum = f" in {p.accum_steps} micro-batches" if p.accum_steps > 1 else ""
  lines = [f"{p.topology} ({p.num_chips} × {p.chip}), mesh {mesh}, global batch "
           f"{p.global_batch}{accum}",
           f"  per chip: parameters {gib(p.param_bytes_per_chip)} (of "
           f"{gib(p.param_bytes_total)}), optimizer state {gib(p.opt_state_bytes_per_chip)}, "
           f"activations+temporaries {gib(p.activation_bytes_per_chip)}",
           f"  peak {gib(p.peak_bytes_per_chip)} of {gib(p.hbm_bytes_per_chip)} HBM: " +
           (f"fits ({gib(HBM_USABLE * p.hbm_bytes_per_chip - p.peak_bytes_per_chip)} to "
            "spare)" if p.fits else
            f"does NOT fit (over by "
            f"{gib(p.peak_bytes_per_chip - HBM_USABLE * p.hbm_bytes_per_chip)})")]
  if p.step_time_source.startswith("not compiled"):
    lines[-1] = (f"  peak at least {gib(p.peak_bytes_per_chip)} of {gib(p.hbm_bytes_per_chip)} "
                 "HBM: does NOT fit")
  else:
    coll = ", ".join(f"{k} ×{v['count']} {v['bytes'] / 2**20:.1f} MiB"
                     for k, v in sorted(p.collectives.items())) or "none"
    lines.append(f"  collectives per step: {coll}")
  if p.mosaic_kernels:
    lines.append(f"  {p.mosaic_kernels} Pallas kernel calls: XLA's FLOPs, bytes and step "
                 "time leave out their work")
  if p.step_seconds:
    lines.append(f"  XLA estimate: {p.step_seconds * 1e3:.1f} ms/step, "
                 f"{p.images_per_second:,.0f} img/s, MFU {100 * (p.mfu or 0):.0f}% "
                 f"({p.flops_per_chip / 1e12:.2f} TFLOP per chip per step; "
                 f"{p.step_time_source})")
  elif p.step_time_source.startswith("not compiled"):
    lines.append(f"  {p.step_time_source}")
  if p.advice:
    lines.append(f"  to fit: {p.advice}")
  return "\n".join(lines)


def _mesh_text(shape) -> str:
  return ",".join(f"{k}={v}" for k, v in shape if v > 1) or "one chip"


def progress_line(index: int, total: int, p: Plan, seconds: float, done_seconds: list[float],
                  workers: int = 1) -> str:
  """'layout 2/4 data=8,fsdp=8: compiled in 41s, fits (peak 12.3 of 95.0 GiB); 2 left,
  ETA 1m22s': one line per compiled layout, the ETA from the mean compile so far."""
  from crate_mae_jax.training.summaries import duration  # pylint: disable=import-outside-toplevel
  if p.step_time_source.startswith("not compiled"):
    fits = "does NOT fit (XLA:TPU ran out of HBM)"
  else:
    fits = (f"{'fits' if p.fits else 'does NOT fit'} (peak {p.peak_bytes_per_chip / GiB:.1f} "
            f"of {p.hbm_bytes_per_chip / GiB:.1f} GiB)")
  left = total - index
  eta = ""
  if left:
    mean = sum(done_seconds) / len(done_seconds)
    eta = f"; {left} left, ETA {duration(mean * math.ceil(left / workers))}"
  return (f"layout {index}/{total} {_mesh_text(tuple(p.mesh.items()))}: compiled in "
          f"{duration(seconds)}, {fits}{eta}")


def search(config, topology: str, devices, shapes, num_train_examples: int, resolved,
           log=print, workers: int = 1) -> list[Plan]:
  """Compiles each layout of `shapes`, logging a progress line and the report of
  each as it finishes; returns the plans in the order of `shapes`. `workers` > 1
  compiles that many at once in threads (XLA's compile releases the GIL); the
  default is one at a time (BENCHMARKS.md, "Pod plans", has the comparison)."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  workers = max(1, workers)

  def one(shape):
    start = time.monotonic()
    p = plan_one(config, topology, devices, shape, num_train_examples, resolved)
    return p, time.monotonic() - start

  if len(shapes) > 1:
    log(f"compiling {len(shapes)} layouts for {topology} "
        f"({workers} at a time; --mesh=... compiles one)")
  results, took = {}, []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(one, shape): i for i, shape in enumerate(shapes)}
    for future in concurrent.futures.as_completed(futures):
      p, seconds = future.result()
      results[futures[future]] = p
      took.append(seconds)
      if len(shapes) > 1:
        log(progress_line(len(results), len(shapes), p, seconds, took, workers))
      log(format_plan(p))
  return [results[i] for i in range(len(shapes))]


def plan(config, topology: str, mesh_text: str | None = None,
         num_train_examples: int = IMAGENET_TRAIN_EXAMPLES, log=print) -> dict:
  """Plans for one mesh (`mesh_text`) or the candidate layouts; returns the
  JSON report with every plan and the recommended one."""
  resolved = config_lib.validate(config)
  if mesh_text:
    sharding.parse_mesh(mesh_text)  # a typo fails before libtpu is loaded
  config = for_tpu(config, resolved)
  resolved = config_lib.resolve_model(config.model)  # with the TPU attention and LayerNorm kernels
  devices = topology_devices(topology)
  micro_batch = config.batch_size // config.accum_steps
  shapes = ([sharding.parse_mesh(mesh_text, len(devices))] if mesh_text else
            candidate_meshes(len(devices), micro_batch))
  for shape in shapes:
    shards = math.prod(size for name, size in shape if name in sharding.BATCH_AXES)
    if micro_batch % shards:
      raise ConfigError(f"config.batch_size={config.batch_size} (per accumulation step "
                        f"{micro_batch}) does not split over the {shards} batch shards of "
                        f"--mesh={mesh_text}; use a multiple of {shards}")
  if not shapes:
    raise ConfigError(f"config.batch_size={config.batch_size} splits over no mesh of "
                      f"{len(devices)} chips; use a multiple of {len(devices)}")
  plans = search(config, topology, devices, shapes, num_train_examples, resolved, log=log)
  best = recommend(plans)
  if best is None:
    smallest = min(plans, key=lambda p: p.peak_bytes_per_chip)
    log(f"does not fit on {topology}: {smallest.advice}")
  else:
    log("recommended: --config.mesh.shape=\"" +
        str(tuple((k, v) for k, v in best.mesh.items())).replace("'", "'") + "\"")
  return report_of(topology, resolved, plans, best)


def report_of(topology: str, model: dict, plans: list[Plan], best: Plan | None) -> dict:
  """The JSON report of one model's plans on one topology."""
  return {"topology": topology, "model": model, "plans": [p.to_json() for p in plans],
          "recommended": None if best is None else best.to_json()}


def merge_reports(reports: list[dict]) -> dict:
  """One report from several of the same model and topology (e.g. one
  `--mesh` run per layout, so that each compile's result survives on its own),
  with the recommendation taken over all their plans."""
  if not reports:
    raise ConfigError("--merge: give at least one JSON report")
  first = reports[0]
  for r in reports[1:]:
    # Fields one report lacks (written before the field existed) are not a difference.
    common = first["model"].keys() & r["model"].keys()
    differ = [k for k in ("topology",) if r[k] != first[k]] + \
        [f"model.{k}" for k in sorted(common) if r["model"][k] != first["model"][k]]
    if differ:
      raise ConfigError(f"--merge: reports differ in {', '.join(differ)}; "
                        "merge only reports of one model on one topology")
  plans = [Plan(**p) for r in reports for p in r["plans"]]
  return report_of(first["topology"], first["model"], plans, recommend(plans))


# ------------------------------------------------------------------ command line
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                lock_config=True)
flags.DEFINE_string("topology", None, "Cloud TPU topology, e.g. v5p:4x4x4, v5e:16x16, v4:2x2x4.")
flags.DEFINE_string("mesh", None, "One layout to plan, e.g. data=8,fsdp=8 (default: try several).")
flags.DEFINE_string("json", None, "Write the report as JSON to this file.")
flags.DEFINE_list("merge", None, "Instead of compiling: merge these JSON reports (one model, "
                  "one topology) into --json, recommending over all their plans.")
flags.DEFINE_integer("num_train_examples", IMAGENET_TRAIN_EXAMPLES,
                     "Training set size (only the learning-rate schedule uses it).")


def main(argv):
  del argv
  # Compiles for the topology from the host's CPU: never take a TPU this host
  # may have, and let several planners share libtpu.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if FLAGS.json:  # before any compile: a report that cannot be written is lost work
    folder = os.path.dirname(os.path.abspath(FLAGS.json))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
      print(f"error: --json={FLAGS.json!r}: the folder {folder!r} does not exist or is not "
            "writable; create it or name another file", file=sys.stderr)
      sys.exit(2)
  if FLAGS.merge:
    try:
      reports = []
      for path in FLAGS.merge:
        with open(path) as f:
          reports.append(json.load(f))
      report = merge_reports(reports)
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
      print(f"error: --merge: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(2)
    for p in report["plans"]:
      print(format_plan(Plan(**p)))
    best = report["recommended"]
    print("recommended: " + (" × ".join(f"{k}={v}" for k, v in best["mesh"].items() if v > 1)
                             if best else "none fits"))
  else:
    if FLAGS.config is None or not FLAGS.topology:
      print("error: --config and --topology are required, e.g. --config=configs/base.py "
            "--topology=v5p:4x4x4", file=sys.stderr)
      sys.exit(2)
    try:
      report = plan(FLAGS.config, FLAGS.topology, FLAGS.mesh, FLAGS.num_train_examples)
    except (ConfigError, ValueError) as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(2)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)
  sys.exit(0 if report["recommended"] is not None else 1)


def run():
  """Console script `crate-mae-plan`."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  cli.run_absl_app(main, FLAGS, module=__name__, quiet=False,
                   usage="--config=CONFIG --topology=TOPOLOGY [--mesh=...] [--json=OUT.json]")


if __name__ == "__main__":
  run()
