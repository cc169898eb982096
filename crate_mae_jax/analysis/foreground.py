"""Foreground score of attention maps: is the cls token looking at the object?

Fashion-MNIST gives an exact foreground mask for free: the object's non-zero
pixels on a zero background. A patch is an object patch when any of its pixels
is. For the cls token's attention row of every head in every encoder layer
(`diagnostics.cls_attention_layers`) two scores are measured per image:

* mass share: the share of the attention over the patches that falls on object
  patches, Σ_object a / Σ_patches a (the cls-to-cls weight is left out, so the
  share is about where among the patches the head looks);
* IoU: the top-k patches of the map, k = the object's patch count, against the
  object's patches, |T ∩ F| / |T ∪ F|.

Chance level, the same scores for a uniform map: the mass share is the object
fraction k / L; its top-k is undefined (every patch ties), so its IoU is taken
as the expected IoU of k patches drawn at random without replacement, computed
exactly from the hypergeometric law of the overlap (`expected_random_iou`).
Images whose object covers no patch or every patch are left out: there both
scores are fixed by the mask whatever the map. Numpy, except the model pass.
"""
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Data sources (`config.data.source`) whose images carry an exact foreground: the object's
# non-zero pixels. 'tfds' qualifies with config.data.name 'fashion_mnist'.
MASK_SOURCES = ("fashion_mnist", "quickstart")
PIXEL_THRESHOLD = 0.5 / 255   # a pixel is foreground above half a grey level


def gives_masks(data_cfg) -> bool:
  """Whether the images of `data_cfg` have a foreground mask (Fashion-MNIST)."""
  source = data_cfg.get("source") if hasattr(data_cfg, "get") else data_cfg.source
  name = data_cfg.get("name") if hasattr(data_cfg, "get") else data_cfg.name
  return source in MASK_SOURCES or (source == "tfds" and name == "fashion_mnist")


# ----------------------------------------------------------------------------- masks


def foreground_pixels(raw) -> np.ndarray:
  """Raw images (B, H, W[, C]), uint8 or in [0, 1] -> (B, H, W) bool: any channel non-zero."""
  x = np.asarray(raw)
  if x.ndim == 4:
    x = x.max(axis=-1)
  if x.ndim != 3:
    raise ValueError(f"foreground_pixels expects (batch, H, W[, C]) images, got {x.shape}")
  return x > 0


def foreground_from_normalized(images, mean: Sequence[float] | float,
                               std: Sequence[float] | float,
                               threshold: float = PIXEL_THRESHOLD) -> np.ndarray:
  """Normalised model inputs (B, H, W, C) -> (B, H, W) bool: pixel value above
  `threshold` in [0, 1] units after undoing (x - mean) / std."""
  x = np.asarray(images, np.float64) * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
  return (x > threshold).any(axis=-1)


def object_patches(images, mean, std, patch_size: int) -> np.ndarray:
  """Normalised model inputs (B, H, W, C) -> (B, gh, gw) bool object patches."""
  return patch_foreground(foreground_from_normalized(images, mean, std), patch_size)


def patch_foreground(pixel_masks, patch_size: int) -> np.ndarray:
  """(B, H, W) bool pixel masks -> (B, gh, gw) bool: the patch holds an object pixel."""
  m = np.asarray(pixel_masks, bool)
  b, h, w = m.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"mask size {(h, w)} is not divisible by patch size {patch_size}")
  m = m.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
  return m.any(axis=(2, 4))


# ----------------------------------------------------------------------------- scores


def expected_random_iou(k: int, n: int) -> float:
  """E[|T ∩ F| / |T ∪ F|] for T a uniformly random k-subset of n patches and |F| = k.

  The overlap m is hypergeometric, P(m) = C(k, m) C(n-k, k-m) / C(n, k), and
  the IoU of two k-sets overlapping in m is m / (2k - m); summed exactly.
  """
  if not 0 <= k <= n:
    raise ValueError(f"expected_random_iou: need 0 <= k <= n, got k={k}, n={n}")
  if k == 0:
    return float("nan")
  total = math.comb(n, k)
  return float(sum(math.comb(k, m) * math.comb(n - k, k - m) * m / (2 * k - m)
                   for m in range(max(0, 2 * k - n), k + 1)) / total)


def per_image_scores(attention, foreground) -> dict[str, np.ndarray]:
  """Scores of each image, head and layer.

  attention: (layers, B, heads, gh, gw) cls-token attention over the patches
  (`diagnostics.cls_attention_layers`); foreground: (B, gh, gw) bool object
  patches. Returns 'mass' and 'iou' (layers, B, heads), 'chance_mass' and
  'chance_iou' (B,) of a uniform map, 'object_patches' (B,) and 'informative'
  (B,) bool: 0 < object patches < L.
  """
  a = np.asarray(attention, np.float64)
  f = np.asarray(foreground, bool)
  if a.ndim != 5 or a.shape[1] != f.shape[0] or a.shape[3:] != f.shape[1:]:
    raise ValueError(f"attention {a.shape} must be (layers, B, heads, gh, gw) over the "
                     f"foreground's (B, gh, gw) {f.shape}")
  layers, b, heads = a.shape[:3]
  a = a.reshape(layers, b, heads, -1)
  f = f.reshape(b, -1)
  n = f.shape[1]
  k = f.sum(axis=1)
  total = a.sum(axis=-1)
  mass = (a * f[None, :, None]).sum(axis=-1) / np.where(total > 0, total, 1.0)
  # rank 0 = most attended patch; the top-k set is rank < k, k per image
  rank = np.argsort(np.argsort(-a, axis=-1, kind="stable"), axis=-1, kind="stable")
  top = rank < k[None, :, None, None]
  inter = (top & f[None, :, None]).sum(axis=-1)
  union = 2 * k[None, :, None] - inter
  iou = inter / np.where(union > 0, union, 1)
  chance_iou = np.array([expected_random_iou(int(ki), n) for ki in k])
  return {"mass": mass, "iou": iou, "chance_mass": k / n, "chance_iou": chance_iou,
          "object_patches": k, "informative": (k > 0) & (k < n)}


def concat_scores(parts: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Joins `per_image_scores` of several batches along the image axis."""
  parts = list(parts)
  if not parts:
    raise ValueError("concat_scores: no batches")
  return {key: np.concatenate([p[key] for p in parts], axis=1 if parts[0][key].ndim == 3 else 0)
          for key in parts[0]}


def summarise(scores: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Means over the informative images: 'mass', 'iou' (layers, heads), their
  standard errors '*_se', the chance levels 'chance_mass', 'chance_iou'
  (floats) and the image counts."""
  keep = np.asarray(scores["informative"], bool)
  if not keep.any():
    raise ValueError("foreground scores: no image has an object that covers some but not "
                     "all patches")
  out: dict[str, Any] = {"num_images": int(keep.size), "num_informative": int(keep.sum())}
  for key in ("mass", "iou"):
    values = scores[key][:, keep]                       # (layers, n, heads)
    out[key] = values.mean(axis=1)
    out[f"{key}_se"] = (values.std(axis=1, ddof=1) / np.sqrt(values.shape[1])
                        if values.shape[1] > 1 else np.zeros_like(out[key]))
  for key in ("chance_mass", "chance_iou"):
    out[key] = float(np.mean(scores[key][keep]))
  out["object_fraction"] = out["chance_mass"]
  return out


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
  """Flat scalars for TensorBoard: 'mass/layer_00/head_0', 'mass/layer_00/mean',
  'iou/...', 'chance/mass', 'chance/iou'."""
  out = {"chance/mass": summary["chance_mass"], "chance/iou": summary["chance_iou"]}
  for key in ("mass", "iou"):
    values = np.asarray(summary[key])
    for layer, row in enumerate(values):
      out[f"{key}/layer_{layer:02d}/mean"] = float(row.mean())
      for head, value in enumerate(row):
        out[f"{key}/layer_{layer:02d}/head_{head}"] = float(value)
  return out


def to_json(summary: Mapping[str, Any]) -> dict[str, Any]:
  """`summarise`'s output with arrays as nested lists, plus per-layer head means."""
  out = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
         for k, v in summary.items()}
  for key in ("mass", "iou"):
    out[f"{key}_layer_mean"] = np.asarray(summary[key]).mean(axis=1).tolist()
  return out


# ----------------------------------------------------------------------------- model


def foreground_scores(attention_fn, images, foreground, batch_size: int = 500
                      ) -> dict[str, Any]:
  """`summarise` of the cls attention maps `attention_fn(images)` gives (every
  encoder layer and head: `diagnostics.cls_attention_layers` of a CRATE-MAE or
  ViT-MAE and its parameters) on normalised `images` (N, H, W, C), with the
  object patches `foreground` (N, gh, gw), in batches of `batch_size`."""
  images, foreground = np.asarray(images), np.asarray(foreground, bool)
  parts = []
  for start in range(0, len(images), batch_size):
    attention = attention_fn(images[start:start + batch_size])
    parts.append(per_image_scores(attention, foreground[start:start + batch_size]))
  return summarise(concat_scores(parts))
