"""PNG figures of the diagnostics, drawn with Pillow and numpy only.

Images come in as float arrays in [0, 1] (or uint8), NHWC with 1 or 3 channels.
`grid_image` is the building block: it tiles images into one uint8 (H, W, 3)
array, which the train loop can also log to TensorBoard as it is.
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

# A perceptually ordered dark-blue -> yellow colormap (anchor points, interpolated).
_HEAT = np.array([[0.050, 0.030, 0.530], [0.420, 0.000, 0.660], [0.690, 0.160, 0.560],
                  [0.880, 0.390, 0.370], [0.990, 0.650, 0.210], [0.940, 0.980, 0.130]])
ENCODER_COLOR = (31, 119, 180)
DECODER_COLOR = (255, 127, 14)


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
  """Values in [0, 1] (any shape) -> float RGB in [0, 1] with the heat colormap."""
  v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0) * (len(_HEAT) - 1)
  lo = np.floor(v).astype(int).clip(0, len(_HEAT) - 2)
  t = (v - lo)[..., None]
  return (_HEAT[lo] * (1 - t) + _HEAT[lo + 1] * t).astype(np.float32)


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


# ----------------------------------------------------------------------------- line plot


def nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
  if not np.isfinite(lo) or not np.isfinite(hi):
    lo, hi = 0.0, 1.0
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  raw = (hi - lo) / max(count - 1, 1)
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
  start = math.floor(lo / step) * step
  stop = math.ceil(hi / step) * step
  return np.arange(start, stop + step / 2, step)


def _fmt(value: float, step: float) -> str:
  decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
  if step * 10**decimals % 1:
    decimals += 1
  return f"{value:.{decimals}f}"


def _panel(image: Image.Image, box: tuple[int, int, int, int], title: str,
           ylabel: str, series: Sequence[tuple[str, np.ndarray, np.ndarray | None, tuple]],
           y_range: tuple[float, float] | None) -> None:
  draw = ImageDraw.Draw(image)
  font, small = load_font(14), load_font(11)
  x0, y0, x1, y1 = box
  left, right, top, bottom = x0 + 62, x1 - 12, y0 + 48, y1 - 44
  tb = draw.textbbox((0, 0), title, font=font)
  draw.text(((left + right - (tb[2] - tb[0])) // 2, y0 + 6), title, fill=(0, 0, 0), font=font)
  n = max(len(s[1]) for s in series)
  values = np.concatenate([np.concatenate([s[1], s[1] - (s[2] if s[2] is not None else 0),
                                           s[1] + (s[2] if s[2] is not None else 0)])
                           for s in series])
  values = values[np.isfinite(values)]
  if y_range is None:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = 0.08 * (hi - lo) if hi > lo else 0.5
    ticks = nice_ticks(lo - pad, hi + pad)
  else:
    ticks = nice_ticks(*y_range)
  ylo, yhi = float(ticks[0]), float(ticks[-1])
  step = float(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0

  def px(i):
    return left + 20 + (right - left - 40) * (i / max(n - 1, 1))

  def py(v):
    return bottom - (bottom - top) * (v - ylo) / (yhi - ylo)

  for t in ticks:
    y = py(t)
    draw.line([left, y, right, y], fill=(225, 225, 225))
    draw.line([left - 4, y, left, y], fill=(0, 0, 0))
    label = _fmt(float(t), step)
    lb = draw.textbbox((0, 0), label, font=small)
    draw.text((left - 7 - (lb[2] - lb[0]), y - (lb[3] + lb[1]) / 2), label, fill=(0, 0, 0),
              font=small)
  for i in range(n):
    x = px(i)
    draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
    label = str(i)
    lb = draw.textbbox((0, 0), label, font=small)
    draw.text((x - (lb[2] - lb[0]) / 2, bottom + 6), label, fill=(0, 0, 0), font=small)
  xb = draw.textbbox((0, 0), "layer", font=small)
  draw.text(((left + right - (xb[2] - xb[0])) / 2, bottom + 24), "layer", fill=(0, 0, 0),
            font=small)
  # vertical y label: render horizontally, rotate, paste.
  lb = draw.textbbox((0, 0), ylabel, font=small)
  label_img = Image.new("RGBA", (lb[2] + 2, lb[3] + 2), (255, 255, 255, 0))
  ImageDraw.Draw(label_img).text((0, 0), ylabel, fill=(0, 0, 0, 255), font=small)
  label_img = label_img.rotate(90, expand=True)
  image.paste(label_img, (x0 + 4, int((top + bottom - label_img.height) / 2)), label_img)

  for name, mean, std, color in series:
    pts = [(px(i), py(v)) for i, v in enumerate(mean) if np.isfinite(v)]
    if std is not None:
      for i, (v, s) in enumerate(zip(mean, std)):
        if np.isfinite(v) and np.isfinite(s) and s > 0:
          draw.line([px(i), py(v - s), px(i), py(v + s)], fill=color, width=1)
    if len(pts) > 1:
      draw.line(pts, fill=color, width=2)
    for x, y in pts:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
  draw.rectangle([left, top, right, bottom], outline=(0, 0, 0), width=1)
  # legend: one row between the title and the axes, centred
  widths = [draw.textbbox((0, 0), s[0], font=small)[2] + 40 for s in series]
  lx, ly = (left + right - sum(widths)) // 2, y0 + 30
  for (name, _, _, color), w in zip(series, widths):
    draw.line([lx, ly + 7, lx + 20, ly + 7], fill=color, width=2)
    draw.ellipse([lx + 7, ly + 4, lx + 13, ly + 10], fill=color)
    draw.text((lx + 25, ly), name, fill=(0, 0, 0), font=small)
    lx += w


def layerwise_image(measures: Mapping[str, np.ndarray], size: tuple[int, int] = (960, 380)
                    ) -> np.ndarray:
  """Two panels, coding rate and sparsity per layer, encoder and decoder lines with
  ±1 std bars, from the dict of `diagnostics.layerwise_measures`. uint8 (H, W, 3)."""
  width, height = size
  image = Image.new("RGB", (width, height), (255, 255, 255))
  specs = (("coding_rate", "Coding rate (compression) per layer", "coding rate R", None),
           ("sparsity", "Sparsity per layer: fraction non-zero", "non-zero fraction", (0.0, 1.0)))
  for k, (measure, title, ylabel, y_range) in enumerate(specs):
    series = []
    for part, color in (("encoder", ENCODER_COLOR), ("decoder", DECODER_COLOR)):
      mean = measures.get(f"{part}/{measure}/mean")
      if mean is not None and np.size(mean):
        std = measures.get(f"{part}/{measure}/std")
        series.append((part, np.asarray(mean, np.float64).reshape(-1),
                       None if std is None else np.asarray(std, np.float64).reshape(-1),
                       color))
    if not series:
      continue
    _panel(image, (k * width // 2, 0, (k + 1) * width // 2, height), title, ylabel, series,
           y_range)
  return np.asarray(image)


def save_layerwise(measures: Mapping[str, np.ndarray], path: str,
                   size: tuple[int, int] = (960, 380)) -> str:
  """Writes the per-layer coding-rate / sparsity plot; returns `path`."""
  return save_png(layerwise_image(measures, size), path)
