"""Progressive coding with one network (the ``progressive`` model of the zoo): many rates, no retraining.

Each iteration codes what the previous ones missed, as ``C`` binary planes at 1/8 resolution (``code_shape``, C/64
bits per pixel): the encoder step takes the residual ``image - reconstruction`` and its recurrent state; the decoder
step turns the bits and its own state into an increment, and the reconstruction after k iterations is ``0.5 +
increment_1 + ... + increment_k``. The edge runs both steps (the decoder to form the next residual); the host runs
the decoder step only. Stopping after k of the K iterations is a lower rate; the first k iterations' bits are the
same whatever k is, so a sender may also send more of them later.

::

    codec = open_progressive("profiles/default/progressive-504", "encoder")   # the edge
    codes, timings = codec.encode(frame, 4)          # uint8 (4, C, h, w) of 0/1; timings in ms
    payload = code_latents(codes, "bits", "zstd")    # or "context" with codec.context_model(4)
    image, timings = open_progressive(path, "decoder").decode(codes)   # the host: float32 (1, 3, H, W) in [0, 1]

``model_path``: the export folder (``latentlink export onnx --out``), its model.json, either step's ONNX file or
TensorRT engine (the other step is found beside it), or a ``.pt`` checkpoint (with ``input_size=(H, W)``).

Python 3.6 + numpy 1.19 compatible (the Jetson Nano).
"""

import glob
import io
import json
import os
import time

import numpy as np

from .backends import open_backend, read_model_info
from .errors import ConfigError

STEPS = ("encoder_step", "decoder_step")


class ProgressiveCodec(object):
    """``encode(image, iterations)`` and ``decode(codes)`` over the step backends of one progressive model.

    Attributes: ``max_iterations`` (K), ``code_shape`` ((C, h, w), one iteration's bits), ``input_shape`` ((1, 3, H,
    W)), ``state_shape`` ((1, S, h, w)), ``info`` (the :class:`~latentlink.edge.backends.ModelInfo`), ``role``.
    ``encoder``/``decoder``: the loaded step backends (``encoder`` is None on the host). Close with :meth:`close`
    or use it as a context manager.
    """

    def __init__(self, encoder, decoder, role):
        self.encoder, self.decoder, self.role = encoder, decoder, role
        self.info = decoder.info
        section = self.info.progressive
        self.max_iterations = int(section["iterations"])
        self.code_shape = tuple(int(d) for d in section["code_shape"])
        self.input_shape = tuple(self.info.input_shape)
        self.state_shape = (1,) + tuple(int(d) for d in section["state_shape"])
        self.start = float(section.get("initial_reconstruction", 0.5))
        self._zero_state = np.zeros(self.state_shape, dtype=np.float32)
        self._context_models = {}

    def _check_iterations(self, iterations, what):
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or \
                not 1 <= iterations <= self.max_iterations:
            raise ConfigError("{}: {!r} iterations; this model codes 1 to {}".format(what, iterations,
                                                                                   self.max_iterations))
        return int(iterations)

    def encode(self, image, iterations):
        """``image``: float32 (1, 3, H, W) in [0, 1], as the encoder's input. Returns ``(codes, timings)``: ``codes``
        a uint8 array (iterations, C, h, w) of 0/1; ``timings`` in ms: ``encode`` (the encoder steps, with their
        uploads), ``decode`` (the decoder steps the residuals need; one fewer than ``iterations``), ``gpu_to_cpu``
        (copying the steps' outputs to host memory) and ``iterations``."""
        if self.encoder is None:
            raise ConfigError("this ProgressiveCodec was opened for the decoder role (the host): open it with role "
                              "'encoder' to encode")
        iterations = self._check_iterations(iterations, "encode")
        image = np.asarray(image, dtype=np.float32)
        if image.shape != self.input_shape:
            raise ConfigError("encode: image of shape {}, the model takes {}".format(image.shape, self.input_shape))
        codes = np.empty((iterations,) + self.code_shape, dtype=np.uint8)
        timings = {"encode": 0.0, "decode": 0.0, "gpu_to_cpu": 0.0, "iterations": iterations}
        enc_state = dec_state = self._zero_state
        reconstruction = np.full(self.input_shape, self.start, dtype=np.float32)
        for i in range(iterations):
            out, t = self.encoder.infer_named({"residual": image - reconstruction, "state": enc_state})
            timings["encode"] += t["run_ms"]
            timings["gpu_to_cpu"] += t["copy_ms"]
            bits = out["codes"]
            codes[i] = bits[0] > 0.5
            if i + 1 == iterations:
                break  # the last residual is never coded: no decoder step for it
            enc_state = out["new_state"].copy()  # the backend owns its outputs until its next call
            out, t = self.decoder.infer_named({"codes": codes[i][None].astype(np.float32), "state": dec_state})
            timings["decode"] += t["run_ms"]
            timings["gpu_to_cpu"] += t["copy_ms"]
            reconstruction = reconstruction + out["increment"]
            dec_state = out["new_state"].copy()
        return codes, timings

    def decode_steps(self, codes):
        """Yield ``(k, image, timings)`` after each of the k = 1..len(codes) iterations of ``codes`` (k, C, h, w):
        the progressive refinement (each image a new float32 array in [0, 1]; timings in ms of that step)."""
        codes = self._check_codes(codes)
        state = self._zero_state
        reconstruction = np.full(self.input_shape, self.start, dtype=np.float32)
        for i in range(codes.shape[0]):
            out, t = self.decoder.infer_named({"codes": codes[i][None].astype(np.float32), "state": state})
            reconstruction = reconstruction + out["increment"]
            state = out["new_state"].copy()
            yield i + 1, np.clip(reconstruction, 0.0, 1.0), {"decode": t["run_ms"], "gpu_to_cpu": t["copy_ms"]}

    def decode(self, codes):
        """``codes``: (k, C, h, w) of 0/1, 1 <= k <= K. Returns ``(image, timings)``: float32 (1, 3, H, W) clipped to
        [0, 1]; timings in ms: ``decode`` (the k decoder steps), ``gpu_to_cpu`` and ``iterations``."""
        timings = {"decode": 0.0, "gpu_to_cpu": 0.0, "iterations": 0}
        image = None
        for k, image, t in self.decode_steps(codes):
            timings["decode"] += t["decode"]
            timings["gpu_to_cpu"] += t["gpu_to_cpu"]
            timings["iterations"] = k
        return image, timings

    def _check_codes(self, codes):
        codes = np.asarray(codes)
        if codes.ndim != 4 or tuple(codes.shape[1:]) != self.code_shape:
            raise ConfigError("decode: codes of shape {}, expected (k, {}, {}, {}) with 1 <= k <= {}".format(
                codes.shape, self.code_shape[0], self.code_shape[1], self.code_shape[2], self.max_iterations))
        self._check_iterations(codes.shape[0], "decode")
        return codes

    def context_model(self, iterations):
        """The ``--entropy context`` coder for ``iterations`` iterations' codes (k, C, h, w), from ``entropy.json``
        beside the model (``latentlink export entropy``): tables for every channel of every iteration, of which the
        first k iterations' are used. Pass it to ``code_latents(codes, "bits", "context", model)``."""
        iterations = self._check_iterations(iterations, "context_model")
        if iterations not in self._context_models:
            self._context_models[iterations] = IterationContextModel(self.info.context_model(), iterations,
                                                                     self.code_shape[0])
        return self._context_models[iterations]

    def close(self):
        for backend in (self.encoder, self.decoder):
            if backend is not None:
                backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class IterationContextModel(object):
    """A :class:`~latentlink.edge.context_model.ContextModel` fitted on all K iterations' codes as one latent of K*C
    channels, used on the first ``iterations`` of them: codes (k, C, h, w) are coded as (1, k*C, h, w), so every
    iteration has tables of its own and a channel's context includes the previous iteration's last channels."""

    def __init__(self, full, iterations, channels):
        from .context_model import ContextModel

        need = iterations * channels
        if full.channels < need:
            raise ConfigError("entropy.json has tables for {} channels; {} iterations of {} need {} (fit them again "
                              "with `latentlink export entropy`)".format(full.channels, iterations, channels, need))
        self.iterations, self.channels = iterations, channels
        passes_per_channel = len(full.tables) // full.channels
        self.model = ContextModel(need, full.tables[:need * passes_per_channel], dict(full.info))
        self.sha256 = full.sha256  # the tables of the whole model: edge and host agree on them all

    def encode(self, codes):
        codes = np.asarray(codes)
        if codes.ndim != 4 or codes.shape[:2] != (self.iterations, self.channels):
            raise ConfigError("context coder for {} iterations of {} channels got codes of shape {}".format(
                self.iterations, self.channels, codes.shape))
        return self.model.encode(codes.reshape((1, -1) + codes.shape[2:]))

    def decode(self, payload, shape):
        """``shape``: (k, C, h, w), as the codes were; returns the codes (uint8)."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 4 or shape[:2] != (self.iterations, self.channels):
            from .errors import ProtocolError

            raise ProtocolError("context-coded codes of shape {}; this coder takes ({}, {}, h, w)".format(
                list(shape), self.iterations, self.channels))
        return self.model.decode(payload, (1, shape[0] * shape[1]) + shape[2:]).reshape(shape)


def step_paths(model_path):
    """``(encoder_step, decoder_step)`` model files for ``model_path`` (see the module's docstring)."""
    path = os.path.abspath(model_path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.json")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        return path, path
    if not os.path.isfile(path):
        raise ConfigError("{}: no such file or folder; give a progressive model's export folder (`latentlink export "
                          "onnx --checkpoint PROGRESSIVE.pt --out DIR`)".format(model_path))
    if ext == ".json":
        with io.open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except ValueError as exc:
                raise ConfigError("{}: not valid JSON ({})".format(path, exc))
        section = data.get("progressive") if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise ConfigError("{}: not a progressive model (model {!r}); train one with `latentlink train --model "
                              "progressive`".format(path, data.get("model") if isinstance(data, dict) else None))
        folder = os.path.dirname(path)
        return tuple(os.path.join(folder, section[step]["file"]) for step in STEPS)
    # one step's ONNX file or engine: the other beside it, the same kind of file
    folder, name = os.path.split(path)
    mine = next((step for step in STEPS if name.startswith(step)), None)
    if mine is None:
        raise ConfigError("{}: not a progressive model's step (encoder_step* or decoder_step*)".format(model_path))
    other = STEPS[1 - STEPS.index(mine)]
    if ext == ".onnx":
        sibling = os.path.join(folder, other + ".onnx")
    else:  # engines carry a checksum and a GPU in their names: the newest of the other step's with our precision
        precision = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        found = sorted(glob.glob(os.path.join(glob.escape(folder), other + ".*" + precision + ext)),
                       key=os.path.getmtime)
        sibling = found[-1] if found else os.path.join(folder, other + ".*" + ext)
    if not os.path.isfile(sibling):
        raise ConfigError("{}: the {} beside it ({}) is missing; build both steps (`latentlink export engine "
                          "DIR/encoder_step.onnx DIR/decoder_step.onnx`)".format(model_path, other, sibling))
    return (path, sibling) if mine == "encoder_step" else (sibling, path)


def open_progressive(model_path, role, **open_backend_kwargs):
    """A loaded :class:`ProgressiveCodec` for ``role`` "encoder" (the edge: both steps) or "decoder" (the host: the
    decoder step). ``open_backend_kwargs`` go to :func:`~latentlink.edge.backends.open_backend` (``threads``,
    ``device``, ``precision``, ``input_size`` for a .pt checkpoint, ``mapped``)."""
    if role not in ("encoder", "decoder"):
        raise ValueError("role must be 'encoder' or 'decoder', got {!r}".format(role))
    enc_path, dec_path = step_paths(model_path)
    if not enc_path.endswith((".pt", ".pth")):
        info = read_model_info(dec_path)
        if info.progressive is None:
            raise ConfigError("{}: model {!r} is not a progressive model".format(dec_path, info.model))
    encoder = None
    decoder = open_backend(dec_path, "decoder", **open_backend_kwargs).load()
    try:
        if decoder.info.progressive is None:
            raise ConfigError("{}: model {!r} is not a progressive model".format(dec_path, decoder.info.model))
        if role == "encoder":
            encoder = open_backend(enc_path, "encoder", **open_backend_kwargs).load()
    except BaseException:
        decoder.close()
        raise
    return ProgressiveCodec(encoder, decoder, role)


def elapsed_ms(start):
    return (time.perf_counter() - start) * 1000.0
