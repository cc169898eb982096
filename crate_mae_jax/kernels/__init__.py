"""The kernels the model layers call, one module per operation: `attention`
(XLA / cuDNN / splash / our MSSA kernel) and `layernorm` (flax / tokamax / ours), each
with its reference path and the rule that picks the kernel for 'auto'."""
