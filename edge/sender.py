"""The ``send`` stage: a bounded queue between encode and the network, and a thread that sends.

Mechanism apart from policy: :class:`Connection` only connects and writes whole frames; :class:`Sender` owns the
policy: how many frames may wait (``queue_size``), which one goes when the queue is full (``drop``), and how to
reconnect (exponential backoff from 0.25 s up to ``max_backoff_s``) when the host is down or goes away. Every
frame that does not reach the host is counted, by reason.
"""

import collections
import logging
import select
import socket
import threading
import time

from .errors import ConfigError
from .protocol import encode_end_of_stream

log = logging.getLogger("latentlink.edge")

DROP_POLICIES = ("oldest", "newest", "block")


def parse_address(text, default_port=5760):
    """``"HOST:PORT"`` (or ``"HOST"``, ``":PORT"``, ``"[::1]:PORT"``) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        host, port = text, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError("bad address {!r}: expected HOST:PORT, e.g. 192.168.1.20:5760".format(text))
    return host, port


class Connection(object):
    """A TCP connection to the host that writes whole frames (TCP_NODELAY, sized send buffer, send timeout)."""

    def __init__(self, address, send_buffer_bytes=1 << 20, connect_timeout_s=5.0, send_timeout_s=10.0):
        self.sock = socket.create_connection(address, timeout=connect_timeout_s)
        # Latents are small and latency-bound: do not let Nagle hold back the tail of a frame.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
        self.sock.settimeout(send_timeout_s)

    def send(self, data):
        self.sock.sendall(data)

    def peer_closed(self):
        """True if the host closed or reset the connection. The host never writes to us, so a readable socket
        means end-of-file or an error; writing into it would "succeed" and silently lose the frame."""
        try:
            readable = select.select([self.sock], [], [], 0)[0]
        except (OSError, ValueError):  # ValueError: a descriptor select() cannot watch; assume it is alive
            return False
        if not readable:
            return False
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except OSError:  # ECONNRESET
            return True

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()


class Sender(object):
    """Sends queued frames to ``address`` from a background thread.

    ``submit(data, timer)`` queues one encoded frame (bytes) with its :class:`~edge.profiler.FrameTimer`; the
    thread times the ``send`` stage on it and, once the frame is sent, hands the timer to ``on_sent(timer)``.
    ``close()`` sends what is queued (waiting at most ``drain_timeout_s``), says end-of-stream and joins the thread.

    Counters (frames): ``sent``, ``dropped_queue`` (pushed out by the drop policy), ``dropped_send`` (lost when a
    connection broke mid-send or left in the queue at close), ``reconnects``.
    """

    def __init__(self, address, stream, queue_size=4, drop="oldest", send_buffer_bytes=1 << 20,
                 connect_timeout_s=5.0, send_timeout_s=10.0, max_backoff_s=5.0, on_sent=None):
        if drop not in DROP_POLICIES:
            raise ConfigError("unknown drop policy {!r} (available: {})".format(drop, ", ".join(DROP_POLICIES)))
        if queue_size < 1:
            raise ConfigError("bad queue size {!r}: at least 1 frame must fit in the queue".format(queue_size))
        self.address, self.stream = address, stream
        self.queue_size, self.drop = queue_size, drop
        self.connection_options = dict(send_buffer_bytes=send_buffer_bytes, connect_timeout_s=connect_timeout_s,
                                       send_timeout_s=send_timeout_s)
        self.max_backoff_s = max_backoff_s
        self.on_sent = on_sent or (lambda timer: None)
        self.sent = self.dropped_queue = self.dropped_send = self.reconnects = 0
        self._connected_before = False
        self.last_seq = -1
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._done = False  # the thread has left its loop: nothing queued from now on would be sent
        self._deadline = None
        self._conn = None
        self._thread = threading.Thread(target=self._run, name="latentlink-sender", daemon=True)
        self._thread.start()

    @property
    def dropped(self):
        return self.dropped_queue + self.dropped_send

    def submit(self, data, timer):
        """Queue a frame; returns False if the drop policy dropped a frame (this one or the oldest)."""
        with self._cond:
            self.last_seq = max(self.last_seq, timer.seq)
            if self._done:  # submitted after close (or the thread failed): count it instead of losing it unseen
                self.dropped_send += 1
                return False
            if len(self._queue) >= self.queue_size:
                if self.drop == "newest":
                    self.dropped_queue += 1
                    return False
                if self.drop == "oldest":
                    self._queue.popleft()
                    self.dropped_queue += 1
                    self._queue.append((data, timer))
                    self._cond.notify_all()
                    return False
                while len(self._queue) >= self.queue_size and not self._closing and not self._done:
                    self._cond.wait(0.1)
                if self._done:
                    self.dropped_send += 1
                    return False
            self._queue.append((data, timer))
            self._cond.notify_all()
            return True

    def close(self, drain_timeout_s=10.0):
        """Send what is queued (up to ``drain_timeout_s`` seconds), then end the stream and the thread."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + drain_timeout_s
            self._cond.notify_all()
        self._thread.join()

    # The sender thread.
    def _run(self):
        try:
            self._send_queued()
        finally:  # even if something unforeseen failed: count what is left, and never leave submit() waiting
            with self._cond:
                self._done = True
                self.dropped_send += len(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            self._disconnect()

    def _send_queued(self):
        backoff = first_backoff = min(0.25, self.max_backoff_s)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                if self._closing and time.monotonic() > self._deadline:
                    self.dropped_send += len(self._queue)
                    log.warning("gave up on %d queued frames: the host at %s:%d was not reachable in time",
                                len(self._queue), *self.address)
                    self._queue.clear()
                    break
                data, timer = self._queue[0]
            if self._conn is not None and self._conn.peer_closed():
                log.warning("the host at %s:%d closed the connection; reconnecting", *self.address)
                self._disconnect()
            if self._conn is None and not self._connect():
                self._sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = first_backoff
            with self._cond:
                if not self._queue or self._queue[0][1] is not timer:
                    continue  # dropped by policy while we were connecting
                self._queue.popleft()
                self._cond.notify_all()
            try:
                with timer.stage("send"):
                    self._conn.send(data)
            except (OSError, socket.timeout) as exc:
                log.warning("lost the connection to %s:%d while sending frame %d (%s); reconnecting",
                            self.address[0], self.address[1], timer.seq, exc)
                with self._cond:
                    self.dropped_send += 1
                self._disconnect()
                continue
            with self._cond:
                self.sent += 1
            try:
                self.on_sent(timer)
            except Exception:  # the caller's hook must not stop the sending (nor leave a blocked submit hanging)
                log.exception("on_sent failed for frame %d", timer.seq)
        if self._conn is not None:
            try:
                self._conn.send(encode_end_of_stream(self.stream, self.last_seq + 1))
            except (OSError, socket.timeout):
                pass

    def _connect(self):
        try:
            self._conn = Connection(self.address, **self.connection_options)
        except (OSError, socket.timeout) as exc:
            log.info("cannot reach the host at %s:%d (%s); retrying", self.address[0], self.address[1], exc)
            return False
        self.reconnects += self._connected_before
        self._connected_before = True
        log.info("connected to %s:%d", *self.address)
        return True

    def _disconnect(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sleep(self, seconds):
        """The backoff wait: submit() does not cut it short (notify wakes us, we wait on); close() does not lengthen
        it past its deadline."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                left = (min(end, self._deadline) if self._closing else end) - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
