"""Shared test setup: CPU only, the golden fixtures from ../shared/fixtures."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def official_tiny():
  path = FIXTURES / "crate_mae_official_tiny.npz"
  if not path.exists():
    pytest.fail(f"golden fixture missing: {path}")
  return dict(np.load(path))


@pytest.fixture(scope="session")
def official_tiny_pth():
  return FIXTURES / "crate_mae_official_tiny.pth"
