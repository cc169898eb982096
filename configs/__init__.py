"""Shipped configs: `--config=configs/NAME.py` in a checkout, `--config=NAME` anywhere."""
