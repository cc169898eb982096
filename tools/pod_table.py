"""The "Pod plans" table of BENCHMARKS.md from the planner's JSON reports.

    python tools/pod_table.py [--merge] [--compact]

benchmarks/plans/<model>_<topology>_<layout>.json hold one `--mesh` run each
(one compile, so each survives on its own); --merge first writes
benchmarks/plans/<model>_<topology>.json, the report over all of a cell's
layouts with the recommendation (`crate_mae_jax.tools.plan.merge_reports`). The
table is then printed from the cell reports only, so every number in it is
one the planner wrote. --compact adds the models × topologies summary of the README.
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crate_mae_jax.tools import plan  # noqa: E402

PLANS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "plans")
MODELS = (("crate_mae_base", "CRATE-MAE-Base"), ("crate_mae_large", "CRATE-MAE-Large"),
          ("vit_mae_base", "ViT-MAE-Base"))
TOPOLOGIES = (("v4:2x2x4", "v4-32"), ("v5p:2x4x4", "v5p-64"), ("v5e:16x16", "v5e-256"),
              ("v6e:4x4", "v6e-16"), ("v5p:4x4x4", "v5p-128"))


def cell_path(model: str, topology: str, layout: str | None = None) -> str:
  name = f"{model}_{topology.replace(':', '_')}" + (f"_{layout}" if layout else "")
  return os.path.join(PLANS, name + ".json")


def merge_cell(model: str, topology: str) -> bool:
  """Writes the cell report from its per-layout reports; False if it has none."""
  paths = sorted(glob.glob(cell_path(model, topology, "*")))
  if not paths:
    return False
  reports = []
  for p in paths:
    with open(p) as f:
      reports.append(json.load(f))
  with open(cell_path(model, topology), "w") as f:
    json.dump(plan.merge_reports(reports), f, indent=1)
  return True


def mesh_text(p: dict) -> str:
  text = " × ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "one chip"
  return text + (f", accum {p['accum_steps']}" if p.get("accum_steps", 1) > 1 else "")


def row(label: str, topology: str, alias: str, report: dict | None) -> str:
  if report is None:
    return f"| {label} | {alias} ({topology}) | not compiled | | | | | | |"
  plans = report["plans"]
  best = report["recommended"]
  n = len(plans)
  chip = plans[0]
  where = f"{alias} ({topology}, {chip['num_chips']} × {chip['chip']})"
  how = (f"searched: {n} layouts ({'; '.join(mesh_text(p) for p in plans)})" if n > 1
         else "one layout only")
  if best is None:
    small = min(plans, key=lambda p: p["peak_bytes_per_chip"])
    return (f"| {label} | {where} | none fits (least: {mesh_text(small)}, "
            f"{small['peak_bytes_per_chip'] / plan.GiB:.2f} of "
            f"{small['hbm_bytes_per_chip'] / plan.GiB:.0f} GiB) | | | | | {how} | |")
  gib = best["peak_bytes_per_chip"] / plan.GiB
  hbm = best["hbm_bytes_per_chip"] / plan.GiB
  source = "xla optimal_seconds" if best["step_time_source"].startswith("xla") else "roofline"
  return (f"| {label} | {where} | **{mesh_text(best)}** | {gib:.2f} of {hbm:.0f} | "
          f"{best['images_per_second']:,.0f} | {100 * best['mfu']:.0f}% | "
          f"{1e3 * best['step_seconds']:.1f} | {how} | {source} |")


def compact(reports: dict) -> str:
  """Models × topologies, one cell each: recommended mesh, est. img/s, MFU, peak GiB."""
  tops = [(t, a) for t, a in TOPOLOGIES if a != "v5p-128"]
  lines = ["| | " + " | ".join(f"{a} (`{t}`)" for t, a in tops) + " |",
           "|---|" + "---|" * len(tops)]
  for model, label in MODELS:
    cells = []
    for topology, _ in tops:
      r = reports.get((model, topology))
      best = r and r["recommended"]
      cells.append("not compiled" if r is None else "none fits" if best is None else
                   f"{mesh_text(best)}: {best['images_per_second']:,.0f} img/s, "
                   f"MFU {100 * best['mfu']:.0f}%, {best['peak_bytes_per_chip'] / plan.GiB:.1f} GiB")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  reports = {}
  lines = ["| model | topology | recommended mesh | peak GiB per device (of HBM) | est. img/s "
           "| MFU | est. ms/step | layouts compiled | step-time source |",
           "|---|---|---|---|---|---|---|---|---|"]
  for topology, alias in TOPOLOGIES:
    for model, label in MODELS:
      if "--merge" in argv:
        merge_cell(model, topology)
      path = cell_path(model, topology)
      report = None
      if os.path.exists(path):
        with open(path) as f:
          report = reports[model, topology] = json.load(f)
      if report is None and alias == "v5p-128":
        continue  # extra rows only where an earlier session compiled them
      lines.append(row(label, topology, alias, report))
  print("\n".join(lines))
  if "--compact" in argv:
    print("\n" + compact(reports))


if __name__ == "__main__":
  main(sys.argv[1:])
