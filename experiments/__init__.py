"""Experiment drivers built on the library, not installed with it: the Fashion-MNIST
study (`study`, `study_v2`, `study_v2_report`, `plots`) and the attention foreground
measurement (`foreground`). Run from the repository root: `python -m experiments.study`."""
