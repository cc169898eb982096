"""crate-mae-jax: CRATE-MAE (white-box masked autoencoder) in JAX/Flax.

The package metadata is in pyproject.toml; this shim keeps `python setup.py ...`
and older pip versions working.
"""
from setuptools import setup

setup()
