"""Figures of the Fashion-MNIST study: layer-wise curves before/after pre-training
and the loss curves of every stage (Pillow only, no matplotlib)."""
import math
from typing import Mapping

import numpy as np

from crate_mae_jax import figures

NAMES = {"crate_mae": "CRATE-MAE", "vit_mae": "ViT-MAE",
         "vit_mae_all": "ViT-MAE (mask tokens in the encoder)",
         "vit_mae_matched": "ViT-MAE (parameter-matched)"}
COLORS = {"crate_mae": (31, 119, 180), "vit_mae": (255, 127, 14), "extra": (44, 160, 44)}


def flat_measures(nested: Mapping) -> dict[str, np.ndarray]:
  """{'encoder': {'coding_rate': {'mean': [...]}}} -> {'encoder/coding_rate/mean': array}."""
  return {f"{part}/{measure}/{stat}": np.asarray(values)
          for part, m in nested.items() for measure, s in m.items() for stat, values in s.items()}


def _titled(image: np.ndarray, title: str) -> np.ndarray:
  from PIL import Image, ImageDraw
  canvas = Image.new("RGB", (image.shape[1], image.shape[0] + 24), (255, 255, 255))
  canvas.paste(Image.fromarray(image), (0, 24))
  ImageDraw.Draw(canvas).text((8, 4), title, fill=(0, 0, 0), font=figures.load_font(14))
  return np.asarray(canvas)


def save_layerwise_before_after(init: Mapping, trained: Mapping, path: str, name: str) -> str:
  """layerwise.png: the untrained model's curves above, the pre-trained model's below."""
  top = _titled(figures.layerwise_image(flat_measures(init)),
                f"{name}: untrained (initialisation)")
  bottom = _titled(figures.layerwise_image(flat_measures(trained)),
                   f"{name}: after pre-training")
  return figures.save_png(np.concatenate([top, bottom], axis=0), path)




def _label(value: float, step: float) -> str:
  decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
  if abs(step * 10**decimals - round(step * 10**decimals)) > 1e-9:
    decimals += 1
  return f"{value:.{decimals}f}"


def line_plot(panels, path: str, panel_size: tuple[int, int] = (480, 340)) -> str:
  """panels: [(title, xlabel, [(name, xs, ys, color, 'line'|'dots'), ...]), ...]
  drawn side by side; returns `path`. Pillow only. Series named '' stay out of
  the legend, which wraps onto more rows (above the plot) when it is wide."""
  from PIL import Image, ImageDraw
  pw, ph = panel_size
  image = Image.new("RGB", (pw * max(len(panels), 1), ph), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  font, small = figures.load_font(14), figures.load_font(11)
  for k, (title, xlabel, series) in enumerate(panels):
    x0 = k * pw
    left, right, top, bottom = x0 + 58, x0 + pw - 14, 50, ph - 42
    legend, lx, row = [], left + 6, 0
    for name, _, _, color, style in series:
      if not name:
        continue
      width = draw.textbbox((0, 0), name, font=small)[2] + 34
      if lx + width > right and lx > left + 6:
        lx, row = left + 6, row + 1
      legend.append((lx, 36 + 15 * row, name, color, style))
      lx += width
    top += 15 * row
    tb = draw.textbbox((0, 0), title, font=font)
    draw.text(((left + right - (tb[2] - tb[0])) // 2, 6), title, fill=(0, 0, 0), font=font)
    series = [s for s in series if len(s[1])]
    if not series:
      draw.text((left + 10, (top + bottom) // 2), "no data", fill=(0, 0, 0), font=small)
      continue
    xs_all = np.concatenate([np.asarray(s[1], float) for s in series])
    ys_all = np.concatenate([np.asarray(s[2], float) for s in series])
    ys_all = ys_all[np.isfinite(ys_all)]
    xt = figures.nice_ticks(float(xs_all.min()), float(xs_all.max()))
    lo, hi = (float(ys_all.min()), float(ys_all.max())) if ys_all.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    yt = figures.nice_ticks(lo - pad, hi + pad)
    xlo, xhi, ylo, yhi = float(xt[0]), float(xt[-1]), float(yt[0]), float(yt[-1])
    px = lambda v: left + (right - left) * (v - xlo) / ((xhi - xlo) or 1.0)
    py = lambda v: bottom - (bottom - top) * (v - ylo) / ((yhi - ylo) or 1.0)
    ystep = float(yt[1] - yt[0]) if len(yt) > 1 else 1.0
    xstep = float(xt[1] - xt[0]) if len(xt) > 1 else 1.0
    for t in yt:
      draw.line([left, py(t), right, py(t)], fill=(228, 228, 228))
      lab = _label(float(t), ystep)
      lb = draw.textbbox((0, 0), lab, font=small)
      draw.text((left - 6 - (lb[2] - lb[0]), py(t) - 7), lab, fill=(0, 0, 0), font=small)
    for t in xt:
      draw.line([px(t), bottom, px(t), bottom + 4], fill=(0, 0, 0))
      lab = _label(float(t), xstep)
      lb = draw.textbbox((0, 0), lab, font=small)
      draw.text((px(t) - (lb[2] - lb[0]) / 2, bottom + 6), lab, fill=(0, 0, 0), font=small)
    xb = draw.textbbox((0, 0), xlabel, font=small)
    draw.text(((left + right - (xb[2] - xb[0])) / 2, bottom + 22), xlabel, fill=(0, 0, 0),
              font=small)
    for name, xs, ys, color, style in series:
      pts = [(px(x), py(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
      if style == "line" and len(pts) > 1:
        draw.line(pts, fill=color, width=2)
      else:
        for x, y in pts:
          draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], outline=color, width=2)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for lx, ly, name, color, style in legend:
      draw.line([lx, ly, lx + 16, ly], fill=color, width=2 if style == "line" else 1)
      draw.text((lx + 20, ly - 7), name, fill=(0, 0, 0), font=small)
  return figures.save_png(np.asarray(image), path)


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


