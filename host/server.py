"""The host: accept edges, read frames, decode latents to images, store or show them, time every stage.

One thread per connection, at most ``max_connections`` at once. A connection is independent of the others: a
malformed or malicious frame, a peer that stalls or trickles, or latents that do not fit the decoder close that one
connection with a log line that says why; the server and the other streams go on. A frame's metadata is checked
(size limits, and the decoder's shape) before its payload is read, and receive buffers grow only with the bytes that
actually arrive (``edge.protocol``).
"""

import logging
import os
import socket
import threading
import time

import cv2

from latentlink.edge.errors import BackendError, ConfigError, ConnectionClosed, ProtocolError
from latentlink.edge.preprocess import to_image
from latentlink.edge.profiler import HOST_STAGES, FrameTimer, summarize
from latentlink.edge.protocol import FIXED_HEADER, FLAG_END_OF_STREAM, decode_latents, read_frame

log = logging.getLogger("latentlink.host")


class StreamStats(object):
    """What the host saw of one named stream, across its connections (an edge may reconnect)."""

    def __init__(self, name):
        self.name = name
        self.frames = 0
        self.gaps = 0  # sequence numbers never received: frames the edge dropped or lost in sending
        self.failed = 0  # frames received but not decoded (latents that do not fit, decoder errors)
        self.connections = 0
        self.ended = False  # the edge said end-of-stream
        self.last_seq = -1  # edges number frames from 0, so frames missing at the start count as gaps

    def account(self, seq):
        """Note that frame ``seq`` arrived (decoded or not); count the sequence numbers skipped before it."""
        if seq > self.last_seq + 1:
            self.gaps += seq - self.last_seq - 1
        elif seq <= self.last_seq:
            log.info("stream %r restarted its sequence at %d (an edge restarted?)", self.name, seq)
        self.last_seq = seq

    def fail(self, seq):
        """Frame ``seq`` arrived but could not be decoded."""
        self.account(seq)
        self.failed += 1

    def as_dict(self):
        return {"frames": self.frames, "gaps": self.gaps, "failed": self.failed, "connections": self.connections,
                "ended": self.ended, "last_seq": self.last_seq}


class Host(object):
    """Receives latents from any number of edges and decodes them with one shared ``decoder`` backend.

    ``out_dir``: save frames as ``out_dir/<stream>/<seq:06d>.png``. ``display``: show them (OpenCV window).
    ``max_frames``: stop after this many decoded frames; ``max_streams``: stop after this many streams said
    end-of-stream. ``idle_timeout_s``: close a connection silent this long between frames; ``frame_timeout_s``:
    a frame, once started, must arrive whole within this time. ``max_frame_bytes``: the largest payload accepted;
    ``max_connections``: edges served at once (more are refused), which with ``max_frame_bytes`` bounds memory.
    ``accept_pickle``: accept the seed pipeline's pickled arrays (off by default: a pickle is a program, and the
    parser for it is the largest attack surface the host has; see the README's threat model).
    """

    def __init__(self, decoder, budget_ms=33.0, out_dir=None, display=False, max_frames=None, max_streams=None,
                 max_frame_bytes=4 << 20, idle_timeout_s=60.0, frame_timeout_s=10.0, max_connections=32,
                 accept_pickle=False):
        self.decoder = decoder
        self.budget_ms = budget_ms
        self.out_dir, self.display = out_dir, display
        self.max_frames, self.max_streams = max_frames, max_streams
        self.max_frame_bytes, self.max_connections = max_frame_bytes, max_connections
        self.idle_timeout_s, self.frame_timeout_s = idle_timeout_s, frame_timeout_s
        self.accept_pickle = accept_pickle
        self.streams = {}
        self.records = []
        self.protocol_errors = 0
        self.write_errors = 0
        self.streams_ended = 0
        self.address = None
        self._lock = threading.Lock()  # guards the counters above, the streams dict and the live names
        self._decode_lock = threading.Lock()  # one decode at a time: ONNX Runtime already uses every core
        self._stop = threading.Event()
        self._conns = set()
        self._live = {}  # stream name -> peer address, for the connections open now
        self._threads = []
        self._latest = {}  # stream -> last image, for --display
        self._first_frame_at = self._last_frame_at = None

    # Lifecycle.
    def bind(self, host="127.0.0.1", port=5760):
        """Listen on ``host:port`` (port 0: any free port); returns the bound ``(host, port)``."""
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            self._server = socket.socket(family, socket.SOCK_STREAM)
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._server.bind(address)
            self._server.listen(16)
        except OSError as exc:
            raise ConfigError("cannot listen on {}:{} ({}); is another host using that port? Pick another "
                              "--listen port, or port 0 for any free one".format(host, port, exc))
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
                self._threads = [t for t in self._threads if t.is_alive()]
                if len(self._threads) >= self.max_connections:
                    log.warning("%s:%s refused: already serving %d connections (--max-connections)", peer[0],
                                peer[1], self.max_connections)
                    conn.close()
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
        names = []  # the stream this connection carries, once its first frame named it
        with self._lock:
            self._conns.add(conn)
        try:
            self._receive_frames(conn, where, names)
        except ConnectionClosed:
            if not self._stop.is_set():
                log.warning("%s: connection closed without end-of-stream%s", where,
                            " (stream {!r})".format(names[0]) if names else "")
        except socket.timeout:
            log.warning("%s: no frame for %.0f s; closing the connection (--idle-timeout)", where,
                        self.idle_timeout_s)
        except ProtocolError as exc:
            if self._stop.is_set():
                log.info("%s: closed mid-frame as the host stops", where)
            else:
                with self._lock:
                    self.protocol_errors += 1
                log.error("%s: bad frame: %s; closing this connection (other streams are unaffected)", where, exc)
        except OSError as exc:
            if not self._stop.is_set():
                log.warning("%s: connection error: %s", where, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: unexpected error; closing this connection", where)
        finally:
            # Free the stream name before closing: an edge that sees the close may reconnect at once.
            with self._lock:
                self._conns.discard(conn)
                if names:
                    self._live.pop(names[0], None)
            conn.close()

    def _receive_frames(self, conn, where, names):
        """Serve frames until end-of-stream. Raises on anything that ends the connection early."""
        while not self._stop.is_set():
            conn.settimeout(self.idle_timeout_s)
            started = []
            meta, payload = read_frame(conn, self.max_frame_bytes, on_header=lambda: started.append(
                time.perf_counter()), frame_timeout_s=self.frame_timeout_s,
                check_meta=lambda m: self._check_meta(m, where, names))
            timer = FrameTimer(meta.seq)
            timer.add("receive", (time.perf_counter() - started[0]) * 1000.0)
            if meta.flags & FLAG_END_OF_STREAM:
                self._end_stream(meta, where)
                return
            self._handle_frame(where, meta, payload, timer)

    def _check_meta(self, meta, where, names):
        """Refuse a frame from its metadata alone, before its payload is read or anything allocated for it."""
        if not names:
            with self._lock:
                if meta.stream in self._live:
                    raise ProtocolError("stream {!r} is already connected from {}; give each edge its own --name"
                                        .format(meta.stream, self._live[meta.stream]))
                self._live[meta.stream] = where
                stats = self.streams.setdefault(meta.stream, StreamStats(meta.stream))
                stats.connections += 1
            names.append(meta.stream)
            log.info("%s: stream %r connected", where, meta.stream)
        elif meta.stream != names[0]:
            raise ProtocolError("stream name changed from {!r} to {!r} on one connection".format(
                names[0], meta.stream))
        if meta.packing == "pickle" and not self.accept_pickle:
            raise ProtocolError("pickle frames are refused by this host (start it with --accept-pickle to accept the "
                                "seed pipeline's pickled arrays, or send with --serializer framed)")
        if not meta.flags & FLAG_END_OF_STREAM and tuple(meta.shape) != tuple(self.decoder.input_shape):
            with self._lock:
                self.streams[meta.stream].fail(meta.seq)
            raise ProtocolError("latents of shape {} do not fit the decoder's input {}: run the host with the "
                                "edge's profile or decoder".format(list(meta.shape), list(self.decoder.input_shape)))

    def _end_stream(self, meta, where):
        with self._lock:
            stats = self.streams[meta.stream]
            stats.gaps += max(0, meta.seq - stats.last_seq - 1)  # frames dropped at the very end
            stats.ended = True
            self.streams_ended += 1
            if self.max_streams and self.streams_ended >= self.max_streams:
                self._stop.set()
        log.info("%s: stream %r ended", where, meta.stream)

    def _handle_frame(self, where, meta, payload, timer):
        stats = self.streams[meta.stream]
        with timer.stage("deserialize"):
            latents = decode_latents(meta, payload)  # decompressed first if entropy-coded (bounded, edge/entropy.py)
        try:
            with self._decode_lock:
                output, timings = self.decoder.infer(latents.astype("float32", copy=False))
                timer.add_backend_timings("decode", None, timings)
                with timer.stage("write"):
                    # Inside the lock: output is the backend's buffer. A tiled model's tiles are joined here.
                    image = to_image(output, self.decoder.info.tiles)
        except BackendError as exc:
            with self._lock:
                stats.fail(meta.seq)
            log.error("%s: frame %d of %r failed to decode: %s", where, meta.seq, meta.stream, exc)
            return
        with timer.stage("write"):
            if self.out_dir:
                self._write(meta, image)
            if self.display:
                self._latest[meta.stream] = image
        now = time.perf_counter()
        record = timer.record()
        record.update(stream=meta.stream, bytes=FIXED_HEADER.size + meta.meta_len + meta.payload_len,
                      latency_ms=round((time.time() - meta.t_capture) * 1000.0, 3))
        with self._lock:
            stats.account(meta.seq)
            stats.frames += 1
            self.records.append(record)
            self._first_frame_at = self._first_frame_at or now
            self._last_frame_at = now
            if self.max_frames and len(self.records) >= self.max_frames:
                self._stop.set()

    def _write(self, meta, image):
        folder = os.path.join(self.out_dir, meta.stream)  # stream names are safe folder names (edge.protocol)
        path = os.path.join(folder, "{:06d}.png".format(meta.seq))
        try:
            os.makedirs(folder, exist_ok=True)
            written = cv2.imwrite(path, image)
        except (OSError, cv2.error) as exc:
            written, reason = False, str(exc)
        else:
            reason = "cv2.imwrite failed (disk full? permissions?)"
        if not written:
            with self._lock:
                self.write_errors += 1
            log.error("cannot write %s: %s", path, reason)

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
            "failed": failed, "protocol_errors": self.protocol_errors, "write_errors": self.write_errors,
            "streams": streams, "notes": notes})
        return summary, records


def check_display():
    """Raise ConfigError unless this OpenCV can open windows (opencv-python-headless cannot)."""
    try:
        cv2.namedWindow("latentlink")
        cv2.destroyWindow("latentlink")
    except cv2.error:
        raise ConfigError("--display needs an OpenCV with GUI support, and this one has none (the [host] extra "
                          "installs opencv-python-headless): pip install opencv-python, or save frames with --out")
