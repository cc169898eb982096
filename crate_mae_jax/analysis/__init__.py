"""Analysis: coding-rate and sparsity diagnostics, figures, the pixel baseline."""
