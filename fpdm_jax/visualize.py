"""Image grids for reports: one row per example, one column per image kind."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  lo, hi = value_range
  x = (np.asarray(image, np.float32) - lo) / (hi - lo)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2,
               background: int = 255) -> np.ndarray:
  """uint8 [H, W, 3] images laid out row by row; cells are padded to the largest."""
  cell_h = max(im.shape[0] for row in rows for im in row)
  cell_w = max(im.shape[1] for row in rows for im in row)
  n_cols = max(len(row) for row in rows)
  grid = np.full((len(rows) * (cell_h + pad) + pad, n_cols * (cell_w + pad) + pad, 3),
                 background, np.uint8)
  for r, row in enumerate(rows):
    for c, im in enumerate(row):
      y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
      grid[y:y + im.shape[0], x:x + im.shape[1]] = im
  return grid


def save_png(image: np.ndarray, path) -> None:
  Image.fromarray(image).save(path)
