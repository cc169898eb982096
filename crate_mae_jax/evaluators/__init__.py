"""Evaluators: one module per kind, built from `config.evals` (see `common`)."""
from crate_mae_jax.evaluators import (classification, common, diagnostics,  # noqa: F401
                                      foreground, knn, linear_probe, reconstruction)
from crate_mae_jax.evaluators.common import (Context, from_config, register,  # noqa: F401
                                             scalars_only, variables_of, write)
