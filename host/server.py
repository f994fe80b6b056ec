"""The host: accept edges, read frames, decode latents to images, store or show them, time every stage.

One thread per connection. A connection is independent of the others: a malformed or malicious frame, a peer that
stalls or a latent that does not fit the decoder closes that one connection with a clear log line; the server and
the other streams go on. Frame size and metadata are checked before anything is allocated (``edge.protocol``).
"""

import logging
import os
import socket
import threading
import time

import cv2

from edge.errors import BackendError, ConnectionClosed, ProtocolError
from edge.preprocess import to_image
from edge.profiler import HOST_STAGES, FrameTimer, summarize
from edge.protocol import FIXED_HEADER, FLAG_END_OF_STREAM, decode_latents, read_frame

log = logging.getLogger("latentlink.host")


class StreamStats(object):
    """What the host saw of one named stream, across its connections (an edge may reconnect)."""

    def __init__(self, name):
        self.name = name
        self.frames = 0
        self.gaps = 0  # sequence numbers never received: frames the edge dropped or lost in sending
        self.failed = 0  # frames received but not decoded (bad latents, wrong shape)
        self.connections = 0
        self.ended = False  # the edge said end-of-stream
        self.last_seq = None

    def as_dict(self):
        return {"frames": self.frames, "gaps": self.gaps, "failed": self.failed, "connections": self.connections,
                "ended": self.ended, "last_seq": self.last_seq}


class Host(object):
    """Receives latents from any number of edges and decodes them with one shared ``decoder`` backend.

    ``out_dir``: save frames as ``out_dir/<stream>/<seq:06d>.png``. ``display``: show them (OpenCV window).
    ``max_frames``: stop after this many decoded frames; ``max_streams``: stop after this many connections ended.
    ``idle_timeout_s``: close a connection silent this long between frames; ``frame_timeout_s``: ... this long
    inside a frame. ``max_frame_bytes``: the largest payload accepted.
    """

    def __init__(self, decoder, budget_ms=33.0, out_dir=None, display=False, max_frames=None, max_streams=None,
                 max_frame_bytes=32 << 20, idle_timeout_s=60.0, frame_timeout_s=10.0):
        self.decoder = decoder
        self.budget_ms = budget_ms
        self.out_dir, self.display = out_dir, display
        self.max_frames, self.max_streams = max_frames, max_streams
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s, self.frame_timeout_s = idle_timeout_s, frame_timeout_s
        self.streams = {}
        self.records = []
        self.protocol_errors = 0
        self.connections_ended = 0
        self.address = None
        self._lock = threading.Lock()  # guards the counters above and the streams dict
        self._decode_lock = threading.Lock()  # one decode at a time: ONNX Runtime already uses every core
        self._stop = threading.Event()
        self._conns = set()
        self._threads = []
        self._latest = {}  # stream -> last image, for --display
        self._first_frame_at = self._last_frame_at = None

    # Lifecycle.
    def bind(self, host="127.0.0.1", port=5760):
        """Listen on ``host:port`` (port 0: any free port); returns the bound ``(host, port)``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, port))
        self._server.listen(16)
        self._server.settimeout(0.05)
        self.address = self._server.getsockname()[:2]
        log.info("listening on %s:%d", *self.address)
        return self.address

    def serve(self):
        """Accept and serve edges until a stop condition or :meth:`stop`; then close everything."""
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self._server.accept()
                except socket.timeout:
                    self._show()
                    continue
                thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                                          name="latentlink-conn-{}:{}".format(*peer[:2]))
                self._threads.append(thread)
                thread.start()
        except KeyboardInterrupt:
            log.info("interrupted")
        finally:
            self._shutdown()

    def stop(self):
        self._stop.set()

    def _shutdown(self):
        self._stop.set()
        self._server.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # wakes the connection threads blocked in recv
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        if self.display:
            cv2.destroyAllWindows()

    # One connection.
    def _serve_connection(self, conn, peer):
        where = "{}:{}".format(*peer[:2])
        with self._lock:
            self._conns.add(conn)
        stream = None
        try:
            stream = self._receive_frames(conn, where)
        except ConnectionClosed:
            log.warning("%s: connection closed without end-of-stream%s", where,
                        " (stream {!r})".format(stream) if stream else "")
        except socket.timeout:
            log.warning("%s: no data for %.0f s; closing the connection", where, self.idle_timeout_s)
        except ProtocolError as exc:
            with self._lock:
                self.protocol_errors += 1
            log.error("%s: bad frame: %s; closing this connection (other streams are unaffected)", where, exc)
        except OSError as exc:
            if not self._stop.is_set():
                log.warning("%s: connection error: %s", where, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: unexpected error; closing this connection", where)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self.connections_ended += 1
                if self.max_streams and self.connections_ended >= self.max_streams:
                    self._stop.set()

    def _receive_frames(self, conn, where):
        """Serve frames until end-of-stream; returns the stream's name. Raises on anything that ends it early."""
        stream = None
        while not self._stop.is_set():
            conn.settimeout(self.idle_timeout_s)
            started = []

            def frame_started():
                # The frame's first bytes are here: idle waiting stops counting, and the rest must come promptly.
                started.append(time.perf_counter())
                conn.settimeout(self.frame_timeout_s)

            meta, payload = read_frame(conn, self.max_frame_bytes, on_header=frame_started)
            timer = FrameTimer(meta.seq)
            timer.add("receive", (time.perf_counter() - started[0]) * 1000.0)
            if stream is None:
                stream = self._open_stream(meta.stream, where)
            elif meta.stream != stream:
                raise ProtocolError("stream name changed from {!r} to {!r} on one connection".format(
                    stream, meta.stream))
            if meta.flags & FLAG_END_OF_STREAM:
                with self._lock:
                    self.streams[stream].ended = True
                log.info("%s: stream %r ended", where, stream)
                return stream
            self._handle_frame(conn, where, meta, payload, timer)
        return stream

    def _open_stream(self, name, where):
        with self._lock:
            stats = self.streams.setdefault(name, StreamStats(name))
            stats.connections += 1
        log.info("%s: stream %r connected", where, name)
        return name

    def _handle_frame(self, conn, where, meta, payload, timer):
        stats = self.streams[meta.stream]
        with timer.stage("deserialize"):
            latents = decode_latents(meta, payload)
        if latents.shape != self.decoder.input_shape:
            with self._lock:
                stats.failed += 1
            raise ProtocolError("latents of shape {} do not fit the decoder's input {}: run the host with the "
                                "edge's profile or decoder".format(latents.shape, self.decoder.input_shape))
        try:
            with self._decode_lock:
                output, timings = self.decoder.infer(latents.astype("float32", copy=False))
                timer.add("decode", timings["run_ms"] + timings["copy_ms"])
                with timer.stage("write"):
                    image = to_image(output)
        except BackendError as exc:
            with self._lock:
                stats.failed += 1
            log.error("%s: frame %d of %r failed to decode: %s", where, meta.seq, meta.stream, exc)
            return
        with timer.stage("write"):
            if self.out_dir:
                folder = os.path.join(self.out_dir, meta.stream)
                if not os.path.isdir(folder):
                    os.makedirs(folder, exist_ok=True)
                cv2.imwrite(os.path.join(folder, "{:06d}.png".format(meta.seq)), image)
            if self.display:
                self._latest[meta.stream] = image
        now = time.perf_counter()
        record = timer.record()
        record.update(stream=meta.stream, bytes=FIXED_HEADER.size + meta.meta_len + meta.payload_len,
                      latency_ms=round((time.time() - meta.t_capture) * 1000.0, 3))
        with self._lock:
            if stats.last_seq is not None and meta.seq > stats.last_seq + 1:
                stats.gaps += meta.seq - stats.last_seq - 1
            elif stats.last_seq is not None and meta.seq <= stats.last_seq:
                log.info("%s: stream %r restarted its sequence at %d", where, meta.stream, meta.seq)
            stats.last_seq = meta.seq
            stats.frames += 1
            self.records.append(record)
            self._first_frame_at = self._first_frame_at or now
            self._last_frame_at = now
            if self.max_frames and len(self.records) >= self.max_frames:
                self._stop.set()

    def _show(self):
        if not self.display or not self._latest:
            return
        for name, image in list(self._latest.items()):
            cv2.imshow("latentlink: " + name, image)
        cv2.waitKey(1)

    # Results.
    def summary(self):
        with self._lock:
            records = sorted(self.records, key=lambda r: (r["stream"], r["seq"]))
            wall_s = (self._last_frame_at - self._first_frame_at) if self._first_frame_at else 0.0
            # fps over the span from the first frame to the last: n frames make n-1 intervals.
            per_frame_wall = wall_s * len(records) / max(1, len(records) - 1)
            streams = {name: s.as_dict() for name, s in sorted(self.streams.items())}
            gaps = sum(s.gaps for s in self.streams.values())
            failed = sum(s.failed for s in self.streams.values())
        notes = {"receive": "from a frame's first bytes to its last; idle time between frames is not counted",
                 "write": "PNG encoding and saving (plus the conversion to an image)" if self.out_dir else
                 "conversion to an image only (no --out)"}
        summary = summarize(records, HOST_STAGES, self.budget_ms, per_frame_wall, dropped=gaps, extra={
            "failed": failed, "protocol_errors": self.protocol_errors, "streams": streams, "notes": notes})
        return summary, records

