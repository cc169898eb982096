"""Export a checkpoint of ours to the official PyTorch format (a `.pth` state dict).

    python -m crate_mae_jax.tools.export_torch --checkpoint=WORKDIR --output=model.pth
    crate-mae-export --checkpoint=WORKDIR --output=model.pth   # installed

reads an Orbax checkpoint (a workdir, a checkpoint root or one step folder of it;
pre-trained, linear-probed or fine-tuned; CRATE-MAE or ViT-MAE) and writes the
state dict of the official module: CRATE-MAE as Ma-Lab-Berkeley/CRATE
`model/crate_ae/crate_ae.py` (`mae_crate_*`), ViT-MAE as facebookresearch/mae
`models_mae.py` (`mae_vit_*`, qkv with bias), with its keys, shapes and layouts, so
that `model.load_state_dict(torch.load(path), strict=True)` takes it. It is the
exact inverse of `convert_torch` (both read `convert_torch.key_map`). Beside it,
`<output>.json` holds the constructor arguments, the model, the task and what was
dropped or filled in.

What has no place of ours is written as the official constructor makes it: the
fixed sin-cos `pos_embed`/`decoder_pos_embed` at --image_size, and `decoder_embed`
where our model has none (CRATE-MAE, whose official forward never calls it, and a
ViT-MAE with encoder_sees='all'): xavier-uniform weight (seed 0), zero bias.
A probe or fine-tune checkpoint exports its encoder; the classifier head is dropped
(the official MAE module has no place for it) and the decoder, which such a
checkpoint does not hold, is a fresh initialisation (seed 0), both said in the JSON.

Bad input (no checkpoint, an unknown architecture, a missing output folder) ends
with exit code 2 and one line on stderr.
"""
import json
import os

import numpy as np

from crate_mae_jax.tools import convert_torch

SEED = 0


class ExportError(ValueError):
  pass


def _split_step_dir(path: str) -> tuple[str, int | None]:
  """(checkpoint root or workdir, step): a step folder `.../checkpoints/1000` names
  its step; anything else means the latest."""
  norm = os.path.normpath(os.path.abspath(path))
  base = os.path.basename(norm)
  if base.isdigit() and os.path.isdir(norm):
    return os.path.dirname(norm), int(base)
  return path, None


def _xavier_uniform(rng, out_dim: int, in_dim: int) -> np.ndarray:
  bound = np.sqrt(6.0 / (in_dim + out_dim))
  return rng.uniform(-bound, bound, (out_dim, in_dim)).astype(np.float32)


def _official_builder(r: dict) -> str | None:
  """The official factory (`mae_crate_base`, ...) these sizes are, if any."""
  from crate_mae_jax import models
  for name, size in models.VARIANTS.items():
    same = all(r[k] == v for k, v in size.items()) and r["patch_size"] == 16
    if r["arch"] == "crate_mae" and same and r["decoder_depth"] == r["depth"] \
        and r["decoder_heads"] == r["heads"]:
      return f"mae_crate_{name}"
    if r["arch"] == "vit_mae" and same and name in ("base", "large") and \
        r["decoder_width"] == r["width"] and r["decoder_depth"] == 8 and \
        r["decoder_heads"] == 16:
      return f"mae_vit_{name}"
  return None


def _constructor(r: dict, image_size: int) -> dict:
  """The official `MaskedAutoencoderViT(...)` arguments of this model."""
  args = dict(img_size=image_size, patch_size=r["patch_size"], in_chans=r["channels"],
              embed_dim=r["width"], depth=r["depth"], num_heads=r["heads"],
              decoder_embed_dim=r["decoder_width"], decoder_depth=r["decoder_depth"],
              decoder_num_heads=r["decoder_heads"], mlp_ratio=r["mlp_ratio"],
              norm_pix_loss=r["norm_pix_loss"])
  if r["arch"] == "crate_mae":
    args["lambd"] = r["ista_lambda"]
  return args


def _order(sd: dict) -> dict:
  """The official module's registration order (only for readability)."""
  first = ["cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "decoder_embed.",
           "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
           "decoder_pred."]

  def rank(item):
    name = item[0]
    for i, prefix in enumerate(first):
      if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
        return i
    return len(first)
  return dict(sorted(sd.items(), key=rank))  # stable: the key map's order inside


def flax_to_torch(params: dict, cfg, image_size: int) -> tuple[dict, list[str]]:
  """(official state dict of numpy arrays, notes on what was filled in) for the
  masked-autoencoder parameters `params` of `cfg`."""
  from crate_mae_jax import config_lib
  from crate_mae_jax.models.pos_embed import sincos_2d
  r = config_lib.resolve_model(cfg)
  p = r["patch_size"]
  if image_size % p:
    raise ExportError(f"--image_size={image_size} is not a multiple of the patch size {p}")
  sd, filled = {}, []
  for name, path, layout in convert_torch.key_map(r):
    value = np.asarray(convert_torch.get_path(params, path), np.float32)
    if name is None:  # one-head CRATE attention: the official one has no projection
      if not np.array_equal(value, convert_torch.to_flax(layout, None, value.shape)):
        raise ExportError(f"{'/'.join(path)} is not the identity: a one-head CRATE-MAE "
                          "attention has no output projection in the official module "
                          "(to_out is nn.Identity), so this model cannot be exported")
      continue
    shape = convert_torch.torch_shape(layout, value.shape, r)
    sd[name] = np.ascontiguousarray(convert_torch.to_torch(layout, value, shape))
  grid = image_size // p
  sd["pos_embed"] = sincos_2d(r["width"], grid, cls_token=True)[None].astype(np.float32)
  sd["decoder_pos_embed"] = sincos_2d(r["decoder_width"], grid,
                                      cls_token=True)[None].astype(np.float32)
  if "decoder_embed.weight" not in sd:
    rng = np.random.default_rng(SEED)
    sd["decoder_embed.weight"] = _xavier_uniform(rng, r["decoder_width"], r["width"])
    sd["decoder_embed.bias"] = np.zeros(r["decoder_width"], np.float32)
    filled.append("decoder_embed: the official forward never calls it; written as its "
                  f"constructor makes it (xavier-uniform weight, seed {SEED}, zero bias)")
  return _order(sd), filled


def _describe(tree) -> str:
  """'kernel (64, 10), bias (10,)' for a small sub-tree."""
  import jax
  return ", ".join(f"{'/'.join(str(getattr(e, 'key', e)) for e in k)} {tuple(np.shape(v))}"
                   for k, v in jax.tree_util.tree_leaves_with_path(tree))


def _mae_params(params: dict, r: dict, task: str) -> tuple[dict, list[str], list[str]]:
  """(masked-autoencoder params, dropped, filled): a classifier's encoder under
  a freshly initialised decoder, its other parts dropped."""
  if task == "pretrain" and "decoder" in params:
    return params, [], []
  if "encoder" not in params:
    raise ExportError(f"the checkpoint's parameters ({sorted(params)}) hold no 'encoder'")
  import jax
  from crate_mae_jax import models
  size = r["patch_size"] * 2
  model = models.build_mae(r)
  fresh = jax.jit(lambda x: model.init({"params": jax.random.key(SEED),
                                        "masking": jax.random.key(SEED + 1)},
                                       x, mask_ratio=0.5))(
      np.zeros((1, size, size, r["channels"]), np.float32))["params"]
  import flax.linen as nn
  fresh = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(fresh))
  out = {**fresh, "encoder": params["encoder"]}
  dropped = [f"{k} ({_describe(params[k])}): the {task} classifier's part, which the "
             "official MAE module has no place for" for k in sorted(params) if k != "encoder"]
  filled = [f"{k}: not in a {task} checkpoint; a fresh initialisation (seed {SEED})"
            for k in sorted(fresh) if k != "encoder"]
  return out, dropped, filled


def _image_size(meta: dict, image_size: int | None) -> int:
  if image_size is not None:
    return int(image_size)
  saved = meta.get("config")
  if isinstance(saved, str):
    try:
      return int(json.loads(saved)["data"]["image_size"])
    except (ValueError, KeyError, TypeError):
      pass
  return 224  # the official constructor's default


def export(checkpoint: str, output: str, image_size: int | None = None,
           step: int | None = None) -> dict:
  """Writes `output` (.pth) and `output`.json; returns the JSON dict."""
  from crate_mae_jax import config_lib, models
  from crate_mae_jax.tools.analyze import model_config_from, AnalyzeError
  from crate_mae_jax.training import checkpoints
  folder = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(folder):
    raise ExportError(f"--output={output!r}: folder {folder!r} does not exist; create it "
                      "or pass a path in an existing folder")
  root, step_of_dir = _split_step_dir(checkpoint)
  step = step_of_dir if step is None else step
  meta, step = checkpoints.read_meta(root, step)
  try:
    cfg = model_config_from(meta)
  except AnalyzeError as e:
    raise ExportError(str(e)) from None
  r = config_lib.resolve_model(cfg)
  task = meta.get("task", "pretrain")
  params, _ = checkpoints.restore_params(root, step)
  import jax
  params = jax.tree_util.tree_map(np.asarray, params)
  params, dropped, filled = _mae_params(params, r, task)
  checkpoints.check_compatible(params, models.abstract_params(r, r["patch_size"] * 2),
                               where=checkpoint)
  size = _image_size(meta, image_size)
  sd, more = flax_to_torch(params, r, size)
  filled = filled + more
  try:
    import torch
  except ImportError as e:
    raise ExportError("writing .pth files needs PyTorch: pip install "
                      "'crate-mae-jax[torch]'") from e
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, output)
  official = ("Ma-Lab-Berkeley/CRATE model/crate_ae/crate_ae.py MaskedAutoencoderViT"
              if r["arch"] == "crate_mae" else
              "facebookresearch/mae models_mae.py MaskedAutoencoderViT (qkv_bias=True)")
  info = {"arch": r["arch"], "official_module": official,
          "official_builder": _official_builder(r),
          "constructor": _constructor(r, size), "image_size": size,
          "patch_size": r["patch_size"], "width": r["width"], "depth": r["depth"],
          "heads": r["heads"], "decoder_width": r["decoder_width"],
          "decoder_depth": r["decoder_depth"], "decoder_heads": r["decoder_heads"],
          "task": task, "checkpoint": os.path.abspath(checkpoint), "step": int(step),
          "num_tensors": len(sd), "dropped": dropped, "filled": filled, "model": dict(r)}
  if r["arch"] == "vit_mae" and r["encoder_sees"] == "all":
    info["note"] = ("encoder_sees='all': the forward is the CRATE repository's mae_vit_* "
                    "(mask tokens in the encoder, decoder_embed not called), whose blocks "
                    "need qkv_bias=True to hold these qkv biases")
  with open(output + ".json", "w") as f:
    json.dump(info, f, indent=2, default=str)
  return info


def _flags():
  """The exporter's absl flags, on their own FlagValues (see convert_torch)."""
  from absl import flags
  fv = flags.FlagValues()
  flags.DEFINE_string("checkpoint", None, "workdir, checkpoint root or step folder of ours",
                      flag_values=fv)
  flags.DEFINE_string("output", None, ".pth file to write (and OUTPUT.json beside it)",
                      flag_values=fv)
  flags.DEFINE_integer("image_size", None, "image side of the official pos_embed tables "
                       "(default: the run's data.image_size, else 224)", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
  return fv


def main(argv=None) -> int:
  """`argv` without the program name (default: sys.argv[1:]); returns the exit code."""
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel

  def body(fv):
    info = export(fv.checkpoint, fv.output, fv.image_size, fv.step)
    dropped = (f"; dropped {len(info['dropped'])} part(s), see the JSON" if info["dropped"]
               else "")
    print(f"wrote {fv.output} ({info['num_tensors']} tensors, {info['arch']}, "
          f"{info['task']}) and {fv.output}.json{dropped}")
    return 0
  return cli.run_tool("export_torch", _flags(), argv, body, module=__name__,
                      usage="--checkpoint=DIR --output=FILE.pth [--FLAG=VALUE ...]",
                      required=("checkpoint", "output"))


def run() -> None:
  """Process entry point."""
  from absl import logging
  from crate_mae_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_startup()
  logging.set_verbosity(logging.WARNING)  # Orbax logs every manager step at INFO
  cli.exit_process(main())


if __name__ == "__main__":
  run()
