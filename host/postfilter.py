"""The host's post-filter stage: a DnCNN-style network (``latentlink train-postfilter``) run on decoded frames.

It runs after the decoder on every frame, on the decoder's batch (one ONNX Runtime call per batch), and is timed
as its own host stage, ``postfilter``. A filter removes the artifacts of the codec it was trained on only, so its
sidecar ``FILE.json`` names that model (the checkpoint's SHA-256, as the decoder's model.json has it, or "jpeg"),
and :func:`open_postfilter` refuses a filter trained for another model than the decoder's.
"""

import json
import logging
from pathlib import Path

import numpy as np

from latentlink.edge.errors import BackendError, ConfigError
from latentlink.edge.tiles import join_tiles, split_tiles

FORMAT = "latentlink-postfilter"
JPEG_ID = "jpeg"  # the ``trained_for`` of a filter for JPEG at the model's bytes (no decoder has it)
log = logging.getLogger("latentlink.host")


def sidecar_path(path):
    """The metadata of a filter: ``FILE.onnx`` -> ``FILE.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def read_filter_info(path):
    """The sidecar of the filter ``path`` as a dict; ConfigError naming the file and the fix if absent or not one."""
    if not Path(path).is_file():
        raise ConfigError("post-filter {}: no such file; train one with `latentlink train-postfilter --out "
                          "FILE.onnx`".format(path))
    meta = sidecar_path(path)
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError("post-filter {}: its metadata {} is missing (it names the model the filter was trained "
                          "for); `latentlink train-postfilter --out {}` writes both".format(path, meta, path)) from None
    except ValueError as exc:
        raise ConfigError("post-filter {}: {} is not valid JSON ({})".format(path, meta, exc)) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("trained_for"), str):
        raise ConfigError("post-filter {}: {} is not a post-filter's metadata (format {!r} with trained_for); "
                          "`latentlink train-postfilter` writes it".format(path, meta, FORMAT))
    return info


def describe(identity):
    """``JPEG`` or ``checkpoint e17d17ce6f38...``: a model identity as a message names it."""
    return "JPEG" if identity == JPEG_ID else "checkpoint {}...".format(str(identity)[:12])


def check_filter_for(path, model_id, what):
    """Refuse (ConfigError) the filter ``path`` unless it was trained for ``model_id`` (a checkpoint's SHA-256, as
    model.json has it, or "jpeg"); ``what`` names that model in the message. Returns the filter's metadata."""
    info = read_filter_info(path)
    if not model_id:
        raise ConfigError("post-filter {}: {} does not record its checkpoint (checkpoint_sha256 in model.json), so "
                          "whether the filter was trained for it cannot be checked; re-export it with `latentlink "
                          "export onnx`".format(path, what))
    if info["trained_for"] != model_id:
        raise ConfigError("post-filter {} was trained for {}, but {} is {}: a filter only removes the artifacts of "
                          "the codec it was trained on; train one for it with `latentlink train-postfilter`".format(
                              path, describe(info["trained_for"]), what, describe(model_id)))
    return info


class PostFilter(object):
    """An ONNX post-filter in ONNX Runtime (CPU): :meth:`run` restores decoded frames, :meth:`run_images` 8-bit
    images. ``threads``: intra-op threads (0: ONNX Runtime's default, one per core)."""

    def __init__(self, path, info, threads=0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError("--postfilter needs ONNX Runtime: pip install onnxruntime ({})".format(exc))
        self.path, self.info = str(path), info
        self.multiple_of = int(info.get("multiple_of", 1))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for a damaged or foreign file
            raise ConfigError("post-filter {}: ONNX Runtime cannot load it ({})".format(path, exc))
        self.input_name = self.session.get_inputs()[0].name

    def check_frame(self, height, width):
        """ConfigError unless frames of ``height`` x ``width`` pixels fit the filter (sides multiples of its fold)."""
        if height % self.multiple_of or width % self.multiple_of:
            raise ConfigError("post-filter {} needs frame sides that are multiples of {}; the decoder gives {}x{}"
                              .format(self.path, self.multiple_of, width, height))

    def run(self, outputs, tiles=(1, 1)):
        """Decoder outputs (a list of float32 NCHW arrays, each one frame, as ``tiles`` tiles) -> the restored
        frames, in the same layout. The input is clipped and rounded to 8 bits first, as the filter was trained."""
        tiles = tuple(tiles)
        frames = [join_tiles(o, tiles) if tiles != (1, 1) else o for o in outputs]
        batch = np.concatenate(frames).astype(np.float32, copy=False)
        batch = np.round(np.clip(batch, 0.0, 1.0) * 255.0) / np.float32(255.0)
        try:
            restored = self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]
        except Exception as exc:
            raise BackendError("post-filter {} failed on a batch of {}: {}".format(self.path, batch.shape, exc))
        out = []
        start = 0
        for frame in frames:
            part = restored[start:start + frame.shape[0]]
            start += frame.shape[0]
            out.append(split_tiles(part, tiles) if tiles != (1, 1) else part)
        return out

    def run_images(self, images_rgb):
        """uint8 RGB images (N, H, W, 3) -> restored uint8 RGB images, rounded and clipped."""
        x = np.ascontiguousarray(images_rgb.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        y = self.session.run(None, {self.input_name: x})[0]
        return np.clip(y * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def open_postfilter(path, decoder_info, threads=0):
    """The :class:`PostFilter` in ``path`` for the decoder described by ``decoder_info`` (its ModelInfo); refused
    with a ConfigError if it was trained for another model, or does not fit the decoder's frames."""
    info = check_filter_for(path, decoder_info.model_id, "the decoder ({})".format(decoder_info.path))
    runner = PostFilter(path, info, threads)
    shape = decoder_info.frame_shape
    runner.check_frame(shape[2], shape[3])
    return runner
