"""The edge's Python API: send images or latents from your own loop, with everything ``latentlink edge`` does.

::

    from latentlink import Sender

    with Sender("192.168.1.20:5760", name="cam0") as sender:
        while True:
            ok, image = camera.read()          # any size, BGR uint8, as OpenCV gives it
            if not ok:                         # the source ended: image is None
                break
            sender.send_image(image)
    # leaving the block ends the stream and waits for the host's acknowledgements

A :class:`Sender` is ``latentlink edge`` without the source: the same profile (input size and fit, model, budget,
transport), the same encoder backends, window, queue, drop policy, delivery, reconnects, credentials and per-frame
accounting (:class:`~latentlink.edge.pipeline.EdgeStream`). ``close()`` returns the same summary as the CLI's report:
``captured`` (frames handed in) = decoded + failed + refused + dropped + lost.

Python 3.6 (the Jetson Nano) like all of ``edge/``; imports nothing of ``latentlink.host``.
"""

import logging
import threading
import time

import numpy as np

from .cli import check_output_file, peak_rss_mb
from .errors import ConfigError
from .pipeline import EdgeStream, default_stream_name, edge_stages
from .profile import load_profile
from .profiler import ReportWriter
from .rate import make_rate, open_model
from .security import Credentials
from .sender import Spool, parse_address

log = logging.getLogger("latentlink.edge")


class Sender(object):
    """Streams images (or ready latents) from the caller's loop to a latentlink host; a context manager.

    ``connect``: the host, ``"HOST:PORT"`` (a bare ``"HOST"`` means port 5760). ``name``: the stream's name on the
    host (default: this machine's name). ``profile``: a profile name or YAML file (default ``nano-504``);
    ``encoder``: a model file, or "default" for the profile's ONNX; ``threads``, ``device``, ``precision``,
    ``mapped``: as ``latentlink edge``'s options of those names.

    Transport (None: the profile's): ``drop`` ("oldest", "newest", "block"), ``queue_size`` (frames waiting beyond
    the window), ``window`` (frames sent and not yet acknowledged), ``delivery`` ("live" or "reliable"), ``entropy``
    ("none", "zlib", "lz4", "zstd"), ``serializer``, ``wait_for_host_s`` (seconds the host may stay unreachable before
    the sender gives up; 0: forever), ``spool`` (a folder for reliable delivery's overflow, at most
    ``spool_bytes``), ``protocol`` (2; 1 for hosts older than protocol 2).

    Credentials as the CLI takes them: ``tls`` (the folder of ``latentlink keys``; the certificate is the one of
    ``name``), ``tls_ca``, ``token_file``. ``report``: write each frame's record to this JSON file as its outcome
    arrives, and the summary at close (``latentlink report FILE`` prints it).

    A progressive model (edge/rate.py): ``rate`` "fixed" (``iterations`` per frame; default all the model has) or
    "adaptive" (each frame's iterations follow the link, from ``min_iterations`` to ``max_iterations``), as
    ``latentlink edge``'s options of those names.

    The model is loaded and the arguments are checked in the constructor (a ``ConfigError`` names the bad value);
    the connection is made in the background, and reconnects as the profile says, like the CLI's. Several threads may
    share a Sender: their frames are taken one at a time, each with its own sequence number.
    """

    def __init__(self, connect="127.0.0.1:5760", name=None, profile="nano-504", encoder="default", drop=None,
                 queue_size=None, window=None, delivery=None, entropy=None, serializer=None, wait_for_host_s=None,
                 spool=None, spool_bytes=100 << 20, protocol=2, tls=None, tls_ca=None, token_file=None, report=None,
                 threads=0, device=None, precision=None, mapped=False, rate=None, iterations=None, min_iterations=None,
                 max_iterations=None):
        self.profile = load_profile(profile)
        self.name = name or default_stream_name()
        address = parse_address(connect)
        delivery = delivery or self.profile.transport.delivery
        if delivery == "reliable" and drop not in (None, "block"):
            raise ConfigError("reliable delivery never drops frames, so it cannot take drop={!r}: leave drop out, or "
                              "use delivery='live'".format(drop))
        if spool and delivery != "reliable":
            raise ConfigError("spool holds frames for reliable delivery only: add delivery='reliable'")
        if report:
            check_output_file("report", report)
        credentials = Credentials.for_edge(tls, self.name, tls_ca, token_file)
        self.encoder_path = self.profile.model.encoder if encoder == "default" else encoder
        self._encoder = open_model(self.encoder_path, "encoder", threads=threads, device=device,
                                   precision=precision, mapped=mapped,
                                   input_size=(self.profile.input.height, self.profile.input.width))
        self._report = None
        self._lock = threading.Lock()  # one frame at a time: a frame's sequence number is taken as it is sent
        self._encoder.load()
        try:
            info = self._encoder.info
            self.latent_shape = tuple(info.latent_shape)
            self.latent_dtype = info.latent_dtype
            self._meta = {"role": "edge", "stream": self.name, "profile": self.profile.name,
                          "backend": self._encoder.name, "encoder": self.encoder_path, "source": "python-api",
                          "packing": info.packing, "input_shape": list(info.input_shape),
                          "latent_shape": list(info.latent_shape)}
            policy = None
            if getattr(self._encoder, "progressive", None) is not None:
                policy = make_rate(rate, self._encoder.max_iterations, iterations, min_iterations, max_iterations,
                                   window=window or self.profile.transport.window)
            elif (rate, iterations, min_iterations, max_iterations) != (None,) * 4:
                raise ConfigError("rate and iterations choose a progressive model's iterations per frame, and {} is "
                                  "not progressive".format(self.encoder_path))
            self._stream = EdgeStream(self._encoder, self.profile, address, self.name, serializer=serializer,
                                      drop=drop, queue_size=queue_size, window=window, delivery=delivery,
                                      entropy=entropy, wait_for_host_s=wait_for_host_s,
                                      spool=Spool(spool, spool_bytes) if spool else None, protocol=protocol,
                                      credentials=credentials, on_record=self._on_record, rate=policy)
            self._meta["entropy"] = self._stream.entropy
            if report:  # each frame's record is written as its outcome arrives, not kept until the end
                self._report = ReportWriter(report, edge_stages(self._stream.entropy), self.profile.budget_ms,
                                            self._meta)
        except BaseException:
            self._encoder.close()
            raise
        self.summary = None
        log.info("stream %r: Python API -> %s (%s, %s packing, entropy %s) -> %s:%d", self.name, self.encoder_path,
                 self._encoder.name, info.packing, self._stream.entropy, address[0], address[1])

    def send_image(self, image, t_capture=None):
        """Preprocess (fit to the profile's input size), encode and queue one image: an HxWx3 uint8 array in BGR
        order, as OpenCV's ``VideoCapture.read`` and ``imread`` give it, any size. ``t_capture``: when it was
        captured, UNIX seconds (default: now), for the capture-to-decoded latency.

        Returns True when queued, False when the drop policy dropped it (or, under ``oldest``, an older frame) or the
        sender has stopped (``stopped``: the host refused the stream or stayed unreachable). Under ``block`` and
        reliable delivery it waits while the queue is full: a slow host slows the caller's loop.
        """
        self._check_open()
        fix = _image_fix(image)
        if fix:
            raise ConfigError("send_image takes an HxWx3 uint8 BGR image (as cv2.imread gives), not {}: {}".format(
                _describe(image), fix))
        with self._lock:
            return self._stream.send_image(image, time.time() if t_capture is None else t_capture)

    def send_latents(self, latents, t_capture=None):
        """Queue latents the caller encoded: an array of the encoder's output shape (:attr:`latent_shape`, e.g.
        (1, 8, 126, 126)), as its ``infer`` returns them; any numeric dtype, converted to the encoder's
        (:attr:`latent_dtype`). Returns as :meth:`send_image`."""
        self._check_open()
        latents = np.asarray(latents)
        if tuple(latents.shape) != self.latent_shape or latents.dtype.kind not in "fiub":
            raise ConfigError("send_latents takes the encoder's output, a numeric array of shape {}, not {}: the "
                              "host's decoder refuses any other shape".format(list(self.latent_shape),
                                                                              _describe(latents)))
        latents = latents.astype(self.latent_dtype, copy=False)  # as the encoder gives them (float32)
        with self._lock:
            return self._stream.send_latents(latents, time.time() if t_capture is None else t_capture)

    @property
    def counts(self):
        """Frames per outcome so far (decoded, failed, refused, dropped, lost, sent), a copy."""
        return dict(self._stream.sender.counts)

    @property
    def stopped(self):
        """True once nothing more can be sent: the host refused the stream, or could not be reached within
        ``wait_for_host_s`` (the summary's ``refused`` and ``gave_up`` say which)."""
        return self._stream.stopped

    def close(self):
        """Deliver what is queued and in flight, end the stream, wait for the host's acknowledgements, release the
        model; returns the summary (a dict, as ``latentlink edge --report`` writes it). Safe to call twice."""
        if self.summary is not None:
            return self.summary
        try:
            summary = self._stream.close()
            self._meta["peak_rss_mb"] = peak_rss_mb()
            if self._report is not None:
                self._report.finish(summary, self._meta)
        finally:
            if self._report is not None:
                self._report.close()
            self._encoder.close()
        self.summary = summary
        return summary

    def _on_record(self, record):
        if self._report is not None:
            self._report.add(record)

    def _check_open(self):
        if self.summary is not None:
            raise ConfigError("this Sender of stream {!r} is closed; make a new one".format(self.name))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __repr__(self):
        return "Sender({!r}, name={!r}, profile={!r})".format("{}:{}".format(*self._stream.sender.address), self.name,
                                                             self.profile.name)


def _image_fix(image):
    """What to do to make ``image`` an HxWx3 uint8 BGR image that send_image takes; None if it is one."""
    if image is None:
        return ("cv2.imread gives None for a file it cannot read, and VideoCapture.read (False, None) once the "
                "source has no frame: check those first")
    if not isinstance(image, np.ndarray):
        return "give a numpy array (np.asarray(image, np.uint8))"
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return "convert a grey image with cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)"
    if image.ndim == 3 and image.shape[2] == 4:
        return "drop the alpha channel with cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)"
    if image.ndim != 3 or image.shape[2] != 3:
        return "give height x width x 3 channels (BGR)"
    if image.dtype.kind == "f":
        return "scale it to 0-255 and convert: (image * 255).clip(0, 255).astype(np.uint8) for values in 0-1"
    if image.dtype != np.uint8:
        return "convert it to 8 bits per channel (0-255), e.g. (image >> 8).astype(np.uint8) for 16 bits"
    if image.size == 0:
        return "it is empty (0 pixels): check that the capture gave a frame"
    return None


def _describe(value):
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return "an array of shape {} and dtype {}".format(list(value.shape), value.dtype)
    return "a {}".format(type(value).__name__)
