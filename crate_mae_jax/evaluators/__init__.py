"""Evaluators: one module per kind, built from `config.evals` and the model's
predict functions (see `common` and `predict`)."""
from crate_mae_jax.evaluators import (classification, common, diagnostics,  # noqa: F401
                                      foreground, knn, linear_probe, reconstruction)
from crate_mae_jax.evaluators.common import (from_config, register,  # noqa: F401
                                             scalars_only, variables_of, write)
from crate_mae_jax.evaluators.predict import predict_fns  # noqa: F401
