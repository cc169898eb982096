"""PNG figures of the diagnostics.

Image grids (reconstructions, attention overlays, PCA) are tiled arrays: images
come in as float arrays in [0, 1] (or uint8), NHWC with 1 or 3 channels, and
`grid_image` tiles them into one uint8 (H, W, 3) array, which the train loop can
also log to TensorBoard as it is. Plots with axes (the per-layer measures, the
study's curves) are matplotlib figures rendered by the Agg canvas: no display, no
pyplot state. matplotlib is imported inside the functions that need it, so the
train step and the grids never load it.
"""
import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 96                      # small images are upscaled (nearest) to at least this
BORDER = 2
BORDER_COLOR = (255, 255, 255)
HEADER = 20                        # title row height, pixels
RECONSTRUCTION_TITLES = ("original", "masked", "reconstruction", "recon. + visible")

HEAT_COLORMAP = "plasma"            # perceptually ordered, dark blue -> yellow
ENCODER_COLOR = "tab:blue"
DECODER_COLOR = "tab:orange"
DPI = 100


def load_font(size: int = 12):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType sizes
    return ImageFont.load_default()


def to_uint8(x) -> np.ndarray:
  """Float [0, 1] (or uint8) HxW, HxWx1 or HxWx3 -> uint8 HxWx3."""
  x = np.asarray(x)
  if x.dtype != np.uint8:
    x = np.round(np.clip(np.nan_to_num(x.astype(np.float32)), 0.0, 1.0) * 255).astype(np.uint8)
  if x.ndim == 2:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"expected 1 or 3 channels, got shape {x.shape}")
  return x


def auto_scale(height: int, min_tile: int = MIN_TILE) -> int:
  """Integer upscale factor that brings a tile of `height` pixels to at least `min_tile`."""
  return max(1, math.ceil(min_tile / max(height, 1)))


def upsample(x, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
  """Resizes (h, w) or (h, w, c) float maps to `size` = (H, W): 'nearest' or 'bilinear'."""
  x = np.asarray(x, np.float32)
  squeeze = x.ndim == 2
  if squeeze:
    x = x[..., None]
  resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}[mode]
  out = np.stack([np.asarray(Image.fromarray(x[..., i], mode="F").resize(
      (size[1], size[0]), resample)) for i in range(x.shape[-1])], axis=-1)
  return out[..., 0] if squeeze else out


def heatmap(values) -> np.ndarray:
  """Values in [0, 1] (any shape) -> float RGB in [0, 1] with matplotlib's HEAT_COLORMAP."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
  return np.asarray(matplotlib.colormaps[HEAT_COLORMAP](v)[..., :3], np.float32)


def grid_image(tiles, border: int = BORDER, scale: int | None = None,
               titles: Sequence[str] | None = None,
               border_color: tuple[int, int, int] = BORDER_COLOR) -> np.ndarray:
  """Tiles rows × columns of equally sized images into one uint8 (H, W, 3) array.

  `tiles`: an array (rows, cols, h, w, c); a list of rows, each a list of
  (h, w, c) images; or a tuple/list of arrays (B, h, w, c), one per *column*
  (e.g. the panels of `diagnostics.reconstruction_panels`: rows = images).
  Images are float in [0, 1] or uint8, c = 1 or 3. Each tile is upscaled
  (nearest) by `scale` (default: `auto_scale(h)`), tiles are separated and
  framed by `border` pixels; `titles` (one per column) adds a header row of
  `HEADER` pixels. Size: W = cols·w·scale + (cols+1)·border,
  H = [HEADER] + rows·h·scale + (rows+1)·border.
  """
  if isinstance(tiles, (tuple, list)) and tiles and all(
      hasattr(t, "shape") and len(t.shape) == 4 for t in tiles) and len(
          {t.shape[0] for t in tiles}) == 1:
    tiles = [[np.asarray(col)[i] for col in tiles] for i in range(tiles[0].shape[0])]
  rows = [[to_uint8(t) for t in row] for row in tiles]
  n_rows, n_cols = len(rows), max(len(r) for r in rows)
  h, w = rows[0][0].shape[:2]
  scale = auto_scale(h) if scale is None else int(scale)
  th, tw = h * scale, w * scale
  top = HEADER if titles else 0
  canvas = np.empty((top + n_rows * th + (n_rows + 1) * border,
                     n_cols * tw + (n_cols + 1) * border, 3), np.uint8)
  canvas[:] = np.asarray(border_color, np.uint8)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      if tile.shape[:2] != (h, w):
        raise ValueError(f"tile ({r}, {c}) has shape {tile.shape}, expected ({h}, {w}, 3)")
      tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
      y = top + border + r * (th + border)
      x = border + c * (tw + border)
      canvas[y:y + th, x:x + tw] = tile
  if titles:
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = load_font(12)
    for c, title in enumerate(titles[:n_cols]):
      x0 = border + c * (tw + border)
      left, t, right, b = draw.textbbox((0, 0), title, font=font)
      draw.text((x0 + max(0, (tw - (right - left)) // 2), max(0, (HEADER - (b - t)) // 2 - t)),
                title, fill=(0, 0, 0), font=font)
    canvas = np.asarray(image)
  return canvas


def save_png(array, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(to_uint8(array)).save(path, format="PNG")
  return path


def reconstruction_grid(panels: Sequence[np.ndarray], scale: int | None = None,
                        titles: Sequence[str] | None = RECONSTRUCTION_TITLES) -> np.ndarray:
  """Rows = images, columns = the panels of `diagnostics.reconstruction_panels`."""
  return grid_image([np.asarray(p) for p in panels], scale=scale, titles=titles)


def save_reconstruction(panels: Sequence[np.ndarray], path: str, scale: int | None = None,
                        titles: Sequence[str] | None = RECONSTRUCTION_TITLES) -> str:
  """Writes the reconstruction grid as a PNG; returns `path`."""
  return save_png(reconstruction_grid(panels, scale, titles), path)


def attention_overlays(images, attention, alpha: float = 0.55,
                       mode: str = "bilinear") -> np.ndarray:
  """Heatmaps of (B, heads, gh, gw) maps upsampled onto (B, H, W, C) images in [0, 1].

  Each map is min-max scaled on its own, coloured and blended over the image
  with weight `alpha`. Returns (B, heads, H, W, 3) floats in [0, 1].
  """
  images = np.asarray(images, np.float32)
  attention = np.asarray(attention, np.float32)
  b, h, w = images.shape[:3]
  out = np.empty((b, attention.shape[1], h, w, 3), np.float32)
  for i in range(b):
    base = to_uint8(images[i]).astype(np.float32) / 255.0
    for k in range(attention.shape[1]):
      a = upsample(attention[i, k], (h, w), mode)
      lo, hi = a.min(), a.max()
      a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
      out[i, k] = (1 - alpha) * base + alpha * heatmap(a)
  return out


def save_attention(images, attention, path: str, alpha: float = 0.55,
                   scale: int | None = None, mode: str = "bilinear") -> str:
  """Rows = images; columns = the image, then the cls attention of each head overlaid."""
  overlays = attention_overlays(images, attention, alpha, mode)
  rows = [[np.asarray(images[i])] + list(overlays[i]) for i in range(overlays.shape[0])]
  titles = ["image"] + [f"head {k}" for k in range(overlays.shape[1])]
  return save_png(grid_image(rows, scale=scale, titles=titles), path)


def save_pca(images, pca_rgb, path: str, scale: int | None = None) -> str:
  """Rows = images; columns = the image and its first three feature PCs as RGB."""
  images = np.asarray(images, np.float32)
  h, w = images.shape[1:3]
  rows = [[images[i], upsample(pca_rgb[i], (h, w), "nearest")] for i in range(len(images))]
  return save_png(grid_image(rows, scale=scale, titles=["image", "PCA (RGB)"]), path)


# ----------------------------------------------------------------------------- plots


def new_figure(size: tuple[int, int]):
  """A matplotlib Figure of `size` = (width, height) pixels on an Agg canvas."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def figure_array(figure) -> np.ndarray:
  """The rendered figure as uint8 (H, W, 3), H x W = its size in pixels."""
  figure.canvas.draw()
  return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure, path: str) -> str:
  """Writes the figure as a PNG of exactly its pixel size; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, format="png", dpi=DPI)
  return path


_LAYERWISE_PANELS = (
    ("coding_rate", "Coding rate (compression) per layer", "coding rate R", None),
    ("sparsity", "Sparsity per layer: fraction non-zero", "non-zero fraction", (0.0, 1.0)))


def draw_layerwise(figure, measures: Mapping[str, np.ndarray]) -> None:
  """Two panels on `figure` (a Figure or SubFigure): coding rate and sparsity per layer,
  encoder and decoder lines with ±1 std bars, from `diagnostics.layerwise_measures`."""
  axes = figure.subplots(1, len(_LAYERWISE_PANELS))
  for ax, (measure, title, ylabel, y_range) in zip(axes, _LAYERWISE_PANELS):
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    ax.grid(True, color="0.9")
    for part, color in (("encoder", ENCODER_COLOR), ("decoder", DECODER_COLOR)):
      mean = measures.get(f"{part}/{measure}/mean")
      if mean is None or not np.size(mean):
        continue
      mean = np.asarray(mean, np.float64).reshape(-1)
      std = measures.get(f"{part}/{measure}/std")
      std = None if std is None else np.asarray(std, np.float64).reshape(-1)
      ax.errorbar(np.arange(len(mean)), mean, yerr=std, color=color, marker="o",
                  markersize=4, capsize=3, label=part)
    if ax.has_data():
      ax.legend(loc="best", fontsize="small")
      ax.xaxis.get_major_locator().set_params(integer=True)
      if y_range is not None:
        ax.set_ylim(*y_range)
    else:
      ax.set_axis_off()


def layerwise_figure(measures: Mapping[str, np.ndarray], size: tuple[int, int] = (960, 380)):
  """The per-layer coding-rate / sparsity figure (a matplotlib Figure of `size` pixels)."""
  figure = new_figure(size)
  draw_layerwise(figure, measures)
  return figure


def layerwise_image(measures: Mapping[str, np.ndarray], size: tuple[int, int] = (960, 380)
                    ) -> np.ndarray:
  """`layerwise_figure` rendered: uint8 (H, W, 3)."""
  return figure_array(layerwise_figure(measures, size))


def save_layerwise(measures: Mapping[str, np.ndarray], path: str,
                   size: tuple[int, int] = (960, 380)) -> str:
  """Writes the per-layer coding-rate / sparsity plot; returns `path`."""
  return save_figure(layerwise_figure(measures, size), path)
