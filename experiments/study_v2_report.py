"""The report of `study_v2`: mean ± sd over seeds, layer-wise figures, plain answers.

Reads DIR/runs/*/results.json (whatever finished) and writes into the report
folder: study2.json (per-run numbers and the aggregates), study2.md (tables),
answers.md (the block for RESULTS.md), layerwise_readout.png (k-NN / ridge probe
top-1 against encoder layer, pre-trained lines and random-initialisation dots)
and white_box.png (CRATE-MAE coding rate and non-zero fraction against layer at
mask ratio 0 and 0.75), drawn with matplotlib (`plots.line_plot`).
"""
import glob
import json
import os

import numpy as np

from crate_mae_jax import config_lib
from experiments import plots

NAMES = {"crate_mae_lam0.5": "CRATE-MAE λ=0.5", "crate_mae_lam5": "CRATE-MAE λ=5.0",
         "vit_mae": "ViT-MAE (visible-only encoder)",
         "vit_mae_all": "ViT-MAE (mask tokens in encoder)",
         "vit_mae_matched": "ViT-MAE (parameter-matched)"}
COLORS = {"crate_mae_lam0.5": "tab:blue", "crate_mae_lam5": "tab:purple",
          "vit_mae": "tab:orange", "vit_mae_all": "tab:red", "vit_mae_matched": "tab:green"}
POOLS = ("cls", "mean")
MATCHED = "vit_mae_matched"
CRATES = ("crate_mae_lam0.5", "crate_mae_lam5")
GOAL_GAP = 0.05


def load_runs(workdir: str) -> list[dict]:
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "results.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  return runs


def layers_of(layer_scalars: dict, pool: str) -> list[str]:
  names = [k.split("/", 1)[1] for k in layer_scalars if k.startswith(pool + "/")]
  return [n for n in names if n != "best"]


def readout(evals: dict, kind: str) -> dict:
  """best (over layers and pools), last (final layer, mean pool), per pool's curve."""
  s = evals[kind]
  curves = {pool: [s[f"{pool}/{n}"] for n in layers_of(s, pool)] for pool in POOLS}
  best_pool = max(POOLS, key=lambda p: s[f"{p}/best"])
  best_layer = max(layers_of(s, best_pool), key=lambda n: s[f"{best_pool}/{n}"])
  return {"best": max(s[f"{p}/best"] for p in POOLS), "best_at": f"{best_pool}/{best_layer}",
          "last": s["mean/final"], "last_cls": s["cls/final"], "curves": curves}


def run_metrics(run: dict) -> dict:
  """Scalars of one run (fractions, not percent)."""
  if run["kind"] == "supervised":
    return {"supervised": run["supervised"]["results"].get("top1")}
  if run["kind"] == "pixel_floor":
    return {"pixel_floor": run["pixel_floor"]["test_accuracy"]}
  m = {}
  for state in ("pretrained", "random_init"):
    for kind, short in (("knn", "knn"), ("linear_probe", "probe")):
      r = readout(run[state], kind)
      m[f"{short}_best/{state}"] = r["best"]
      m[f"{short}_last/{state}"] = r["last"]
  m["knn_gap_best"] = m["knn_best/pretrained"] - m["knn_best/random_init"]
  m["knn_gap_last"] = m["knn_last/pretrained"] - m["knn_last/random_init"]
  m["probe_gap_best"] = m["probe_best/pretrained"] - m["probe_best/random_init"]
  m["finetune"] = (run.get("finetune") or {}).get("results", {}).get("top1")
  m["pretrain_loss"] = (run.get("pretrain") or {}).get("results", {}).get("loss")
  return m


def mean_sd(values) -> dict:
  v = np.asarray([x for x in values if x is not None], float)
  if not len(v):
    return {"mean": None, "sd": None, "n": 0}
  return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v))}


def aggregate(runs: list[dict]) -> dict:
  """{kind: {variant: {metric: mean_sd}}}."""
  groups: dict = {}
  for run in runs:
    key = (run["kind"], run.get("variant") or "-")
    groups.setdefault(key, []).append(run_metrics(run))
  out: dict = {}
  for (kind, variant), ms in groups.items():
    names = sorted({k for m in ms for k in m})
    out.setdefault(kind, {})[variant] = {k: mean_sd([m.get(k) for m in ms]) for k in names}
  return out


def curves(runs: list[dict], state: str, kind: str, pool: str) -> dict:
  """{variant: (layers, mean curve)} of the read-out `kind` over seeds."""
  per: dict = {}
  for run in runs:
    if run["kind"] == "mae":
      per.setdefault(run["variant"], []).append(readout(run[state], kind)["curves"][pool])
  return {v: np.mean(np.asarray(c, float), axis=0) for v, c in per.items()}


def white_box_curves(runs: list[dict], state: str, ratio: str, measure: str) -> dict:
  per: dict = {}
  for run in runs:
    wb = (run.get(state) or {}).get("white_box", {}).get(ratio)
    if run["kind"] != "mae" or not wb:
      continue
    keys = sorted(k for k in wb if k.startswith(f"encoder/{measure}/layer_"))
    per.setdefault(run["variant"], []).append([wb[k] for k in keys])
  return {v: np.mean(np.asarray(c, float), axis=0) for v, c in per.items()}


# ----------------------------------------------------------------------------- figures


def save_layerwise_figure(runs: list[dict], path: str) -> str:
  panels = []
  for kind, title in (("knn", "k-NN"), ("linear_probe", "ridge probe")):
    for pool in POOLS:
      series = []
      trained, random = curves(runs, "pretrained", kind, pool), curves(runs, "random_init",
                                                                      kind, pool)
      for v, ys in trained.items():
        xs = np.arange(len(ys))
        series.append((NAMES.get(v, v), xs, 100 * ys, COLORS.get(v, "black"), "line"))
        if v in random:
          series.append(("", xs, 100 * random[v], COLORS.get(v, "black"), "dots"))
      panels.append((f"{title}, {pool}: top-1 % (dots: random init)",
                     "encoder layer (last = after final norm)", series))
  return plots.line_plot(panels, path, panel_size=(520, 380))


def save_white_box_figure(runs: list[dict], path: str) -> str:
  panels = []
  for measure, label in (("coding_rate", "coding rate"), ("sparsity", "non-zero fraction")):
    for ratio in ("mask_0", "mask_0.75"):
      series = []
      for state, style in (("pretrained", "line"), ("random_init", "dots")):
        for v, ys in white_box_curves(runs, state, ratio, measure).items():
          series.append((NAMES.get(v, v) if style == "line" else "", np.arange(len(ys)), ys,
                         COLORS.get(v, "black"), style))
      panels.append((f"{label}, {ratio.replace('_', ' ')} (dots: random init)",
                     "encoder layer", series))
  return plots.line_plot(panels, path, panel_size=(480, 340))


# ----------------------------------------------------------------------------- text


def fmt(s: dict | None, percent: bool = True) -> str:
  if not s or s.get("mean") is None:
    return "–"
  k = 100 if percent else 1
  sd = f" ± {k * s['sd']:.2f}" if s["n"] > 1 else ""
  return f"{k * s['mean']:.2f}{sd} (n={s['n']})"


def tables(agg: dict, runs: list[dict]) -> str:
  mae, sup = agg.get("mae", {}), agg.get("supervised", {})
  lines = ["| model | params (encoder) | k-NN best | k-NN last | probe best | probe last | "
           "k-NN best, random init | k-NN gain (pre-trained − random) | fine-tune | "
           "supervised from scratch |", "| --- | ---: |" + " ---: |" * 8]
  params = {r["variant"]: r["params"]["encoder"] for r in runs if r["kind"] == "mae"}
  for v in NAMES:
    if v not in mae and v not in sup:
      continue
    m = mae.get(v, {})
    lines.append(
        f"| {NAMES[v]} | {params.get(v, 0):,} | {fmt(m.get('knn_best/pretrained'))} | "
        f"{fmt(m.get('knn_last/pretrained'))} | {fmt(m.get('probe_best/pretrained'))} | "
        f"{fmt(m.get('probe_last/pretrained'))} | {fmt(m.get('knn_best/random_init'))} | "
        f"{fmt(m.get('knn_gap_best'))} | {fmt(m.get('finetune'))} | "
        f"{fmt(sup.get(v, {}).get('supervised'))} |")
  floor = agg.get("pixel_floor", {}).get("-", {}).get("pixel_floor")
  if floor:
    lines.append(f"| raw pixels, linear classifier | – | – | – | {fmt(floor)} | – | – | – | – "
                 "| – |")
  lines += ["", "Top-1 % on the test split, mean ± sd over seeds (n = seeds "
            "finished). *best*: the best encoder layer and pool (cls or mean); *last*: the "
            "last layer after the final norm, mean-pooled. k-NN: cosine, k = 20, T = 0.07; "
            "probe: ridge on one-hot labels (closed form, λ from a held-out tenth of the "
            "train split). Random init: the exact parameters each run started from.", ""]
  return "\n".join(lines)


def white_box_table(runs: list[dict]) -> str:
  lines = []
  for v in CRATES:
    rows = {}
    for state in ("random_init", "pretrained"):
      for ratio in ("mask_0", "mask_0.75"):
        for measure in ("coding_rate", "sparsity"):
          c = white_box_curves(runs, state, ratio, measure).get(v)
          if c is not None:
            rows[(state, ratio, measure)] = c
    if not rows:
      continue
    depth = len(next(iter(rows.values())))
    cols = sorted(rows)
    lines += [f"### {NAMES[v]}: encoder coding rate / non-zero fraction per layer (mean over "
              "seeds)", "",
              "| layer | " + " | ".join(f"{m.replace('_', ' ')} {r.replace('_', ' ')} "
                                         f"{'init' if s == 'random_init' else 'trained'}"
                                         for s, r, m in cols) + " |",
              "|" + " ---: |" * (len(cols) + 1)]
    for i in range(depth):
      lines.append(f"| {i} | " + " | ".join(f"{rows[c][i]:.3g}" for c in cols) + " |")
    lines.append("")
  return "\n".join(lines)


def _diff(a: dict | None, b: dict | None) -> str:
  if not a or not b or a.get("mean") is None or b.get("mean") is None:
    return "not measured"
  d = 100 * (a["mean"] - b["mean"])
  noise = 100 * (a["sd"] + b["sd"])
  verdict = ("beyond the seed spread" if abs(d) > noise else "within the seed spread")
  return f"{d:+.2f} points ({verdict}: sd sum {noise:.2f})"


def spearman_with_depth(values) -> float:
  v = np.asarray(values, float)
  if len(v) < 2:
    return float("nan")
  ranks = np.argsort(np.argsort(v))
  return float(np.corrcoef(np.arange(len(v)), ranks)[0, 1])


def answers(agg: dict, runs: list[dict]) -> str:
  mae, sup = agg.get("mae", {}), agg.get("supervised", {})
  out = ["### Answers (computed from the runs by `study_v2_report`)", ""]
  matched = mae.get(MATCHED, {})
  for v in CRATES:
    m = mae.get(v)
    if not m:
      continue
    out.append(f"- **{NAMES[v]} vs the parameter-matched ViT-MAE**: probe (best layer) "
               f"{_diff(m.get('probe_best/pretrained'), matched.get('probe_best/pretrained'))}; "
               f"k-NN (best layer) "
               f"{_diff(m.get('knn_best/pretrained'), matched.get('knn_best/pretrained'))}; "
               f"fine-tune {_diff(m.get('finetune'), matched.get('finetune'))}.")
  for v in NAMES:
    m = mae.get(v)
    if not m or not m.get("knn_gap_best", {}).get("n"):
      continue
    gap = m["knn_gap_best"]["mean"]
    out.append(f"- **Pre-training vs random init, k-NN, {NAMES[v]}**: best layer "
               f"{fmt(m['knn_gap_best'])} points, last layer {fmt(m['knn_gap_last'])} points "
               f"(goal ≥ {100 * GOAL_GAP:.0f}: {'met' if gap >= GOAL_GAP else 'missed'}).")
  for v in sup:
    if v in mae:
      out.append(f"- **Fine-tune vs supervised from scratch, {NAMES.get(v, v)}**: "
                 f"{_diff(mae[v].get('finetune'), sup[v].get('supervised'))}.")
  for v in CRATES:
    for ratio in ("mask_0", "mask_0.75"):
      for state in ("pretrained", "random_init"):
        c = white_box_curves(runs, state, ratio, "coding_rate").get(v)
        if c is None:
          continue
        rho = spearman_with_depth(c)
        falls = c[-1] < c[0] and rho <= -0.8
        out.append(f"- **Layer-wise compression, {NAMES[v]}, {state.replace('_', ' ')}, "
                   f"{ratio.replace('_', ' ')}**: coding rate {c[0]:.1f} (layer 0) → "
                   f"{c[-1]:.1f} (layer {len(c) - 1}), rank correlation with depth "
                   f"{rho:+.2f}: {'falls with depth' if falls else 'does not fall with depth'}.")
  if all(v in mae for v in CRATES):
    a, b = mae[CRATES[0]], mae[CRATES[1]]
    sp = {v: white_box_curves(runs, "pretrained", "mask_0", "sparsity").get(v) for v in CRATES}
    nz = ", ".join(f"{NAMES[v]} mean non-zero fraction {np.mean(s):.3f}"
                   for v, s in sp.items() if s is not None)
    out.append(f"- **λ = 0.5 vs 5.0** (0.5 minus 5.0): probe best "
               f"{_diff(a.get('probe_best/pretrained'), b.get('probe_best/pretrained'))}; "
               f"k-NN best {_diff(a.get('knn_best/pretrained'), b.get('knn_best/pretrained'))}; "
               f"fine-tune {_diff(a.get('finetune'), b.get('finetune'))}; {nz}.")
  return "\n".join(out) + "\n"


def report(workdir: str, out_dir: str) -> dict:
  """Writes the report of what `workdir` holds into `out_dir`; returns study2.json's dict."""
  runs = load_runs(workdir)
  os.makedirs(out_dir, exist_ok=True)
  protocol = {}
  if os.path.isfile(os.path.join(workdir, "protocol.json")):
    with open(os.path.join(workdir, "protocol.json")) as f:
      protocol = json.load(f)
  agg = aggregate(runs)
  env = next((r.get("environment") for r in runs if r.get("environment")), {})
  figures = {}
  if any(r["kind"] == "mae" for r in runs):
    figures["layerwise_readout"] = save_layerwise_figure(
        runs, os.path.join(out_dir, "layerwise_readout.png"))
    if any((r.get("pretrained") or {}).get("white_box") for r in runs):
      figures["white_box"] = save_white_box_figure(runs, os.path.join(out_dir, "white_box.png"))
  expected = protocol.get("runs", [])
  finished = [r["name"] for r in runs]
  missing = [n for n in expected if n not in finished]
  head = [f"Runs finished: {len(finished)} of {len(expected) or len(finished)}"
          + (f" (missing: {', '.join(missing)})" if missing else "") + "; device "
          f"{env.get('device_kind', '?')} ({env.get('backend', '?')}), JAX {env.get('jax', '?')}, "
          f"{env.get('time', '?')}; epochs {protocol.get('epochs')}; workers "
          f"{protocol.get('workers')}.", ""]
  text = answers(agg, runs)
  md = "\n".join(["# Fashion-MNIST study v2: baselines, layer-wise read-outs, controls, seeds",
                  "", *head, tables(agg, runs), white_box_table(runs), text,
                  "Figures: `layerwise_readout.png`, `white_box.png`.", ""])
  with open(os.path.join(out_dir, "study2.md"), "w") as f:
    f.write(config_lib.redacted(md))
  with open(os.path.join(out_dir, "answers.md"), "w") as f:
    f.write(config_lib.redacted("\n".join(head) + tables(agg, runs) + "\n" + text))
  study = {"protocol": protocol, "environment": env, "aggregate": agg, "figures": figures,
           "finished": finished, "missing": missing,
           "runs": {r["name"]: {"metrics": run_metrics(r), **r} for r in runs}}
  with open(os.path.join(out_dir, "study2.json"), "w") as f:
    json.dump(config_lib.redacted(study), f, indent=1, default=str)
  print(md)
  return study
