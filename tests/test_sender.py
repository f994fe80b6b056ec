"""Tests of the ``send`` stage (edge/sender.py) against a small in-test receiver on loopback.

They run on Python 3.6 + numpy 1.19 and 3.11 + numpy 2. Every wait is a bounded poll for a condition; no test
passes or fails on how long something took. Frames that must stay "in flight" (a receiver that stops reading)
are made larger than both socket buffers together, so that ``sendall`` cannot finish before the receiver reads.
"""
import select
import socket
import threading
import time

import numpy as np
import pytest

import latentlink.edge.sender as sender_module
from latentlink.edge.errors import ConfigError, ConnectionClosed
from latentlink.edge.profiler import FrameTimer
from latentlink.edge.protocol import FLAG_END_OF_STREAM, encode_frame, read_frame
from latentlink.edge.sender import DROP_POLICIES, Sender, parse_address

STREAM = "cam0"
SMALL = 16  # payload bytes of an ordinary frame
BIG = 1 << 19  # payload bytes of a frame that cannot fit in the (small) socket buffers of both ends
SMALL_BUFFER = 4096  # SO_SNDBUF of the sender and SO_RCVBUF of the receiver in the "in flight" tests
WAIT_S = 10.0  # upper bound of every wait: a bug must fail the test, never hang the suite


# --- helpers -------------------------------------------------------------------------------------------------


def wait_for(condition, what, timeout=WAIT_S):
    """Poll ``condition()`` until it is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.002)


def frame(seq, size=SMALL):
    """One encoded data frame whose payload bytes all equal ``seq % 256``."""
    return encode_frame(STREAM, seq, 1000.0 + seq, np.full(size, seq % 256, dtype=np.uint8), "uint8")


def free_port():
    """A loopback port nothing listens on (bound, then released): connecting to it is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Abort(Exception):
    pass


class Receiver(object):
    """A stand-in for the host: accepts connections one after another and reads frames with ``read_frame``.

    ``pause_before=k``: once the header of the k-th frame (0-based, over all connections) arrived, set ``paused``
    and stop reading until ``go`` is set. ``abort_before=k``: once that header arrived, close the connection with
    the rest of the frame unread (the kernel answers the sender with a reset) and stop listening.
    ``close_after=k``: after k whole frames, close the connection cleanly and stop listening.
    """

    def __init__(self, port=0, pause_before=None, abort_before=None, close_after=None, rcvbuf=None):
        self.pause_before, self.abort_before, self.close_after = pause_before, abort_before, close_after
        self.frames = []  # (FrameMeta, payload) in arrival order, over all connections
        self.by_connection = []  # one list of seqs (data frames) per connection
        self.errors = []
        self.paused, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._headers = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:  # inherited by accepted connections; must be set before listen() to bound the TCP window
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.listener.settimeout(0.02)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="test-receiver", daemon=True)
        self.thread.start()

    @property
    def data_seqs(self):
        return [m.seq for m, _ in self.frames if not m.flags & FLAG_END_OF_STREAM]

    @property
    def end_of_stream(self):
        return [m for m, _ in self.frames if m.flags & FLAG_END_OF_STREAM]

    def _on_header(self):
        index = self._headers
        self._headers += 1
        if index == self.abort_before:
            raise _Abort()
        if index == self.pause_before:
            self.paused.set()
            if not self.go.wait(WAIT_S):
                raise AssertionError("the receiver was never told to go on")

    def _serve(self):
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                try:
                    conn.settimeout(WAIT_S)
                    if not self._read(conn):
                        break
                finally:
                    conn.close()
        finally:
            self.listener.close()
            self.done.set()

    def _read(self, conn):
        """Read frames until the sender closes; False when this receiver is to stop (abort / close_after)."""
        seqs = []
        self.by_connection.append(seqs)
        while True:
            try:
                meta, payload = read_frame(conn, on_header=self._on_header)
            except _Abort:  # stop listening first, so that the sender cannot reconnect to this host
                self.listener.close()
                return False  # then conn.close() with unread data: a reset, as when a host process dies
            except ConnectionClosed:
                return True
            except Exception as exc:  # a short or bad frame is a finding, not a crash of the receiver
                self.errors.append(exc)
                return True
            if not meta.flags & FLAG_END_OF_STREAM:
                assert payload == bytes(bytearray([meta.seq % 256]) * len(payload))
                seqs.append(meta.seq)
            self.frames.append((meta, payload))
            if self.close_after is not None and len(self.frames) >= self.close_after:
                self.listener.close()
                return False

    def stop(self):
        self.go.set()
        self._stop.set()
        self.thread.join(WAIT_S)


@pytest.fixture
def cleanup():
    """Collects senders and receivers; closes them after the test even when it fails."""
    things = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Sender):
            thing.close(drain_timeout_s=0.0)
        else:
            thing.stop()


def make_sender(cleanup, port, **options):
    kwargs = dict(queue_size=4, drop="oldest", connect_timeout_s=2.0, send_timeout_s=WAIT_S, max_backoff_s=0.05,
                  send_buffer_bytes=SMALL_BUFFER)
    kwargs.update(options)
    s = Sender(("127.0.0.1", port), STREAM, **kwargs)
    cleanup.append(s)
    return s


def receiver(cleanup, **options):
    r = Receiver(**options)
    cleanup.append(r)
    return r


def submitted_in_thread(s, seqs, size=SMALL):
    """Submit frames from another thread (for ``block``, where submit waits); returns (thread, returned list)."""
    returned = []

    def run():
        for seq in seqs:
            returned.append(s.submit(frame(seq, size), FrameTimer(seq)))

    t = threading.Thread(target=run, name="test-submitter", daemon=True)
    t.start()
    return t, returned


def check_accounting(s, submitted):
    assert s.sent + s.dropped == submitted, (s.sent, s.dropped_queue, s.dropped_send, submitted)
    assert s.dropped == s.dropped_queue + s.dropped_send


def wait_for_end_of_stream(r):
    wait_for(lambda: r.end_of_stream, "the end-of-stream frame")


# --- addresses and configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("h:1", ("h", 1)),
    ("h", ("h", 5760)),
    (":9", ("127.0.0.1", 9)),
    ("[::1]:9", ("::1", 9)),
    ("[::1]", ("::1", 5760)),
    ("192.168.1.20:5760", ("192.168.1.20", 5760)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_parse_address_default_port_is_an_argument():
    assert parse_address("h", default_port=7000) == ("h", 7000)


@pytest.mark.parametrize("text", ["h:notaport", "h:70000", "h:-1", "h:"])
def test_parse_address_refuses_a_bad_port_and_names_it(text):
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert repr(text) in str(info.value)


def test_unknown_drop_policy_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as info:
        Sender(("127.0.0.1", 1), STREAM, drop="random")
    message = str(info.value)
    assert "'random'" in message
    for policy in DROP_POLICIES:
        assert policy in message


@pytest.mark.parametrize("queue_size", [0, -1])
def test_a_queue_without_room_is_refused(queue_size):
    with pytest.raises(ConfigError) as info:
        Sender(("127.0.0.1", 1), STREAM, queue_size=queue_size)
    assert str(queue_size) in str(info.value)


# --- the host is up ------------------------------------------------------------------------------------------


def test_every_frame_arrives_in_order_then_end_of_stream(cleanup):
    r = receiver(cleanup)
    timers = []
    s = make_sender(cleanup, r.port, queue_size=32, on_sent=timers.append)
    n = 20
    for seq in range(n):
        assert s.submit(frame(seq), FrameTimer(seq)) is True
    s.close()
    wait_for_end_of_stream(r)
    assert r.errors == []
    assert r.data_seqs == list(range(n))
    metas = [m for m, _ in r.frames]
    assert metas[-1].flags & FLAG_END_OF_STREAM and metas[-1].seq == n and metas[-1].stream == STREAM
    assert len(r.end_of_stream) == 1
    assert (s.sent, s.dropped_queue, s.dropped_send, s.dropped, s.reconnects) == (n, 0, 0, 0, 0)
    assert s.last_seq == n - 1
    # on_sent: once per sent frame, in order, with its own timer, whose record has the send stage
    assert [t.seq for t in timers] == list(range(n))
    for t in timers:
        assert isinstance(t, FrameTimer)
        record = t.record()
        assert record["seq"] == t.seq and record["stages"]["send"] >= 0.0


def test_close_without_frames_returns_and_counts_nothing(cleanup):
    r = receiver(cleanup)
    s = make_sender(cleanup, r.port)
    s.close()
    assert (s.sent, s.dropped, s.reconnects) == (0, 0, 0)


def test_an_on_sent_that_raises_does_not_stop_the_sender(cleanup):
    r = receiver(cleanup)
    seen = []

    def on_sent(timer):
        seen.append(timer.seq)
        raise KeyError("t0")  # e.g. a record hook that expects a field the caller forgot

    s = make_sender(cleanup, r.port, queue_size=1, drop="block", on_sent=on_sent)
    t, returned = submitted_in_thread(s, range(6))
    t.join(WAIT_S)
    assert not t.is_alive(), "submit (block) waits for a sender thread that died"
    s.close()
    wait_for_end_of_stream(r)
    assert r.data_seqs == list(range(6)) and seen == list(range(6))
    assert (s.sent, s.dropped) == (6, 0)


def test_a_frame_submitted_after_close_is_counted_as_dropped(cleanup):
    r = receiver(cleanup)
    s = make_sender(cleanup, r.port)
    s.submit(frame(0), FrameTimer(0))
    s.close()
    assert s.submit(frame(1), FrameTimer(1)) is False
    check_accounting(s, 2)
    assert (s.sent, s.dropped_send) == (1, 1)


# --- drop policies with a host that stops reading ------------------------------------------------------------


def fill_while_paused(cleanup, drop, queue_size, n):
    """Frame 0 stuck in flight (the receiver paused in it), then frames 1..n-1 submitted into a full queue."""
    r = receiver(cleanup, pause_before=0, rcvbuf=SMALL_BUFFER)
    s = make_sender(cleanup, r.port, queue_size=queue_size, drop=drop)
    assert s.submit(frame(0, BIG), FrameTimer(0)) is True
    wait_for(r.paused.is_set, "frame 0 to be on the wire")
    returned = [s.submit(frame(seq, BIG), FrameTimer(seq)) for seq in range(1, n)]
    r.go.set()
    s.close()
    wait_for_end_of_stream(r)
    assert r.errors == []
    return r, s, returned


def test_drop_newest_keeps_the_first_frames(cleanup):
    r, s, returned = fill_while_paused(cleanup, "newest", queue_size=3, n=10)
    assert returned == [True] * 3 + [False] * 6
    assert r.data_seqs == [0, 1, 2, 3]
    assert (s.sent, s.dropped_queue, s.dropped_send) == (4, 6, 0)
    assert r.end_of_stream[0].seq == 10  # the next seq after the last one captured, dropped or not
    check_accounting(s, 10)


def test_drop_oldest_keeps_the_latest_frames(cleanup):
    r, s, returned = fill_while_paused(cleanup, "oldest", queue_size=3, n=10)
    assert returned == [True] * 3 + [False] * 6
    assert r.data_seqs == [0, 7, 8, 9]
    assert (s.sent, s.dropped_queue, s.dropped_send) == (4, 6, 0)
    assert r.end_of_stream[0].seq == 10
    check_accounting(s, 10)


def test_drop_block_makes_submit_wait_and_drops_nothing(cleanup):
    r = receiver(cleanup, pause_before=0, rcvbuf=SMALL_BUFFER)
    s = make_sender(cleanup, r.port, queue_size=2, drop="block")
    n = 8
    t, returned = submitted_in_thread(s, range(n), size=BIG)
    # frame 0 in flight, frames 1 and 2 queued: the 4th submit cannot return while the receiver is paused
    wait_for(lambda: r.paused.is_set() and len(returned) == 3, "frame 0 on the wire and 3 submits returned")
    assert t.is_alive() and len(returned) == 3
    r.go.set()
    t.join(WAIT_S)
    assert not t.is_alive()
    s.close()
    wait_for_end_of_stream(r)
    assert returned == [True] * n
    assert r.data_seqs == list(range(n))
    assert (s.sent, s.dropped) == (n, 0)
    check_accounting(s, n)


# --- the host is down, comes up, goes away -------------------------------------------------------------------


class CountingConnection(sender_module.Connection):
    attempts = 0

    def __init__(self, *args, **kwargs):
        CountingConnection.attempts += 1
        super(CountingConnection, self).__init__(*args, **kwargs)


@pytest.fixture
def attempts(monkeypatch):
    """Counts the sender's connection attempts (a real connection is made all the same)."""
    CountingConnection.attempts = 0
    monkeypatch.setattr(sender_module, "Connection", CountingConnection)
    return lambda: CountingConnection.attempts


def test_host_down_at_start_then_up_delivers_every_frame_with_block(cleanup, attempts):
    port = free_port()
    s = make_sender(cleanup, port, queue_size=2, drop="block")
    n = 6
    t, returned = submitted_in_thread(s, range(n))
    wait_for(lambda: attempts() >= 2, "two refused connection attempts")
    assert s.sent == 0
    r = receiver(cleanup, port=port)
    t.join(WAIT_S)
    assert not t.is_alive()
    s.close()
    wait_for_end_of_stream(r)
    assert r.data_seqs == list(range(n)) and r.end_of_stream[0].seq == n
    assert (s.sent, s.dropped, s.reconnects) == (n, 0, 0)  # the first connection is no reconnect


def test_host_goes_away_mid_frame_then_comes_back(cleanup):
    # The first host reads frames 0-2, then dies in the middle of frame 3 (a reset); a new one takes the port.
    r1 = receiver(cleanup, abort_before=3, rcvbuf=SMALL_BUFFER)
    s = make_sender(cleanup, r1.port, queue_size=16)
    n = 8
    for seq in range(n):
        assert s.submit(frame(seq, BIG), FrameTimer(seq)) is True
    wait_for(r1.done.is_set, "the first host to go away")
    r2 = receiver(cleanup, port=r1.port)
    s.close()
    wait_for_end_of_stream(r2)
    assert r1.data_seqs == [0, 1, 2] and r1.end_of_stream == []
    assert r2.data_seqs == [4, 5, 6, 7] and r2.end_of_stream[0].seq == n
    assert (s.sent, s.dropped_queue, s.dropped_send, s.reconnects) == (7, 0, 1, 1)
    check_accounting(s, n)


def test_host_closing_between_frames_loses_no_frame(cleanup):
    # A host that closes an idle connection (its idle timeout, a restart): the frames after it must not be written
    # into the closed connection and counted as sent.
    r1 = receiver(cleanup, close_after=3)
    s = make_sender(cleanup, r1.port, queue_size=16)
    for seq in range(3):
        s.submit(frame(seq), FrameTimer(seq))
    wait_for(r1.done.is_set, "the first host to close the connection")
    # the host's FIN has reached the sender's socket (loopback delivers it at once; this only makes it certain)
    wait_for(lambda: select.select([s._conn.sock], [], [], 0)[0], "the sender's end of the connection to see it")
    r2 = receiver(cleanup, port=r1.port)
    n = 8
    for seq in range(3, n):
        s.submit(frame(seq), FrameTimer(seq))
    s.close()
    wait_for_end_of_stream(r2)
    assert r1.data_seqs == [0, 1, 2]
    assert r2.data_seqs == [3, 4, 5, 6, 7] and r2.end_of_stream[0].seq == n
    assert (s.sent, s.dropped, s.reconnects) == (n, 0, 1)
    check_accounting(s, n)


def test_close_with_an_unreachable_host_gives_up_and_counts_the_queue(cleanup):
    s = make_sender(cleanup, free_port(), queue_size=8)
    for seq in range(5):
        s.submit(frame(seq), FrameTimer(seq))
    closer = threading.Thread(target=s.close, kwargs=dict(drain_timeout_s=0.2), daemon=True)
    closer.start()
    closer.join(WAIT_S)
    assert not closer.is_alive(), "close() hangs when the host cannot be reached"
    assert (s.sent, s.dropped_queue, s.dropped_send, s.reconnects) == (0, 0, 5, 0)
    check_accounting(s, 5)


class RefusedConnection(object):
    attempts = 0

    def __init__(self, address, **options):
        RefusedConnection.attempts += 1
        raise ConnectionRefusedError(111, "Connection refused")


def test_backoff_grows_from_at_most_max_backoff(cleanup, monkeypatch):
    RefusedConnection.attempts = 0
    monkeypatch.setattr(sender_module, "Connection", RefusedConnection)
    waits = []

    def record(self, seconds):
        waits.append(seconds)
        time.sleep(0.001)

    monkeypatch.setattr(Sender, "_sleep", record)
    for max_backoff_s, expected in [(1.0, [0.25, 0.5, 1.0, 1.0, 1.0]), (0.1, [0.1, 0.1, 0.1, 0.1, 0.1])]:
        del waits[:]
        s = make_sender(cleanup, 1, max_backoff_s=max_backoff_s)
        s.submit(frame(0), FrameTimer(0))
        wait_for(lambda: len(waits) >= 5, "five backoff waits")
        s.close(drain_timeout_s=0.0)
        assert waits[:5] == pytest.approx(expected)
        assert (s.sent, s.dropped_send) == (0, 1)


def test_submitting_frames_does_not_cut_the_backoff_short(cleanup, monkeypatch):
    # While the host is down the sender waits 0.25 s, 0.5 s, ... between attempts, however fast frames come.
    RefusedConnection.attempts = 0
    monkeypatch.setattr(sender_module, "Connection", RefusedConnection)
    s = make_sender(cleanup, 1, max_backoff_s=30.0)
    s.submit(frame(0), FrameTimer(0))
    wait_for(lambda: RefusedConnection.attempts >= 1, "the first attempt")
    before = RefusedConnection.attempts
    for seq in range(1, 11):
        s.submit(frame(seq), FrameTimer(seq))
        time.sleep(0.01)  # let the sender thread run between frames, as a camera would
    during = RefusedConnection.attempts - before
    # with backoff, at most one attempt per expired wait (0.25 s, then 0.75 s, 1.75 s, 3.75 s after the first)
    assert during <= 3, "%d connection attempts for 10 frames: submit cuts the backoff short" % during
    s.close(drain_timeout_s=0.0)
    check_accounting(s, 11)
    assert (s.sent, s.dropped_queue, s.dropped_send) == (0, 7, 4)
