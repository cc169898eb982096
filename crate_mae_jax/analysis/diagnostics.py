"""White-box diagnostics: compression (coding rate) and sparsity, layer by layer.

CRATE layers are steps of an optimisation: MSSA compresses the tokens against
per-head subspaces, ISTA sparsifies them. These measures show whether a trained
network does what its construction says:

* coding rate of each layer's per-head projection w = LN(z) U, the quantity the
  CRATE paper plots (official `vis_utils/coding_rate.py`, ε = 0.01);
* sparsity, ‖Z‖₀ / (d · N), of each ISTA output.

The measures are pure `jax.numpy` and jittable; `make_measure_fn` compiles the
model pass and the measures together, which the train loop runs at evaluation.
Also here: the cls token's attention per head, a PCA of patch features and the
reconstruction panels of the MAE visualisation. Nothing here imports TensorFlow.
"""
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crate_mae_jax.models import patches

# Names sown by `layers.MSSA`, `layers.ISTA` and `layers.CrateDecoderLayer`.
SUBSPACE_PROJ = "subspace_proj"
SPARSE_CODE = "sparse_code"
DICTIONARY_OUT = "dictionary_out"


class NotWhiteBoxError(ValueError):
  """The model has no CRATE intermediates (e.g. ViT-MAE)."""


def _compute_dtype():
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _batch_mean_std(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and unbiased std (as torch.std) over the leading axis; std 0 for one image."""
  mean = values.mean(axis=0)
  if values.shape[0] < 2:
    return mean, jnp.zeros_like(mean)
  return mean, values.std(axis=0, ddof=1)


# ----------------------------------------------------------------------------- measures


def coding_rate_per_image(z: jax.Array, eps: float = 0.01) -> jax.Array:
  """Coding rate of each image: z (B, heads, N, d) -> (B,).

  The official definition: every token vector of every head is scaled to unit
  length, then R = ½ Σ_heads logdet(I_N + p/(N ε) Z Zᵀ) with p = d, the head
  dimension, and N the number of tokens. By Sylvester's identity the N×N
  determinant equals logdet(I_d + p/(N ε) Zᵀ Z), which is what is evaluated
  here (d ≤ N in every configuration, and never more than d×d work), through a
  Cholesky factor, in float32 (float64 when `jax_enable_x64` is on).
  A token vector that is exactly zero stays zero instead of becoming NaN.
  """
  if z.ndim != 4:
    raise ValueError(f"coding_rate expects (batch, heads, tokens, head_dim), got {z.shape}")
  dtype = _compute_dtype()
  z = z.astype(dtype)
  _, _, n, p = z.shape
  norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  z = z / jnp.maximum(norm, jnp.finfo(dtype).tiny)
  gram = jnp.einsum("bhnd,bhne->bhde", z, z, precision=jax.lax.Precision.HIGHEST)
  scalar = p / (n * eps)
  matrix = jnp.eye(p, dtype=dtype) + scalar * gram
  chol = jnp.linalg.cholesky(matrix)
  logdet = 2.0 * jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)  # (B, heads)
  return logdet.sum(-1) / 2.0


def coding_rate(z: jax.Array, eps: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """(mean, std) over the batch of `coding_rate_per_image`; std unbiased as torch's."""
  return _batch_mean_std(coding_rate_per_image(z, eps))


def sparsity_per_image(z: jax.Array, threshold: float = 0.0) -> jax.Array:
  """Fraction of non-zero entries, ‖Z‖₀ / (d · N), of each image: (B, ..., N, d) -> (B,).

  An entry counts as non-zero when |z| > threshold (0: exactly non-zero).
  """
  nonzero = (jnp.abs(z) > threshold).astype(_compute_dtype())
  return nonzero.reshape(z.shape[0], -1).mean(axis=-1)


def sparsity(z: jax.Array, threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(mean, std) over the batch of `sparsity_per_image`."""
  return _batch_mean_std(sparsity_per_image(z, threshold))


# ----------------------------------------------------------------------------- per layer


def _layers(tree: Mapping[str, Any], part: str) -> list[Mapping[str, Any]]:
  part_tree = tree.get(part, {})
  names = sorted((k for k in part_tree if k.startswith("layer_")),
                 key=lambda k: int(k.split("_")[1]))
  return [part_tree[k] for k in names]


def _sown(layer: Mapping[str, Any], *path: str) -> jax.Array | None:
  node = layer
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node[-1] if isinstance(node, (tuple, list)) else node


def _unwrap(intermediates: Mapping[str, Any]) -> Mapping[str, Any]:
  if "intermediates" in intermediates:
    intermediates = intermediates["intermediates"]
  if not any(_sown(layer, "mssa", SUBSPACE_PROJ) is not None
             for layer in _layers(intermediates, "encoder")):
    raise NotWhiteBoxError(
        "the model sowed no CRATE intermediates (encoder/layer_*/mssa/subspace_proj): "
        "white-box diagnostics need a CRATE-MAE model, not ViT-MAE")
  return intermediates


def heads_first(w: jax.Array) -> jax.Array:
  """The sown projection (B, N, heads, head_dim) -> (B, heads, N, head_dim)."""
  return jnp.swapaxes(w, 1, 2)


def per_image_measures(intermediates: Mapping[str, Any], eps: float = 0.01,
                       threshold: float = 0.0) -> dict[str, jax.Array]:
  """Per-layer, per-image measures from the sown intermediates (jittable).

  Returns {'encoder/coding_rate', 'encoder/sparsity', 'decoder/coding_rate',
  'decoder/sparsity'}, each (layers, B), layers in forward order. See
  `layerwise_measures` for what each one measures.
  """
  tree = _unwrap(intermediates)
  out = {}
  enc = _layers(tree, "encoder")
  out["encoder/coding_rate"] = jnp.stack(
      [coding_rate_per_image(heads_first(_sown(l, "mssa", SUBSPACE_PROJ)), eps) for l in enc])
  out["encoder/sparsity"] = jnp.stack(
      [sparsity_per_image(_sown(l, "ista", SPARSE_CODE), threshold) for l in enc])
  dec = _layers(tree, "decoder")
  if dec:
    out["decoder/coding_rate"] = jnp.stack(
        [coding_rate_per_image(heads_first(_sown(l, "mssa", SUBSPACE_PROJ)), eps) for l in dec])
    out["decoder/sparsity"] = jnp.stack(
        [sparsity_per_image(_sown(l, DICTIONARY_OUT), threshold) for l in dec])
  return out


def reduce_measures(per_image: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """(layers, B) arrays -> '<part>/<measure>/mean' and '/std', each (layers,)."""
  out = {}
  for key, values in per_image.items():
    mean, std = _batch_mean_std(jnp.swapaxes(values, 0, 1))
    out[f"{key}/mean"], out[f"{key}/std"] = mean, std
  return out


def measures_from_intermediates(intermediates: Mapping[str, Any], eps: float = 0.01,
                                threshold: float = 0.0) -> dict[str, jax.Array]:
  """Per-layer mean/std from the sown intermediates of one forward pass (jittable)."""
  return reduce_measures(per_image_measures(intermediates, eps, threshold))


def _check_white_box(model) -> None:
  from crate_mae_jax.models.vit_mae import ViTEncoder, ViTMAE
  if isinstance(model, (ViTMAE, ViTEncoder)):
    raise NotWhiteBoxError(
        f"{type(model).__name__} has no subspace projections or sparse codes: white-box "
        "diagnostics need a CRATE-MAE model")


def make_measure_fn(model, mask_ratio: float = 0.0, eps: float = 0.01,
                    threshold: float = 0.0, per_image: bool = False) -> Callable:
  """A jitted fn(params, images, noise) -> per-layer measures (jax arrays).

  One forward pass of the masked autoencoder at `mask_ratio` (the official
  measures use 0: every patch visible); `noise` (B, L) picks the kept patches.
  With `per_image` the arrays are (layers, B) (to pool several eval batches, then
  `reduce_measures`), otherwise mean/std per layer.
  """
  _check_white_box(model)

  def fn(params, images, noise):
    _, state = model.apply({"params": params}, images, mask_ratio=mask_ratio, noise=noise,
                           mutable=["intermediates"])
    values = per_image_measures(state, eps, threshold)
    return values if per_image else reduce_measures(values)
  return jax.jit(fn)


_MEASURE_FNS: dict = {}


def _default_noise(model, images, seed: int = 0) -> jax.Array:
  length = patches.num_patches(images, model.patch_size)
  return jax.random.uniform(jax.random.key(seed), (images.shape[0], length))


def layerwise_measures(model, params, images, mask_ratio: float = 0.0,
                       noise: jax.Array | None = None, eps: float = 0.01,
                       threshold: float = 0.0) -> dict[str, np.ndarray]:
  """Per-layer compression and sparsity of one batch, as numpy arrays (layers,).

  Runs `model` (a CRATE-MAE) once with its intermediates and returns, each as
  '<key>/mean' and '<key>/std' over the batch (std unbiased, as torch):

  * 'encoder/coding_rate': coding rate (ε = `eps`) of each encoder layer's MSSA
    projection w = LN(z) U, all tokens (cls included) — the official measure;
    it should fall through the layers as MSSA compresses.
  * 'encoder/sparsity': fraction of non-zero entries of each ISTA output (the
    layer output), ‖Z‖₀/(d·N) — it should stay well below 1.
  * 'decoder/coding_rate': the same coding rate for the projections of the
    decoder MSSA blocks (decoder layer order, first = next to the latent); the
    decoder undoes compression, so it should rise.
  * 'decoder/sparsity': fraction of non-zero entries of each decoder layer's
    dictionary output D·LN(x). The decoder has no ISTA step, so this linear
    output is dense (≈ 1) by construction; it is reported for symmetry and to
    show the decoder densifying the sparse codes.

  `images` are normalised NHWC; `noise` (B, L) chooses which patches are kept
  when `mask_ratio` > 0 (default: uniform noise from a fixed key). Raises
  `NotWhiteBoxError` (a ValueError) for ViT-MAE models.
  """
  _check_white_box(model)
  images = jnp.asarray(images)
  if noise is None:
    noise = _default_noise(model, images)
  key = (model, float(mask_ratio), float(eps), float(threshold))
  if key not in _MEASURE_FNS:
    _MEASURE_FNS[key] = make_measure_fn(model, mask_ratio, eps, threshold)
  out = _MEASURE_FNS[key](params, images, jnp.asarray(noise))
  return {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}


def summary_scalars(measures: Mapping[str, Any], include_std: bool = False) -> dict[str, float]:
  """Flat scalars for TensorBoard: 'diag/encoder/coding_rate/layer_03' -> mean value.

  With `include_std` also 'diag/encoder/coding_rate_std/layer_03'.
  """
  out = {}
  for key, values in measures.items():
    part_measure, stat = key.rsplit("/", 1)
    if stat == "std" and not include_std:
      continue
    if stat not in ("mean", "std"):
      continue
    name = part_measure if stat == "mean" else f"{part_measure}_std"
    for i, value in enumerate(np.asarray(values).reshape(-1)):
      out[f"diag/{name}/layer_{i:02d}"] = float(value)
  return out


# ----------------------------------------------------------------------------- attention


def cls_attention_weights(w: jax.Array, keys: jax.Array | None = None) -> jax.Array:
  """The cls token's attention: w (B, N, heads, d_h) -> (B, heads, N).

  softmax(w₀ kᵀ / √d_h) over all N tokens (cls first), so each row sums to 1;
  k = w (MSSA: query = key) unless `keys` (ViT's separate keys) are given.
  """
  w = w.astype(jnp.float32)
  keys = w if keys is None else keys.astype(jnp.float32)
  logits = jnp.einsum("bhd,bkhd->bhk", w[:, 0], keys,
                      precision=jax.lax.Precision.HIGHEST) * w.shape[-1]**-0.5
  return jax.nn.softmax(logits, axis=-1)


def encode_with_intermediates(model, params, images) -> tuple[jax.Array, Mapping[str, Any]]:
  """Encoder features (B, 1 + L, D), no masking, and the sown encoder intermediates."""
  _check_white_box(model)
  features, state = model.apply({"params": params}, jnp.asarray(images), method="encode",
                                mutable=["intermediates"])
  return features, _unwrap(state)


def cls_attention_from_intermediates(intermediates: Mapping[str, Any], layer: int,
                                     grid: tuple[int, int]) -> np.ndarray:
  """`cls_attention` from already sown intermediates; grid = (gh, gw)."""
  enc = _layers(_unwrap(intermediates), "encoder")
  index = range(len(enc))[layer]
  attn = np.asarray(cls_attention_weights(_sown(enc[index], "mssa", SUBSPACE_PROJ)))[:, :, 1:]
  return attn.reshape(attn.shape[0], attn.shape[1], *grid)


def cls_attention(model, params, images, layer: int = -1) -> np.ndarray:
  """Per head, the cls token's attention over the patches in encoder `layer`.

  Returns (B, heads, gh, gw): the patch entries of the cls token's attention
  row, softmax(w wᵀ/√d_h) taken over cls + patches, so together with the
  cls-to-cls weight (1 − the map's sum) each head's row sums to 1; the map alone
  sums to less than 1. `layer` may be negative (-1: the last layer).
  """
  images = jnp.asarray(images)
  _, intermediates = encode_with_intermediates(model, params, images)
  return cls_attention_from_intermediates(
      intermediates, layer, patches.patch_grid(images, model.patch_size))


def _is_vit(model) -> bool:
  from crate_mae_jax.models.vit_mae import ViTEncoder, ViTMAE
  return isinstance(model, (ViTMAE, ViTEncoder))


def _vit_cls_attention(model, params, images) -> list[np.ndarray]:
  """Per ViT block, the cls token's attention (B, heads, N) from the captured qkv."""
  n = 1 + patches.num_patches(images, model.patch_size)
  _, state = model.apply({"params": params}, images,
                         method="encode" if hasattr(model, "encode") else None,
                         capture_intermediates=lambda m, name: m.name == "qkv",
                         mutable=["intermediates"])
  tree = state["intermediates"]
  enc = _layers(tree if "encoder" in tree else {"encoder": tree}, "encoder")
  out = []
  for layer in enc:
    qkv = _sown(layer, "qkv", "__call__")[:, :n]         # (B, N, 3, heads, d_h)
    out.append(np.asarray(cls_attention_weights(qkv[:, :, 0], qkv[:, :, 1])))
  return out


def cls_attention_layers(model, params, images) -> np.ndarray:
  """The cls token's attention over the patches, every encoder layer and head:
  (layers, B, heads, gh, gw), for CRATE-MAE (MSSA, query = key) and ViT-MAE
  (its blocks' query and key), every patch visible. As `cls_attention`, each
  map sums to 1 minus the cls-to-cls weight."""
  images = jnp.asarray(images)
  grid = patches.patch_grid(images, model.patch_size)
  if _is_vit(model):
    maps = [a[:, :, 1:].reshape(a.shape[0], a.shape[1], *grid)
            for a in _vit_cls_attention(model, params, images)]
    return np.stack(maps)
  _, intermediates = encode_with_intermediates(model, params, images)
  depth = len(_layers(intermediates, "encoder"))
  return np.stack([cls_attention_from_intermediates(intermediates, i, grid)
                   for i in range(depth)])


# ----------------------------------------------------------------------------- PCA


def _grid_of(length: int, grid: tuple[int, int] | None) -> tuple[int, int]:
  if grid is not None:
    return grid
  side = int(round(length**0.5))
  if side * side != length:
    raise ValueError(f"{length} patch features do not form a square grid; pass grid=(gh, gw)")
  return side, side


def pca_features(features, n: int = 3, per_image: bool = False,
                 grid: tuple[int, int] | None = None) -> np.ndarray:
  """PCA of patch features, the first `n` components min-max scaled to [0, 1].

  features (B, L, D) of the patches only (drop the cls token first). The
  principal axes come from all images together (`per_image=False`, colours
  comparable across the batch) or from each image alone. Signs are fixed so
  the largest loading of each axis is positive. Returns (B, gh, gw, n), with n=3
  an RGB image per image; components beyond the feature rank are 0.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 3:
    raise ValueError(f"pca_features expects (batch, patches, dim), got {x.shape}")
  b, length, _ = x.shape
  gh, gw = _grid_of(length, grid)
  groups = [x[i:i + 1] for i in range(b)] if per_image else [x]
  outs = []
  for group in groups:
    flat = group.reshape(-1, group.shape[-1])
    flat = flat - flat.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    axes = vt[:n]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    proj = flat @ axes.T
    if proj.shape[1] < n:
      proj = np.concatenate([proj, np.zeros((proj.shape[0], n - proj.shape[1]))], axis=1)
    lo, hi = proj.min(axis=0, keepdims=True), proj.max(axis=0, keepdims=True)
    proj = (proj - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    outs.append(proj.reshape(group.shape[0], gh, gw, n))
  return np.clip(np.concatenate(outs, axis=0), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- reconstruction


def _patchify(x: np.ndarray, p: int) -> np.ndarray:
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def _unpatchify(x: np.ndarray, p: int, c: int, gh: int, gw: int) -> np.ndarray:
  n = x.shape[0]
  x = x.reshape(n, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * p, gw * p, c)


def unnormalize(images, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
  """x * std + mean, clipped to [0, 1] (no scaling when mean/std are None)."""
  x = np.asarray(images, np.float32)
  if std is not None:
    x = x * np.asarray(std, np.float32)
  if mean is not None:
    x = x + np.asarray(mean, np.float32)
  return np.clip(x, 0.0, 1.0)


def reconstruction_panels(images, pred, mask, patch_size: int,
                          mean: Sequence[float] | None, std: Sequence[float] | None,
                          norm_pix_loss: bool, fill: float = 0.5
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The four panels of the MAE visualisation, float32 (B, H, W, C) in [0, 1].

  images: normalised (B, H, W, C) model inputs; pred: (B, L, p·p·C) pixel
  predictions; mask: (B, L), 1 = masked. Returns (original, masked input with
  removed patches painted `fill` grey, reconstruction, reconstruction with the
  visible patches pasted back from the original). With `norm_pix_loss` the
  prediction is in per-patch standardised units and is mapped back with the
  target patch's own mean and (unbiased) variance, as MAE's visualisation does.
  The mean/std normalisation of the inputs is then undone.
  """
  x = np.asarray(images, np.float32)
  b, h, w, c = x.shape
  p = patch_size
  gh, gw = h // p, w // p
  pred = np.asarray(pred, np.float32)
  if norm_pix_loss:
    target = _patchify(x, p)
    t_mean = target.mean(axis=-1, keepdims=True)
    t_var = target.var(axis=-1, keepdims=True, ddof=1)
    pred = pred * np.sqrt(t_var + 1e-6) + t_mean
  recon = unnormalize(_unpatchify(pred, p, c, gh, gw), mean, std)
  original = unnormalize(x, mean, std)
  mask = np.asarray(mask, np.float32).reshape(b, gh, gw)
  masked_pixels = np.repeat(np.repeat(mask, p, axis=1), p, axis=2)[..., None] > 0
  masked_input = np.where(masked_pixels, np.float32(fill), original)
  pasted = np.where(masked_pixels, recon, original)
  return original, masked_input.astype(np.float32), recon, pasted.astype(np.float32)


def reconstruct(model, params, images, mask_ratio: float, key: jax.Array,
                mean: Sequence[float], std: Sequence[float]):
  """A masked reconstruction with a mask drawn from `key`: returns
  (`reconstruction_panels(...)`, the model outputs). `model` is a CrateMAE or
  ViTMAE (its patch size and norm_pix_loss set how the panels are undone)."""
  p = model.patch_size
  noise = jax.random.uniform(key, (images.shape[0], patches.num_patches(images, p)))
  out = model.apply({"params": params}, jnp.asarray(images), mask_ratio=mask_ratio, noise=noise)
  panels = reconstruction_panels(np.asarray(images), np.asarray(out["pred"]),
                                 np.asarray(out["mask"]), p, mean, std, model.norm_pix_loss)
  return panels, out


def nest_measures(measures: Mapping[str, np.ndarray]) -> dict:
  """{'encoder/coding_rate/mean': values} -> {'encoder': {'coding_rate': {'mean': [...]}}}."""
  out: dict = {}
  for key, values in sorted(measures.items()):
    part, measure, stat = key.split("/")
    out.setdefault(part, {}).setdefault(measure, {})[stat] = [float(v) for v in values]
  return out
