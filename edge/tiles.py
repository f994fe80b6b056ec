"""Patch processing: a frame split into a grid of equal, non-overlapping tiles, encoded as one batch.

The seed deck split 1008x1008 frames into four 504x504 tiles (batch 4); seed 000 compressed 512x512 slices as
128x128 patches. A model exported with ``--tiles RxC`` takes the batch of ``R * C`` tiles in row-major order
(left to right, then top to bottom) and ``model.json`` records the grid, so the host puts the frame back together.
"""

import numpy as np

from .errors import ConfigError


def parse_tiles(text):
    """``"2x2"`` -> ``(2, 2)``: rows x columns of tiles."""
    try:
        rows, cols = (int(n) for n in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError("bad tile grid {!r}: expected ROWSxCOLS, e.g. 2x2".format(text))
    if rows < 1 or cols < 1:
        raise ConfigError("bad tile grid {!r}: rows and columns must be at least 1".format(text))
    return rows, cols


def tile_shape(frame_shape, tiles):
    """The (R*C, C, H/R, W/C) batch shape of the tiles of a (1, C, H, W) frame; ConfigError unless they divide it."""
    rows, cols = tiles
    n, channels, height, width = frame_shape
    if n != 1 or height % rows or width % cols:
        raise ConfigError("a {}x{} frame does not split into {}x{} equal tiles: pick a size whose height is a "
                          "multiple of {} and width a multiple of {}".format(width, height, rows, cols, rows, cols))
    return (rows * cols, channels, height // rows, width // cols)


def split_tiles(frame, tiles, out=None):
    """(1, C, H, W) -> (R*C, C, H/R, W/C), row-major; written into ``out`` when given (no allocation per frame)."""
    rows, cols = tiles
    batch, channels, tile_h, tile_w = tile_shape(frame.shape, tiles)
    grid = frame.reshape(channels, rows, tile_h, cols, tile_w).transpose(1, 3, 0, 2, 4)
    if out is None:
        out = np.empty((batch, channels, tile_h, tile_w), dtype=frame.dtype)
    np.copyto(out.reshape(rows, cols, channels, tile_h, tile_w), grid)
    return out


def join_tiles(batch, tiles):
    """(R*C, C, h, w) -> (1, C, R*h, C*w): the inverse of :func:`split_tiles`."""
    rows, cols = tiles
    n, channels, tile_h, tile_w = batch.shape
    if n != rows * cols:
        raise ConfigError("{} tiles do not make a {}x{} grid".format(n, rows, cols))
    grid = np.asarray(batch).reshape(rows, cols, channels, tile_h, tile_w).transpose(2, 0, 3, 1, 4)
    return grid.reshape(1, channels, rows * tile_h, cols * tile_w)
