"""Named variants and the one place that turns a model config into a module.

A model config (`config.model`, an ml_collections ConfigDict) names an `arch`
('crate_mae' or 'vit_mae') and a `variant`; every size field left as None is
filled from the variant table, and any field set explicitly wins, so
`--config.model.depth=6` works on top of any variant.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crate_mae_jax.kernels import attention, layernorm
from crate_mae_jax.models.crate_mae import CrateEncoder, CrateMAE
from crate_mae_jax.models.vit_mae import ViTEncoder, ViTMAE

ARCHS = ("crate_mae", "vit_mae")

# CRATE-MAE sizes of the paper / official `mae_crate_*`: the decoder mirrors the
# encoder. ViT-MAE of "the same configuration" follows the official `mae_vit_*`
# in the same repository: decoder as wide as the encoder, 8 layers, 16 heads.
VARIANTS = {
    "tiny": dict(width=384, depth=12, heads=6),
    "small": dict(width=576, depth=12, heads=12),
    "base": dict(width=768, depth=12, heads=12),
    "large": dict(width=1024, depth=24, heads=16),
}
VIT_DECODER = dict(decoder_depth=8, decoder_heads=16)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(variant: str = "base", arch: str = "crate_mae") -> ml_collections.ConfigDict:
  """Default model config; size fields None mean 'take them from the variant'."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      arch=arch,
      variant=variant,
      patch_size=16,
      channels=3,
      width=placeholder(int),
      depth=placeholder(int),
      heads=placeholder(int),
      decoder_depth=placeholder(int),    # CRATE: = depth; ViT-MAE: 8
      decoder_width=placeholder(int),    # ViT-MAE only: = width
      decoder_heads=placeholder(int),    # CRATE: = heads; ViT-MAE: 16
      mlp_ratio=4.0,                     # ViT-MAE only
      encoder_sees="visible",            # ViT-MAE only: 'visible' (MAE) or 'all' (mask
                                         # tokens in the encoder, the official mae_vit)
      ista_step=0.1,                     # η
      ista_lambda=0.5,                   # λ
      ista_fused=True,                   # x(D − DᵀD) in one product
      norm_pix_loss=False,
      mask_ratio=0.75,
      drop_path=0.0,                     # downstream fine-tuning only
      dtype="float32",                   # compute dtype; "bfloat16" for mixed precision
      param_dtype="float32",
      attention_impl="auto",             # "auto" (on one GPU in bf16/fp16: our MSSA kernel,
                                         # cuDNN for ViT-MAE; else XLA),
                                         # "explicit", "xla", "cudnn", "mssa" (our
                                         # q=k=v kernel, GPU), "splash" (TPU)
      norm_impl="auto",                  # "auto" (ours, "pallas", on one GPU in bf16/fp16:
                                         # Pallas Triton, the residual add fused in; else
                                         # flax), "flax", "tokamax", "pallas"
      remat_policy=placeholder(str),     # None, "full" or a jax.checkpoint_policies name
  ))


class ResolvedModel(dict):
  """A model config with every size filled in and every field checked: what
  `resolve` returns and what the builders read. A plain dict (checkpoints save
  it as JSON); its type tells `resolve` that there is nothing left to do."""


def resolve(cfg) -> ResolvedModel:
  """Fills unset sizes from the variant and checks the combination.

  Entry points (`config_lib.validate`, `analyze`, `convert_torch`) call it once
  and pass the result down; given a `ResolvedModel` it returns it unchanged, so
  the builders below accept either. Raises ValueError naming the field and the fix.
  """
  if isinstance(cfg, ResolvedModel):
    return cfg
  return _fill_and_check(cfg)


def _fill_and_check(cfg) -> ResolvedModel:
  out = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  arch, variant = out["arch"], out["variant"]
  if arch not in ARCHS:
    raise ValueError(f"config.model.arch={arch!r} is unknown; use one of {ARCHS}")
  if variant not in VARIANTS:
    raise ValueError(f"config.model.variant={variant!r} is unknown; "
                     f"use one of {tuple(VARIANTS)} (or set width/depth/heads)")
  for key, value in VARIANTS[variant].items():
    if out[key] is None:
      out[key] = value
  if out["decoder_depth"] is None:
    out["decoder_depth"] = out["depth"] if arch == "crate_mae" else VIT_DECODER["decoder_depth"]
  if out["decoder_width"] is None:
    out["decoder_width"] = out["width"]
  if out["decoder_heads"] is None:
    out["decoder_heads"] = out["heads"] if arch == "crate_mae" else VIT_DECODER["decoder_heads"]
  for key in ("width", "depth", "heads", "decoder_depth", "patch_size", "channels"):
    if not isinstance(out[key], int) or out[key] < 1:
      raise ValueError(f"config.model.{key}={out[key]!r} must be a positive integer")
  if out["width"] % out["heads"]:
    raise ValueError(f"config.model.heads={out['heads']} does not divide "
                     f"config.model.width={out['width']}; pick heads that divide the width")
  if arch == "crate_mae" and out["decoder_width"] != out["width"]:
    raise ValueError(f"config.model.decoder_width={out['decoder_width']} must equal "
                     f"config.model.width={out['width']} for CRATE-MAE (its decoder inverts "
                     "the encoder); leave it unset")
  if out["encoder_sees"] not in ("visible", "all"):
    raise ValueError(f"config.model.encoder_sees={out['encoder_sees']!r} is unknown; use "
                     "'visible' or 'all'")
  if arch == "vit_mae" and out["encoder_sees"] == "all" and \
      out["decoder_width"] != out["width"]:
    raise ValueError(f"config.model.decoder_width={out['decoder_width']} must equal "
                     f"config.model.width={out['width']} with encoder_sees='all' (the decoder "
                     "reads the latent directly); leave it unset")
  if out["decoder_width"] % out["decoder_heads"]:
    raise ValueError(f"config.model.decoder_heads={out['decoder_heads']} does not divide "
                     f"config.model.decoder_width={out['decoder_width']}")
  if out["width"] % 4:
    raise ValueError(f"config.model.width={out['width']} must be divisible by 4 "
                     "(2-D sin-cos position embedding)")
  if not 0.0 <= out["mask_ratio"] < 1.0:
    raise ValueError(f"config.model.mask_ratio={out['mask_ratio']} must lie in [0, 1)")
  for key in ("dtype", "param_dtype"):
    if out[key] not in DTYPES:
      raise ValueError(f"config.model.{key}={out[key]!r} is unknown; use one of {tuple(DTYPES)}")
  if out["attention_impl"] is None:      # older configs and checkpoints' metadata
    out["attention_impl"] = "auto"
  if out["attention_impl"] not in attention.ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={out['attention_impl']!r} is unknown; "
                     f"use one of {attention.ATTENTION_IMPLS}")
  if out.get("norm_impl") in (None, "fused"):  # older configs and checkpoints' metadata
    out["norm_impl"] = "auto" if out.get("norm_impl") is None else "flax"  # same function
  if out["norm_impl"] not in layernorm.NORM_IMPLS:
    raise ValueError(f"config.model.norm_impl={out['norm_impl']!r} is unknown; "
                     f"use one of {layernorm.NORM_IMPLS}")
  policy = out["remat_policy"]
  if policy not in (None, "none", "full") and not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"config.model.remat_policy={policy!r} is unknown; use None, 'full' "
                     "or a name in jax.checkpoint_policies")
  return ResolvedModel(out)


def kernels(resolved: dict, platform: str | None = None) -> dict[str, str]:
  """The attention and LayerNorm kernels a resolved model config runs with on
  `platform` (default: JAX's backend), after 'auto' is decided."""
  dtype = DTYPES[resolved["dtype"]]
  shared_qkv = resolved["arch"] == "crate_mae"
  return {"attention": attention.resolve_attention(resolved["attention_impl"], dtype, platform,
                                                   shared_qkv,
                                                   resolved["width"] // resolved["heads"]),
          "layernorm": layernorm.resolve_norm(resolved["norm_impl"], dtype, platform)}


def with_fields(model, **changes) -> ResolvedModel:
  """`model` (resolved or not) with some fields changed, checked again: a derived
  model (float32 feature extraction, another attention kernel)."""
  return _fill_and_check({**resolve(model), **changes})


def build_mae(cfg):
  """The masked autoencoder module (`CrateMAE` or `ViTMAE`) a model describes
  (a `ResolvedModel`, or a model ConfigDict resolved here)."""
  r = resolve(cfg)
  common = dict(patch_size=r["patch_size"], channels=r["channels"], width=r["width"],
                depth=r["depth"], heads=r["heads"], decoder_depth=r["decoder_depth"],
                norm_pix_loss=r["norm_pix_loss"], dtype=DTYPES[r["dtype"]],
                param_dtype=DTYPES[r["param_dtype"]], attention_impl=r["attention_impl"],
                norm_impl=r["norm_impl"], remat_policy=r["remat_policy"])
  if r["arch"] == "crate_mae":
    return CrateMAE(decoder_heads=r["decoder_heads"], ista_step=r["ista_step"],
                    ista_lambda=r["ista_lambda"], ista_fused=r["ista_fused"], **common)
  return ViTMAE(decoder_width=r["decoder_width"], decoder_heads=r["decoder_heads"],
                mlp_ratio=r["mlp_ratio"], encoder_sees=r["encoder_sees"], **common)


def build_encoder(cfg):
  """The encoder alone (for probing and fine-tuning), with `drop_path` applied."""
  r = resolve(cfg)
  common = dict(patch_size=r["patch_size"], width=r["width"], depth=r["depth"],
                heads=r["heads"], drop_path=r["drop_path"], dtype=DTYPES[r["dtype"]],
                param_dtype=DTYPES[r["param_dtype"]], attention_impl=r["attention_impl"],
                norm_impl=r["norm_impl"], remat_policy=r["remat_policy"])
  if r["arch"] == "crate_mae":
    return CrateEncoder(ista_step=r["ista_step"], ista_lambda=r["ista_lambda"],
                        ista_fused=r["ista_fused"], **common)
  return ViTEncoder(mlp_ratio=r["mlp_ratio"], mask_tokens=r["encoder_sees"] == "all",
                    **common)


def build_classifier(cfg, num_classes: int, *, pool: str = "cls",
                     head_norm: bool = False, frozen: bool = False,
                     head_init_std: float = 0.01):
  from crate_mae_jax.models.classifier import Classifier
  if pool not in ("cls", "mean"):
    raise ValueError(f"pool={pool!r} is unknown; use 'cls' or 'mean'")
  return Classifier(build_encoder(cfg), num_classes, pool, head_norm, frozen, head_init_std)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def abstract_params(cfg, image_size: int = 224):
  """Parameter shapes without allocating them (boxes removed)."""
  import flax.linen as nn
  r = resolve(cfg)
  model = build_mae(r)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, r["channels"]), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                           x, mask_ratio=r["mask_ratio"]), images)
  return nn.meta.unbox(shapes["params"])


def parameter_table(image_size: int = 224) -> str:
  """Markdown table: parameters of each CRATE-MAE variant and of the ViT-MAE of
  the same configuration, with the ratio."""
  rows = ["| variant | width / depth / heads | CRATE-MAE | ViT-MAE | ratio |",
          "| --- | --- | ---: | ---: | ---: |"]
  for name, size in VARIANTS.items():
    crate = count_params(abstract_params(model_config(name, "crate_mae"), image_size))
    vit = count_params(abstract_params(model_config(name, "vit_mae"), image_size))
    rows.append(f"| {name} | {size['width']} / {size['depth']} / {size['heads']} | "
                f"{crate:,} | {vit:,} | {crate / vit:.1%} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(parameter_table())
