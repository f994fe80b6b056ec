"""The ``send`` stage and the closed loop: a bounded queue, a window of frames in flight, acknowledgements, and an
exact account of what became of every frame.

Mechanism apart from policy. :class:`Link` is one TCP connection to the host: protocol 2's handshake (HELLO, then
ACCEPT or REFUSE), frames out, and a thread that reads the host's acknowledgements. :class:`Sender` owns the policy:

- a **window**: at most ``window`` frames sent and not yet acknowledged. A slow host slows the window down, so
  frames wait in the edge's queue, where the drop policy can act, never in kernel buffers where it cannot;
- a **queue** of ``queue_size`` frames beyond the window, and the **drop policy** for it when it is full:
  ``oldest`` (live view: the newest frame always gets in), ``newest``, or ``block`` (never drop);
- **delivery**: ``live`` (a frame in flight when a connection dies is lost, unless the host's next ACCEPT says it
  was decoded) or ``reliable`` (it is resent after the reconnect and the host deduplicates; frames that do not fit
  in memory wait in an optional disk :class:`Spool`; nothing is ever dropped);
- **reconnects** with exponential backoff (0.25 s doubling up to ``max_backoff_s``) that only an ACCEPT resets;
  ``wait_for_host_s`` bounds how long the host may stay unreachable (0: forever);
- a **permanent refusal** (model, shape or name mismatch...) stops the sender at once; :attr:`Sender.refusal` says why.

Every frame submitted ends in exactly one bucket of :attr:`Sender.counts` (see :data:`OUTCOMES`), and its
:class:`~latentlink.edge.profiler.FrameTimer` gets ``extra["outcome"]`` and, once decoded, ``extra["latency_ms"]``:
capture to decoded on the host, in milliseconds, with the host's clock offset estimated NTP-style
(:class:`ClockOffset`). ``protocol=1`` speaks to hosts older than protocol 2: no handshake, no acknowledgements,
frames counted ``sent`` once written.

Python 3.6 (the Jetson Nano) like all of ``edge/``. Only the sender thread writes to a link's socket; each link's
reader thread only reads.
"""

import collections
import errno
import logging
import math
import os
import socket
import ssl
import struct
import threading
import time

from .errors import ConfigError, ConnectionClosed, HostRefused, LatentlinkError, ProtocolError
from .protocol import (DELIVERIES, KIND_ACCEPT, KIND_ACK, KIND_AUTH, KIND_CHALLENGE, KIND_CLOCK, KIND_END, KIND_HELLO,
                       KIND_NAMES, KIND_REFUSE, MAX_CLOCK_OFFSET_S, MAX_WINDOW, PERMANENT_REFUSALS, VERSION,
                       VERSION_2, encode_end_of_stream, encode_message, latency_ms, read_body, read_header)
from .security import (Credentials, TLSSocket, connect_tls, edge_proof, explain_client_tls_error, host_proof,
                       new_nonce, proof_matches, rejected_by_host)

log = logging.getLogger("latentlink.edge")

DROP_POLICIES = ("oldest", "newest", "block")
# The buckets of the edge's account: every frame it submits ends in exactly one. "sent" is protocol 1 only (written
# to a host that never acknowledges: its fate is unknown). "stored": a gateway (latentlink host --jetstream) stored it
# durably in its broker for decode workers (not decoded yet when acknowledged).
OUTCOMES = ("decoded", "failed", "refused", "dropped", "lost", "sent", "stored")
NO_ANSWER_LIMIT = 3  # handshakes in a row that got no answer at all before the edge stops (an old or foreign peer)
SOFTWARE = "latentlink 0.1.0"
RTT_SAMPLES = 256  # acknowledgement round trips kept for link_state() between two calls (the newest)

# What the sender tells a rate controller (edge/rate.py) before each frame is encoded. Counts are frames;
# ``window``: the frames the host lets be in flight now; ``rtts_ms``: send-to-ACK round trips (ms, this edge's
# clock) of the acknowledgements that came since the last call, oldest first; ``connected``: a link is up.
LinkState = collections.namedtuple("LinkState", "in_flight waiting window rtts_ms connected")


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


class NoAnswer(LatentlinkError):
    """The peer took the connection but did not answer the HELLO (closed, timed out, or answered in kind)."""


class ClockOffset(object):
    """The host's clock minus this edge's, in seconds, estimated NTP-style from request/answer exchanges.

    Each exchange gives t1 (edge sends), t2 (host receives), t3 (host answers), t4 (edge receives); its offset is
    ((t2 - t1) + (t3 - t4)) / 2, wrong by at most half its round trip (t4 - t1) - (t3 - t2). The estimate is the
    exchange with the smallest round trip so far; ``error_s`` is that bound (None before any exchange). An exchange
    whose offset is not finite or over :data:`MAX_CLOCK_OFFSET_S` (times from a broken or hostile host) is ignored:
    it is no clock, and the offset goes into CLOCK messages and the report.
    """

    def __init__(self):
        self.offset_s = 0.0
        self.error_s = None

    def add(self, t1, t2, t3, t4):
        """Add one exchange; returns True when it improved the estimate."""
        round_trip = max(0.0, (t4 - t1) - (t3 - t2))
        offset_s = ((t2 - t1) + (t3 - t4)) / 2.0
        if not (math.isfinite(offset_s) and math.isfinite(round_trip) and abs(offset_s) <= MAX_CLOCK_OFFSET_S):
            return False
        if self.error_s is not None and round_trip / 2.0 >= self.error_s:
            return False
        self.offset_s, self.error_s = offset_s, round_trip / 2.0
        return True


class Link(object):
    """One TCP connection to the host, in TLS when ``credentials`` have a TLS context; ``protocol`` 2 does the
    handshake (and, with a token, the challenge: :mod:`latentlink.edge.security`) in the constructor.

    Raises :class:`HostRefused` (the host said REFUSE, or a permanent TLS or token failure), :class:`NoAnswer` or
    ``OSError``. After :meth:`start`, ``on_ack(link, fields, t4)`` is called from the link's reader thread for every
    ACK and ``on_close(link, why)`` once when the connection ends; :attr:`failure` is then a :class:`HostRefused` if
    it ended for a reason no retry can change (protocol 1 learns of a rejected certificate only there). (Started
    apart, so that the owner can register the link before a close is reported: a host that closes right after its
    ACCEPT must not leave a dead link nobody hears of.)
    """

    def __init__(self, address, protocol, hello, on_ack, on_close, send_buffer_bytes=1 << 20, connect_timeout_s=5.0,
                 send_timeout_s=10.0, credentials=None):
        self.address, self.protocol = address, protocol
        self.where = "{}:{}".format(*address)
        self.on_ack, self.on_close = on_ack, on_close
        self.credentials = credentials or Credentials()
        self.accept = None  # the host's ACCEPT fields (protocol 2)
        self.handshake = None  # (t1, t2, t3, t4) of the HELLO/ACCEPT exchange, for the clock offset
        self.failure = None
        sock = self.sock = socket.create_connection(address, timeout=connect_timeout_s)
        try:
            # Latents are small and latency-bound: do not let Nagle hold back the tail of a frame.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            _keepalive(sock)
            if self.credentials.tls is not None:
                try:
                    tls = connect_tls(sock, self.credentials.tls, address[0], connect_timeout_s)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; 3.6's CertificateError not
                    raise self._tls_failure(exc)
                # The reader and sender threads share it: TLSSocket serialises their calls into OpenSSL.
                sock = self.sock = TLSSocket(tls, send_timeout_s)
                sock.settimeout(connect_timeout_s)
            if protocol == VERSION_2:
                self._handshake(hello, connect_timeout_s)
            # Blocking from now on: the reader waits as long as the host decodes; sends time out on their own.
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout_s))
        except BaseException:
            sock.close()
            raise
        self._closed = False
        self._reader = threading.Thread(target=self._read_acks, name="latentlink-acks", daemon=True)

    def _tls_failure(self, exc):
        """The exception a failed TLS connection raises: permanent (:class:`HostRefused`) or retried
        (:class:`NoAnswer`); see :func:`~latentlink.edge.security.explain_client_tls_error`."""
        message, permanent = explain_client_tls_error(exc, self.where, self.credentials.ca)
        return HostRefused("tls", message) if permanent else NoAnswer(message)

    def start(self):
        """Start reading acknowledgements."""
        self._reader.start()

    def _handshake(self, hello, timeout_s):
        token, where = self.credentials.token, self.where
        if token is not None:  # the host answers a nonce with CHALLENGE
            hello = dict(hello, nonce=new_nonce())
        t1 = time.time()
        self.sock.sendall(encode_message(KIND_HELLO, t_send=t1, **hello))
        kind, fields = self._answer(timeout_s, "HELLO")
        if kind == KIND_CHALLENGE:
            if token is None:
                raise HostRefused("unauthorized", "the host at {} requires a token: start this edge with --token-file "
                                  "FILE (a copy of the host's)".format(where))
            # The host proves it knows the token before this edge answers its nonce: an impostor learns nothing.
            if not proof_matches(host_proof(token, hello["nonce"], fields["nonce"]), fields["proof"]):
                raise HostRefused("host_not_authenticated", "the host at {} does not know this edge's token (its "
                                  "CHALLENGE proof is wrong): its --token-file holds another token, or something "
                                  "else answers at that address".format(where))
            self.sock.sendall(encode_message(KIND_AUTH, proof=edge_proof(token, fields["nonce"], hello["nonce"],
                                                                         hello["stream"], hello["session"])))
            kind, fields = self._answer(timeout_s, "AUTH")
        elif token is not None and kind == KIND_ACCEPT:
            raise HostRefused("host_not_authenticated", "the host at {} accepted this edge without proving it knows "
                              "the token: it runs without --token-file (anyone could pose as it). Give the host the "
                              "same --token-file, or drop --token-file from this edge".format(where))
        t4 = time.time()
        if kind == KIND_REFUSE:
            raise HostRefused(fields["reason"], fields["message"], fields["permanent"])
        if kind != KIND_ACCEPT:
            raise HostRefused("bad_answer", "the host at {} answered HELLO with {}, not ACCEPT or REFUSE".format(
                where, KIND_NAMES[kind]))
        self.accept = fields
        self.handshake = (t1, fields["t_recv"], fields["t_send"], t4)

    def _answer(self, timeout_s, what):
        """The host's next handshake message, ``(kind, fields)``, within ``timeout_s``."""
        try:
            version, kind, meta_len = read_header(self.sock, versions=(VERSION_2,))
            fields, _ = read_body(self.sock, version, kind, meta_len, deadline=time.monotonic() + timeout_s)
        except ConnectionClosed:
            raise NoAnswer("the host at {} closed the connection without answering our protocol-2 {}".format(
                self.where, what))
        except socket.timeout:
            raise NoAnswer("the host at {} did not answer our {} within {:.0f} s".format(self.where, what, timeout_s))
        except ProtocolError as exc:
            raise HostRefused("not_latentlink", "{} answered something that is not a latentlink host ({}): is "
                              "--connect pointing at the right service?".format(self.where, exc))
        except ssl.SSLError as exc:  # TLS 1.3: the host's verdict on our certificate arrives with its first answer
            raise self._tls_failure(exc)
        return kind, fields

    def send(self, data):
        self.sock.sendall(data)

    def _read_acks(self):
        why = "closed by the host"
        try:
            while True:
                version, kind, meta_len = read_header(self.sock, versions=(VERSION_2,) if self.protocol == 2 else ())
                fields, _ = read_body(self.sock, version, kind, meta_len, deadline=time.monotonic() + 10.0)
                if kind != KIND_ACK:
                    raise ProtocolError("the host sent {} after ACCEPT (expected ACK)".format(KIND_NAMES[kind]))
                self.on_ack(self, fields, time.time())
        except ConnectionClosed:
            pass
        except ssl.SSLError as exc:
            rejected = rejected_by_host(exc, self.where)
            if rejected is not None and not self._closed:
                self.failure = HostRefused("tls", rejected)  # protocol 1 hears of a rejected certificate only here
            why = str(exc) if not self._closed else "closed"
        except (ProtocolError, OSError) as exc:
            why = str(exc) if not self._closed else "closed"
        except Exception as exc:  # a bug in a callback must still end the link cleanly
            log.exception("reading acknowledgements failed")
            why = repr(exc)
        self.on_close(self, why)

    def close(self):
        """Close both directions; wakes the reader thread (it then calls on_close)."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _timeval(seconds):
    """struct timeval for SO_SNDTIMEO (a send blocked this long fails with EAGAIN)."""
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def _keepalive(sock):
    """Notice a host that vanished (power, cable) within about 25 s, even while no frame is being sent."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Spool(object):
    """Reliable delivery's overflow on disk: frames that do not fit in the memory queue wait in ``folder``, oldest
    first, up to ``max_bytes`` bytes in all. Files live only as long as the edge process."""

    def __init__(self, folder, max_bytes):
        if max_bytes < 1:
            raise ConfigError("bad spool size {!r}: give a number of bytes >= 1".format(max_bytes))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError("cannot create the spool folder {} ({}); pick a writable --spool".format(folder, exc))
        self.folder, self.max_bytes = folder, max_bytes
        self.bytes = 0
        self._items = collections.deque()  # (seq, path, size, timer)

    def __len__(self):
        return len(self._items)

    def fits(self, size):
        return self.bytes + size <= self.max_bytes

    def put(self, seq, data, timer):
        path = os.path.join(self.folder, "{:020d}.frame".format(seq))
        with open(path, "wb") as f:
            f.write(data)
        self._items.append((seq, path, len(data), timer))
        self.bytes += len(data)

    def take(self):
        seq, path, size, timer = self._items.popleft()
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        self.bytes -= size
        return seq, data, timer

    def timers(self):
        return [item[3] for item in self._items]

    def clear(self):
        for _, path, _, _ in self._items:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._items.clear()
        self.bytes = 0


class Sender(object):
    """Sends submitted frames to ``address`` from a background thread, under a window, and accounts for each.

    ``hello``: the model description for the handshake (``model_id shape dtype packing entropy tiles``).
    ``submit(data, timer)`` queues one encoded frame (bytes; protocol 2's FRAME or protocol 1's frame, as
    ``protocol`` says) with its :class:`~latentlink.edge.profiler.FrameTimer`, which must carry
    ``extra["t_capture"]`` (UNIX seconds) for the latency. ``close()`` waits until every frame is acknowledged (or
    the sender gave up), says END and waits for its acknowledgement (``end_timeout_s``). ``abort()`` stops at once.

    Counters: :attr:`counts` (frames per outcome, see :data:`OUTCOMES`), ``reconnects`` (connections after the
    first), ``connection_losses``, ``resent`` (reliable: frames sent again), ``duplicates`` (frames the host had
    already decoded). :attr:`refusal` is ``(reason, message)`` once the host refused for good; :attr:`gave_up` a
    message once ``wait_for_host_s`` ran out.

    ``end_of_stream=False`` (protocol 1 only): send no end-of-stream frame at close, for receivers that know no
    latentlink framing (``--serializer pickle-raw``): closing the connection ends their stream.
    ``on_settled(timer)``, if given, is called once per frame when its outcome is known, under the sender's lock
    and from whichever thread settled it: it must be quick and must not call the sender (the pipeline appends the
    timer to a deque). Its ``send`` stage may still be open then (see ``FrameTimer.timing``).
    """

    def __init__(self, address, stream, hello=None, queue_size=4, drop="oldest", window=4, delivery="live",
                 protocol=VERSION_2, wait_for_host_s=0.0, spool=None, send_buffer_bytes=1 << 20,
                 connect_timeout_s=5.0, send_timeout_s=10.0, max_backoff_s=5.0, end_timeout_s=10.0,
                 end_of_stream=True, credentials=None, on_settled=None):
        if drop not in DROP_POLICIES:
            raise ConfigError("unknown drop policy {!r} (available: {})".format(drop, ", ".join(DROP_POLICIES)))
        if delivery not in DELIVERIES:
            raise ConfigError("unknown delivery {!r} (available: {})".format(delivery, ", ".join(DELIVERIES)))
        if queue_size < 1:
            raise ConfigError("bad queue size {!r}: at least 1 frame must fit in the queue".format(queue_size))
        if window < 1:
            raise ConfigError("bad window {!r}: at least 1 frame must be allowed in flight".format(window))
        if window > MAX_WINDOW:  # the HELLO could not say it (--window takes any positive number)
            raise ConfigError("bad window {!r}: at most {} frames may be in flight".format(window, MAX_WINDOW))
        if protocol not in (VERSION, VERSION_2):
            raise ConfigError("unknown protocol {!r} (this edge speaks 1 and 2)".format(protocol))
        if protocol == VERSION and delivery == "reliable":
            raise ConfigError("--delivery reliable needs acknowledgements, which protocol 1 does not have: use "
                              "--protocol 2 (and a host that speaks it)")
        if delivery == "reliable" and drop != "block":
            raise ConfigError("--delivery reliable never drops frames, so it cannot take --drop {}: leave --drop "
                              "out, or use --delivery live".format(drop))
        if spool is not None and delivery != "reliable":
            raise ConfigError("a spool holds frames for --delivery reliable only; add --delivery reliable or leave "
                              "the spool out")
        if wait_for_host_s < 0:
            raise ConfigError("bad --wait-for-host {!r}: seconds >= 0 (0: wait forever)".format(wait_for_host_s))
        credentials = credentials or Credentials()
        if protocol == VERSION and credentials.token is not None:
            raise ConfigError("--token-file is proved in protocol 2's handshake, which protocol 1 does not have: drop "
                              "--protocol 1 (the host must speak protocol 2), or use --tls DIR")
        self.address, self.stream = address, stream
        self.queue_size, self.drop, self.delivery, self.protocol = queue_size, drop, delivery, protocol
        self.window = window
        self.wait_for_host_s = wait_for_host_s
        self.max_backoff_s, self.end_timeout_s = max_backoff_s, end_timeout_s
        self.end_of_stream = end_of_stream
        self.on_settled = on_settled
        self.link_options = dict(send_buffer_bytes=send_buffer_bytes, connect_timeout_s=connect_timeout_s,
                                 send_timeout_s=send_timeout_s, credentials=credentials)
        self.session = os.urandom(8).hex()  # a new stream each run; the same across this run's reconnects
        self.hello = dict(hello or {}, versions=[VERSION_2], stream=stream, session=self.session,
                          delivery=delivery, window=window, software=SOFTWARE)
        if protocol == VERSION_2:
            # Checked now: a HELLO the protocol refuses (a missing shape, say) would otherwise fail at the first
            # connection, in the sender's thread, which would end with every frame lost and a traceback.
            encode_message(KIND_HELLO, t_send=0.0, **self.hello)
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.reconnects = self.connection_losses = self.resent = self.duplicates = 0
        self.refusal = None
        self.gave_up = None
        self.clock = ClockOffset()
        self.end_acknowledged = False
        self.last_seq = -1
        self._waiting = collections.deque()  # (seq, data, timer): not sent yet; the drop policy acts here
        self._resend = collections.deque()  # reliable: sent on a link that died unacknowledged; these go first
        self._in_flight = collections.OrderedDict()  # seq -> (data, timer, t_sent): sent, not yet acknowledged
        self._unconfirmed = {}  # live: seq -> timer, in flight when a link died; the next ACCEPT may confirm them
        self._spool = spool
        self._link = None
        self._link_seen = False
        self._down_since = time.monotonic()  # when the host was last not connected: --wait-for-host counts from it
        self._window_now = window
        self._rtts = collections.deque(maxlen=RTT_SAMPLES)  # ms, send to ACK, since the last link_state()
        self._clock_to_send = False
        self._cond = threading.Condition()
        self._closing = self._aborting = False
        self._done = False  # the thread has left its loop: nothing submitted from now on will be sent
        self._thread = threading.Thread(target=self._run, name="latentlink-sender", daemon=True)
        self._thread.start()

    # The caller's side.
    @property
    def stopped(self):
        """True once the sender can send nothing more (refused, gave up, aborted, or closed)."""
        return self._done

    @property
    def in_flight(self):
        return len(self._in_flight)

    def link_state(self):
        """The link as a rate controller sees it now (a :data:`LinkState`); the round trips it returns are not
        returned again."""
        with self._cond:
            rtts = list(self._rtts)
            self._rtts.clear()
            return LinkState(in_flight=len(self._in_flight), waiting=len(self._waiting), window=self._window_now,
                             rtts_ms=rtts, connected=self._link is not None)

    def submit(self, data, timer):
        """Queue a frame; returns False if it (or, under ``oldest``, another frame) was dropped."""
        with self._cond:
            self.last_seq = max(self.last_seq, timer.seq)
            if self._done:  # refused or gave up: count the frame instead of losing it unseen
                self._finish(timer, "refused" if self.refusal else "lost")
                return False
            if self.delivery == "reliable":
                return self._submit_reliable(data, timer)
            if len(self._waiting) >= self.queue_size:
                if self.drop == "newest":
                    self._finish(timer, "dropped")
                    return False
                if self.drop == "oldest":
                    self._finish(self._waiting.popleft()[2], "dropped")
                    self._waiting.append((timer.seq, data, timer))
                    self._cond.notify_all()
                    return False
                while len(self._waiting) >= self.queue_size and not self._done:
                    self._cond.wait(0.1)
                if self._done:
                    self._finish(timer, "refused" if self.refusal else "lost")
                    return False
            self._waiting.append((timer.seq, data, timer))
            self._cond.notify_all()
            return True

    def _submit_reliable(self, data, timer):
        # Oldest first: once anything waits on disk, newer frames go to disk too (the sender reads it after memory).
        while not self._done:
            spooled = self._spool is not None and len(self._spool) > 0
            if not spooled and len(self._waiting) < self.queue_size:
                self._waiting.append((timer.seq, data, timer))
                break
            if self._spool is not None and self._spool.fits(len(data)):
                self._spool.put(timer.seq, data, timer)
                break
            self._cond.wait(0.1)  # memory and spool full: block capture, never drop
        else:
            self._finish(timer, "refused" if self.refusal else "lost")
            return False
        self._cond.notify_all()
        return True

    def close(self):
        """Deliver what is queued and in flight, end the stream, and stop. A Ctrl-C while waiting aborts."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            while self._thread.is_alive():
                self._thread.join(0.2)
        except KeyboardInterrupt:
            log.warning("interrupted again: not waiting for the host; counting what is not acknowledged as lost")
            self.abort()
            self._thread.join()

    def abort(self):
        """Stop now: frames not yet acknowledged are counted as lost."""
        with self._cond:
            self._aborting = self._closing = True
            link = self._link
            self._cond.notify_all()
        if link is not None:
            link.close()

    # The sender thread.
    def _run(self):
        try:
            self._loop()
        except Exception:  # a bug: count what is left, never leave submit() waiting
            log.exception("the sender failed")
        finally:
            with self._cond:  # one locked block: whoever sees ``stopped`` sees the final counts
                outcome = "refused" if self.refusal else "lost"
                if self._unconfirmed or self._in_flight or self._resend or self._waiting or self._spool:
                    left = len(self._unconfirmed) + len(self._in_flight) + len(self._resend) + len(self._waiting) + (
                        len(self._spool) if self._spool is not None else 0)
                    if not self.refusal:
                        log.warning("%d frames were never acknowledged by the host: counted as lost", left)
                for timer in list(self._unconfirmed.values()):
                    self._finish(timer, outcome)
                for _, timer, _ in self._in_flight.values():
                    self._finish(timer, outcome)
                for queue in (self._resend, self._waiting):
                    for _, _, timer in queue:
                        self._finish(timer, outcome)
                if self._spool is not None:
                    for timer in self._spool.timers():
                        self._finish(timer, outcome)
                    self._spool.clear()
                self._unconfirmed.clear()
                self._in_flight.clear()
                self._resend.clear()
                self._waiting.clear()
                link, self._link = self._link, None
                self._done = True
                self._cond.notify_all()
            if link is not None:
                link.close()

    def _loop(self):
        first_backoff = backoff = min(0.25, self.max_backoff_s)
        no_answers = 0
        while True:
            with self._cond:
                if self._aborting or self.refusal:
                    return
                if self._closing and self._link is None and not self._pending():
                    return  # nothing left to deliver, and no connection to say END on: nothing was ever sent
                link = self._link
            if link is None:
                try:
                    self._open_link()
                except HostRefused as exc:
                    if exc.permanent:
                        self._refused(exc)
                        return
                    log.warning("the host at %s:%d is busy (%s); retrying", self.address[0], self.address[1], exc)
                except NoAnswer as exc:
                    no_answers += 1
                    if no_answers >= NO_ANSWER_LIMIT:
                        if self.link_options["credentials"].tls is not None:
                            hint = ("A host without --tls closes on a TLS handshake: start the host with --tls DIR, "
                                    "or drop --tls from this edge; or is --connect pointing at another service?")
                        else:
                            hint = ("An older latentlink host (protocol 1) closes on a protocol-2 HELLO: upgrade the "
                                    "host, or start this edge with --protocol 1; or is --connect pointing at another "
                                    "service?")
                        self._refused(HostRefused("no_answer", "{} ({} times in a row). {}".format(
                            exc, no_answers, hint)))
                        return
                    log.warning("%s; retrying", exc)
                except (OSError, socket.timeout) as exc:
                    no_answers = 0
                    log.info("cannot reach the host at %s:%d (%s); retrying", self.address[0], self.address[1], exc)
                else:
                    backoff, no_answers = first_backoff, 0
                    continue
                if self.wait_for_host_s and time.monotonic() - self._down_since > self.wait_for_host_s:
                    self.gave_up = "the host at {}:{} was not reachable for {:.0f} s (--wait-for-host)".format(
                        self.address[0], self.address[1], self.wait_for_host_s)
                    log.error("%s; giving up", self.gave_up)
                    return
                self._sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if not self._send_next(link):
                with self._cond:
                    if self._link is None:
                        continue
                    if self._closing and not self._pending():
                        break  # every frame acknowledged: say END
                    else:
                        self._cond.wait(0.5)  # for an ACK, a frame, a close, or the link's end
        self._end_stream()

    def _pending(self):
        """Frames not yet acknowledged (under the lock)."""
        return bool(self._waiting or self._resend or self._in_flight or self._unconfirmed or
                    (self._spool is not None and len(self._spool)))

    def _open_link(self):
        with self._cond:
            unacked = sorted(list(self._unconfirmed) + [item[0] for item in self._resend])
        hello = dict(self.hello, unacked=unacked)
        link = Link(self.address, self.protocol, hello, self._on_ack, self._on_close, **self.link_options)
        with self._cond:
            if self._aborting:
                link.close()
                return
            if link.accept is not None:
                self._apply_accept(link)
            if self._link_seen:
                self.reconnects += 1
            self._link_seen = True
            self._link = link
            self._cond.notify_all()
        link.start()
        log.info("connected to %s:%d%s", self.address[0], self.address[1],
                 " (protocol 1: no acknowledgements)" if self.protocol == VERSION else
                 " (window {}, {} delivery)".format(self._window_now, self.delivery))

    def _apply_accept(self, link):
        """Under the lock: the host's ACCEPT tells which frames of an earlier connection it had handled."""
        accept = link.accept
        self._window_now = min(self.window, accept["window"])
        if self.clock.add(*link.handshake):
            self._clock_to_send = True
        resend_by_seq = dict((item[0], item) for item in self._resend)
        for seq, outcome in accept["acked"]:
            timer = self._unconfirmed.pop(seq, None)
            if timer is None and seq in resend_by_seq:
                timer = resend_by_seq.pop(seq)[2]
            if timer is not None:
                self._finish(timer, outcome)
        self._resend = collections.deque(sorted(resend_by_seq.values(), key=lambda item: item[0]))
        if self._unconfirmed:  # live delivery: in flight when the connection died, and not handled by the host
            log.warning("%d frames in flight when the connection died were lost", len(self._unconfirmed))
            for timer in self._unconfirmed.values():
                self._finish(timer, "lost")
            self._unconfirmed.clear()
        if self._resend:
            log.info("resending %d unacknowledged frames", len(self._resend))

    def _next_frame(self):
        """Under the lock: the next frame to send, if the window has room: resends first, then memory, then disk."""
        if self.protocol == VERSION_2 and len(self._in_flight) >= self._window_now:
            return None
        if self._resend:
            self.resent += 1
            return self._resend.popleft()
        if self._waiting:
            return self._waiting.popleft()
        if self._spool is not None and len(self._spool):
            return self._spool.take()
        return None

    def _send_next(self, link):
        """Send one frame (and a CLOCK first when the estimate improved); False when there was nothing to send."""
        with self._cond:
            if self._link is not link:
                return False
            item = self._next_frame()
            clock = None
            if self._clock_to_send and self.protocol == VERSION_2:
                clock, self._clock_to_send = (self.clock.offset_s, self.clock.error_s), False
            if item is not None:
                seq, data, timer = item
                if self.protocol == VERSION_2:  # t_sent: the first time of the exchange that times the clock
                    self._in_flight[seq] = (data, timer, time.time())
                self._cond.notify_all()  # room in the queue for a blocked submit()
        try:
            if clock is not None:
                link.send(encode_message(KIND_CLOCK, offset_s=clock[0], error_s=clock[1]))
            if item is None:
                return False
            with timer.stage("send"):
                link.send(data)
        except (OSError, socket.timeout) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                exc = "no progress for {:.0f} s".format(self.link_options["send_timeout_s"])
            log.warning("lost the connection to %s:%d while sending%s (%s); reconnecting", self.address[0],
                        self.address[1], "" if item is None else " frame {}".format(seq), exc)
            if item is not None and self.protocol == VERSION:
                with self._cond:
                    self._finish(timer, "lost")
            self._on_close(link, str(exc))
            return True
        if self.protocol == VERSION:
            with self._cond:
                self._finish(timer, "sent")
        return True

    def _on_ack(self, link, fields, t4):
        """An ACK from ``link``'s reader thread."""
        with self._cond:
            if fields["outcome"] == "end":
                self.end_acknowledged = True
            else:
                entry = self._in_flight.pop(fields["seq"], None)
                if entry is None:
                    return  # an ACK for a frame already settled (e.g. by an earlier connection's ACCEPT)
                _, timer, t_sent = entry
                self._rtts.append(max(0.0, (t4 - t_sent) * 1000.0))
                if self.clock.add(t_sent, fields["t_recv"], fields["t_ack"], t4):
                    self._clock_to_send = True
                if fields["duplicate"]:
                    self.duplicates += 1
                self._finish(timer, fields["outcome"], fields)
            self._cond.notify_all()

    def _on_close(self, link, why):
        """``link`` ended (its reader saw the close, or a send failed): settle what was in flight on it."""
        if link.failure is not None:  # the host rejected this edge's certificate: reconnecting cannot help
            self._refused(link.failure)
        with self._cond:
            if self._link is not link:
                return
            self._link = None
            self._down_since = time.monotonic()
            if not self.end_acknowledged:  # the host closes once it acknowledged END: that is no loss
                self.connection_losses += 1
            if self.delivery == "reliable":
                items = [(seq, data, timer) for seq, (data, timer, _) in self._in_flight.items()]
                self._resend = collections.deque(sorted(list(self._resend) + items, key=lambda item: item[0]))
            else:
                for seq, (_, timer, _) in self._in_flight.items():
                    self._unconfirmed[seq] = timer
            self._in_flight.clear()
            self._cond.notify_all()
            closing = self._closing and not self._pending()
        link.close()
        if not closing and not self._aborting and not self.refusal:
            log.warning("the connection to %s:%d ended (%s); reconnecting", self.address[0], self.address[1], why)

    def _end_stream(self):
        """Say END and wait (at most ``end_timeout_s``) for the host to acknowledge it."""
        with self._cond:
            link = self._link
        if link is None or (self.protocol == VERSION and not self.end_of_stream):
            return  # without an end-of-stream frame, closing the connection ends the stream
        try:
            if self.protocol == VERSION:
                link.send(encode_end_of_stream(self.stream, self.last_seq + 1))
                return
            link.send(encode_message(KIND_END, stream=self.stream, seq=self.last_seq + 1))
        except (OSError, socket.timeout) as exc:
            log.warning("could not say end-of-stream to the host (%s)", exc)
            return
        deadline = time.monotonic() + self.end_timeout_s
        with self._cond:
            while not self.end_acknowledged and self._link is link and not self._aborting:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("the host did not acknowledge end-of-stream within %.0f s", self.end_timeout_s)
                    break
                self._cond.wait(left)

    def _refused(self, exc):
        with self._cond:
            if self.refusal is not None:
                return
            self.refusal = (exc.reason, exc.message)
            self._cond.notify_all()
        if exc.reason in PERMANENT_REFUSALS:
            log.error("the host refused stream %r (%s): %s", self.stream, exc.reason, exc.message)
        else:  # this edge's own decision: TLS, token, or no answer
            log.error("stopping stream %r (%s): %s", self.stream, exc.reason, exc.message)

    def _finish(self, timer, outcome, ack=None):
        """Under the lock: ``timer``'s frame ends in bucket ``outcome``; a decoded frame gets its latency."""
        self.counts[outcome] += 1
        timer.extra["outcome"] = outcome
        if ack is not None and outcome == "decoded" and "t_capture" in timer.extra:
            t_done_here = ack["t_done"] - self.clock.offset_s  # the host's clock read on ours
            latency = latency_ms(t_done_here, timer.extra["t_capture"])
            if latency is not None:  # else a host's time that is no clock: the frame has no latency
                timer.extra["latency_ms"] = latency
        if ack is not None and outcome == "failed" and ack.get("reason"):
            timer.extra["reason"] = ack["reason"]
        if self.on_settled is not None:
            self.on_settled(timer)

    def _sleep(self, seconds):
        """The backoff wait: submit() does not cut it short; close() or abort() does not lengthen it."""
        end = time.monotonic() + seconds
        with self._cond:
            while not self._aborting:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
