"""Tests of the ``send`` stage and the closed loop (edge/sender.py) against a scripted fake host on loopback.

They run on Python 3.6 + numpy 1.19 (the Jetson Nano's) and on current Python + numpy 2. The fake host
(:class:`FakeHost`) reads the edge's HELLO, answers what the test scripts (ACCEPT, REFUSE, nothing, foreign bytes),
reads FRAMEs and acknowledges them when the test says: at once, later, never, as "failed", or closes the
connection after a given frame. Every wait is a bounded poll for a condition, so a bug fails a test instead of
hanging it; no test passes or fails on how long something took, and every count asserted is exact. A few tests use
the real host (``latentlink.host.server.Host``) with the tiny ONNX model; they need torch to export it.
"""
import collections
import os
import re
import socket
import threading
import time

import numpy as np
import pytest

import latentlink.edge.sender as sender_module
from latentlink.edge.errors import ConfigError, ConnectionClosed, ProtocolError
from latentlink.edge.profiler import FrameTimer
from latentlink.edge.protocol import (FLAG_END_OF_STREAM, KIND_ACCEPT, KIND_ACK, KIND_CLOCK, KIND_END, KIND_FRAME,
                                      KIND_HELLO, KIND_NAMES, KIND_REFUSE, VERSION, VERSION_2, encode_message,
                                      MAX_WINDOW, frame_payload, pack_latents, read_body, read_frame, read_header)
from latentlink.edge.sender import NO_ANSWER_LIMIT, OUTCOMES, ClockOffset, Sender, Spool

pytestmark = pytest.mark.timeout(120)

STREAM = "cam0"
SMALL = 16  # latent elements (uint8) of a test frame
WAIT_S = 10.0  # upper bound of every wait: a bug must fail the test, never hang the suite
HELLO = {"model_id": "0123456789abcdef" * 4, "shape": [SMALL], "dtype": "uint8", "packing": "uint8",
         "entropy": "none", "tiles": [1, 1]}

# What the fake host answers a HELLO with, one per connection (the last one repeats).
ACCEPT = ("accept", {})


def accept(**options):
    """ACCEPT with options: ``window`` (else the edge's), ``acked`` ([seq, outcome] pairs), ``close`` (close the
    connection right after the ACCEPT)."""
    return ("accept", options)


def refuse(reason, permanent=True, message=None):
    return ("refuse", reason, permanent, message or "refused by the test: " + reason)


BUSY = refuse("busy", permanent=False)
OLD_HOST = ("old",)  # a protocol-1 host: reads a frame header, finds version 2, closes without a word
PROTOCOL_1 = ("v1",)  # an old-style reader: read_frame until the end-of-stream frame and the close


def raw(data):
    return ("raw", data)  # answers the HELLO with these bytes, then closes


# --- helpers -------------------------------------------------------------------------------------------------


def wait_for(condition, what, timeout=WAIT_S):
    """Poll ``condition()`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.002)


def frame(seq, version=VERSION_2):
    """One encoded frame (protocol 2's FRAME, or protocol 1's) whose latents all equal ``seq % 256``."""
    latents = np.full(SMALL, seq % 256, dtype=np.uint8)
    return frame_payload(STREAM, seq, 1000.0 + seq, latents, "uint8", pack_latents(latents, "uint8"),
                         version=version)


def timer(seq):
    t = FrameTimer(seq)
    t.extra["t_capture"] = time.time()
    return t


def free_port():
    """A loopback port nothing listens on (bound, then released): connecting to it is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Conn(object):
    """What the fake host saw on one connection."""

    def __init__(self, index, sock):
        self.index, self.sock = index, sock
        self.hello = None  # the HELLO's fields
        self.kinds = []  # names of the messages after the HELLO, in arrival order
        self.frames = []  # seqs of the FRAMEs (protocol 1: data frames), in arrival order
        self.end = None  # END's fields (protocol 1: the end-of-stream frame's FrameMeta)
        self.unacked = []  # frames received and not acknowledged yet
        self.done = threading.Event()  # the handler returned: all the edge sent was read, or the host closed
        self.write_lock = threading.Lock()  # the handler and the test both send ACKs


class FakeHost(object):
    """A scripted protocol-2 host: one thread per connection, answers from ``answers`` (one per connection, the
    last repeats).

    ``auto_ack``: acknowledge each FRAME as it arrives (else it waits in ``Conn.unacked`` until :meth:`ack` or
    :meth:`release`). ``close_after``: ``{connection index: n}``: that connection acknowledges nothing and closes
    once its n-th frame arrived. ``outcomes``: ``{seq: (outcome, reason)}`` for ACKs other than "decoded";
    ``duplicates``: seqs whose ACK says ``duplicate: true``. ``hold``: answer no HELLO until ``go`` is set.
    """

    def __init__(self, answers=(ACCEPT,), port=0, auto_ack=True, close_after=None, outcomes=None, duplicates=(),
                 hold=False):
        self.answers = list(answers)
        self.auto_ack = auto_ack
        self.close_after = dict(close_after or {})
        self.outcomes = dict(outcomes or {})
        self.duplicates = set(duplicates)
        self.go = threading.Event()
        if not hold:
            self.go.set()
        self.conns = []
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.listener.settimeout(0.02)
        self.address = self.listener.getsockname()[:2]
        thread = threading.Thread(target=self._serve, name="fake-host", daemon=True)
        self._threads.append(thread)
        thread.start()

    @property
    def frames(self):
        """Every frame's seq, over all connections, in arrival order."""
        return [seq for conn in list(self.conns) for seq in conn.frames]

    def conn(self, index):
        wait_for(lambda: len(self.conns) > index, "connection %d" % index)
        return self.conns[index]

    def _serve(self):
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                conn = Conn(len(self.conns), sock)
                self.conns.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), name="fake-host-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn):
        sock = conn.sock
        answer = self.answers[min(conn.index, len(self.answers) - 1)]
        try:
            sock.settimeout(3 * WAIT_S)
            if answer == PROTOCOL_1:
                return self._read_protocol_1(conn)
            if answer == OLD_HOST:
                try:
                    read_frame(sock)
                except ProtocolError:  # "unsupported protocol version 2": an old host closes the connection
                    return
                raise AssertionError("the edge did not open with a protocol-2 HELLO")
            version, kind, meta_len = read_header(sock, versions=(VERSION_2,))
            assert kind == KIND_HELLO, KIND_NAMES[kind]
            conn.hello, _ = read_body(sock, version, kind, meta_len)
            if not self.go.wait(WAIT_S):
                raise AssertionError("the test never let the fake host answer")
            if answer[0] == "raw":
                sock.sendall(answer[1])
                return
            if answer[0] == "refuse":
                sock.sendall(encode_message(KIND_REFUSE, reason=answer[1], permanent=answer[2], message=answer[3]))
                return
            options = answer[1]
            t_recv = time.time()
            sock.sendall(encode_message(KIND_ACCEPT, version=VERSION_2, window=options.get("window",
                                                                                           conn.hello["window"]),
                                        max_frame_bytes=1 << 20, acked=options.get("acked", []), t_recv=t_recv,
                                        t_send=time.time()))
            if options.get("close"):
                return
            self._read_protocol_2(conn)
        except ConnectionClosed:
            pass
        except Exception as exc:  # noted; a test that expects a clean run checks host.errors
            if not self._stop.is_set():
                self.errors.append(exc)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            conn.done.set()

    def _read_protocol_2(self, conn):
        sock = conn.sock
        while True:
            version, kind, meta_len = read_header(sock, versions=(VERSION_2,))
            fields, payload = read_body(sock, version, kind, meta_len)
            conn.kinds.append(KIND_NAMES[kind])
            if kind == KIND_FRAME:
                assert fields.stream == STREAM and payload == bytes(bytearray([fields.seq % 256]) * SMALL)
                conn.frames.append(fields.seq)
                limit = self.close_after.get(conn.index)
                if limit is not None:  # a connection to drop acknowledges nothing
                    if len(conn.frames) >= limit:
                        return
                    continue
                with self._lock:
                    conn.unacked.append(fields.seq)
                    auto = self.auto_ack
                if auto:
                    self._ack_pending(conn)
            elif kind == KIND_END:
                conn.end = fields
                now = time.time()
                self._send(conn, encode_message(KIND_ACK, seq=fields["seq"], outcome="end", t_recv=now, t_ack=now))
            elif kind != KIND_CLOCK:
                raise AssertionError("the edge sent %s after HELLO" % KIND_NAMES[kind])

    def _read_protocol_1(self, conn):
        while True:
            meta, payload = read_frame(conn.sock)
            conn.kinds.append("END_OF_STREAM" if meta.flags & FLAG_END_OF_STREAM else "FRAME")
            if meta.flags & FLAG_END_OF_STREAM:
                conn.end = meta
            else:
                assert payload == bytes(bytearray([meta.seq % 256]) * SMALL)
                conn.frames.append(meta.seq)

    def _send(self, conn, data):
        with conn.write_lock:
            try:
                conn.sock.sendall(data)
            except OSError:  # the edge went away: the ACK is lost, as it would be from a real host
                pass

    def _send_ack(self, conn, seq):
        outcome, reason = self.outcomes.get(seq, ("decoded", ""))
        now = time.time()
        fields = dict(seq=seq, outcome=outcome, duplicate=seq in self.duplicates, t_recv=now, t_ack=now, t_done=now)
        if reason:
            fields["reason"] = reason
        self._send(conn, encode_message(KIND_ACK, **fields))

    def _ack_pending(self, conn):
        with self._lock:
            seqs, conn.unacked = conn.unacked, []
        for seq in seqs:
            self._send_ack(conn, seq)

    def ack(self, seq):
        """Acknowledge frame ``seq`` (received and not acknowledged yet) now."""
        with self._lock:
            conns = [conn for conn in self.conns if seq in conn.unacked]
            assert len(conns) == 1, "frame %d is not waiting for an ACK" % seq
            conns[0].unacked.remove(seq)
        self._send_ack(conns[0], seq)

    def release(self):
        """From now on acknowledge every frame at once, starting with those waiting."""
        with self._lock:
            self.auto_ack = True
            conns = list(self.conns)
        for conn in conns:
            self._ack_pending(conn)

    def stop(self):
        self.go.set()
        self._stop.set()
        self.listener.close()
        for conn in list(self.conns):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(WAIT_S)


@pytest.fixture
def cleanup():
    """Collects senders and fake hosts; stops them after the test even when it fails."""
    things = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Sender):
            thing.abort()
            thing._thread.join(WAIT_S)
        else:
            thing.stop()


def fake_host(cleanup, *answers, **options):
    host = FakeHost(answers or (ACCEPT,), **options)
    cleanup.append(host)
    return host


def make_sender(cleanup, address, **options):
    kwargs = dict(hello=HELLO, queue_size=8, drop="oldest", window=4, connect_timeout_s=WAIT_S,
                  send_timeout_s=WAIT_S, max_backoff_s=0.05, end_timeout_s=WAIT_S)
    kwargs.update(options)
    s = Sender(tuple(address), STREAM, **kwargs)
    cleanup.append(s)
    return s


def close(s):
    """``s.close()``, bounded: a close that never returns fails the test."""
    closer = threading.Thread(target=s.close, name="test-close", daemon=True)
    closer.start()
    closer.join(WAIT_S)
    assert not closer.is_alive(), "close() did not return"


def submit_all(s, seqs, version=VERSION_2):
    """Submit frames ``seqs`` here; returns (timers, what submit returned)."""
    timers = [timer(seq) for seq in seqs]
    return timers, [s.submit(frame(t.seq, version), t) for t in timers]


def submitted_in_thread(s, seqs):
    """Submit from another thread (submit may wait); returns (thread, timers, what submit returned so far)."""
    timers, returned = [timer(seq) for seq in seqs], []

    def run():
        for t in timers:
            returned.append(s.submit(frame(t.seq), t))

    thread = threading.Thread(target=run, name="test-submitter", daemon=True)
    thread.start()
    return thread, timers, returned


def outcomes(timers):
    return [t.extra.get("outcome") for t in timers]


def check_accounting(s, timers, **expected):
    """Every frame submitted is in exactly one bucket, its timer says which, and the buckets are ``expected``."""
    assert sum(s.counts.values()) == len(timers)
    assert collections.Counter(outcomes(timers)) == collections.Counter(
        dict((k, v) for k, v in s.counts.items() if v))
    assert s.counts == dict(dict.fromkeys(OUTCOMES, 0), **expected)


# --- the handshake and a host that acknowledges everything ---------------------------------------------------


def test_hello_describes_the_stream_and_every_acknowledged_frame_is_decoded(cleanup):
    host = fake_host(cleanup)
    s = make_sender(cleanup, host.address, window=3, queue_size=16, delivery="live")
    n = 10
    timers, returned = submit_all(s, range(n))
    close(s)
    conn = host.conn(0)
    hello = conn.hello
    assert hello["stream"] == STREAM and hello["session"] == s.session
    assert re.match(r"[0-9a-f]{16}\Z", s.session)
    for key in ("model_id", "shape", "dtype", "packing", "entropy", "tiles"):
        assert hello[key] == HELLO[key], key
    assert (hello["window"], hello["delivery"], hello["versions"], hello["unacked"]) == (3, "live", [2], [])
    assert hello["software"] == sender_module.SOFTWARE
    assert returned == [True] * n
    assert conn.frames == list(range(n))
    # the handshake's clock estimate goes out before the first frame; END says how many frames there were
    assert conn.kinds[0] == "CLOCK" and conn.kinds[-1] == "END"
    assert conn.end == {"stream": STREAM, "seq": n}
    assert s.end_acknowledged
    check_accounting(s, timers, decoded=n)
    for t in timers:
        assert t.extra["outcome"] == "decoded" and isinstance(t.extra["latency_ms"], float)
        assert "send" in t.stages
    assert (s.reconnects, s.connection_losses, s.resent, s.duplicates, s.refusal, s.gave_up) == (0, 0, 0, 0, None,
                                                                                                  None)
    assert s.clock.error_s is not None
    assert s.stopped and len(host.conns) == 1 and host.errors == []


def test_a_frame_the_host_could_not_decode_is_failed_with_its_reason(cleanup):
    host = fake_host(cleanup, outcomes={2: ("failed", "decode failed: latents of another model")})
    s = make_sender(cleanup, host.address)
    timers, _ = submit_all(s, range(4))
    close(s)
    check_accounting(s, timers, decoded=3, failed=1)
    assert outcomes(timers) == ["decoded", "decoded", "failed", "decoded"]
    assert timers[2].extra["reason"] == "decode failed: latents of another model"
    assert "latency_ms" not in timers[2].extra


def test_close_without_frames_says_end_of_stream(cleanup):
    host = fake_host(cleanup)
    s = make_sender(cleanup, host.address)
    wait_for(lambda: s._link is not None, "the connection")
    close(s)
    assert host.conn(0).end == {"stream": STREAM, "seq": 0} and s.end_acknowledged
    check_accounting(s, [])


# --- the window ----------------------------------------------------------------------------------------------


def sent_on_connection(s, conn):
    """Abort the sender, then wait until the host read everything it had sent on ``conn``: its exact frames."""
    s.abort()
    wait_for(conn.done.is_set, "the host to see the connection close")
    return list(conn.frames)


def test_at_most_window_frames_are_in_flight_while_the_host_does_not_acknowledge(cleanup):
    host = fake_host(cleanup, auto_ack=False, hold=True)
    s = make_sender(cleanup, host.address, window=3, queue_size=16)
    timers, _ = submit_all(s, range(8))  # all queued before the ACCEPT: nothing but the window holds them back
    host.go.set()
    conn = host.conn(0)
    # A sender that ignored the window would empty its queue at once; one that keeps it stops at 3 frames out.
    wait_for(lambda: len(s._waiting) == 0 or (s.in_flight == 3 and len(conn.frames) == 3), "the window to fill")
    assert s.in_flight == 3 and len(s._waiting) == 5 and conn.frames == [0, 1, 2]
    host.ack(0)  # room for exactly one more
    wait_for(lambda: len(conn.frames) == 4 and s.in_flight == 3, "the next frame")
    assert len(s._waiting) == 4
    assert sent_on_connection(s, conn) == [0, 1, 2, 3]
    close(s)  # joins the sender's thread: its account is final once close() returned
    check_accounting(s, timers, decoded=1, lost=7)


def test_the_hosts_smaller_window_wins(cleanup):
    host = fake_host(cleanup, accept(window=2), auto_ack=False, hold=True)
    s = make_sender(cleanup, host.address, window=5, queue_size=16)
    timers, _ = submit_all(s, range(6))
    host.go.set()
    conn = host.conn(0)
    wait_for(lambda: len(s._waiting) == 0 or (s.in_flight == 2 and len(conn.frames) == 2), "the window to fill")
    assert s.in_flight == 2 and len(s._waiting) == 4
    assert conn.hello["window"] == 5
    assert sent_on_connection(s, conn) == [0, 1]
    close(s)
    check_accounting(s, timers, lost=6)


# --- drop policies with the window full ----------------------------------------------------------------------


def fill_with_the_window_full(cleanup, drop, n=10):
    """Window 1 and queue 3: frame 0 in flight and unacknowledged, then frames 1..n-1 submitted, then acks."""
    host = fake_host(cleanup, auto_ack=False)
    s = make_sender(cleanup, host.address, window=1, queue_size=3, drop=drop)
    timers, returned = submit_all(s, [0])
    wait_for(lambda: host.frames == [0] and s.in_flight == 1, "frame 0 in flight")
    more, more_returned = submit_all(s, range(1, n))
    host.release()
    close(s)
    assert host.errors == []
    return host, s, timers + more, returned + more_returned


def test_drop_oldest_keeps_the_newest_frames(cleanup):
    host, s, timers, returned = fill_with_the_window_full(cleanup, "oldest")
    assert returned == [True] * 4 + [False] * 6
    assert host.frames == [0, 7, 8, 9]
    check_accounting(s, timers, decoded=4, dropped=6)
    assert outcomes(timers) == ["decoded"] + ["dropped"] * 6 + ["decoded"] * 3
    assert host.conn(0).end["seq"] == 10  # the next seq after the last one submitted, dropped or not


def test_drop_newest_keeps_the_first_frames(cleanup):
    host, s, timers, returned = fill_with_the_window_full(cleanup, "newest")
    assert returned == [True] * 4 + [False] * 6
    assert host.frames == [0, 1, 2, 3]
    check_accounting(s, timers, decoded=4, dropped=6)
    assert outcomes(timers) == ["decoded"] * 4 + ["dropped"] * 6
    assert host.conn(0).end["seq"] == 10


def test_drop_block_makes_submit_wait_until_an_ack_frees_room(cleanup):
    host = fake_host(cleanup, auto_ack=False)
    s = make_sender(cleanup, host.address, window=1, queue_size=2, drop="block")
    thread, timers, returned = submitted_in_thread(s, range(6))
    # frame 0 in flight, 1 and 2 queued: the 4th submit waits
    wait_for(lambda: host.frames == [0] and s.in_flight == 1 and len(returned) == 3, "3 submits to return")
    assert thread.is_alive() and len(returned) == 3 and len(s._waiting) == 2
    host.ack(0)  # frame 1 goes out, frame 3 gets in, frame 4 waits
    wait_for(lambda: host.frames == [0, 1] and len(returned) == 4, "one more submit to return")
    assert thread.is_alive() and len(returned) == 4
    host.release()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    close(s)
    assert returned == [True] * 6 and host.frames == list(range(6))
    check_accounting(s, timers, decoded=6)


# --- a connection lost with frames in flight -----------------------------------------------------------------


def test_live_frames_in_flight_on_a_lost_connection_are_decoded_if_accept_says_so_else_lost(cleanup):
    host = fake_host(cleanup, ACCEPT, accept(acked=[[0, "decoded"], [1, "decoded"], [2, "failed"]]),
                     close_after={0: 4}, auto_ack=False)
    s = make_sender(cleanup, host.address, window=4, queue_size=8, delivery="live")
    timers, _ = submit_all(s, range(8))  # 0-3 in flight on the first connection, 4-7 queued
    first, second = host.conn(0), host.conn(1)
    wait_for(lambda: second.hello is not None, "the second HELLO")
    assert first.frames == [0, 1, 2, 3]
    assert second.hello["unacked"] == [0, 1, 2, 3] and second.hello["session"] == first.hello["session"]
    host.release()
    close(s)
    assert second.frames == [4, 5, 6, 7]  # live: nothing is sent twice
    check_accounting(s, timers, decoded=6, failed=1, lost=1)
    assert outcomes(timers)[:4] == ["decoded", "decoded", "failed", "lost"]
    assert (s.reconnects, s.connection_losses, s.resent) == (1, 1, 0)
    assert host.errors == []


def test_reliable_resends_what_was_in_flight_in_order_except_what_accept_acked(cleanup):
    host = fake_host(cleanup, ACCEPT, accept(acked=[[0, "decoded"], [1, "decoded"]]), close_after={0: 4},
                     duplicates={2})
    s = make_sender(cleanup, host.address, window=4, queue_size=8, delivery="reliable", drop="block")
    timers, returned = submit_all(s, range(8))
    close(s)
    first, second = host.conn(0), host.conn(1)
    assert returned == [True] * 8
    assert first.frames == [0, 1, 2, 3]
    assert second.hello["unacked"] == [0, 1, 2, 3]
    # 0 and 1 were decoded (says the ACCEPT): not resent; 2 and 3 resent first, in order, then the queue
    assert second.frames == [2, 3, 4, 5, 6, 7]
    assert (s.resent, s.duplicates, s.reconnects, s.connection_losses) == (2, 1, 1, 1)
    check_accounting(s, timers, decoded=8)
    assert second.end == {"stream": STREAM, "seq": 8} and s.end_acknowledged
    assert len(host.conns) == 2 and host.errors == []


# --- the spool -----------------------------------------------------------------------------------------------


def spool_files(folder):
    return sorted(os.listdir(folder))


def test_the_spool_holds_what_memory_cannot_and_gives_it_back_in_order(cleanup, tmp_path):
    folder = str(tmp_path / "spool")
    spool = Spool(folder, 1 << 20)
    host = fake_host(cleanup, auto_ack=False)
    s = make_sender(cleanup, host.address, window=1, queue_size=1, delivery="reliable", drop="block", spool=spool)
    timers, returned = submit_all(s, [0])
    wait_for(lambda: host.frames == [0] and s.in_flight == 1, "frame 0 in flight")
    more, more_returned = submit_all(s, range(1, 6))  # 1 in memory, 2-5 on disk
    assert returned + more_returned == [True] * 6
    assert [seq for seq, _, _ in s._waiting] == [1]
    assert spool_files(folder) == ["%020d.frame" % seq for seq in range(2, 6)]
    assert len(spool) == 4 and spool.bytes == 4 * len(frame(2))
    host.release()
    close(s)
    assert host.frames == list(range(6))
    assert spool_files(folder) == [] and len(spool) == 0 and spool.bytes == 0
    check_accounting(s, timers + more, decoded=6)


def test_a_full_spool_blocks_submit_and_drops_nothing(cleanup, tmp_path):
    folder = str(tmp_path / "spool")
    spool = Spool(folder, 2 * len(frame(0)))  # room for two frames
    host = fake_host(cleanup, auto_ack=False)
    s = make_sender(cleanup, host.address, window=1, queue_size=1, delivery="reliable", drop="block", spool=spool)
    timers, _ = submit_all(s, [0])
    wait_for(lambda: host.frames == [0] and s.in_flight == 1, "frame 0 in flight")
    thread, more, returned = submitted_in_thread(s, range(1, 6))
    wait_for(lambda: len(returned) == 3, "frames 1-3 to get in")  # 1 in memory, 2 and 3 on disk, 4 waits
    assert thread.is_alive() and len(returned) == 3
    assert spool_files(folder) == ["%020d.frame" % seq for seq in (2, 3)]
    host.release()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    close(s)
    assert returned == [True] * 5 and host.frames == list(range(6))
    assert spool_files(folder) == []
    check_accounting(s, timers + more, decoded=6)


# --- refusals and peers that are not (new) latentlink hosts --------------------------------------------------


def test_a_permanent_refusal_stops_the_sender_and_counts_every_frame_refused(cleanup):
    host = fake_host(cleanup, refuse("model_mismatch", message="another checkpoint"), hold=True)
    s = make_sender(cleanup, host.address, max_backoff_s=0.01)
    timers, _ = submit_all(s, range(3))  # before the answer
    host.go.set()
    wait_for(lambda: s.stopped, "the sender to stop")
    assert s.refusal == ("model_mismatch", "another checkpoint")
    s._thread.join(WAIT_S)
    assert not s._thread.is_alive()  # it cannot try again
    more, returned = submit_all(s, range(3, 5))  # after it
    assert returned == [False, False]
    close(s)
    check_accounting(s, timers + more, refused=5)
    assert len(host.conns) == 1 and s.reconnects == 0 and not s.end_acknowledged


def test_a_busy_host_is_retried_until_it_accepts(cleanup):
    host = fake_host(cleanup, BUSY, BUSY, ACCEPT)
    s = make_sender(cleanup, host.address)
    timers, _ = submit_all(s, range(4))
    close(s)
    assert len(host.conns) == 3 and host.conns[2].frames == [0, 1, 2, 3]
    assert s.refusal is None and s.reconnects == 0  # refused connections are no connections
    check_accounting(s, timers, decoded=4)


def test_an_old_host_that_closes_on_hello_stops_the_sender_with_advice(cleanup):
    host = fake_host(cleanup, OLD_HOST)
    s = make_sender(cleanup, host.address)
    timers, _ = submit_all(s, range(2))
    wait_for(lambda: s.stopped, "the sender to stop")
    reason, message = s.refusal
    assert reason == "no_answer"
    assert "upgrade the host" in message and "--protocol 1" in message
    assert len(host.conns) == NO_ANSWER_LIMIT
    close(s)
    check_accounting(s, timers, refused=2)


def test_a_foreign_service_stops_the_sender_at_once(cleanup):
    host = fake_host(cleanup, raw(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    s = make_sender(cleanup, host.address)
    timers, _ = submit_all(s, range(2))
    wait_for(lambda: s.stopped, "the sender to stop")
    assert s.refusal[0] == "not_latentlink" and "--connect" in s.refusal[1]
    assert len(host.conns) == 1
    close(s)
    check_accounting(s, timers, refused=2)


# --- a host that is not there --------------------------------------------------------------------------------


class CountingLink(sender_module.Link):
    attempts = 0

    def __init__(self, *args, **kwargs):
        CountingLink.attempts += 1
        super(CountingLink, self).__init__(*args, **kwargs)


@pytest.fixture
def attempts(monkeypatch):
    """Counts the sender's connection attempts (each still really made)."""
    CountingLink.attempts = 0
    monkeypatch.setattr(sender_module, "Link", CountingLink)
    return lambda: CountingLink.attempts


def test_the_sender_gives_up_after_wait_for_host_and_counts_the_frames_lost(cleanup, attempts):
    s = make_sender(cleanup, ("127.0.0.1", free_port()), wait_for_host_s=0.3, max_backoff_s=0.05)
    timers, _ = submit_all(s, range(3))
    wait_for(lambda: s.stopped, "the sender to give up")
    assert "--wait-for-host" in s.gave_up and s.refusal is None
    assert attempts() >= 2
    more, returned = submit_all(s, [3])
    assert returned == [False]
    close(s)
    check_accounting(s, timers + more, lost=4)


def test_a_host_that_comes_up_within_wait_for_host_gets_every_frame(cleanup, attempts):
    port = free_port()
    s = make_sender(cleanup, ("127.0.0.1", port), wait_for_host_s=60.0, max_backoff_s=0.05)
    timers, _ = submit_all(s, range(3))
    wait_for(lambda: attempts() >= 2, "two refused connection attempts")
    host = fake_host(cleanup, port=port)
    close(s)
    assert host.frames == [0, 1, 2] and s.gave_up is None and s.reconnects == 0
    check_accounting(s, timers, decoded=3)


def test_only_an_accept_resets_the_backoff(cleanup, monkeypatch):
    waits = []

    def record(self, seconds):  # the backoff the sender chose, logged instead of slept
        waits.append(seconds)
        time.sleep(0.001)

    monkeypatch.setattr(Sender, "_sleep", record)
    # TCP connects each time; a busy answer is still a failed attempt (no reset); an ACCEPT resets it
    host = fake_host(cleanup, BUSY, BUSY, BUSY, accept(close=True), BUSY, ACCEPT)
    s = make_sender(cleanup, host.address, max_backoff_s=0.5)
    wait_for(lambda: s.reconnects == 1, "the second accepted connection")
    assert waits == pytest.approx([0.25, 0.5, 0.5, 0.25])
    timers, _ = submit_all(s, range(3))
    close(s)
    assert len(host.conns) == 6 and host.conns[5].frames == [0, 1, 2]
    check_accounting(s, timers, decoded=3)


def test_a_host_that_always_says_busy_is_not_hammered(cleanup, monkeypatch):
    waits = []

    def record(self, seconds):
        waits.append(seconds)
        time.sleep(0.001)

    monkeypatch.setattr(Sender, "_sleep", record)
    host = fake_host(cleanup, BUSY)
    s = make_sender(cleanup, host.address, max_backoff_s=1.0)
    wait_for(lambda: len(waits) >= 6, "six backoff waits")
    s.abort()
    s._thread.join(WAIT_S)
    assert waits[:6] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert len(host.conns) == len(waits)  # one attempt per wait: nothing cuts a wait short


# --- protocol 1 ----------------------------------------------------------------------------------------------


def test_protocol_1_sends_frames_without_a_handshake_and_counts_them_sent(cleanup):
    host = fake_host(cleanup, PROTOCOL_1)
    s = make_sender(cleanup, host.address, protocol=VERSION, window=1, hello=None)  # no window, no HELLO
    timers, returned = submit_all(s, range(5), version=VERSION)
    close(s)
    conn = host.conn(0)
    wait_for(conn.done.is_set, "the close")
    assert returned == [True] * 5
    assert conn.frames == list(range(5)) and conn.hello is None
    assert conn.kinds == ["FRAME"] * 5 + ["END_OF_STREAM"]
    assert conn.end.seq == 5 and conn.end.stream == STREAM
    check_accounting(s, timers, sent=5)
    assert host.errors == [] and not s.end_acknowledged


@pytest.mark.parametrize("options, words", [
    (dict(protocol=1, delivery="reliable", drop="block"), "protocol 1"),
    (dict(delivery="reliable", drop="oldest"), "--drop oldest"),
    (dict(delivery="reliable", drop="newest"), "--drop newest"),
    (dict(spool="spool"), "reliable"),
    (dict(spool="spool", drop="block"), "reliable"),
    (dict(window=0), "window"),
    (dict(window=MAX_WINDOW + 1), "at most %d frames" % MAX_WINDOW),  # the HELLO could not carry it
    (dict(hello=None), "shape"),  # protocol 2 needs the model's description, checked before any connection
    (dict(hello=dict(HELLO, packing="jpeg")), "packing"),
    (dict(queue_size=0), "queue size"),
    (dict(protocol=3), "protocol"),
    (dict(delivery="eventually"), "delivery"),
    (dict(wait_for_host_s=-1), "--wait-for-host"),
])
def test_contradictory_settings_are_config_errors(tmp_path, options, words):
    if options.get("spool") == "spool":
        options = dict(options, spool=Spool(str(tmp_path / "spool"), 1000))
    kwargs = dict(hello=HELLO, drop="oldest")
    kwargs.update(options)
    with pytest.raises(ConfigError) as info:
        Sender(("127.0.0.1", 1), STREAM, **kwargs)
    assert words in str(info.value)


def test_a_spool_of_no_bytes_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        Spool(str(tmp_path / "spool"), 0)


# --- the clock offset ----------------------------------------------------------------------------------------


def test_clock_offset_keeps_the_exchange_with_the_smallest_round_trip():
    # Times in binary fractions: exact in floating point, so "as good" really is equal.
    clock = ClockOffset()
    assert (clock.offset_s, clock.error_s) == (0.0, None)
    # sent at 100 (edge clock), received by the host at 105.125 (its clock), answered at 105.25, back at 100.375:
    # round trip 0.375 - 0.125 = 0.25 s, offset ((105.125 - 100) + (105.25 - 100.375)) / 2 = 5 s, within 0.125 s
    assert clock.add(100.0, 105.125, 105.25, 100.375) is True
    assert (clock.offset_s, clock.error_s) == (5.0, 0.125)
    assert clock.add(200.0, 205.5, 205.625, 200.75) is False  # round trip 0.625 s: worse, ignored
    assert clock.add(300.0, 306.0, 306.125, 300.375) is False  # as good (0.25 s), not better: ignored
    assert (clock.offset_s, clock.error_s) == (5.0, 0.125)
    assert clock.add(400.0, 404.0625, 404.09375, 400.0625) is True  # round trip 0.03125 s: better
    assert (clock.offset_s, clock.error_s) == (4.046875, 0.015625)
    # a host whose clock is behind the edge's
    behind = ClockOffset()
    assert behind.add(10.0, 7.0625, 7.125, 10.1875) is True
    assert (behind.offset_s, behind.error_s) == (-3.0, 0.0625)


# --- stopping ------------------------------------------------------------------------------------------------


def test_abort_while_close_waits_for_a_host_that_never_acknowledges(cleanup):
    host = fake_host(cleanup, auto_ack=False)
    s = make_sender(cleanup, host.address, window=2, queue_size=4)
    timers, _ = submit_all(s, range(3))
    conn = host.conn(0)
    wait_for(lambda: conn.frames == [0, 1] and s.in_flight == 2, "the window to fill")
    closer = threading.Thread(target=s.close, name="test-close", daemon=True)
    closer.start()
    wait_for(lambda: s._closing, "close() to begin")
    assert closer.is_alive()  # close() waits for the acknowledgements
    s.abort()
    closer.join(WAIT_S)
    assert not closer.is_alive(), "close() did not return after abort()"
    assert s.stopped
    wait_for(conn.done.is_set, "the host to see the connection close")
    assert conn.frames == [0, 1] and conn.end is None  # no END after an abort
    check_accounting(s, timers, lost=3)


class ReaderFirstLink(sender_module.Link):
    """A link whose reader, once started, runs to its end before the sender goes on (the first link only, closed
    by the host): what a slow sender thread would let happen. Makes the race below certain, not likely."""
    links = 0

    def __init__(self, *args, **kwargs):
        ReaderFirstLink.links += 1
        self.first = ReaderFirstLink.links == 1
        super(ReaderFirstLink, self).__init__(*args, **kwargs)
        self._let_the_reader_finish()

    def start(self):
        super(ReaderFirstLink, self).start()
        self._let_the_reader_finish()

    def _let_the_reader_finish(self):
        if self.first and self._reader.ident is not None:  # started (in __init__ or start)
            self._reader.join(WAIT_S)


def test_a_host_that_closes_right_after_accept_is_noticed_and_the_frames_go_to_the_next_connection(cleanup,
                                                                                                   monkeypatch):
    # The link's reader must start only once the link is registered: else it reports the close of a link the
    # sender does not know yet, and the sender waits on a dead connection for ever.
    ReaderFirstLink.links = 0
    monkeypatch.setattr(sender_module, "Link", ReaderFirstLink)
    host = fake_host(cleanup, accept(close=True), ACCEPT)
    s = make_sender(cleanup, host.address)
    wait_for(lambda: len(host.conns) == 2 and s.reconnects == 1, "the reconnect")
    timers, _ = submit_all(s, range(4))
    close(s)
    assert host.conns[0].frames == [] and host.conns[1].frames == [0, 1, 2, 3]
    assert s.connection_losses == 1 and len(host.conns) == 2
    check_accounting(s, timers, decoded=4)


# --- the real host -------------------------------------------------------------------------------------------


@pytest.fixture
def real_host(tiny_profile, tmp_path):
    """The real host with the tiny ONNX model in this process (needs torch for the model: skipped without)."""
    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile
    from latentlink.host.server import Host

    decoder = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load()
    host = Host(decoder, out_dir=str(tmp_path / "frames"), idle_timeout_s=30, frame_timeout_s=WAIT_S, window=3)
    host.bind("127.0.0.1", 0)
    thread = threading.Thread(target=host.serve, name="real-host", daemon=True)
    thread.start()
    yield host
    host.stop()
    thread.join(WAIT_S)
    decoder.close()


def real_hello(decoder, **changes):
    info = decoder.info
    hello = {"model_id": info.model_id, "shape": [int(d) for d in decoder.input_shape], "dtype": "float32",
             "packing": info.packing, "entropy": "none", "tiles": [int(t) for t in info.tiles]}
    hello.update(changes)
    return hello


def real_frame(decoder, seq):
    latents = (np.random.RandomState(seq).random_sample(decoder.input_shape) > 0.5).astype(np.float32)
    packing = decoder.info.packing
    return frame_payload(STREAM, seq, time.time(), latents, packing, pack_latents(latents, packing), version=2)


def test_the_real_host_decodes_every_frame_and_acknowledges_the_end(cleanup, real_host, tmp_path):
    s = make_sender(cleanup, real_host.address, hello=real_hello(real_host.decoder), window=8, queue_size=8,
                    delivery="reliable", drop="block")
    n = 6
    timers = [timer(seq) for seq in range(n)]
    for t in timers:
        assert s.submit(real_frame(real_host.decoder, t.seq), t)
    close(s)
    check_accounting(s, timers, decoded=n)
    assert s._window_now == 3  # the host's window
    assert s.end_acknowledged and s.refusal is None
    stats = real_host.streams[STREAM]
    assert (stats.frames, stats.duplicates, stats.failed, stats.ended) == (n, 0, 0, True)
    assert sorted(os.listdir(str(tmp_path / "frames" / STREAM))) == ["%06d.png" % seq for seq in range(n)]
    for t in timers:
        assert isinstance(t.extra["latency_ms"], float)


def test_the_real_host_refuses_another_latent_shape_for_good(cleanup, real_host):
    shape = [int(d) for d in real_host.decoder.input_shape]
    shape[1] += 1
    s = make_sender(cleanup, real_host.address, hello=real_hello(real_host.decoder, shape=shape))
    timers, _ = submit_all(s, range(2))
    wait_for(lambda: s.stopped, "the sender to stop")
    assert s.refusal[0] == "shape_mismatch"
    close(s)
    check_accounting(s, timers, refused=2)
    assert STREAM not in real_host.streams
