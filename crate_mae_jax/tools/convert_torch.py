"""Import official PyTorch CRATE-MAE checkpoints (Ma-Lab-Berkeley/CRATE, model/crate_ae).

    python -m crate_mae_jax.tools.convert_torch --checkpoint=crate_mae_base.pth --output=DIR
    crate-mae-convert --checkpoint=crate_mae_base.pth --output=DIR   # installed

reads an official `.pth` (state dict at the top level, under 'model' or
'state_dict', with or without 'module.' prefixes), maps it onto the Flax
parameters and writes an Orbax checkpoint (see `checkpoints`) that probing,
fine-tuning and `analyze` load. Reading `.pth` files needs the `[torch]` extra;
`torch_to_flax` itself works on any mapping of names to numpy arrays.

Layout notes: PyTorch `Linear.weight` is (out, in) and becomes a (in, out) kernel;
the per-head projection is reshaped to (width, heads, head_dim), matching the
official `rearrange('b n (h d) -> b h n d')`; the patch conv (D, C, p, p) becomes
a (p*p*C, D) kernel in `patchify` order. The ISTA dictionary is kept as stored.
The fixed `pos_embed`/`decoder_pos_embed` buffers are checked against the sin-cos
table and dropped; `decoder_embed.*`, which the official forward never calls, is
dropped too. A one-head model has no official output projection (`to_out` is
`nn.Identity` there); it becomes an identity kernel with a zero bias.

`key_map` is the one table of official names, our parameter paths and layouts
(CRATE-MAE and, for `torch_to_flax`, ViT-MAE in MAE's `models_mae` layout); the
export (`export_torch`) reads the same table backwards.

Errors (a state dict that does not fit, an unreadable file, a bad --heads) end
the CLI with exit code 2 and one line on stderr naming every offending key.
"""
import re
from typing import Mapping

import numpy as np

IGNORED = ("pos_embed", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias")


class ConversionError(ValueError):
  pass


def unwrap_state_dict(obj) -> dict[str, np.ndarray]:
  """Finds the state dict in a loaded checkpoint and strips 'module.' prefixes."""
  if isinstance(obj, Mapping):
    for key in ("model", "state_dict"):
      if key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state dict, got {type(obj).__name__}")
  out = {}
  for name, value in obj.items():
    name = re.sub(r"^(module\.)+", "", name)
    if hasattr(value, "detach"):
      value = value.detach().cpu().float().numpy() if value.is_floating_point() \
          else value.detach().cpu().numpy()
    out[name] = np.asarray(value)
  return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ConversionError("reading .pth files needs PyTorch: pip install "
                          "'crate-mae-jax[torch]'") from e
  # Checkpoints written by the MAE training code (which the official README
  # points to for CRATE-MAE) also pickle the run's `argparse.Namespace` under
  # 'args'; the weights-only unpickler refuses it unless it is allow-listed.
  import argparse
  import contextlib
  serialization = torch.serialization
  if hasattr(serialization, "safe_globals"):
    allow = serialization.safe_globals([argparse.Namespace])
  else:  # torch 2.4
    serialization.add_safe_globals([argparse.Namespace])
    allow = contextlib.nullcontext()
  try:
    with allow:
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError as e:
    raise ConversionError(f"checkpoint {path!r} does not exist") from e
  except Exception as e:  # unpickling / zip errors: not a readable .pth
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConversionError(f"cannot read {path!r} as a PyTorch checkpoint "
                          f"({type(e).__name__}: {first})") from e
  return unwrap_state_dict(obj)


def _count(sd, prefix: str) -> int:
  ids = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
  return max(ids) + 1 if ids else 0


def infer_model_config(sd: Mapping[str, np.ndarray], heads: int | None = None,
                       **overrides):
  """A CRATE-MAE model config matching the state dict's shapes.

  The head count is not visible in the shapes: it comes from `heads`, else from
  the named variant of the same width (tiny 6, small 12, base 12, large 16).
  """
  from crate_mae_jax import models
  if "patch_embed.proj.weight" not in sd:
    raise ConversionError("state dict has no 'patch_embed.proj.weight': not a CRATE-MAE "
                          f"checkpoint (first keys: {sorted(sd)[:5]})")
  vit = sorted(k for k in sd if re.match(r"blocks\.\d+\.(attn\.qkv|mlp\.fc1)\.", k))
  if vit:
    raise ConversionError(f"a ViT state dict ({vit[0]}), not an official CRATE-MAE one "
                          "(blocks.N.layers.0...): this converter reads model/crate_ae "
                          "checkpoints")
  if not _count(sd, "blocks") or not _count(sd, "decoder_blocks"):
    raise ConversionError("state dict has no " + ("encoder blocks.N" if not _count(
        sd, "blocks") else "decoder_blocks.N") + " weights: convert the whole pre-trained "
        "CRATE-MAE autoencoder (model/crate_ae), not an encoder-only or fine-tuned model")
  width, channels, patch, _ = sd["patch_embed.proj.weight"].shape
  cfg = models.model_config("base", "crate_mae")
  if heads is None:
    by_width = {v["width"]: (name, v["heads"]) for name, v in models.VARIANTS.items()}
    if width not in by_width:
      raise ConversionError(f"width {width} matches no named variant; pass --heads")
    cfg.variant, heads = by_width[width]
  cfg.width, cfg.heads = int(width), int(heads)
  cfg.depth, cfg.decoder_depth = _count(sd, "blocks"), _count(sd, "decoder_blocks")
  cfg.patch_size, cfg.channels = int(patch), int(channels)
  for key, value in overrides.items():
    if value is not None:
      cfg[key] = value
  return cfg


# ------------------------------------------------------------------ the one key map
# Layouts of an official tensor against ours; both directions read them:
#   "copy"     same array (LayerNorm weight -> scale, biases, tokens, the ISTA dictionary)
#   ("T", n)   a PyTorch Linear weight (out, in) against a kernel whose first n axes
#              are the input: (in, out), (width, heads, head_dim), (heads, head_dim, width)
#   "flat"     a flat bias against (3, heads, head_dim)
#   "conv"     the patch conv (D, C, p, p) against a (p*p*C, D) kernel in `patchify` order
#   "identity" no official tensor: a one-head CRATE attention has no output projection
#              (`to_out` is nn.Identity), ours is an identity kernel with a zero bias


def _norm_rows(torch_prefix, path):
  return [(f"{torch_prefix}.weight", path + ("scale",), "copy"),
          (f"{torch_prefix}.bias", path + ("bias",), "copy")]


def _crate_mssa_rows(torch_prefix, path, heads):
  rows = [(f"{torch_prefix}.qkv.weight", path + ("subspaces", "kernel"), ("T", 1))]
  if heads == 1:
    return rows + [(None, path + ("out", "kernel"), "identity"),
                   (None, path + ("out", "bias"), "identity")]
  return rows + [(f"{torch_prefix}.to_out.0.weight", path + ("out", "kernel"), ("T", 2)),
                 (f"{torch_prefix}.to_out.0.bias", path + ("out", "bias"), "copy")]


def _vit_block_rows(torch_prefix, path):
  t = torch_prefix
  return (_norm_rows(f"{t}.norm1", path + ("norm_attn",)) + [
      (f"{t}.attn.qkv.weight", path + ("qkv", "kernel"), ("T", 1)),
      (f"{t}.attn.qkv.bias", path + ("qkv", "bias"), "flat"),
      (f"{t}.attn.proj.weight", path + ("out", "kernel"), ("T", 2)),
      (f"{t}.attn.proj.bias", path + ("out", "bias"), "copy")] +
      _norm_rows(f"{t}.norm2", path + ("norm_mlp",)) + [
      (f"{t}.mlp.fc1.weight", path + ("mlp", "fc1", "kernel"), ("T", 1)),
      (f"{t}.mlp.fc1.bias", path + ("mlp", "fc1", "bias"), "copy"),
      (f"{t}.mlp.fc2.weight", path + ("mlp", "fc2", "kernel"), ("T", 1)),
      (f"{t}.mlp.fc2.bias", path + ("mlp", "fc2", "bias"), "copy")])


def key_map(cfg) -> list[tuple[str | None, tuple[str, ...], object]]:
  """(official name, path in our parameter tree, layout), in the official module's
  order: CRATE-MAE as `model/crate_ae` (`mae_crate_*`), ViT-MAE as MAE's
  `models_mae` (`mae_vit_*`, qkv with bias). The one mapping that `torch_to_flax`
  and `export_torch` both read; the fixed `pos_embed` tables and an unused
  `decoder_embed` are not in it (they hold nothing of ours)."""
  from crate_mae_jax import config_lib
  r = config_lib.resolve_model(cfg)
  enc, dec = ("encoder",), ("decoder",)
  rows = [("cls_token", enc + ("cls_token",), "copy"),
          ("patch_embed.proj.weight", enc + ("patch_embed", "proj", "kernel"), "conv"),
          ("patch_embed.proj.bias", enc + ("patch_embed", "proj", "bias"), "copy")]
  crate = r["arch"] == "crate_mae"
  for i in range(r["depth"]):
    layer = enc + (f"layer_{i}",)
    if crate:
      b = f"blocks.{i}.layers.0"
      rows += (_norm_rows(f"{b}.0.norm", layer + ("norm_mssa",)) +
               _crate_mssa_rows(f"{b}.0.fn", layer + ("mssa",), r["heads"]) +
               _norm_rows(f"{b}.1.norm", layer + ("norm_ista",)) +
               [(f"{b}.1.fn.weight", layer + ("ista", "dictionary"), "copy")])
    else:
      rows += _vit_block_rows(f"blocks.{i}", layer)
  rows += _norm_rows("norm", enc + ("norm",))
  if crate or r["encoder_sees"] == "all":
    rows.append(("mask_token", enc + ("mask_token",), "copy"))
  else:
    rows += [("decoder_embed.weight", dec + ("embed", "kernel"), ("T", 1)),
             ("decoder_embed.bias", dec + ("embed", "bias"), "copy"),
             ("mask_token", dec + ("mask_token",), "copy")]
  for i in range(r["decoder_depth"]):
    layer = dec + (f"layer_{i}",)
    if crate:
      b = f"decoder_blocks.{i}.layers.0"
      rows += (_norm_rows(f"{b}.0.norm", layer + ("norm_dict",)) +
               [(f"{b}.0.fn.weight", layer + ("dictionary", "kernel"), ("T", 1))] +
               _norm_rows(f"{b}.1.norm", layer + ("norm_mssa",)) +
               _crate_mssa_rows(f"{b}.1.fn", layer + ("mssa",), r["decoder_heads"]))
    else:
      rows += _vit_block_rows(f"decoder_blocks.{i}", layer)
  rows += _norm_rows("decoder_norm", dec + ("norm",))
  rows += [("decoder_pred.weight", dec + ("pixel_head", "kernel"), ("T", 1)),
           ("decoder_pred.bias", dec + ("pixel_head", "bias"), "copy")]
  return rows


def torch_shape(layout, shape: tuple, cfg) -> tuple:
  """The official tensor's shape for one of our parameters of `shape`."""
  if layout == "conv":
    from crate_mae_jax import config_lib
    r = config_lib.resolve_model(cfg)
    return (shape[1], r["channels"], r["patch_size"], r["patch_size"])
  if layout == "flat":
    return (int(np.prod(shape)),)
  if isinstance(layout, tuple):
    n = layout[1]
    return (int(np.prod(shape[n:])), int(np.prod(shape[:n])))
  return tuple(shape)


def to_flax(layout, value: np.ndarray, shape: tuple) -> np.ndarray:
  """An official tensor in our layout (`shape`: our parameter's shape)."""
  if layout == "identity":
    if len(shape) == 1:
      return np.zeros(shape, np.float32)
    return np.eye(shape[-1], dtype=np.float32).reshape(shape)
  if layout == "conv":  # (D, C, p, p) -> (p, p, C, D) -> (p*p*C, D)
    return value.transpose(2, 3, 1, 0).reshape(shape)
  if isinstance(layout, tuple):
    return value.T.reshape(shape)
  return value.reshape(shape)


def to_torch(layout, value: np.ndarray, shape: tuple) -> np.ndarray:
  """One of our parameters in the official layout (`shape`: from `torch_shape`);
  the exact inverse of `to_flax`."""
  if layout == "conv":
    d, c, p, _ = shape
    return value.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  if isinstance(layout, tuple):
    return value.reshape(shape[::-1]).T
  return value.reshape(shape)


def get_path(tree, path):
  """tree[path[0]][path[1]]...: one parameter of a nested dict by its key path."""
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _abstract(cfg):
  from crate_mae_jax import config_lib, models
  r = config_lib.resolve_model(cfg)
  return models.abstract_params(r, image_size=r["patch_size"] * 2)


def _expected_shapes(cfg) -> dict[str, tuple]:
  """Official state-dict names and shapes for a model config."""
  abstract = _abstract(cfg)
  return {name: torch_shape(layout, tuple(get_path(abstract, path).shape), cfg)
          for name, path, layout in key_map(cfg) if name is not None}


def check_state_dict(sd: Mapping[str, np.ndarray], cfg) -> None:
  """Refuses a state dict that does not fit `cfg`, naming every bad key."""
  expected = _expected_shapes(cfg)
  present = {k for k in sd if k not in IGNORED or k in expected}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  wrong = sorted(f"{k} {tuple(sd[k].shape)} != {expected[k]}"
                 for k in set(expected) & present if tuple(sd[k].shape) != expected[k])
  if missing or unexpected or wrong:
    raise ConversionError(
        "state dict does not match the CRATE-MAE config (check --heads and that this "
        f"is a model/crate_ae checkpoint): missing {missing}; unexpected {unexpected}; "
        f"wrong shape {wrong}")
  from crate_mae_jax.models.pos_embed import sincos_2d
  for key in ("pos_embed", "decoder_pos_embed"):
    if key in sd:
      buf = sd[key]
      side = int(round(max(buf.size // max(buf.shape[-1], 1) - 1, 0)**0.5))
      table = sincos_2d(buf.shape[-1], side) if buf.shape[-1] % 4 == 0 else None
      if table is None or buf.size != table.size or not np.allclose(
          buf.reshape(table.shape), table, atol=1e-2):   # 1e-2: saved in fp16 / bf16
        raise ConversionError(f"{key} is not the fixed 2-D sin-cos table this model "
                              "uses; the checkpoint was trained with another embedding")


def torch_to_flax(sd: Mapping[str, np.ndarray], cfg) -> dict:
  """Maps an official state dict onto the Flax parameter tree of `cfg` (`key_map`)."""
  from crate_mae_jax import config_lib
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  r = config_lib.resolve_model(cfg)
  check_state_dict(sd, r)
  abstract = _abstract(r)
  params: dict = {}
  for name, path, layout in key_map(r):
    shape = tuple(get_path(abstract, path).shape)
    _set(params, path, np.ascontiguousarray(
        to_flax(layout, None if name is None else sd[name], shape), np.float32))
  from crate_mae_jax.training.checkpoints import check_compatible
  check_compatible(params, abstract, where="converted state dict")
  return params


def convert(checkpoint: str, output: str, heads: int | None = None, **overrides) -> str:
  """Reads an official `.pth`, writes an Orbax checkpoint; returns its path."""
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax import config_lib
  sd = load_torch_state_dict(checkpoint)
  resolved = config_lib.resolve_model(infer_model_config(sd, heads, **overrides))
  params = torch_to_flax(sd, resolved)
  meta = {"model": resolved, "task": "pretrain",
          "source": {"converted_from": checkpoint, "format": "official PyTorch CRATE-MAE"}}
  return checkpoints.save_params(output, params, meta)


def _flags():
  """The converter's absl flags, on their own FlagValues so that `main` can be
  called in-process (and repeatedly) next to other entry points' flags."""
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "official .pth file", flag_values=fv)
  flags.DEFINE_string("output", None, "Orbax checkpoint directory to write", flag_values=fv)
  flags.DEFINE_integer("heads", None, "attention heads (default: the named variant of the "
                       "same width)", flag_values=fv)
  flags.DEFINE_float("ista_lambda", None, "λ (default 0.5)", flag_values=fv)
  flags.DEFINE_float("ista_step", None, "η (default 0.1)", flag_values=fv)
  flags.DEFINE_bool("norm_pix_loss", None, "per-patch normalised pixel loss", flag_values=fv)
  return fv


def main(argv=None) -> int:
  """`argv` without the program name (default: sys.argv[1:]); returns the exit code."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel

  def body(fv):
    path = convert(fv.checkpoint, fv.output, fv.heads, ista_lambda=fv.ista_lambda,
                   ista_step=fv.ista_step, norm_pix_loss=fv.norm_pix_loss)
    print(f"wrote {path}")
    return 0
  return cli.run_tool("convert_torch", _flags(), argv, body, module=__name__,
                      usage="--checkpoint=FILE.pth --output=DIR [--FLAG=VALUE ...]",
                      required=("checkpoint", "output"))


def run() -> None:
  """Process entry point."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  cli.exit_process(main())


if __name__ == "__main__":
  run()
