"""crate-mae-jax: CRATE-MAE (white-box masked autoencoder) in JAX/Flax.

Importing the package pulls in no TensorFlow: models, training step and
benchmark run on hosts without it; only the input pipeline and summaries need it.
"""
from crate_mae_jax.models.crate_mae import CrateDecoder, CrateEncoder, CrateMAE
from crate_mae_jax.models.layers import ISTA, MSSA, CrateDecoderLayer, CrateEncoderLayer
from crate_mae_jax.models import VARIANTS, build_mae, count_params, model_config, resolve
from crate_mae_jax.models.vit_mae import ViTEncoder, ViTMAE

__version__ = "0.1.0"
