"""notebooks/crate_mae_tour.ipynb runs headless, top to bottom, on a tiny model
saved here, and is committed without outputs."""
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_train_config
from crate_mae_jax import models
from crate_mae_jax.training import checkpoints

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "crate_mae_tour.ipynb"


def test_notebook_is_committed_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
  cfg = tiny_train_config(source="quickstart")
  resolved = models.resolve(cfg.model)
  params = nn.meta.unbox(models.build_mae(resolved).init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)},
      np.zeros((1, 28, 28, 1), np.float32), mask_ratio=0.75)["params"])
  ckpt = tmp_path / "ckpt"
  checkpoints.save_params(str(ckpt), params, {"model": resolved, "task": "pretrain"}, step=3)
  figures = tmp_path / "figures"
  for key, value in {"CRATE_MAE_CHECKPOINT": str(ckpt), "CRATE_MAE_DATA": "quickstart",
                     "CRATE_MAE_FIGURES": str(figures), "MPLBACKEND": "Agg",
                     "JAX_PLATFORMS": "cpu"}.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.outputs)
  assert "step 3: crate_mae" in printed
  assert "encoder/coding_rate" in printed and "uniform map: mass share" in printed
  for name in ("reconstruction", "attention", "pca", "layerwise"):
    assert (figures / f"{name}.png").stat().st_size > 0
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 4
