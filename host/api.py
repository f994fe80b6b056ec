"""The host's Python API: decoded frames in your own program, as an iterator, a callback or imagezmq's recv_image.

::

    from latentlink import Receiver

    with Receiver("0.0.0.0:5760") as receiver:
        for frame in receiver:                 # a DecodedFrame: stream, seq, image (BGR uint8), latents, ...
            cv2.imwrite(f"{frame.stream}-{frame.seq}.png", frame.image)

A :class:`Receiver` runs a :class:`~latentlink.host.server.Host` (``latentlink host``: the same handshake, checks,
credentials, decoding and accounting) in a background thread. Its output puts each decoded frame into a bounded
queue; the host acknowledges a frame to its edge only once the frame is in that queue, so a consumer slower than the
edges fills the queue, then holds up the host, whose edges' windows then fill: they slow down (``block``) or drop
frames by their policy, and memory does not grow. At most ``queue_size`` frames are acknowledged and not yet taken.
"""

import logging
import queue
import threading
import time

from latentlink.edge.cli import check_output_dir, check_output_file, peak_rss_mb
from latentlink.edge.errors import ConfigError, LatentlinkError
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import ReportWriter, host_stages
from latentlink.edge.security import Credentials
from latentlink.edge.sender import parse_address

from .outputs import DecodedFrame, Output, OutputError
from .server import Host
from .triton_backend import open_decoder

log = logging.getLogger("latentlink.host")
POLL_S = 0.1  # how often a waiting consumer or a blocked write looks whether the receiver stopped


class ReceiverError(LatentlinkError):
    """The receiver stopped on an error: in its host thread, or raised by ``on_frame``. The original exception is
    its ``__cause__`` (the traceback shows both)."""


class ReceiverClosed(LatentlinkError):
    """``recv`` after the receiver stopped (``close``, ``max_streams``, ``max_frames``) and every frame was taken."""


class QueueOutput(Output):
    """The receiver's output: each decoded frame into ``frames`` (a bounded ``queue.Queue``), waiting while it is
    full, so that the host acknowledges the frame only once the application can have it. Once ``closed`` is set a
    waiting frame is refused (:class:`OutputError`: it counts as failed, or as lost if its connection is gone)."""

    uri = "python://Receiver"

    def __init__(self, frames, closed):
        self.frames, self.closed = frames, closed

    def write(self, frame: DecodedFrame):
        while True:
            try:
                self.frames.put(frame, timeout=POLL_S)
                return
            except queue.Full:
                if self.closed.is_set():
                    raise OutputError(f"frame {frame.seq} of stream {frame.stream!r}: the Receiver was closed "
                                      "before the application took it")


class Receiver:
    """Listens for edges and yields their decoded frames (:class:`~latentlink.host.outputs.DecodedFrame`); a context
    manager. Three ways to take frames:

    - ``for frame in receiver:``, until the receiver stops (``max_streams`` or ``max_frames`` reached, or
      :meth:`close` from another thread);
    - ``receiver.recv(timeout=None)`` -> DecodedFrame, or ``recv_image()`` -> ``(stream, image)`` as imagezmq's
      ``ImageHub`` (no ``send_reply`` needed: the host acknowledges frames itself);
    - ``Receiver(..., on_frame=callback)``: ``callback(frame)`` in one thread of the receiver's, frame after frame;
      :meth:`wait` blocks until the receiver stops. An exception in the callback stops the receiver and is re-raised
      (as :class:`ReceiverError`) by :meth:`wait` or :meth:`close`.

    ``listen``: ``"HOST:PORT"`` (port 0: any free port; :attr:`address` says which). ``profile``, ``decoder``,
    ``threads``, ``device``, ``precision``, ``window``: as ``latentlink host``'s options. Credentials as the CLI
    takes them: ``tls`` (the folder of ``latentlink keys init``) and ``token_file``. ``queue_size``: frames decoded
    and acknowledged that may wait for the application (bounded: a slower application slows the edges). ``out``: also
    save each frame as ``out/<stream>/<seq:06d>.png``. ``report``: the host's report file (``latentlink report``).
    ``max_streams`` / ``max_frames``: stop after that many streams ended / frames decoded. ``host_options``: more
    :class:`~latentlink.host.server.Host` keyword arguments (``idle_timeout_s``, ``max_connections``, ...).

    The model is loaded and the port bound in the constructor (a ``ConfigError`` names what is wrong). :meth:`close`
    stops the host and returns its summary (``latentlink host --report``'s), with ``receiver``: frames ``delivered``
    to the application and ``undelivered`` (decoded and acknowledged, still queued at close: discarded).
    """

    def __init__(self, listen="127.0.0.1:5760", profile="nano-504", decoder="default", tls=None, token_file=None,
                 queue_size=8, out=None, on_frame=None, max_streams=None, max_frames=None, window=8, report=None,
                 threads=0, device=None, precision=None, **host_options):
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"bad queue_size {queue_size!r}: a number of frames, at least 1")
        if on_frame is not None and not callable(on_frame):  # e.g. on_frame=show(frame): its result, not the function
            raise ConfigError(f"on_frame must be a function taking a DecodedFrame, not {on_frame!r}; pass the function "
                              "itself (on_frame=show, not on_frame=show(...))")
        if out:
            check_output_dir("out", out)
        if report:
            check_output_file("report", report)
        self.profile = load_profile(profile)
        credentials = Credentials.for_host(tls, token_file)  # missing files fail before the model loads
        listen_host, listen_port = parse_address(listen)
        self.decoder_path = self.profile.model.decoder if decoder == "default" else decoder
        self._decoder = open_decoder(self.decoder_path, "decoder", threads=threads, device=device,
                                     precision=precision,  # a file, or a decode service's triton://HOST:PORT/MODEL
                                     input_size=(self.profile.input.height, self.profile.input.width)).load()
        self._frames = queue.Queue(maxsize=queue_size)
        self._closed = threading.Event()  # close() was called: blocked writes give up
        self._served = threading.Event()  # the host thread has ended
        self._error = None  # (where, exception) of the first failure
        self._raised = False  # that failure was re-raised to the application
        self._report = None
        self.summary = None
        self.delivered = 0
        try:
            options = dict(budget_ms=self.profile.budget_ms, max_frame_bytes=self.profile.transport.max_frame_bytes,
                           window=window)
            options.update(host_options)
            self._host = Host(self._decoder, out_dir=out, max_streams=max_streams, max_frames=max_frames,
                              credentials=credentials, outputs=[QueueOutput(self._frames, self._closed)], **options)
            self._meta = {"role": "host", "profile": self.profile.name, "backend": self._decoder.name,
                          "decoder": self.decoder_path, "out": out}
            if report:  # each decoded frame's record is written at once, not kept until the end
                self._report = ReportWriter(report, host_stages(options.get("postfilter")), self.profile.budget_ms,
                                            self._meta)
                self._host.add_record_listener(self._report.add)
            bound = self._host.bind(listen_host, listen_port)
        except BaseException:
            if self._report is not None:
                self._report.close()
            self._decoder.close()
            raise
        self.address = "{}:{}".format(*bound)  # what a Sender connects to (the real port when listening on 0)
        self._thread = threading.Thread(target=self._serve, name="latentlink-receiver-host", daemon=True)
        self._thread.start()
        self._on_frame, self._callback_thread = on_frame, None
        if on_frame is not None:
            self._callback_thread = threading.Thread(target=self._call_back, name="latentlink-receiver-on-frame",
                                                     daemon=True)
            self._callback_thread.start()

    # The host's thread and the callback's.
    def _serve(self):
        try:
            self._host.serve()
        except BaseException as exc:  # noqa: B902 (handed to the application's thread, which re-raises it)
            self._fail("the receiver's host thread", exc)
        finally:
            self._served.set()

    def _call_back(self):
        try:
            while not self._closed.is_set():
                frame = self._get(None)
                if frame is None:
                    return
                self._on_frame(frame)
        except ReceiverError:
            pass  # the host thread failed: wait() and close() raise it
        except BaseException as exc:  # noqa: B902
            self._fail("on_frame", exc)
            self._host.stop()
            self._closed.set()  # a write waiting for room gives up: nobody will take frames any more

    def _fail(self, where, exc):
        if self._error is None:
            log.error("%s failed: %r", where, exc)
            self._error = (where, exc)

    def _raise_error(self):
        where, exc = self._error
        self._raised = True
        raise ReceiverError(f"{where} failed: {type(exc).__name__}: {exc}") from exc

    def _get(self, timeout):
        """The next frame; None once the receiver stopped and the queue is empty. Raises ReceiverError on a host
        failure (after the frames received before it), TimeoutError after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            served = self._served.is_set()  # read before the queue: a frame put before the end is not missed
            try:
                frame = self._frames.get(timeout=POLL_S if deadline is None else
                                         max(0.0, min(POLL_S, deadline - time.monotonic())))
            except queue.Empty:
                if self._error is not None and self._error[0] != "on_frame":
                    self._raise_error()
                if served or self._closed.is_set():
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no frame within {timeout} s")
                continue
            self.delivered += 1
            return frame

    # The application's side.
    def recv(self, timeout=None):
        """The next decoded frame (waiting at most ``timeout`` seconds: TimeoutError; None: as long as it takes).
        Raises :class:`ReceiverClosed` once the receiver stopped and every frame was taken."""
        self._check_pull()
        frame = self._get(timeout)
        if frame is None:
            raise ReceiverClosed("the receiver has stopped and every frame it received was taken")
        return frame

    def recv_image(self, timeout=None):
        """``(stream, image)`` of the next decoded frame, as imagezmq's ``ImageHub.recv_image`` (``image``: HxWx3
        uint8, BGR)."""
        frame = self.recv(timeout)
        return frame.stream, frame.image

    def __iter__(self):
        self._check_pull()
        while True:
            frame = self._get(None)
            if frame is None:
                return
            yield frame

    def _check_pull(self):
        if self._on_frame is not None:
            raise ConfigError("this Receiver hands its frames to on_frame; iterate or recv() only without on_frame")

    def wait(self, timeout=None):
        """Block until the receiver stops (``max_streams`` or ``max_frames`` reached, or :meth:`close`) and, with
        ``on_frame``, every frame went to it; returns False if ``timeout`` seconds passed first. Raises
        :class:`ReceiverError` if the host thread or ``on_frame`` failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._callback_thread):
            while thread is not None and thread.is_alive():  # short joins: Ctrl-C stays responsive
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                thread.join(POLL_S)
                if self._error is not None:
                    self._raise_error()
        if self._error is not None:
            self._raise_error()
        return True

    def snapshot(self):
        """The host's live counts (:meth:`~latentlink.host.server.Host.snapshot`: ``frames`` decoded, ``streams``,
        ...) with ``queued`` (frames waiting for the application, at most ``queue_size``) and ``delivered``."""
        snapshot = self._host.snapshot()
        snapshot.update(queued=self._frames.qsize(), delivered=self.delivered)
        return snapshot

    @property
    def stopped(self):
        """True once the host has stopped (frames may still wait in the queue)."""
        return self._served.is_set()

    def close(self):
        """Stop the host (edges still streaming lose their connection: their frames in flight count as lost, or are
        resent elsewhere under reliable delivery), release the model; returns the host's summary with
        ``receiver``. Raises :class:`ReceiverError` if the host thread or ``on_frame`` failed and nobody was told yet.
        Safe to call twice, and from ``on_frame``."""
        if self.summary is None:
            self._host.stop()
            self._closed.set()  # after stop(): a write waiting for room gives up, and no new frame is decoded
            self._thread.join()
            if self._callback_thread is not None and self._callback_thread is not threading.current_thread():
                self._callback_thread.join()
            undelivered = 0
            while True:  # frames acknowledged but never taken: counted, then let go
                try:
                    self._frames.get_nowait()
                except queue.Empty:
                    break
                undelivered += 1
            try:
                summary = self._host.summary()
                summary["receiver"] = {"delivered": self.delivered, "undelivered": undelivered}
                self._meta.update(peak_rss_mb=peak_rss_mb(), stream=",".join(summary["streams"]) or "-")
                if self._report is not None:
                    self._report.finish(summary, self._meta)
            finally:
                if self._report is not None:
                    self._report.close()
                self._decoder.close()
            self.summary = summary
        if self._error is not None and not self._raised:
            self._raise_error()
        return self.summary

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # the application's own exception goes on; an error of ours is in the log
            self._raised = True
            self.close()
        return False

    def __repr__(self):
        return f"Receiver({self.address!r}, profile={self.profile.name!r})"
