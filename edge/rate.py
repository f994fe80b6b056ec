"""Rate that follows the link: how many iterations of a progressive model each frame gets.

A progressive model (edge/progressive.py, ``model.json`` with ``"progressive": {"iterations": K, "code_shape":
[C, h, w]}``) codes a frame as K residual binary codes, each refining the image the ones before it give. A frame may
carry only its first k (1 <= k <= K, best first): fewer bytes, a coarser image. The edge picks k per frame, before
encoding, with a *rate policy*:

- :class:`FixedRate`: the same k for every frame (``latentlink edge --rate fixed --iterations N``);
- :class:`AdaptiveRate`: k follows the link (``--rate adaptive --min-iterations A --max-iterations B``): fewer
  when acknowledgements lag, more when they come back fast. The rule, its units and its hysteresis are in its
  docstring (and in the README's "Rate that follows the link").

The policies read the sender's :data:`~latentlink.edge.sender.LinkState` (frames in flight and queued, the window,
acknowledgement round trips), so they are pure and testable without a network. :class:`ProgressiveBackend` shows a
progressive codec to the edge's pipeline and the host's decode stage as a backend (``info``, ``input_shape``,
``infer_batch``...), and :func:`open_model` opens either kind of model from its file. Python 3.6 (the Jetson Nano).
"""

import os
import time

import numpy as np

from .errors import BackendError, ConfigError, LatentlinkError
from .protocol import MAX_ITERATIONS

RATES = ("fixed", "adaptive")
CHECKPOINTS = (".pt", ".pth")  # PyTorch checkpoints: what model they hold is known once loaded


class FixedRate(object):
    """Every frame gets ``iterations`` codes."""

    name = "fixed"

    def __init__(self, iterations):
        self.iterations = int(iterations)

    def choose(self, link):
        """The iterations of the next frame (``link``: a LinkState, unused)."""
        return self.iterations

    def describe(self):
        return {"rate": "fixed", "iterations": self.iterations}


class AdaptiveRate(object):
    """Iterations per frame that follow the link: additive increase, multiplicative decrease, with hysteresis.

    Before each frame, from the sender's :data:`~latentlink.edge.sender.LinkState`:

    - ``fill`` = (frames in flight + frames queued) / window (a fraction; above 1 once frames queue beyond it);
    - ``srtt`` (ms): a short average of the acknowledgements' round trips (send to ACK on this edge's clock), each
      new one weighing ``smoothing`` (1/4); ``long`` (ms): a long one, each weighing ``long_smoothing`` (1/32), what
      round trips have been lately. ``srtt`` well above ``long``: round trips are *growing*, frames queue somewhere.

    The link is **congested** when ``fill >= high_fill`` (0.75: 3 frames of a window of 4) or ``srtt > rtt_factor *
    long + margin_ms`` (1.5 x long + 20 ms); it is **clear** when ``fill <= low_fill`` (0.5) and ``srtt <=
    clear_factor * long + margin_ms`` (1.25 x long + 20 ms). Congested: k halves (``k // 2``, not below
    ``min_iterations``), at most once per ``cooldown`` frames (the window: the frames sent before a decrease must
    drain before it shows). Clear for ``raise_after`` (8) frames in a row: k grows by one (not above
    ``max_iterations``). Between the two (the dead band) or without a connection, k holds and the clear count
    restarts. So one late ACK does not move k (it moves ``srtt`` by a quarter of its excess), nor does a window half
    full; k starts at ``max_iterations`` (``start``). A host that stops answering fills the window within a few
    frames: congested.

    Why growth and not a floor: round trips through a loaded host jitter by tens of ms from frame to frame, and
    a frame of more iterations takes longer to send and decode without anything queueing; both move ``long``
    with them. What a live stream cannot afford is frames queueing, which the window's fill and a sudden growth
    show.
    """

    name = "adaptive"

    def __init__(self, min_iterations, max_iterations, start=None, high_fill=0.75, low_fill=0.5, rtt_factor=1.5,
                 clear_factor=1.25, margin_ms=20.0, smoothing=0.25, long_smoothing=1.0 / 32, raise_after=8,
                 cooldown=4):
        if not 1 <= min_iterations <= max_iterations:
            raise ConfigError("bad iterations {}..{}: need 1 <= --min-iterations <= --max-iterations".format(
                min_iterations, max_iterations))
        if not 0.0 < low_fill < high_fill:
            raise ConfigError("bad fill thresholds {} / {}: need 0 < low < high".format(low_fill, high_fill))
        self.min_iterations, self.max_iterations = int(min_iterations), int(max_iterations)
        self.iterations = self.max_iterations if start is None else min(max(int(start), self.min_iterations),
                                                                        self.max_iterations)
        self.high_fill, self.low_fill = high_fill, low_fill
        self.rtt_factor, self.clear_factor, self.margin_ms = rtt_factor, clear_factor, margin_ms
        self.smoothing, self.long_smoothing = smoothing, long_smoothing
        self.raise_after, self.cooldown = raise_after, cooldown
        self.srtt_ms = self.long_ms = None  # ms; None before the first acknowledgement
        self._clear = 0  # clear frames in a row
        self._since_decrease = cooldown  # frames since the last decrease
        self.decreases = self.increases = 0

    def state(self, link):
        """``"congested"``, ``"clear"`` or ``"hold"`` for ``link`` (updates the round-trip estimates)."""
        for rtt in link.rtts_ms:
            if self.srtt_ms is None:
                self.srtt_ms = self.long_ms = rtt
            self.srtt_ms += self.smoothing * (rtt - self.srtt_ms)
            self.long_ms += self.long_smoothing * (rtt - self.long_ms)
        if not link.connected:
            return "hold"
        fill = (link.in_flight + link.waiting) / float(max(1, link.window))
        srtt, long_ms = self.srtt_ms, self.long_ms
        if fill >= self.high_fill or (srtt is not None and srtt > self.rtt_factor * long_ms + self.margin_ms):
            return "congested"
        if fill <= self.low_fill and (srtt is None or srtt <= self.clear_factor * long_ms + self.margin_ms):
            return "clear"
        return "hold"

    def choose(self, link):
        """The iterations of the next frame, given the link's state now (a LinkState)."""
        state = self.state(link)
        self._since_decrease += 1
        if state == "congested":
            self._clear = 0
            if self._since_decrease > self.cooldown and self.iterations > self.min_iterations:
                self.iterations = max(self.min_iterations, self.iterations // 2)
                self._since_decrease = 0
                self.decreases += 1
        elif state == "clear":
            self._clear += 1
            if self._clear >= self.raise_after:
                self._clear = 0
                if self.iterations < self.max_iterations:
                    self.iterations += 1
                    self.increases += 1
        else:
            self._clear = 0
        return self.iterations

    def describe(self):
        return {"rate": "adaptive", "min_iterations": self.min_iterations, "max_iterations": self.max_iterations,
                "decreases": self.decreases, "increases": self.increases}


def make_rate(rate, max_k, iterations=None, min_iterations=None, max_iterations=None, window=4):
    """The policy for ``--rate`` (None: fixed) and its options, checked against the model's ``max_k`` iterations;
    ``window``: the edge's window (frames), the adaptive policy's cooldown."""
    rate = rate or "fixed"
    if rate not in RATES:
        raise ConfigError("unknown --rate {!r} (available: {})".format(rate, ", ".join(RATES)))
    for option, value in (("--iterations", iterations), ("--min-iterations", min_iterations),
                          ("--max-iterations", max_iterations)):
        if value is not None and not 1 <= value <= max_k:
            raise ConfigError("{} {}: this model codes 1 to {} iterations per frame".format(option, value, max_k))
    if rate == "fixed":
        if min_iterations is not None or max_iterations is not None:
            raise ConfigError("--min-iterations and --max-iterations bound --rate adaptive; with --rate fixed give "
                              "--iterations N")
        return FixedRate(max_k if iterations is None else iterations)
    if iterations is not None:
        raise ConfigError("--iterations fixes every frame's iterations (--rate fixed); --rate adaptive takes "
                          "--min-iterations and --max-iterations")
    low, high = min_iterations or 1, max_iterations or max_k
    if low > high:
        raise ConfigError("--min-iterations {} is above --max-iterations {}".format(low, high))
    return AdaptiveRate(low, high, cooldown=window)


def progressive_spec(info):
    """``(K, (C, h, w))`` from a model's metadata (``model.json``'s ``progressive``), None for other models;
    ConfigError when it is malformed."""
    spec = info.data.get("progressive") if isinstance(info.data, dict) else None
    if spec is None:
        return None
    try:
        k = int(spec["iterations"])
        code_shape = tuple(int(d) for d in spec["code_shape"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("{}: progressive {!r} is not {{\"iterations\": K, \"code_shape\": [C, h, w]}}".format(
            info.path, spec))
    if not 1 <= k <= MAX_ITERATIONS or len(code_shape) != 3 or min(code_shape) < 1:
        raise ConfigError("{}: progressive iterations {} (1 to {}) or code shape {} ([C, h, w]) out of range".format(
            info.path, k, MAX_ITERATIONS, list(code_shape)))
    return k, code_shape


class ProgressiveBackend(object):
    """A progressive codec (``open_progressive``'s :class:`ProgressiveCodec`) as the pipelines see a backend.

    The edge calls :meth:`encode` (``tensor`` (1, 3, H, W) float32 -> codes uint8 (k, C, h, w)); the host's decode
    stage calls :meth:`infer_batch` with each frame's codes (any k, one decode per frame). ``input_shape`` is the
    largest frame's latents, (K, C, h, w), as the HELLO's shape says; ``progressive`` the HELLO's description.
    """

    max_batch = 1
    copy_note = ""

    def __init__(self, codec, info, role):
        self.codec, self.info, self.role = codec, info, role
        self.max_iterations = int(codec.max_iterations)
        self.code_shape = tuple(int(d) for d in codec.code_shape)
        spec = progressive_spec(info)
        if spec is not None and spec != (self.max_iterations, self.code_shape):
            raise ConfigError("{}: model.json says {} iterations of codes {}, and the model codes {} of {}".format(
                info.path, spec[0], list(spec[1]), self.max_iterations, list(self.code_shape)))
        self.progressive = {"iterations": self.max_iterations, "code_shape": list(self.code_shape)}
        steps = getattr(codec, "decoder", None)  # the runtime of its steps (onnxruntime, tensorrt, torch)
        self.name = "progressive {}".format(getattr(steps, "name", None) or getattr(codec, "name", "model"))
        self.loaded = False

    @property
    def input_shape(self):
        """What the role takes: the encoder a frame (1, 3, H, W); the decoder at most K codes, (K, C, h, w)."""
        if self.role == "encoder":
            return tuple(int(d) for d in self.codec.input_shape)
        return (self.max_iterations,) + self.code_shape

    @property
    def wire_shape(self):
        """The HELLO's latent shape: the largest frame, (K, C, h, w)."""
        return (self.max_iterations,) + self.code_shape

    def encode(self, tensor, iterations):
        """The first ``iterations`` codes of ``tensor``: ``(codes, timings)``, codes uint8 0/1 of shape (iterations,
        C, h, w); timings in ms as a backend's ``infer``: ``run_ms`` (the encoder steps and the decoder steps the
        residuals need) and ``copy_ms`` (outputs to host memory, the codec's ``gpu_to_cpu``)."""
        started = time.perf_counter()
        codes, timings = self.codec.encode(tensor, int(iterations))
        wall_ms = (time.perf_counter() - started) * 1000.0
        codes = np.asarray(codes)
        if codes.shape != (int(iterations),) + self.code_shape:
            raise BackendError("the progressive encoder gave codes of shape {} for {} iterations (expected {})".format(
                codes.shape, iterations, (int(iterations),) + self.code_shape))
        copy_ms = float(timings.get("gpu_to_cpu", 0.0)) if isinstance(timings, dict) else 0.0
        return codes.astype(np.uint8, copy=False), {"run_ms": max(0.0, wall_ms - copy_ms), "copy_ms": copy_ms}

    def context_model(self, iterations):
        """The ``--entropy context`` coder of ``iterations`` codes (k, C, h, w): the model's tables for its first k
        iterations (edge/progressive.py's IterationContextModel); ConfigError if it has none."""
        if not hasattr(self.codec, "context_model"):
            raise ConfigError("this progressive model has no context coder; use --entropy zlib or zstd")
        return self.codec.context_model(int(iterations))

    def infer_batch(self, arrays):
        """Decode each frame's codes (k, C, h, w) to its image (1, 3, H, W) float32; ``(outputs, timings)`` with
        ``run_ms`` for all of them (BackendError when one fails: the host then decodes them one by one)."""
        outputs, started = [], time.perf_counter()
        for codes in arrays:
            bits = (np.asarray(codes) > 0.5).astype(np.uint8)
            if not 1 <= bits.shape[0] <= self.max_iterations or tuple(bits.shape[1:]) != self.code_shape:
                raise BackendError("codes of shape {} do not fit this decoder ({} iterations of {})".format(
                    bits.shape, self.max_iterations, list(self.code_shape)))
            try:
                image, _ = self.codec.decode(bits)
            except (ValueError, RuntimeError, LatentlinkError) as exc:
                raise BackendError("progressive decode of {} iterations failed: {}".format(bits.shape[0], exc))
            outputs.append(np.array(image, dtype=np.float32))  # its own array, as infer_batch promises
        return outputs, {"run_ms": (time.perf_counter() - started) * 1000.0, "copy_ms": 0.0}

    def load(self):
        if not self.loaded and hasattr(self.codec, "load"):
            self.codec.load()
        self.loaded = True
        return self

    def close(self):
        if self.loaded and hasattr(self.codec, "close"):
            self.codec.close()
        self.loaded = False

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc_info):
        self.close()


def is_progressive(model_path):
    """True when the model file's metadata (model.json) describes a progressive model; None for a PyTorch
    checkpoint (known once loaded)."""
    from .backends.base import read_model_info

    if os.path.splitext(model_path)[1].lower() in CHECKPOINTS:
        return None
    try:
        return progressive_spec(read_model_info(model_path)) is not None
    except ConfigError:
        return False  # no metadata: open_backend says what it lacks


def open_model(model_path, role, **options):
    """A backend for ``model_path``: a :class:`ProgressiveBackend` when it is a progressive model (opened with
    ``open_progressive``), else :func:`~latentlink.edge.backends.open_backend`'s (unloaded; a PyTorch checkpoint
    is loaded to tell which it is)."""
    from .backends import open_backend
    from .backends.base import read_model_info

    progressive = is_progressive(model_path)
    if progressive is None:  # a checkpoint says what it is once loaded
        backend = open_backend(model_path, role, **options).load()
        if backend.info.progressive is None:
            return backend
        backend.close()
    elif not progressive:
        return open_backend(model_path, role, **options)
    from .progressive import open_progressive  # the progressive model's own module

    codec = open_progressive(model_path, role, **options)
    info = getattr(codec, "info", None) or read_model_info(model_path)
    return ProgressiveBackend(codec, info, role)
