"""Pure-JAX image augmentation: random resized crop, flip, RandAugment, mixup/cutmix.

No TensorFlow. Everything is jittable with static output shapes, so it can run
inside the jitted train step (`source.device_augment`, used for in-memory
sources) and `mixup_cutmix` is what the fine-tuning step calls.

Crops and resizes go through `jax.image.scale_and_translate` (per sample, vmapped,
the box traced): pixel centres, the kernel widened by the down-scaling factor so
down-sampling is anti-aliased, weights renormalised at the borders -- PIL's
convention (its bicubic is Keys' a = -0.5, as JAX's), so the result matches PIL's
resize to within rounding. A horizontal flip reverses the resized columns; the
eval resize is the same call with a fixed box.

RandAugment follows timm's `rand-m{M}-mstd0.5-inc1` (the MAE fine-tuning
recipe): per layer one of the 15 ops in `RANDAUGMENT_OPS`, applied with
probability 0.5, magnitude M + N(0, 0.5) clipped to [0, 10], a random sign for
the signed ops. `input_pipeline` implements the same ops with TF for tf.data
(the two agree op by op on the same image and arguments).

Random numbers are drawn in few, vector-valued calls (one uniform vector per
sample for the crop and flip, one per RandAugment layer, one log-gamma vector
for mixup/cutmix): this keeps compile times low on CPU.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateX", "TranslateY")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
RANDAUGMENT_PROB = 0.5
RANDAUGMENT_MAGNITUDE_STD = 0.5
FILL_VALUE = 128.0
SMALL_IMAGE = 64          # eval: images with both sides <= this are just resized
EVAL_CROP_FRACTION = 0.875
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------ magnitudes
# Shared by the JAX and the TF implementation (plain arithmetic on either).
def rotate_degrees(level, sign):
  return 30.0 * level * sign


def shear_amount(level, sign):
  return 0.3 * level * sign


def translate_fraction(level, sign):
  return 0.45 * level * sign


def posterize_bits(level, floor=math.floor):
  return 4 - floor(level * 4.0)


def solarize_threshold(level):
  return 256.0 - level * 256.0


def solarize_add(level):
  return 110.0 * level


def enhance_factor(level, sign):
  return 1.0 + 0.9 * level * sign


def affine_params(op: str, level, sign, height: int, width: int, xp=jnp):
  """(a0, a1, a2, b0, b1, b2): output pixel (x, y) samples input (a0 x + a1 y + a2,
  b0 x + b1 y + b2), in pixel-index coordinates. `xp`: jnp or tf."""
  one, zero = xp.ones_like(level), xp.zeros_like(level)
  if op == "Rotate":
    t = rotate_degrees(level, sign) * (math.pi / 180.0)
    c, s = xp.cos(t), xp.sin(t)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return (c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy)
  if op == "ShearX":
    return (one, shear_amount(level, sign), zero, zero, one, zero)
  if op == "ShearY":
    return (one, zero, zero, shear_amount(level, sign), one, zero)
  if op == "TranslateX":
    return (one, zero, translate_fraction(level, sign) * width, zero, one, zero)
  if op == "TranslateY":
    return (one, zero, zero, zero, one, translate_fraction(level, sign) * height)
  raise ValueError(op)


# ------------------------------------------------------------------ resampling
_METHODS = {"bilinear": "linear", "linear": "linear", "bicubic": "cubic", "cubic": "cubic"}


def resize_method(method: str) -> str:
  """The `jax.image` name of an interpolation ('bilinear' or 'bicubic')."""
  if method not in _METHODS:
    raise ValueError(f"interpolation {method!r} is unknown; use 'bilinear' or 'bicubic'")
  return _METHODS[method]


def crop_and_resize(images, top, left, crop_h, crop_w, size: int, method: str = "bicubic"):
  """The box rows [top, top + crop_h) x columns [left, left + crop_w) of (..., H, W, C)
  images, resampled to (..., size, size, C) (anti-aliased when the box is larger).

  The box may be fractional and traced (vmap it for one box per sample); it must
  lie inside the image.
  """
  scale = jnp.stack([size / jnp.asarray(crop_h, jnp.float32),
                     size / jnp.asarray(crop_w, jnp.float32)])
  translation = -jnp.stack([jnp.asarray(top, jnp.float32),
                            jnp.asarray(left, jnp.float32)]) * scale
  shape = images.shape[:-3] + (size, size, images.shape[-1])
  spatial = (images.ndim - 3, images.ndim - 2)
  return jax.image.scale_and_translate(images, shape, spatial, scale, translation,
                                       resize_method(method), antialias=True, precision=_HI)


def eval_box(height: int, width: int, image_size: int) -> tuple[float, float, float, float]:
  """Eval geometry as a box of the input, (top, left, crop_h, crop_w): small images
  (both sides <= 64) are resized whole to image_size; larger ones have the shorter
  side resized to image_size / 0.875 and are centre-cropped to image_size (the
  crop offset rounded to whole pixels of the resized image, as tf_sources does)."""
  if max(height, width) <= SMALL_IMAGE:
    return 0.0, 0.0, float(height), float(width)
  short = int(round(image_size / EVAL_CROP_FRACTION))
  box = []
  for size in (height, width):
    resized = max(int(round(size * short / min(height, width))), image_size)
    offset = int(round((resized - image_size) / 2.0))
    px = size / resized  # input pixels per resized pixel
    box.append((offset * px, image_size * px))
  (top, crop_h), (left, crop_w) = box
  return top, left, crop_h, crop_w


def random_resized_crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=RATIO,
                            attempts: int = CROP_ATTEMPTS, u=None):
  """torchvision's RandomResizedCrop.get_params: (top, left, crop_h, crop_w).

  `u`: optional (2 * attempts + 2,) uniforms to use instead of drawing from `key`."""
  if u is None:
    u = jax.random.uniform(key, (2 * attempts + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  r = jnp.exp(lo + (hi - lo) * u[attempts:2 * attempts])
  cw = jnp.round(jnp.sqrt(area * r))
  ch = jnp.round(jnp.sqrt(area / r))
  ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
  first = jnp.argmax(ok)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = float(width), float(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fw, fh = float(round(height * ratio[1])), float(height)
  else:
    fw, fh = float(width), float(height)
  found = ok.any()
  ch = jnp.where(found, ch[first], fh)
  cw = jnp.where(found, cw[first], fw)
  top = jnp.floor(u[2 * attempts] * (height - ch + 1))
  left = jnp.floor(u[2 * attempts + 1] * (width - cw + 1))
  top = jnp.where(found, top, jnp.floor((height - ch) / 2))
  left = jnp.where(found, left, jnp.floor((width - cw) / 2))
  return top, left, ch, cw


def adapt_channels(images, channels: int):
  """(..., C0) -> (..., channels): 1 -> 3 tiles, 3/4 -> 1 takes luminance (ITU-R 601)."""
  c0 = images.shape[-1]
  if c0 == channels:
    return images
  if c0 == 1:
    return jnp.repeat(images, channels, axis=-1)
  if channels == 1 and c0 >= 3:
    w = jnp.asarray([0.299, 0.587, 0.114], images.dtype)
    return jnp.sum(images[..., :3] * w, axis=-1, keepdims=True)
  if channels == 3 and c0 == 4:
    return images[..., :3]
  raise ValueError(f"cannot convert {c0}-channel images to {channels} channels")


# ------------------------------------------------------------------ RandAugment
def _blend(degenerate, image, factor):
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _gray(image):
  if image.shape[-1] == 1:
    return image
  return jnp.sum(image * jnp.asarray([0.299, 0.587, 0.114], image.dtype), -1, keepdims=True)


def _autocontrast(image):
  lo = image.min(axis=(0, 1), keepdims=True)
  hi = image.max(axis=(0, 1), keepdims=True)
  scaled = (image - lo) * (255.0 / jnp.where(hi > lo, hi - lo, 1.0))
  return jnp.where(hi > lo, scaled, image)


def _equalize(image):
  """PIL's ImageOps.equalize, per channel (one histogram scatter for all channels)."""
  h, w, c = image.shape
  q = jnp.clip(jnp.round(image), 0, 255).astype(jnp.int32) + 256 * jnp.arange(c)
  hist = jnp.zeros(256 * c, jnp.int32).at[q.ravel()].add(1).reshape(c, 256)
  last = jnp.take_along_axis(hist, (255 - jnp.argmax(hist[:, ::-1] > 0, axis=1))[:, None], 1)
  step = (h * w - last) // 255                                     # (c, 1)
  lut = (jnp.cumsum(hist, axis=1) - hist + step // 2) // jnp.maximum(step, 1)
  out = jnp.clip(lut, 0, 255).reshape(-1)[q].astype(image.dtype)
  return jnp.where(step[:, 0] == 0, image, out)


def _posterize(image, bits):
  shift = (8 - bits).astype(jnp.int32)
  q = jnp.clip(image, 0, 255).astype(jnp.int32)
  return ((q >> shift) << shift).astype(image.dtype)


def _sharpness(image, factor):
  h, w, _ = image.shape
  if h < 3 or w < 3:
    return image
  k = ((1, 1, 1), (1, 5, 1), (1, 1, 1))
  smooth = sum(k[i][j] * image[i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3))
  degenerate = image.at[1:-1, 1:-1].set(smooth / 13.0)
  return _blend(degenerate, image, factor)


def _warp(image, params):
  """Bilinear affine warp, constant fill outside (one gather per corner)."""
  a0, a1, a2, b0, b1, b2 = params
  h, w, _ = image.shape
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing="ij")
  xs, ys = a0 * x + a1 * y + a2, b0 * x + b1 * y + b2
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
  flat = image.reshape(h * w, -1)
  out = 0.0
  for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                      (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
    yy, xx = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
    inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
    idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
    out = out + wgt * jnp.where(inside, flat[idx], FILL_VALUE)
  return out


def _pixel_op(name: str, image, level, sign):
  if name == "AutoContrast":
    return _autocontrast(image)
  if name == "Equalize":
    return _equalize(image)
  if name == "Invert":
    return 255.0 - image
  if name == "Posterize":
    return _posterize(image, posterize_bits(level, jnp.floor))
  if name == "Solarize":
    return jnp.where(image >= solarize_threshold(level), 255.0 - image, image)
  if name == "SolarizeAdd":
    return jnp.where(image < 128.0, jnp.clip(image + solarize_add(level), 0, 255), image)
  if name == "Color":
    return _blend(jnp.broadcast_to(_gray(image), image.shape), image,
                  enhance_factor(level, sign))
  if name == "Contrast":
    mean = jnp.mean(_gray(image))
    return _blend(jnp.full_like(image, mean), image, enhance_factor(level, sign))
  if name == "Brightness":
    return _blend(jnp.zeros_like(image), image, enhance_factor(level, sign))
  if name == "Sharpness":
    return _sharpness(image, enhance_factor(level, sign))
  return image  # the affine ops are applied by _warp


def randaugment(key, image, layers: int, magnitude: float):
  """timm-style RandAugment of one float image (H, W, C) in [0, 255]."""
  h, w, _ = image.shape
  affine_ids = [RANDAUGMENT_OPS.index(n) for n in AFFINE_OPS]
  num_ops = len(RANDAUGMENT_OPS)

  def layer(image, u):
    op = jnp.minimum(jnp.floor(u[0] * num_ops), num_ops - 1).astype(jnp.int32)
    noise = jax.scipy.special.ndtri(jnp.clip(u[2], 1e-7, 1.0 - 1e-7))
    level = jnp.clip(magnitude + RANDAUGMENT_MAGNITUDE_STD * noise, 0.0, 10.0) / 10.0
    sign = jnp.where(u[3] < 0.5, -1.0, 1.0)
    # One warp per layer: the affine op's matrix is selected, not each op warped.
    params = [affine_params(n, level, sign, h, w) for n in AFFINE_OPS]
    chosen = tuple(jnp.select([op == i for i in affine_ids], [p[k] for p in params], 0.0)
                   for k in range(6))
    is_affine = jnp.isin(op, jnp.asarray(affine_ids))
    out = jnp.where(is_affine, _warp(image, chosen), image)
    branches = [lambda x, n=n: _pixel_op(n, x, level, sign) for n in RANDAUGMENT_OPS]
    out = jax.lax.switch(op, branches, out)
    return jnp.where(u[1] < RANDAUGMENT_PROB, out, image), None

  image, _ = jax.lax.scan(layer, image, jax.random.uniform(key, (layers, 4)))
  return image


# ------------------------------------------------------------------ the device augmentation
def identity_augment(rng, images, train: bool = False):
  """The device augmentation of sources whose host pipeline already augmented and
  normalised the images (tf.data): consumers call `source.device_augment` always."""
  del rng, train
  return images


def make_device_augment(*, image_size: int, mean: Sequence[float], std: Sequence[float],
                        crop_scale=(0.2, 1.0), flip: bool = True, randaugment_layers: int = 0,
                        randaugment_magnitude: float = 9.0, method: str = "bicubic",
                        ratio=RATIO) -> Callable:
  """Returns `augment(rng, images, train) -> float32 (B, S, S, C)` normalised images.

  `images`: (B, H, W, C0) uint8 or float pixel values in [0, 255] (raw arrays);
  C0 is converted to C = len(mean). train=True: random resized crop (scale
  crop_scale, ratio 3/4-4/3, `method`), horizontal flip (p=0.5, if `flip`),
  RandAugment (if randaugment_layers > 0), normalisation. train=False: the eval
  resize (see `eval_box`) and normalisation; rng is unused. Pure
  and jittable; `train` must be a Python bool. Per-sample keys are split from
  `rng`, so the output is a function of (rng, images).
  """
  resize_method(method)  # an unknown interpolation fails here, not inside jit
  channels = len(mean)
  mean_a = np.asarray(mean, np.float32) * 255.0
  std_a = np.asarray(std, np.float32) * 255.0
  scale = tuple(float(s) for s in crop_scale)
  n_box = 2 * CROP_ATTEMPTS + 2

  def normalise(x):
    return (x - mean_a) / std_a

  def train_one(key, image):
    h, w, _ = image.shape
    k_geo, k_ra = jax.random.split(key)
    u = jax.random.uniform(k_geo, (n_box + 1,))  # the box, then the flip
    top, left, ch, cw = random_resized_crop_box(None, h, w, scale, ratio, u=u[:n_box])
    out = jnp.clip(crop_and_resize(image, top, left, ch, cw, image_size, method), 0.0, 255.0)
    if flip:
      out = jnp.where(u[n_box] < 0.5, out[:, ::-1], out)
    out = adapt_channels(out, channels)
    if randaugment_layers > 0:
      out = randaugment(k_ra, out, randaugment_layers, randaugment_magnitude)
    return normalise(out)

  @jax.jit
  def train_fn(rng, images):
    images = jnp.asarray(images).astype(jnp.float32)
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(train_one)(keys, images)

  @jax.jit
  def eval_fn(images):
    images = jnp.asarray(images).astype(jnp.float32)
    _, h, w, _ = images.shape
    if (h, w) == (image_size, image_size):
      out = images
    else:
      out = crop_and_resize(images, *eval_box(h, w, image_size), image_size, method)
      out = jnp.clip(out, 0.0, 255.0)
    return normalise(adapt_channels(out, channels))

  def augment(rng, images, train: bool):
    if images.ndim != 4:
      raise ValueError(f"device_augment expects (B, H, W, C) images, got {images.shape}")
    return train_fn(rng, images) if train else eval_fn(images)

  return augment


# ------------------------------------------------------------------ mixup / cutmix
def mixup_cutmix(rng, images, labels_onehot, mixup_alpha: float, cutmix_alpha: float,
                 switch_prob: float = 0.5):
  """timm's batch-mode Mixup: pairs each sample with the batch reversed.

  With both alphas > 0, cutmix is used with probability `switch_prob`, else
  mixup; lambda ~ Beta(alpha, alpha). Cutmix pastes a box of area ~(1 - lambda)
  from the paired image and corrects lambda to the pasted area. Returns
  (images, targets), targets = lam * y + (1 - lam) * y[::-1] (rows still sum to
  1). Alphas are Python floats (static); both 0 returns the inputs unchanged.
  """
  mixup_alpha, cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels_onehot
  k_gamma, k_u = jax.random.split(rng)
  # Beta(a, a) = G1 / (G1 + G2), G ~ Gamma(a): one log-gamma draw serves both.
  alphas = np.repeat([mixup_alpha if mixup_alpha > 0 else 1.0,
                      cutmix_alpha if cutmix_alpha > 0 else 1.0], 2).astype(np.float32)
  lg = jax.random.loggamma(k_gamma, jnp.asarray(alphas))
  lam_mix, lam_cut = jax.nn.sigmoid(lg[0] - lg[1]), jax.nn.sigmoid(lg[2] - lg[3])
  u = jax.random.uniform(k_u, (3,))
  dtype = images.dtype
  x = images.astype(jnp.float32)
  y = labels_onehot.astype(jnp.float32)
  x_rev, y_rev = x[::-1], y[::-1]
  _, h, w, _ = x.shape
  outs, lams = [], []
  if mixup_alpha > 0:
    outs.append(lam_mix * x + (1.0 - lam_mix) * x_rev)
    lams.append(lam_mix)
  if cutmix_alpha > 0:
    cut = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy = jnp.minimum(jnp.floor(u[1] * h), h - 1).astype(jnp.int32)
    cx = jnp.minimum(jnp.floor(u[2] * w), w - 1).astype(jnp.int32)
    y1, y2 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x1, x2 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    iy = jnp.arange(h)[:, None]
    ix = jnp.arange(w)[None, :]
    box = (iy >= y1) & (iy < y2) & (ix >= x1) & (ix < x2)
    outs.append(jnp.where(box[None, :, :, None], x_rev, x))
    lams.append(1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w))
  if len(outs) == 2:
    use_cut = u[0] < switch_prob
    out, lam = jnp.where(use_cut, outs[1], outs[0]), jnp.where(use_cut, lams[1], lams[0])
  else:
    out, lam = outs[0], lams[0]
  targets = lam * y + (1.0 - lam) * y_rev
  return out.astype(dtype), targets.astype(labels_onehot.dtype)
