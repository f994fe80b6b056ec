"""Camera frame <-> model tensor conversions (the ``preprocess`` stage and its inverse on the host).

A frame (BGR uint8, any size) becomes the model's input: float32 RGB in [0, 1], NCHW, batch 1, width x height as
the profile says. How the frame's aspect ratio is made to fit is explicit and deterministic:

- ``center-crop``: cut the largest centred region with the input's aspect ratio, then resize (no distortion,
  loses the edges of the frame). The default.
- ``resize``: stretch the whole frame to the input size (keeps everything, distorts shapes).
- ``pad``: shrink the whole frame to fit, centred on black bars (keeps everything, wastes bits on the bars).

Resizing uses area interpolation when shrinking (no aliasing) and bilinear when enlarging.
"""

import cv2
import numpy as np

from .errors import ConfigError
from .tiles import join_tiles, split_tiles, tile_shape

FIT_MODES = ("center-crop", "resize", "pad")


def fit_frame(frame, width, height, fit="center-crop"):
    """``frame`` (H, W, 3) uint8 -> (height, width, 3) uint8, made to fit as ``fit`` says."""
    if fit not in FIT_MODES:
        raise ConfigError("unknown fit {!r} (available: {})".format(fit, ", ".join(FIT_MODES)))
    h, w = frame.shape[:2]
    if fit == "center-crop":
        # Largest centred crop with the target aspect ratio (integer pixels, rounded down).
        crop_w = min(w, int(h * width / height))
        crop_h = min(h, int(w * height / width))
        y, x = (h - crop_h) // 2, (w - crop_w) // 2
        return _resize(frame[y:y + crop_h, x:x + crop_w], width, height)
    if fit == "resize":
        return _resize(frame, width, height)
    scale = min(width / w, height / h)
    inner_w, inner_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    y, x = (height - inner_h) // 2, (width - inner_w) // 2
    out[y:y + inner_h, x:x + inner_w] = _resize(frame, inner_w, inner_h)
    return out


def _resize(image, width, height):
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrinking = width * height < w * h
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


class Preprocessor(object):
    """Frames -> model input tensors, reusing one preallocated (1, 3, height, width) float32 buffer.

    The returned array is that buffer: it is overwritten by the next call.
    """

    def __init__(self, width, height, fit="center-crop", tiles=(1, 1)):
        if fit not in FIT_MODES:
            raise ConfigError("unknown fit {!r} (available: {})".format(fit, ", ".join(FIT_MODES)))
        self.width, self.height, self.fit, self.tiles = width, height, fit, tuple(tiles)
        self._buffer = np.empty((1, 3, height, width), dtype=np.float32)
        self._tiled = None
        if self.tiles != (1, 1):  # patch processing: the frame goes out as a batch of tiles (edge/tiles.py)
            self._tiled = np.empty(tile_shape(self._buffer.shape, self.tiles), dtype=np.float32)

    def __call__(self, frame_bgr):
        """The model's input: (1, 3, height, width), or (R*C, 3, height/R, width/C) tiles."""
        rgb = cv2.cvtColor(fit_frame(frame_bgr, self.width, self.height, self.fit), cv2.COLOR_BGR2RGB)
        np.multiply(rgb.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=self._buffer[0], casting="unsafe")
        if self._tiled is not None:
            return split_tiles(self._buffer, self.tiles, out=self._tiled)
        return self._buffer


def to_image(tensor, tiles=(1, 1)):
    """Model output (1, 3, H, W) float RGB in [0, 1] -> BGR uint8 (H, W, 3), rounded and clipped like a PNG.

    A tiled model's output, (R*C, 3, h, w) with ``tiles=(R, C)``, is put back together first.
    """
    if tuple(tiles) != (1, 1):
        tensor = join_tiles(tensor, tiles)
    rgb = np.clip(np.asarray(tensor[0], dtype=np.float32).transpose(1, 2, 0) * 255.0 + 0.5, 0, 255)
    return cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_RGB2BGR)


def psnr(reference, test):
    """PSNR in dB between two uint8 images of the same shape (8-bit peak 255); inf when identical."""
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
