"""Training: the train loop, its step, state, optimizer, checkpoints and records."""
