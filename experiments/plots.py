"""Figures of the Fashion-MNIST study: layer-wise curves before/after pre-training
and the loss curves of every stage (matplotlib, through `figures`)."""
from typing import Mapping

import numpy as np

from crate_mae_jax.analysis import figures

NAMES = {"crate_mae": "CRATE-MAE", "vit_mae": "ViT-MAE",
         "vit_mae_all": "ViT-MAE (mask tokens in the encoder)",
         "vit_mae_matched": "ViT-MAE (parameter-matched)"}
COLORS = {"crate_mae": "tab:blue", "vit_mae": "tab:orange", "extra": "tab:green"}


def flat_measures(nested: Mapping) -> dict[str, np.ndarray]:
  """{'encoder': {'coding_rate': {'mean': [...]}}} -> {'encoder/coding_rate/mean': array}."""
  return {f"{part}/{measure}/{stat}": np.asarray(values)
          for part, m in nested.items() for measure, s in m.items() for stat, values in s.items()}


def layerwise_before_after_figure(init: Mapping, trained: Mapping, name: str,
                                  size: tuple[int, int] = (960, 808)):
  """The untrained model's per-layer curves above, the pre-trained model's below."""
  figure = figures.new_figure(size)
  top, bottom = figure.subfigures(2, 1)
  for sub, measures, title in ((top, init, f"{name}: untrained (initialisation)"),
                               (bottom, trained, f"{name}: after pre-training")):
    sub.suptitle(title, x=0.01, ha="left")
    figures.draw_layerwise(sub, flat_measures(measures))
  return figure


def save_layerwise_before_after(init: Mapping, trained: Mapping, path: str, name: str) -> str:
  """layerwise.png: the untrained model's curves above, the pre-trained model's below."""
  return figures.save_figure(layerwise_before_after_figure(init, trained, name), path)


def line_plot_figure(panels, panel_size: tuple[int, int] = (480, 340)):
  """panels: [(title, xlabel, [(name, xs, ys, color, 'line'|'dots'), ...]), ...], drawn
  side by side, `panel_size` pixels each. Series named '' stay out of the legend."""
  figure = figures.new_figure((panel_size[0] * max(len(panels), 1), panel_size[1]))
  axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
  for ax, (title, xlabel, series) in zip(axes, panels):
    ax.set(title=title, xlabel=xlabel)
    ax.title.set_fontsize("medium")
    ax.grid(True, color="0.9")
    series = [s for s in series if len(s[1])]
    if not series:
      ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
      ax.set(xticks=[], yticks=[])
      continue
    for name, xs, ys, color, style in series:
      xs, ys = np.asarray(xs, float), np.asarray(ys, float)
      label = name or None
      if style == "line":
        ax.plot(xs, ys, color=color, linewidth=1.5, label=label)
      else:
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=5, markerfacecolor="none",
                color=color, label=label)
    if any(name for name, *_ in series):
      ax.legend(loc="best", fontsize="small")
  return figure


def line_plot(panels, path: str, panel_size: tuple[int, int] = (480, 340)) -> str:
  """`line_plot_figure` written as a PNG; returns `path`."""
  return figures.save_figure(line_plot_figure(panels, panel_size), path)


def save_loss_curves(archs: Mapping[str, dict], path: str) -> str:
  """Pre-training masked MSE (train line, eval dots) and probe / fine-tune train loss,
  against epochs."""
  panels = []
  for task, title in (("pretrain", "Pre-training loss (masked MSE)"),
                      ("linear_probe", "Linear probe: train loss"),
                      ("finetune", "Fine-tuning: train loss")):
    series = []
    for arch, summary in archs.items():
      stage = summary.get("stages", {}).get(task)
      if not stage:
        continue
      steps_per_epoch = max(stage["steps"], 1) / max(stage["epochs"], 1e-9)
      color = COLORS.get(arch, COLORS["extra"])
      name = NAMES.get(arch, arch)
      train_loss = np.asarray(stage.get("train_loss") or np.zeros((0, 2)), float)
      series.append((f"{name} train", train_loss[:, 0] / steps_per_epoch, train_loss[:, 1],
                     color, "line"))
      if task == "pretrain":
        ev = np.asarray(stage.get("eval_loss") or np.zeros((0, 2)), float)
        series.append((f"{name} eval", ev[:, 0] / steps_per_epoch, ev[:, 1], color, "dots"))
    panels.append((title, "epoch", series))
  return line_plot(panels, path)


