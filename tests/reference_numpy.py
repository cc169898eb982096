"""An independent float64 numpy model of CRATE-MAE, written from the paper and the
spec of the official forward pass (not from the Flax code), for invariance tests.

It reads an *official-style* PyTorch state dict (names and layouts of
`model/crate_ae`: `Linear.weight` is (out, in), the patch conv is (D, C, p, p))
so the converter is exercised on the way into Flax.

The maths, per image (tokens are rows):

* patchify: patch (i, j) of a (H, W, C) image, flattened in the order
  (row-in-patch, col-in-patch, channel); patches in row-major grid order;
* masking: `keep = int(L * (1 - r))` patches with the smallest noise are kept;
  `ids_restore` is the rank of each patch's noise; mask = 1 where removed;
* encoder input: patch embeddings, masked positions replaced by the mask token,
  cls token prepended, then the fixed 2-D sin-cos table added (cls row zero);
* encoder layer: z½ = z + MSSA(LN z); x = LN z½;
  z' = relu(x + η (x D − x Dᵀ D) − η λ), D the official (d, d) weight;
* MSSA(x): per head k, w = x U_kᵀ (U the bias-free (d, d) `qkv` weight, head-major
  output channels), softmax(w wᵀ / sqrt(d_h)) w, heads concatenated, output
  Linear with bias;
* encoder final LayerNorm (eps 1e-6); block LayerNorms use eps 1e-5;
* decoder layer: y = LN(x) Wᵀ (bias-free Linear); x' = y − MSSA(LN y);
* decoder final LayerNorm (eps 1e-6), pixel Linear, cls row dropped;
* loss: per-patch mean squared error against the (optionally per-patch
  standardised, with the *unbiased* variance as `torch.var`) target, averaged over
  masked patches. The official code divides 0 by 0 when nothing is masked; the
  package documents the mean over all patches instead, and so does this model.
"""
import numpy as np

BLOCK_EPS = 1e-5
FINAL_EPS = 1e-6


# ----------------------------------------------------------------------------- layout
def patchify(images: np.ndarray, p: int) -> np.ndarray:
  """(N, H, W, C) -> (N, L, p*p*C) by explicit index arithmetic."""
  n, h, w, c = images.shape
  gh, gw = h // p, w // p
  assert gh * p == h and gw * p == w
  out = np.empty((n, gh * gw, p * p * c), images.dtype)
  for i in range(gh):
    for j in range(gw):
      for r in range(p):
        for s in range(p):
          for ch in range(c):
            out[:, i * gw + j, (r * p + s) * c + ch] = images[:, i * p + r, j * p + s, ch]
  return out


def sincos_table(dim: int, rows: int, cols: int) -> np.ndarray:
  """(1 + rows*cols, dim): zero cls row; first half encodes the column index,
  second half the row index; each half is [sin(pos ω), cos(pos ω)],
  ω_k = 10000^(-k / (dim/4))."""
  quarter = dim // 4
  omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
  table = np.zeros((1 + rows * cols, dim))
  for i in range(rows):
    for j in range(cols):
      a, b = j * omega, i * omega
      table[1 + i * cols + j] = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)])
  return table


def masking(noise: np.ndarray, ratio: float):
  n, length = noise.shape
  keep = int(length * (1 - ratio))
  order = np.argsort(noise, axis=1, kind="stable")
  ids_restore = np.empty_like(order)
  rows = np.arange(n)[:, None]
  ids_restore[rows, order] = np.arange(length)[None, :]
  mask = (ids_restore >= keep).astype(np.float64)
  return mask, ids_restore


# ----------------------------------------------------------------------------- layers
def layer_norm(x, weight, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * weight + bias


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def mssa(x, sd, prefix, heads):
  u = sd[f"{prefix}.qkv.weight"]                      # (heads*dh, d)
  dh = u.shape[0] // heads
  outs = []
  for k in range(heads):
    w = x @ u[k * dh:(k + 1) * dh].T                   # (B, N, dh)
    attn = softmax(np.einsum("bnd,bmd->bnm", w, w) / np.sqrt(dh))
    outs.append(attn @ w)
  out = np.concatenate(outs, axis=-1)
  if f"{prefix}.to_out.0.weight" not in sd:  # one full-width head: nn.Identity
    return out
  return out @ sd[f"{prefix}.to_out.0.weight"].T + sd[f"{prefix}.to_out.0.bias"]


def ista(x, dictionary, eta, lam):
  return np.maximum(x + eta * (x @ dictionary - (x @ dictionary.T) @ dictionary) - eta * lam, 0.0)


# ----------------------------------------------------------------------------- model
def forward(sd, images, noise, mask_ratio, heads, eta=0.1, lam=0.5, norm_pix_loss=False):
  """images (N, H, W, C); returns dict(latent, pred, mask, ids_restore, loss)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  images = np.asarray(images, np.float64)
  conv = sd["patch_embed.proj.weight"]               # (D, C, p, p)
  d, c, p, _ = conv.shape
  n, h, w, _ = images.shape
  gh, gw = h // p, w // p
  patches = patchify(images, p)                       # (N, L, p*p*C)
  # conv weight as a (p*p*C, D) matrix in patchify order
  kernel = np.einsum("dcrs->rscd", conv).reshape(p * p * c, d)
  tokens = patches @ kernel + sd["patch_embed.proj.bias"]
  mask, ids_restore = masking(np.asarray(noise, np.float64), mask_ratio)
  tokens = np.where(mask[..., None] > 0, sd["mask_token"].reshape(1, 1, d), tokens)
  cls = np.broadcast_to(sd["cls_token"].reshape(1, 1, d), (n, 1, d))
  z = np.concatenate([cls, tokens], axis=1) + sincos_table(d, gh, gw)[None]

  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  for i in range(depth):
    b = f"blocks.{i}.layers.0"
    z = z + mssa(layer_norm(z, sd[f"{b}.0.norm.weight"], sd[f"{b}.0.norm.bias"], BLOCK_EPS),
                 sd, f"{b}.0.fn", heads)
    x = layer_norm(z, sd[f"{b}.1.norm.weight"], sd[f"{b}.1.norm.bias"], BLOCK_EPS)
    z = ista(x, sd[f"{b}.1.fn.weight"], eta, lam)
  latent = layer_norm(z, sd["norm.weight"], sd["norm.bias"], FINAL_EPS)

  x = latent
  decoder_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
  for i in range(decoder_depth):
    b = f"decoder_blocks.{i}.layers.0"
    y = layer_norm(x, sd[f"{b}.0.norm.weight"], sd[f"{b}.0.norm.bias"], BLOCK_EPS) \
        @ sd[f"{b}.0.fn.weight"].T
    x = y - mssa(layer_norm(y, sd[f"{b}.1.norm.weight"], sd[f"{b}.1.norm.bias"], BLOCK_EPS),
                 sd, f"{b}.1.fn", heads)
  x = layer_norm(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"], FINAL_EPS)
  pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]

  target = patches
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, ddof=1, keepdims=True)       # unbiased, as torch.var
    target = (target - mean) / np.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  loss = (per_patch * mask).sum() / mask.sum() if mask.sum() > 0 else per_patch.mean()
  return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore, loss=loss)


# ----------------------------------------------------------------------------- weights
def random_state_dict(rng: np.random.Generator, *, width: int, depth: int,
                      decoder_depth: int, patch_size: int, channels: int,
                      heads: int = 2, grid: int | None = None) -> dict[str, np.ndarray]:
  """Random float32 weights under the official state-dict names and layouts.

  LayerNorm affine parameters are perturbed away from 1/0 and biases are non-zero
  so that every parameter matters. With `grid` (a square patch grid, the only
  kind the official code builds) the fixed `pos_embed` buffers and the unused
  `decoder_embed` layer are included, as in a real checkpoint. With one head the
  official attention has no output projection (`to_out` is nn.Identity), so
  its weights are absent.
  """
  d, p, c = width, patch_size, channels

  def uniform(shape, bound):
    return rng.uniform(-bound, bound, shape)

  def xavier(out_f, in_f):
    return uniform((out_f, in_f), np.sqrt(6.0 / (in_f + out_f)))

  def norm(prefix):
    return {f"{prefix}.weight": 1.0 + 0.2 * rng.standard_normal(d),
            f"{prefix}.bias": 0.2 * rng.standard_normal(d)}

  def attn(prefix):
    if heads == 1:
      return {f"{prefix}.qkv.weight": xavier(d, d)}
    return {f"{prefix}.qkv.weight": xavier(d, d),
            f"{prefix}.to_out.0.weight": xavier(d, d),
            f"{prefix}.to_out.0.bias": 0.1 * rng.standard_normal(d)}

  dict_bound = np.sqrt(6.0 / d)                       # kaiming_uniform_, as official
  sd = {"cls_token": 0.5 * rng.standard_normal((1, 1, d)),
        "mask_token": 0.5 * rng.standard_normal((1, 1, d)),
        "patch_embed.proj.weight": xavier(d, c * p * p).reshape(d, c, p, p),
        "patch_embed.proj.bias": 0.1 * rng.standard_normal(d),
        "decoder_pred.weight": xavier(p * p * c, d),
        "decoder_pred.bias": 0.1 * rng.standard_normal(p * p * c)}
  sd.update(norm("norm"))
  sd.update(norm("decoder_norm"))
  for i in range(depth):
    b = f"blocks.{i}.layers.0"
    sd.update(norm(f"{b}.0.norm"))
    sd.update(attn(f"{b}.0.fn"))
    sd.update(norm(f"{b}.1.norm"))
    sd[f"{b}.1.fn.weight"] = uniform((d, d), dict_bound)
  for i in range(decoder_depth):
    b = f"decoder_blocks.{i}.layers.0"
    sd.update(norm(f"{b}.0.norm"))
    sd[f"{b}.0.fn.weight"] = uniform((d, d), dict_bound)
    sd.update(norm(f"{b}.1.norm"))
    sd.update(attn(f"{b}.1.fn"))
  if grid is not None:
    table = sincos_table(d, grid, grid)[None]
    sd["pos_embed"] = table
    sd["decoder_pos_embed"] = table
    sd["decoder_embed.weight"] = xavier(d, d)
    sd["decoder_embed.bias"] = np.zeros(d)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def rel_err(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
