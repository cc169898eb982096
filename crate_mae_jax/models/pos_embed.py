"""Fixed 2-D sine-cosine position embeddings (MAE / MoCo v3 convention).

The table is a constant, not a parameter: it is rebuilt from the grid size on every
call, so checkpoints never carry it and any image size with a square patch grid works.
"""
import numpy as np


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim): first half sines, second half cosines."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
  # float32 throughout, as the official table is computed.
  omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
  omega = (1.0 / 10000**omega).astype(np.float32)
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int],
              cls_token: bool = True) -> np.ndarray:
  """Position table of shape (rows*cols [+1], dim), float32.

  `grid_size` is the side of a square patch grid, or (rows, cols).

  Half of the channels encode the row index and half the column index, in the
  official order (the numpy meshgrid puts the column coordinate first). With
  `cls_token` a zero row is prepended for the cls position.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
  rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  # Official: meshgrid(w, h), so the first half encodes the column index.
  grid_w, grid_h = np.meshgrid(np.arange(cols, dtype=np.float32),
                               np.arange(rows, dtype=np.float32))
  emb = np.concatenate(
      [_sincos_1d(dim // 2, grid_w), _sincos_1d(dim // 2, grid_h)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)
