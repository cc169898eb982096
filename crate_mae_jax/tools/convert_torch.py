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

Errors (a state dict that does not fit, an unreadable file, a bad --heads) end
the CLI with exit code 2 and one line on stderr naming every offending key.
"""
import os
import re
import sys
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


def _mssa(sd, prefix, heads, out):
  qkv = sd[f"{prefix}.qkv.weight"]
  width = qkv.shape[1]
  head_dim = qkv.shape[0] // heads
  out["subspaces"] = {"kernel": qkv.T.reshape(width, heads, head_dim)}
  if f"{prefix}.to_out.0.weight" not in sd:
    # One head as wide as the model: the official Attention has no output
    # projection (`to_out` is nn.Identity), i.e. an identity map without bias.
    out["out"] = {"kernel": np.eye(width, dtype=np.float32).reshape(heads, head_dim, width),
                  "bias": np.zeros(width, np.float32)}
    return out
  w_out = sd[f"{prefix}.to_out.0.weight"]
  out["out"] = {"kernel": w_out.T.reshape(heads, head_dim, w_out.shape[0]),
                "bias": sd[f"{prefix}.to_out.0.bias"]}
  return out


def _norm(sd, prefix):
  return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}


def _expected_shapes(cfg) -> dict[str, tuple]:
  """Official state-dict names and shapes for a model config."""
  from crate_mae_jax import models
  r = models.resolve(cfg)
  d, p, c = r["width"], r["patch_size"], r["channels"]
  shapes = {"cls_token": (1, 1, d), "mask_token": (1, 1, d),
            "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,), "decoder_norm.weight": (d,),
            "decoder_norm.bias": (d,), "decoder_pred.weight": (p * p * c, d),
            "decoder_pred.bias": (p * p * c,)}
  # The official Attention drops its output projection when one head spans the
  # whole width (`project_out = not (heads == 1 and dim_head == dim)`).
  out_proj = r["heads"] != 1
  for i in range(r["depth"]):
    b = f"blocks.{i}.layers.0"
    shapes.update({f"{b}.0.norm.weight": (d,), f"{b}.0.norm.bias": (d,),
                   f"{b}.0.fn.qkv.weight": (d, d), f"{b}.0.fn.to_out.0.weight": (d, d),
                   f"{b}.0.fn.to_out.0.bias": (d,), f"{b}.1.norm.weight": (d,),
                   f"{b}.1.norm.bias": (d,), f"{b}.1.fn.weight": (d, d)})
  for i in range(r["decoder_depth"]):
    b = f"decoder_blocks.{i}.layers.0"
    shapes.update({f"{b}.0.norm.weight": (d,), f"{b}.0.norm.bias": (d,),
                   f"{b}.0.fn.weight": (d, d), f"{b}.1.norm.weight": (d,),
                   f"{b}.1.norm.bias": (d,), f"{b}.1.fn.qkv.weight": (d, d),
                   f"{b}.1.fn.to_out.0.weight": (d, d), f"{b}.1.fn.to_out.0.bias": (d,)})
  if not out_proj:
    shapes = {k: v for k, v in shapes.items() if ".fn.to_out.0." not in k}
  return shapes


def check_state_dict(sd: Mapping[str, np.ndarray], cfg) -> None:
  """Refuses a state dict that does not fit `cfg`, naming every bad key."""
  expected = _expected_shapes(cfg)
  present = {k for k in sd if k not in IGNORED}
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
          buf.reshape(table.shape), table, atol=1e-4):
        raise ConversionError(f"{key} is not the fixed 2-D sin-cos table this model "
                              "uses; the checkpoint was trained with another embedding")


def torch_to_flax(sd: Mapping[str, np.ndarray], cfg) -> dict:
  """Maps an official CRATE-MAE state dict onto the Flax parameter tree of `cfg`."""
  from crate_mae_jax import models
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  r = models.resolve(cfg)
  check_state_dict(sd, r)
  heads = r["heads"]
  conv = sd["patch_embed.proj.weight"]  # (D, C, p, p) -> (p, p, C, D) -> (p*p*C, D)
  encoder = {
      "patch_embed": {"proj": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                               "bias": sd["patch_embed.proj.bias"]}},
      "cls_token": sd["cls_token"], "mask_token": sd["mask_token"],
      "norm": _norm(sd, "norm")}
  for i in range(r["depth"]):
    b = f"blocks.{i}.layers.0"
    encoder[f"layer_{i}"] = {
        "norm_mssa": _norm(sd, f"{b}.0.norm"),
        "mssa": _mssa(sd, f"{b}.0.fn", heads, {}),
        "norm_ista": _norm(sd, f"{b}.1.norm"),
        "ista": {"dictionary": sd[f"{b}.1.fn.weight"]}}
  decoder = {"norm": _norm(sd, "decoder_norm"),
             "pixel_head": {"kernel": sd["decoder_pred.weight"].T,
                            "bias": sd["decoder_pred.bias"]}}
  for i in range(r["decoder_depth"]):
    b = f"decoder_blocks.{i}.layers.0"
    decoder[f"layer_{i}"] = {
        "norm_dict": _norm(sd, f"{b}.0.norm"),
        "dictionary": {"kernel": sd[f"{b}.0.fn.weight"].T},
        "norm_mssa": _norm(sd, f"{b}.1.norm"),
        "mssa": _mssa(sd, f"{b}.1.fn", heads, {})}
  params = {"encoder": encoder, "decoder": decoder}
  import jax
  params = jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, np.float32), params)
  from crate_mae_jax.training.checkpoints import check_compatible
  check_compatible(params, models.abstract_params(r, image_size=r["patch_size"] * 2),
                   where="converted state dict")
  return params


def convert(checkpoint: str, output: str, heads: int | None = None, **overrides) -> str:
  """Reads an official `.pth`, writes an Orbax checkpoint; returns its path."""
  from crate_mae_jax.training import checkpoints
  from crate_mae_jax import models
  sd = load_torch_state_dict(checkpoint)
  resolved = models.resolve(infer_model_config(sd, heads, **overrides))
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


def _usage_error(message: str) -> int:
  print("convert_torch: error: " + " ".join(str(message).split()), file=sys.stderr)
  return 2


def main(argv=None) -> int:
  """`argv` without the program name (default: sys.argv[1:]); returns the exit code."""
  from absl import flags
  argv = sys.argv[1:] if argv is None else list(argv)
  fv = _flags()
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  if cli.wants_help([sys.argv[0], *argv]):
    cli.print_help([sys.argv[0], *argv], fv, module=__name__,
                   usage="--checkpoint=FILE.pth --output=DIR [--FLAG=VALUE ...]")
    return 0
  try:
    rest = fv(["convert_torch"] + argv)
  except flags.Error as e:
    return _usage_error(e)
  if len(rest) > 1:
    return _usage_error(f"unexpected arguments {rest[1:]}")
  for name in ("checkpoint", "output"):
    if fv[name].value is None:
      return _usage_error(f"--{name} is required")
  try:
    path = convert(fv.checkpoint, fv.output, fv.heads, ista_lambda=fv.ista_lambda,
                   ista_step=fv.ista_step, norm_pix_loss=fv.norm_pix_loss)
  except (ValueError, OSError) as e:  # ConversionError, CheckpointError, config errors
    return _usage_error(e)
  print(f"wrote {path}")
  return 0


def run() -> None:
  """Process entry point: ends the process even if a failed Orbax save left
  its (non-daemon) writer threads behind."""
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  run()
