"""The host: accept edges, read frames, decode latents to images, store or show them, time every stage.

A pipeline of four stages, each bounded::

    connection threads (one per edge: handshake, limits, dedup, read frames)
      -> decode queue (at most ``queue_size`` frames; when full, receivers stop reading and the edges' windows fill)
      -> decode stage (one thread: up to ``batch_size`` frames of any streams in one decoder run, waiting at most
         ``batch_wait_ms`` for more once it holds one; ``Backend.infer_batch``)
      -> write stage (``write_workers`` threads, each with its own queue of at most ``queue_size`` frames; a stream's
         frames always go to the same one, so they reach the outputs in order): the outputs (``self.outputs``,
         host/outputs.py), the frame's record, then its ACK on its connection (one sender at a time per socket)

so a frame is acknowledged only once decoded and written, and a slow decoder slows the edges' windows instead of
growing queues: memory is bounded by the queue sizes and the windows (each connection has at most ``window``
frames in flight). ``pipeline=False`` keeps the serial path (each connection's thread decodes and writes its own
frames under one lock), for the throughput benchmark. Stopping (:meth:`Host.stop`, ``--max-frames``,
``--max-streams``, a first Ctrl-C or SIGTERM) stops reading, finishes the frames received and lets their ACKs out
before the connections close; :meth:`Host.abort` (a second signal) drops the queued frames unacknowledged.

One thread per connection, at most ``max_connections`` at once and ``max_connections_per_peer`` from one IP
address; more are refused (REFUSE busy) at once. A connection is independent of the others: a malformed or malicious
frame, a peer that stalls or trickles, or latents that do not fit the decoder close that one connection with a log
line that says why; the server and the other streams go on. Every wait has a total deadline, however the peer
splits its bytes: the first message within ``handshake_timeout_s`` of connecting (protocol 2's whole HELLO), the next
message's first byte within ``idle_timeout_s`` of the last message, and every message whole within
``frame_timeout_s`` of its first byte; a peer that does not read what the host sends is cut off after
``frame_timeout_s`` too. So no peer holds a connection slot for long without delivering frames. A frame's metadata is checked
(size limits, and the decoder's shape) before its payload is read, and receive buffers grow only with the bytes that
actually arrive (``latentlink.edge.protocol``).

Protocol 2 edges (see the protocol module) open with a HELLO, which the host checks against its decoder before any
frame: the model's identity, the latent shape, packing, tiles and coder, and that the stream name is not live from
another session; it answers ACCEPT (with the window it grants) or REFUSE with the reason. It acknowledges each
frame after decoding and writing it. It remembers what each session's frames became (:class:`Session`; with
``out_dir``, also in a journal beside the PNGs), and which are in the pipeline now, so a frame resent after a
reconnect, even to a restarted host, is never decoded or written twice (a resend of a frame in flight waits for
that frame's outcome). A
reconnect of the same session takes over its stream name at once, dropping the stale connection and its backlog.
Protocol 1 edges and raw pickles go through the same pipeline, without acknowledgements.

With credentials (``latentlink.edge.security``) the host serves only edges that have them: under TLS each accepted
connection does its TLS handshake in its own thread, within a deadline, and an edge may stream only under the name
its certificate carries; with a token the HELLO is answered with a CHALLENGE, and only an edge whose AUTH proves it
has the token is accepted. Refusals say why, to the edge (REFUSE ``unauthorized``) and in the log.
"""

import collections
import logging
import queue
import select
import socket
import statistics
import threading
import time

import cv2

from latentlink.edge.backends.base import checkpoint_of
from latentlink.edge.entropy import check_available
from latentlink.edge.errors import BackendError, ConfigError, ConnectionClosed, LatentlinkError, ProtocolError
from latentlink.edge.lossless import PREDICTORS as LOSSLESS_PREDICTORS, codec as lossless_codec
from latentlink.edge.profiler import FrameStats, FrameTimer, host_stages
from latentlink.edge.protocol import (FIXED_HEADER, FLAG_END_OF_STREAM, KIND_ACCEPT, KIND_ACK, KIND_AUTH,
                                      KIND_CHALLENGE, KIND_CLOCK, KIND_END, KIND_FRAME, KIND_HELLO, KIND_NAMES,
                                      KIND_REFUSE, MAGIC, MAX_WINDOW, PERMANENT_REFUSALS, VERSION, VERSION_2, VERSIONS,
                                      check_stream_name, decode_latents, encode_message, latency_ms, parse_header,
                                      read_body, read_header, wait_header, wait_header_bytes)
from latentlink.edge.security import (Credentials, TLSSocket, edge_proof, explain_server_tls_error, handshake,
                                      host_proof, linger_close, new_nonce, peer_name, proof_matches)

from .out_dir import OutDir
from .outputs import FolderOutput, OutputError, decoded_frame
from .raw_pickle import serve_raw_pickles

log = logging.getLogger("latentlink.host")
REMEMBERED_FRAMES = 4 * MAX_WINDOW  # outcomes a session keeps for deduplication: far more than can be in flight
REMEMBERED_SESSIONS = 1024  # sessions kept after their connection ended (for reconnects), oldest forgotten first
MAX_STREAM_STATS = 10000  # streams whose counts the summary lists one by one; older ones are summed (Host)
JOURNAL_DIR = ".latentlink"  # under out_dir: <stream>.delivered, "session seq outcome" lines (kept apart from PNGs)
# The most sequence numbers one jump (or an end-of-stream) may count as never received: 2**24 frames, 6.5 days at
# 30 fps. A larger jump is no edge's drops but a restart or a peer's bad numbers: it is logged and counted in
# seq_jumps instead, so that no absurd "dropped" reaches a report.
MAX_SEQ_JUMP = 2 ** 24
BUSY_REFUSERS = 8  # under TLS, connections over --max-connections answered "busy" at once (each needs a handshake)
LOSSLESS_DECODES = 2  # lossless frames decoded at once, across connections: each may take 60x --max-frame-bytes
TLS_RECORD = b"\x16"  # the first byte of a TLS ClientHello (a handshake record)


class Unauthorized(LatentlinkError):
    """An edge without the credentials this host requires: its connection is closed, with a log line saying why."""


class StreamStats(object):
    """What the host saw of one named stream, across its connections (an edge may reconnect)."""

    def __init__(self, name):
        self.name = name
        self.frames = 0
        self.gaps = 0  # sequence numbers never received: frames the edge dropped or lost in sending
        self.failed = 0  # frames received but not decoded (latents that do not fit, decoder errors)
        self.duplicates = 0  # protocol 2: resent frames this host had already handled (not decoded again)
        self.connections = 0
        self.sessions = 0  # protocol 2: edge runs (an edge restart is a new session; a reconnect is not)
        self.ended = False  # the edge said end-of-stream
        self.last_seq = -1  # edges number frames from 0, so frames missing at the start count as gaps
        self.seq_jumps = 0  # jumps over more than MAX_SEQ_JUMP sequence numbers: not counted as gaps
        self.untimed = 0  # frames decoded whose capture time gave no plausible latency (protocol.latency_ms)

    def add_gaps(self, n, what):
        """Count ``n`` sequence numbers never received, unless ``n`` is beyond MAX_SEQ_JUMP (``what`` says where
        the jump is, for the log line)."""
        if n > MAX_SEQ_JUMP:
            self.seq_jumps += 1
            log.warning("stream %r: %s skips %d sequence numbers, more than the %d an edge could have dropped in "
                        "6.5 days at 30 fps: counted as a jump, not as frames never received (an edge restart, or "
                        "a peer's bad numbers)", self.name, what, n, MAX_SEQ_JUMP)
        elif n > 0:
            self.gaps += n

    def account(self, seq):
        """Note that frame ``seq`` arrived (decoded or not); count the sequence numbers skipped before it."""
        if seq > self.last_seq + 1:
            self.add_gaps(seq - self.last_seq - 1, "frame {} after frame {}".format(seq, self.last_seq))
        elif seq <= self.last_seq:
            log.info("stream %r restarted its sequence at %d (an edge restarted?)", self.name, seq)
        self.last_seq = seq

    def fail(self, seq):
        """Frame ``seq`` arrived but could not be decoded."""
        self.account(seq)
        self.failed += 1

    def as_dict(self):
        return {"frames": self.frames, "gaps": self.gaps, "failed": self.failed, "duplicates": self.duplicates,
                "connections": self.connections, "sessions": self.sessions, "ended": self.ended,
                "last_seq": self.last_seq, "seq_jumps": self.seq_jumps, "untimed": self.untimed}

    def absorb(self, other):
        """Add the counts of ``other`` (a stream being forgotten) to these totals."""
        for key in ("frames", "gaps", "failed", "duplicates", "connections", "sessions", "seq_jumps", "untimed"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


class Session(object):
    """What the host knows of one protocol-2 edge session: the outcome of each frame it handled (the last
    :data:`REMEMBERED_FRAMES`), which connection carries it now, and its clock offset.

    ``out``: the host's :class:`OutDir`, where each outcome is appended to ``.latentlink/<stream>.delivered`` (the
    journal), read back when a restarted host meets the session again, so that frames an earlier host process
    decoded and wrote are not decoded or written twice.
    ``lock`` serialises the frames of one session across connections (a stale connection finishing a frame while
    its replacement receives the same frame again).
    """

    def __init__(self, stream, session_id, out=None):
        self.stream, self.id = stream, session_id
        self.outcomes = collections.OrderedDict()  # seq -> "decoded" | "failed"
        self.in_flight = {}  # seq -> _Job: received, not yet decoded and written (a resend must not decode it again)
        self.lock = threading.Lock()
        self.connection = None  # the _Connection carrying it now
        self.first_seq = None  # the first sequence number this host process saw (gaps count from it)
        self.max_seq = -1  # the highest sequence number handled (an END may not say fewer frames were sent)
        self.received = 0  # distinct frames handled (decoded or failed), this host process or a journaled earlier one
        self.offset_s = 0.0  # the host's clock minus the edge's, as the edge estimated it (CLOCK)
        self.out, self.journal = out, stream + ".delivered"
        if out is not None:
            self._read_journal()
            if self.first_seq is None:
                # No journal line of this session: no earlier host process (with this out_dir) handled any of its
                # frames, so those numbered before the first this one sees were dropped by the edge: gaps from 0.
                self.first_seq = 0

    def _read_journal(self):
        where = self.out.where(JOURNAL_DIR, self.journal)
        try:
            f = self.out.open_text(JOURNAL_DIR, self.journal)
        except OSError as exc:
            log.error("cannot read %s (%s): frames resent after a host restart may be written twice", where, exc)
            return
        if f is None:
            return
        with f:
            for line in f:
                words = line.split()
                if (len(words) == 3 and words[0] == self.id and words[1].isdigit() and len(words[1]) <= 16
                        and words[2] in ("decoded", "failed", "stored")):  # 16 digits: below 2**53, like every seq
                    self._remember(int(words[1]), words[2])
        if self.outcomes:
            log.info("stream %r session %s: %d frames already handled by an earlier host process (from %s)",
                     self.stream, self.id, len(self.outcomes), where)

    def _remember(self, seq, outcome):
        self.outcomes[seq] = outcome
        self.received += 1
        if self.first_seq is None or seq < self.first_seq:
            self.first_seq = seq
        self.max_seq = max(self.max_seq, seq)
        while len(self.outcomes) > REMEMBERED_FRAMES:
            self.outcomes.popitem(last=False)

    def remember(self, seq, outcome):
        """Frame ``seq`` was handled: ``outcome`` is "decoded" or "failed"."""
        self._remember(seq, outcome)
        if self.out is not None:
            try:
                self.out.append(JOURNAL_DIR, self.journal, u"{} {} {}\n".format(self.id, seq, outcome))
            except OSError as exc:
                log.error("cannot append to %s (%s): frames resent after a host restart may be written twice",
                          self.out.where(JOURNAL_DIR, self.journal), exc)


class _Connection(object):
    """One connection: its socket (once the TLS handshake is done, a
    :class:`~latentlink.edge.security.TLSSocket`: the receiver reads while the write stage sends, and one OpenSSL
    connection must never be used by two threads at once), peer and (protocol 2) session;
    ``identity`` the name in its TLS certificate; ``evicted`` once a reconnect replaced it; ``greeted`` once its
    first message began (from then on, silence is idleness, not a missing handshake)."""

    def __init__(self, sock, where):
        self.sock, self.where = sock, where
        self.raw = sock  # the socket itself, for shutdown and TCP state (under TLS, ``sock`` is a TLSSocket around it)
        self.session = None
        self.identity = None
        self.evicted = False
        self.greeted = False
        self.broken = False  # a send failed: no more acknowledgements on it
        self.send_lock = threading.Lock()  # the write stage's threads and the receiver all send on this socket
        self.pending = 0  # its frames in the pipeline, not yet written and acknowledged
        self.idle = threading.Condition()  # notified when ``pending`` falls to 0


class _Job(object):
    """One frame on its way through the pipeline: received -> decode queue -> decoded (in a batch) -> written to
    the outputs -> acknowledged (protocol 2). ``me``: the connection it came on; ``ack``: protocol 2 (raw pickles
    and protocol 1 get no acknowledgement); ``waiters``: connections of the same session that received it again
    while it was in flight (a reconnect), which get its acknowledgement too."""

    __slots__ = ("me", "meta", "latents", "timer", "offset_s", "t_recv", "ack", "waiters", "output", "outcome",
                 "reason", "batch", "t_queued")

    def __init__(self, me, meta, latents, timer, offset_s=0.0, t_recv=None, ack=False):
        self.me, self.meta, self.latents, self.timer = me, meta, latents, timer
        self.offset_s, self.t_recv, self.ack = offset_s, t_recv, ack
        self.waiters = []
        self.output = None  # the decoder's output for this frame (its own array)
        self.outcome = self.reason = None  # set when the frame failed before its write
        self.batch = 1
        self.t_queued = time.perf_counter()


class _DecodeQueue(object):
    """The decode queue: at most ``capacity`` frames, taken round-robin across streams (first in, first out within
    a stream), so that each edge's next acknowledgement waits for about one frame of every other stream, not for
    every frame queued before it. ``put`` raises ``queue.Full`` after ``timeout`` s; ``get`` returns a job, or
    None once :meth:`close` was called and the queue is empty, and raises ``queue.Empty`` after ``timeout`` s."""

    def __init__(self, capacity):
        self.capacity = capacity
        self._streams = collections.OrderedDict()  # stream -> deque of jobs; the next stream to take from first
        self._size = 0
        self._closed = False
        self._changed = threading.Condition()

    def qsize(self):
        return self._size

    def put(self, job, timeout=None):
        with self._changed:
            if not self._changed.wait_for(lambda: self._size < self.capacity, timeout):
                raise queue.Full
            self._streams.setdefault(job.meta.stream, collections.deque()).append(job)
            self._size += 1
            self._changed.notify_all()

    def get(self, timeout=None):
        with self._changed:
            if not self._changed.wait_for(lambda: self._size or self._closed, timeout):
                raise queue.Empty
            if not self._size:
                return None  # closed, and every frame taken
            stream, jobs = next(iter(self._streams.items()))
            job = jobs.popleft()
            if jobs:
                self._streams.move_to_end(stream)  # its next frame after one of each other stream
            else:
                del self._streams[stream]
            self._size -= 1
            self._changed.notify_all()
            return job

    def close(self):
        """No more frames: ``get`` returns None once the queue is empty."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Host(object):
    """Receives latents from any number of edges and decodes them with one shared ``decoder`` backend.

    ``out_dir``: save frames as ``out_dir/<stream>/<seq:06d>.png``. ``display``: show them (OpenCV window).
    ``max_frames``: stop after this many decoded frames; ``max_streams``: stop after this many streams said
    end-of-stream. Seconds: ``handshake_timeout_s``: a connection's first message must start within this time of
    connecting, and protocol 2's HELLO arrive whole; ``idle_timeout_s``: close a connection silent this long between
    messages (a total: one recv waits for the first byte); ``frame_timeout_s``: a message, once its first byte
    arrived, must arrive whole within this time (and the host's own messages be taken by the peer within it).
    ``max_frame_bytes``: the largest payload accepted; ``max_connections``: edges served at once, and
    ``max_connections_per_peer``: from one IP address (more are refused), which with ``max_frame_bytes`` bounds
    memory.
    ``window``: the most frames a protocol-2 edge may have in flight (it may ask for fewer).
    ``accept_pickle``: accept the seed pipeline's pickled arrays (off by default: a pickle is a program, and the
    parser for it is the largest attack surface the host has; see the README's threat model).
    ``accept_pickle_raw``: serve plain clients' length-prefixed pickles (:mod:`latentlink.host.raw_pickle`; off by
    default), as stream ``raw_stream_name`` (None: raw-<ip>-<port>).
    ``decode_delay_s``: for tests and benchmarks only: sleep this long per frame decoded, in the decode stage
    (simulates a slower decoder, so that frames are in flight when a fault is injected; 0: off).
    The pipeline: ``batch_size``: the most frames decoded in one call (across streams; 1: no batching);
    ``batch_wait_ms``: how long the decode stage waits for more frames once it has one (ms; it never waits when
    the queue holds a full batch); ``queue_size``: the most frames waiting to be decoded (receivers stop reading
    when it is full, so the edges' windows fill and they slow down) and waiting in each writer's queue;
    ``write_workers``: threads that write decoded frames to the outputs and acknowledge them (a stream's frames
    always go to one of them, in order). ``pipeline=False``: the serial path, each connection's thread decodes
    and writes its own frames one at a time under one lock (what the host did before the pipeline; kept for the
    throughput benchmark). ``progress_s``: log a progress line this often while frames flow (seconds; 0: off).
    ``credentials``: a :class:`~latentlink.edge.security.Credentials` with a TLS context, a token, or both, that
    edges must match (None: any edge is served, as before).
    ``outputs``: :class:`~latentlink.host.outputs.Output` objects that take each decoded frame after the PNG folder
    of ``out_dir`` (an output's :class:`~latentlink.host.outputs.OutputError` makes that frame count as failed).
    ``forward``: a gateway's forward step instead of decoding (``latentlink host --jetstream``:
    :class:`~latentlink.host.jetstream.Forwarder`): the decode stage hands it each batch, frames undecoded (their
    payload as received in ``job.latents``), and it sets each job's outcome ("stored", "failed" or "dropped"); the
    write stage then acknowledges them with that outcome, and writes nothing.
    ``postfilter``: a :class:`~latentlink.host.postfilter.PostFilter` run on each decoded batch, timed as the stage
    ``postfilter`` (None: none, and no such stage).

    Memory does not grow with the frames or the streams served: the summary is aggregated as frames are decoded
    (:class:`~latentlink.edge.profiler.FrameStats`), and each decoded frame's record goes to ``on_record(record)``
    (called from the write stage's threads, e.g. a :class:`~latentlink.edge.profiler.ReportWriter`'s ``add``),
    never into a list. :attr:`streams` keeps the counts of at most ``max_stream_stats`` streams: when a new stream would
    pass that, the oldest ended one (or, if none ended, the oldest not connected) is forgotten and its counts added
    to :attr:`forgotten`, so the summary's totals stay exact.
    """


    def __init__(self, decoder, budget_ms=33.0, out_dir=None, display=False, max_frames=None, max_streams=None,
                 max_frame_bytes=4 << 20, idle_timeout_s=60.0, frame_timeout_s=10.0, max_connections=32,
                 accept_pickle=False, window=8, handshake_timeout_s=5.0, max_connections_per_peer=4,
                 decode_delay_s=0.0, credentials=None, on_record=None, max_stream_stats=MAX_STREAM_STATS,
                 accept_pickle_raw=False, raw_stream_name=None, outputs=(), batch_size=4, batch_wait_ms=5.0,
                 queue_size=64, write_workers=2, pipeline=True, progress_s=5.0, forward=None,
                 postfilter=None):
        if batch_size < 1 or queue_size < 1 or write_workers < 1 or batch_wait_ms < 0:
            raise ConfigError("bad pipeline settings: batch size {}, queue size {} and write workers {} must be at "
                              "least 1, and the batch wait {} ms at least 0".format(batch_size, queue_size,
                                                                                   write_workers, batch_wait_ms))
        self.decoder = decoder
        self.forward = forward  # a gateway: frames are forwarded (published), not decoded
        self.budget_ms = budget_ms
        self.out_dir, self.display = out_dir, display
        self.out = OutDir(out_dir) if out_dir else None  # symlinks inside it are refused, never followed
        # Where decoded frames go (host/outputs.py): the PNG folder first, then the caller's outputs.
        self.outputs = ([FolderOutput(self.out)] if self.out is not None else []) + list(outputs)
        self.max_frames, self.max_streams = max_frames, max_streams
        self.max_frame_bytes, self.max_connections = max_frame_bytes, max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.idle_timeout_s, self.frame_timeout_s = idle_timeout_s, frame_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.accept_pickle = accept_pickle
        self.accept_pickle_raw, self.raw_stream_name = accept_pickle_raw, raw_stream_name
        self.window = window
        self.decode_delay_s = decode_delay_s  # tests and benchmarks: a slower decoder
        self.credentials = credentials or Credentials()
        self._sessions = collections.OrderedDict()  # (stream, session id) -> Session, least recently used first
        self.streams = collections.OrderedDict()  # name -> StreamStats, least recently connected first
        self.max_stream_stats = max_stream_stats
        self.forgotten = StreamStats("")  # the summed counts of the streams dropped from self.streams
        self.forgotten_streams = 0
        self._record_listeners = [on_record] if on_record is not None else []
        self.postfilter = postfilter
        self._frames = FrameStats(host_stages(postfilter), budget_ms)  # every decoded frame, aggregated
        self.protocol_errors = 0
        self.write_errors = 0
        self.refused_connections = 0  # over --max-connections or --max-connections-per-peer
        self.timeouts = 0  # connections closed for silence: no first message in time, or idle between messages
        self.refused_streams = 0  # edges refused at the handshake (credentials, model, name in use) or as unauthorized
        self.dropped_on_stop = 0  # frames received but dropped unacknowledged as the host stopped (or aborted)
        self.streams_ended = 0
        self.address = None
        self._lock = threading.Lock()  # guards the counters above, the streams dict and the live names
        self._decode_lock = threading.Lock()  # one decode at a time: ONNX Runtime already uses every core
        self._lossless_slots = threading.BoundedSemaphore(LOSSLESS_DECODES)  # their memory: _decode_payload
        self._stop = threading.Event()  # no new connections or frames; the frames queued are still finished
        self._abort = threading.Event()  # stop at once: the frames queued are dropped, not acknowledged
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_ms / 1000.0
        self.queue_size, self.pipeline, self.progress_s = queue_size, pipeline, progress_s
        self._decode_queue = _DecodeQueue(queue_size)  # _Job; its bound is the pipeline's memory bound
        self._write_queues = [queue.Queue(queue_size) for _ in range(write_workers)]
        self._workers = []
        self._batches = collections.Counter()  # batch size -> batches decoded
        self._claimed = 0  # frames taken for decoding, towards max_frames (failed ones are given back)
        self._progress = None  # (time.monotonic(), {stream: decoded}) of the last progress line
        self._latencies = collections.deque(maxlen=1000)  # ms, since the last progress line
        self._conns = set()
        self._active = 0  # connections being served (slots taken)
        self._per_peer = {}  # IP address -> connections being served from it (absent: none)
        self._live = {}  # stream name -> peer address, for the connections open now
        self._threads = []
        self._refusers = []  # TLS: threads answering "busy" (handshake, then REFUSE)
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
        """Accept and serve edges until a stop condition, :meth:`stop` or :meth:`abort`; then finish the frames
        received (unless aborted), acknowledge them, and close everything."""
        self._start_workers()
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self._server.accept()
                except socket.timeout:
                    self._show()
                    self._log_progress()
                    continue
                self._threads = [t for t in self._threads if t.is_alive()]
                refusal = self._admit(conn, peer[0])
                if refusal is not None:
                    log.warning("%s:%s refused: %s", peer[0], peer[1], refusal)
                    self._refuse_busy(conn, refusal + "; retrying")
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
        """Stop: no new connections or frames; the frames already received are decoded, written and acknowledged
        first (at most ``queue_size`` and the edges' windows)."""
        self._stop.set()

    def abort(self):
        """Stop at once: like :meth:`stop`, but the frames waiting in the queues are dropped unacknowledged (the
        edges resend them, or count them lost); the summary and report still cover every frame decoded."""
        self._abort.set()
        self._stop.set()

    @property
    def stopping(self):
        return self._stop.is_set()

    def _admit(self, conn, ip):
        """Take a connection slot for ``conn`` from address ``ip``; returns None, or why not (the limits)."""
        with self._lock:
            if self._active >= self.max_connections:
                why = "the host serves {} connections already (--max-connections)".format(self.max_connections)
            elif self._per_peer.get(ip, 0) >= self.max_connections_per_peer:
                why = "the host serves {} connections from {} already (--max-connections-per-peer)".format(
                    self.max_connections_per_peer, ip)
            else:
                self._active += 1
                self._per_peer[ip] = self._per_peer.get(ip, 0) + 1
                self._conns.add(conn)  # registered here, so that a stop from now on shuts it down too
                return None
            self.refused_connections += 1
            return why

    def _release(self, conn, ip):
        """Under the lock: give back the slot :meth:`_admit` took (before the close, so that a peer that sees the
        close and connects again finds it free)."""
        self._conns.discard(conn)
        self._active -= 1
        if self._per_peer[ip] > 1:
            self._per_peer[ip] -= 1
        else:
            del self._per_peer[ip]  # the dict holds only peers connected now

    def _refuse_busy(self, conn, message):
        """Answer "busy" (retried by the edge). Under TLS the answer needs a handshake first, so it is given from a
        thread (at most :data:`BUSY_REFUSERS` at once; beyond that the connection is just closed)."""
        if self.credentials.tls is None:
            _refuse_and_close(conn, "busy", message, permanent=False)
            return
        self._refusers = [t for t in self._refusers if t.is_alive()]
        if len(self._refusers) >= BUSY_REFUSERS:
            conn.close()
            return

        def refuse():
            tls = self.credentials.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                handshake(tls, self.handshake_timeout_s)
            except (OSError, ValueError):
                tls.close()
                return
            _refuse_and_close(tls, "busy", message, permanent=False, linger=True)

        thread = threading.Thread(target=refuse, daemon=True, name="latentlink-busy")
        self._refusers.append(thread)
        thread.start()

    def _shutdown(self):
        """Stop reading, let the pipeline finish what it holds (acknowledgements included: an edge that sees its
        last ACK needs no reconnect), then close the connections and end the worker threads."""
        self._stop.set()
        self._server.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # the receivers read end-of-stream; their sockets stay open for the acknowledgements
            _shutdown(conn, socket.SHUT_RD)
        backlog = self._decode_queue.qsize()
        if backlog and not self._abort.is_set():
            log.info("stopping: finishing the %d frames received (Ctrl-C or SIGTERM again to drop them)", backlog)
        for thread in self._threads:  # each returns once its connection's frames are written and acknowledged
            while thread.is_alive():
                thread.join(timeout=0.5)
                self._log_progress()
        self._decode_queue.close()  # the decode stage takes what is left, then tells the writers to end
        for thread in self._workers:
            thread.join()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        with self._decode_lock:  # a decode still running ends before the caller closes the decoder
            pass
        if self.display:
            cv2.destroyAllWindows()

    # The pipeline.
    def _start_workers(self):
        if self._workers or not self.pipeline:
            return
        self._workers.append(threading.Thread(target=self._decode_loop, daemon=True, name="latentlink-decode"))
        for index, jobs in enumerate(self._write_queues):
            self._workers.append(threading.Thread(target=self._write_loop, args=(jobs,), daemon=True,
                                                  name="latentlink-write-{}".format(index)))
        for thread in self._workers:
            thread.start()

    def _put(self, jobs, job, force=False):
        """Put ``job`` on the bounded queue ``jobs``, waiting while it is full; False (not queued) once the host
        aborts, unless ``force`` (a frame already decoded is written and acknowledged even when aborting). A frame
        received whole as the host stops is still queued and finished: stopping ends the reading, not the frames
        already read (the decode stage runs until every connection's thread has returned)."""
        while True:
            if not force and self._abort.is_set():
                return False
            try:
                jobs.put(job, timeout=0.1)
                return True
            except queue.Full:
                continue

    def _submit(self, job):
        """Hand a received frame to the decode stage (or, on the serial path, decode and write it here); False
        when the host aborts and the frame was not taken (it is then not acknowledged)."""
        with job.me.idle:
            job.me.pending += 1
        if not self.pipeline:
            with self._decode_lock:
                if self._abort.is_set():
                    self._drop(job)
                    return False
                self._decode([job])
            self._finish(job)
            return True
        if not self._put(self._decode_queue, job):
            self._drop(job)
            return False
        return True

    def _decode_loop(self):
        """The decode stage: batches of up to ``batch_size`` frames from the queue, across streams."""
        while True:
            job = self._decode_queue.get()
            if job is None:
                for jobs in self._write_queues:
                    jobs.put(None)
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                try:
                    more = self._decode_queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:  # closed: the next get says so again, after this batch
                    break
                batch.append(more)
            try:
                self._decode_batch(batch)
            except Exception:  # a bug must cost these frames, never the decode stage
                log.exception("unexpected error decoding a batch of %d frames", len(batch))
                for job in batch:
                    if job.outcome is None and job.output is None:
                        job.outcome, job.reason = "failed", "decode failed on the host (see its log)"
            for job in batch:
                if job.outcome == "dropped":
                    continue
                index = hash(job.meta.stream) % len(self._write_queues)  # one writer per stream: its frames in order
                self._put(self._write_queues[index], job, force=True)

    def _decode_batch(self, batch):
        """Decode ``batch`` (frames dropped when aborting, or past ``max_frames``, are marked "dropped")."""
        take = []
        for job in batch:
            if job.me.evicted and self._forsake(job):
                continue  # a connection a reconnect replaced: its backlog is dropped (resent frames join the job)
            with self._lock:
                if self._abort.is_set() or (self.max_frames and self._claimed >= self.max_frames):
                    job.outcome = "dropped"
                else:
                    self._claimed += 1
                    take.append(job)
            if job.outcome == "dropped":
                self._drop(job)
        if self.forward is None:  # a gateway forwards lossless frames as they came, for the workers
            lossless = [job for job in take if job.meta.packing == "lossless"]
            for job in lossless:  # the image itself, rebuilt on receipt: no decoder run
                job.output = job.latents
            take = [job for job in take if job.meta.packing != "lossless"]
        if take and self.forward is not None:
            self._forward(take)
        elif take:
            with self._decode_lock:
                self._decode(take)

    def _forward(self, jobs):
        """A gateway's decode stage: the forward step publishes the batch and sets each job's outcome."""
        started = time.perf_counter()
        self.forward.forward(jobs, self._stop.is_set, self._abort.is_set)
        if self.decode_delay_s:  # tests and benchmarks: a slower stage, so that frames are in flight for a fault
            time.sleep(self.decode_delay_s * len(jobs))
        per_frame = (time.perf_counter() - started) * 1000.0 / len(jobs)
        with self._lock:
            self._batches[len(jobs)] += 1
        for job in jobs:
            job.batch = len(jobs)
            job.timer.add("decode", per_frame)  # the forward step's time, in the decode column
            if job.outcome == "dropped":
                self._drop(job)

    def _decode(self, jobs):
        """Run the decoder on ``jobs`` (one call for the batch; under the decode lock); each job gets its own
        ``output``, or ``outcome`` "failed" with the reason."""
        started = time.perf_counter()
        try:
            outputs, timings = self.decoder.infer_batch([job.latents.astype("float32", copy=False) for job in jobs])
        except BackendError as exc:
            if len(jobs) > 1:  # find the frame that fails: decode them one at a time
                for job in jobs:
                    self._decode([job])
                return
            job = jobs[0]
            log.error("%s: frame %d of %r failed to decode: %s", job.me.where, job.meta.seq, job.meta.stream, exc)
            job.outcome, job.reason = "failed", "decode failed: {}".format(exc)
            return
        if self.decode_delay_s:  # tests and benchmarks: simulates a slower decoder (counted as decode time)
            time.sleep(self.decode_delay_s * len(jobs))  # per frame: batching does not make the fault window shorter
        per_frame = (time.perf_counter() - started) * 1000.0 / len(jobs)
        filter_ms = 0.0
        if self.postfilter is not None:  # on the decoder's batch, in one call; its own stage
            started = time.perf_counter()
            try:
                outputs = self.postfilter.run(outputs, self.decoder.info.tiles)
            except BackendError as exc:
                log.error("%d frame(s) failed in the post-filter: %s", len(jobs), exc)
                for job in jobs:
                    job.outcome, job.reason = "failed", "post-filter failed on the host (see its log)"
                return
            filter_ms = (time.perf_counter() - started) * 1000.0 / len(jobs)
        with self._lock:
            self._batches[len(jobs)] += 1
        for job, output in zip(jobs, outputs):
            if self.postfilter is not None:
                job.timer.add("postfilter", filter_ms)
            job.output, job.batch = output, len(jobs)
            # The batch's time shared out: the frames' decode times add up to the decoder's busy time.
            job.timer.add("decode", per_frame)
            if "run_gpu_ms" in timings:
                job.timer.add_gpu("decode", (timings["run_gpu_ms"] + timings.get("copy_gpu_ms", 0.0)) / len(jobs))

    def _write_loop(self, jobs):
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                self._finish(job)
            except Exception:  # a bug must cost one frame, never the write stage
                log.exception("%s: unexpected error writing frame %d of %r", job.me.where, job.meta.seq,
                              job.meta.stream)
                self._done(job.me)

    def _forsake(self, job):
        """Drop the frame of a replaced connection unless a resend of it waits for its acknowledgement; True if
        dropped."""
        session = job.me.session
        if session is None:
            return False
        with session.lock:
            if job.waiters:
                return False
            if session.in_flight.get(job.meta.seq) is job:
                del session.in_flight[job.meta.seq]
        job.outcome = "dropped"
        self._done(job.me)
        return True

    def _drop(self, job):
        """A frame taken off the pipeline unfinished (the host stops): not remembered, not acknowledged."""
        with self._lock:
            self.dropped_on_stop += 1
        session = job.me.session if job.ack else None
        if session is not None:
            with session.lock:
                if session.in_flight.get(job.meta.seq) is job:
                    del session.in_flight[job.meta.seq]
        self._done(job.me)

    def _done(self, me):
        with me.idle:
            me.pending -= 1
            if me.pending <= 0:
                me.idle.notify_all()

    def _wait_idle(self, me):
        """Wait until the frames ``me`` received are written and acknowledged (bounded: a send gives up after
        ``frame_timeout_s``, and an abort drops what is queued)."""
        with me.idle:
            while me.pending > 0:
                me.idle.wait(0.5)

    def _finish(self, job):
        """The write stage: write a decoded frame to the outputs, remember its outcome, acknowledge it."""
        meta, me = job.meta, job.me
        if job.outcome is None:
            outcome, reason = self._write(job)
        else:
            outcome, reason = job.outcome, job.reason
        if outcome == "failed":
            with self._lock:
                if self.max_frames:
                    self._claimed -= 1  # max_frames counts frames decoded
        t_done = time.time()
        waiters = []
        if job.ack:
            session = me.session
            with session.lock:
                session.remember(meta.seq, outcome)
                session.in_flight.pop(meta.seq, None)
                waiters = job.waiters
            with self._lock:
                stats = self.streams[meta.stream]
                stats.last_seq = max(stats.last_seq, meta.seq)
                if outcome == "failed":
                    stats.failed += 1
        else:
            with self._lock:
                stats = self.streams[meta.stream]
                if outcome == "failed":
                    stats.fail(meta.seq)
                else:
                    stats.account(meta.seq)
        try:
            if job.ack:
                for conn, duplicate in [(me, False)] + [(w, True) for w in waiters if w is not me]:
                    fields = dict(seq=meta.seq, outcome=outcome, duplicate=duplicate, t_recv=job.t_recv,
                                  t_done=t_done)
                    if reason:
                        fields["reason"] = reason[:1000]
                    self._ack(conn, encode_message(KIND_ACK, t_ack=time.time(), **fields))
        finally:
            self._done(me)

    def _ack(self, me, data):
        """Send an acknowledgement on ``me`` unless it was replaced or broke; a failed send closes it."""
        if me.evicted or me.broken:
            return
        try:
            self._send_on(me, data)
        except (LatentlinkError, OSError) as exc:  # ProtocolError, ConnectionClosed: closed meanwhile
            me.broken = True
            if not me.evicted:
                log.warning("%s: cannot acknowledge a frame (%s); closing this connection", me.where, exc)
            _shutdown(me.raw)

    # One connection.
    def _serve_connection(self, conn, peer):
        where = "{}:{}".format(*peer[:2])
        me = _Connection(conn, where)
        names = []  # the stream this connection carries, once known
        try:
            # From the connection's start, not per byte: a protocol-2 edge sends HELLO at once, a protocol-1 edge
            # connects when it has a frame to send. Under TLS the handshake counts in the same time.
            greet_by = time.monotonic() + self.handshake_timeout_s
            if self.credentials.tls is not None:
                if not self._start_tls(me):
                    return
            else:
                conn.settimeout(self.handshake_timeout_s)
                if conn.recv(1, socket.MSG_PEEK) == TLS_RECORD:
                    log.warning("%s: a TLS handshake (an edge started with --tls?), and this host runs without "
                                "--tls: closing. Start the host with --tls DIR, or the edge without", where)
                    return
            conn = me.sock
            try:
                header, deadline = wait_header_bytes(conn, greet_by, self.frame_timeout_s)
            except ConnectionClosed:
                if me.identity is None:
                    raise
                # An edge on Python 3.6 checks the host's name only after the handshake, then hangs up: say so.
                log.warning("%s: the edge with the certificate for %r closed the connection right after the TLS "
                            "handshake: did it reject this host's certificate? (it must name the address the edge "
                            "connects to: `latentlink keys host DIR --host-name ADDRESS`)", where, me.identity)
                return
            me.greeted = True
            if bytes(header[:4]) != MAGIC:  # not latentlink: maybe a plain client's pickles (--accept-pickle-raw)
                if me.identity is not None:
                    raise Unauthorized("length-prefixed pickles carry no stream name to match the certificate's "
                                       "{!r}: --accept-pickle-raw is for hosts without --tls".format(me.identity))
                return serve_raw_pickles(self, me, names, header)
            version, byte, meta_len = parse_header(header, VERSIONS)
            if version == VERSION:
                if self.credentials.token is not None:
                    raise Unauthorized("a protocol-1 edge cannot prove it has the token this host requires "
                                       "(--token-file): start the edge with --token-file FILE (protocol 2)")
                log.info("%s: a protocol-1 edge: no handshake and no acknowledgements (upgrade the edge for "
                         "acknowledged delivery and exact accounting)", where)
                self._receive_frames_v1(conn, where, names, me, (byte, meta_len, deadline))
            else:
                self._serve_v2(me, names, byte, meta_len, min(deadline, greet_by))
        except Unauthorized as exc:
            with self._lock:
                self.refused_streams += 1
            log.warning("%s: refused: %s; closing", where, exc)
        except ConnectionClosed:
            if not self._stop.is_set() and not me.evicted:
                log.warning("%s: connection closed without end-of-stream%s", where,
                            " (stream {!r})".format(names[0]) if names else "")
        except socket.timeout:
            with self._lock:
                self.timeouts += 1
            if me.greeted:
                log.warning("%s: no message for %.0f s; closing the connection (--idle-timeout)", where,
                            self.idle_timeout_s)
            else:
                log.warning("%s: said nothing within %.0f s of connecting; closing the connection "
                            "(--handshake-timeout)", where, self.handshake_timeout_s)
        except ProtocolError as exc:
            self._wait_idle(me)  # the good frames before the bad one are finished and counted first
            if self._stop.is_set() or me.evicted:
                log.info("%s: closed mid-frame as the %s", where, "host stops" if self._stop.is_set() else
                         "edge reconnected")
            else:
                with self._lock:
                    self.protocol_errors += 1
                log.error("%s: bad frame: %s; closing this connection (other streams are unaffected)", where, exc)
        except OSError as exc:
            if not self._stop.is_set() and not me.evicted:
                log.warning("%s: connection error: %s", where, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: unexpected error; closing this connection", where)
        finally:
            # Its frames in the pipeline are acknowledged before the close; until then the connection keeps its
            # name and slot (a new session of its edge takes them over, dropping that backlog, as for a live one).
            self._wait_idle(me)
            # Free the stream name before closing: an edge that sees the close may reconnect at once. Only if it is
            # still ours: a reconnect of the same session may have taken it over already.
            with self._lock:
                self._release(conn, peer[0])
                self._conns.discard(me.raw)
                if names and self._live.get(names[0]) is me:
                    del self._live[names[0]]
                if me.session is not None and me.session.connection is me:
                    me.session.connection = None
            me.sock.close()

    def _start_tls(self, me):
        """The TLS handshake of ``me`` (within ``handshake_timeout_s`` in all); True once ``me.sock`` is the TLS
        socket and ``me.identity`` its certificate's name, False when the connection was refused (and closed)."""
        conn, where = me.sock, me.where
        deadline = time.monotonic() + self.handshake_timeout_s
        conn.settimeout(self.handshake_timeout_s)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            log.warning("%s: no TLS handshake within %.0f s; closing", where, self.handshake_timeout_s)
            return False
        if not first:
            log.info("%s: closed before sending anything", where)
            return False
        if first == MAGIC[:1]:  # latentlink in plain text: tell a protocol-2 edge what it lacks
            self._refuse_plain(me)
            return False
        tls = self.credentials.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # stop() shuts down the socket in use
            self._conns.discard(conn)
            self._conns.add(tls)
        me.sock = me.raw = tls
        try:
            handshake(tls, self.handshake_timeout_s, deadline)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
            if not self._stop.is_set():
                log.warning("%s: TLS handshake failed: %s; closing", where,
                            explain_server_tls_error(exc, self.credentials.ca))
            with self._lock:
                self._conns.discard(tls)
            linger_close(tls)  # so that the edge reads our alert, not a reset
            return False
        me.identity = peer_name(tls)
        try:
            check_stream_name(me.identity)
        except ConfigError:  # signed by the CA, yet no certificate of `latentlink keys edge`
            log.warning("%s: refused: its certificate names no stream (common name %r): edges need a certificate "
                        "of `latentlink keys edge DIR NAME`; closing", where, me.identity)
            return False
        log.debug("%s: TLS, certificate for %r", where, me.identity)
        me.sock = TLSSocket(tls, self.frame_timeout_s)  # one SSL call at a time, from any thread
        return True

    def _refuse_plain(self, me):
        """A plain-text latentlink edge on a TLS host: REFUSE a protocol-2 HELLO (in plain text, so it can read
        why); a protocol-1 edge reads nothing, so only the log says it."""
        conn, where = me.sock, me.where
        version, kind, meta_len = read_header(conn)
        message = ("this host requires TLS: start the edge with --tls DIR (its certificate from `latentlink keys edge "
                   "DIR NAME`)")
        if version == VERSION_2 and kind == KIND_HELLO:
            hello, _ = read_body(conn, version, kind, meta_len, deadline=time.monotonic() + self.frame_timeout_s)
            log.warning("%s: refused stream %r (unauthorized): an edge without TLS; %s", where, hello["stream"],
                        message)
            conn.sendall(encode_message(KIND_REFUSE, reason="unauthorized", message=message, permanent=True))
        else:
            log.warning("%s: refused: a protocol-%d edge without TLS; %s; closing", where, version, message)

    def _receive_frames_v1(self, conn, where, names, me, first):
        """Serve protocol-1 frames until end-of-stream; ``first`` is the (flags, meta_len, deadline) of the header
        already read. Raises on anything that ends the connection early."""
        highest = -1  # the highest sequence number on this connection: its end-of-stream may not say fewer
        while not self._stop.is_set():
            if first is None:
                _, flags, meta_len, deadline = wait_header(conn, (VERSION,), time.monotonic() + self.idle_timeout_s,
                                                           self.frame_timeout_s)
            else:
                (flags, meta_len, deadline), first = first, None
            started = time.perf_counter()
            meta, payload = read_body(conn, VERSION, flags, meta_len, self.max_frame_bytes, deadline,
                                      check_meta=lambda m: self._check_meta(m, where, names, me))
            timer = FrameTimer(meta.seq)
            timer.add("receive", (time.perf_counter() - started) * 1000.0)
            if meta.flags & FLAG_END_OF_STREAM:
                if meta.seq <= highest:
                    raise ProtocolError("end-of-stream says {} frames were sent (numbered 0 to {}), but frame {} "
                                        "arrived on this connection".format(meta.seq, meta.seq - 1, highest))
                self._wait_idle(me)  # its frames accounted first: the gaps at the end count from the last
                self._end_stream(meta.stream, meta.seq, where)
                return
            highest = max(highest, meta.seq)
            self._receive_frame(me, meta, payload, timer)

    def _check_meta(self, meta, where, names, me, session=None):
        """Refuse a frame from its metadata alone, before its payload is read or anything allocated for it."""
        if not names:  # protocol 1: the first frame names the stream
            if self.credentials.tls is not None and meta.stream != me.identity:
                raise Unauthorized("a protocol-1 edge with the certificate for {!r} sent a frame of stream {!r}: an "
                                   "edge may stream only under its certificate's name (its --name)".format(
                                       me.identity, meta.stream))
            with self._lock:
                if meta.stream in self._live:
                    raise ProtocolError("stream {!r} is already connected from {}; give each edge its own --name"
                                        .format(meta.stream, self._live[meta.stream].where))
                self._live[meta.stream] = me
                stats = self._stream_stats(meta.stream)
                stats.connections += 1
            names.append(meta.stream)
            log.info("%s: stream %r connected", where, meta.stream)
        elif meta.stream != names[0]:
            raise ProtocolError("stream name changed from {!r} to {!r} on one connection".format(
                names[0], meta.stream))
        if meta.packing == "pickle" and not self.accept_pickle:
            raise ProtocolError("pickle frames are refused by this host (start it with --accept-pickle to accept the "
                                "seed pipeline's pickled arrays, or send with --serializer framed)")
        # (a lossless frame is an image of any size, bounded by the frame limit: edge/protocol.py)
        problem = None if meta.flags & FLAG_END_OF_STREAM or meta.packing == "lossless" else \
            self._latents_problem(meta)
        if problem is not None:
            if session is None:
                self._wait_idle(me)  # the frames before it accounted first, in order (gaps count from them)
            with self._lock:
                if session is None:
                    self.streams[meta.stream].fail(meta.seq)
                else:
                    self.streams[meta.stream].failed += 1
            raise ProtocolError(problem)

    def _latents_problem(self, meta):
        return latents_problem(self.decoder, meta)

    def _end_stream(self, stream, seq, where, session=None):
        """The edge said end-of-stream after ``seq`` frames (numbered 0 .. seq - 1)."""
        with self._lock:
            stats = self.streams[stream]
            if session is None:
                stats.add_gaps(seq - stats.last_seq - 1, "end-of-stream {}".format(seq))  # dropped at the very end
            elif session.first_seq is not None:
                # Numbers this host process never saw, from the first it saw: an earlier host's frames are not gaps.
                stats.add_gaps(seq - session.first_seq - session.received, "END {}".format(seq))
            stats.last_seq = max(stats.last_seq, seq - 1)
            stats.ended = True
            self.streams_ended += 1
            if self.max_streams and self.streams_ended >= self.max_streams:
                self._stop.set()
        log.info("%s: stream %r ended", where, stream)

    # Protocol 2.
    def _serve_v2(self, me, names, kind, meta_len, hello_deadline):
        """Serve a protocol-2 connection whose first header (``kind``, ``meta_len``) was read; its HELLO must arrive
        whole by ``hello_deadline`` (``time.monotonic()``)."""
        conn, where = me.sock, me.where
        if kind != KIND_HELLO:
            raise ProtocolError("a protocol-2 connection must open with HELLO, not {}".format(KIND_NAMES[kind]))
        t_recv = time.time()
        hello, _ = read_body(conn, VERSION_2, kind, meta_len, deadline=hello_deadline)
        # Credentials first: an edge that has none learns nothing of this host's model, nor takes a name.
        refusal = self._authenticate(me, hello)
        if refusal is None:
            refusal = self._check_hello(hello)
        if refusal is None:
            refusal, evicted = self._take_stream(me, hello)
        if refusal is not None:
            reason, message = refusal
            with self._lock:
                self.refused_streams += 1
            log.warning("%s: refused stream %r (%s): %s", where, hello["stream"], reason, message)
            self._send_on(me, encode_message(KIND_REFUSE, reason=reason, message=message,
                                             permanent=reason in PERMANENT_REFUSALS))
            return
        session = me.session
        names.append(hello["stream"])
        if evicted is not None:
            log.info("%s: stream %r reconnected (session %s); dropping the stale connection from %s and its "
                     "backlog", where, hello["stream"], session.id, evicted.where)
            _shutdown(evicted.raw)
        else:
            log.info("%s: stream %r connected (session %s, %s delivery)", where, hello["stream"], session.id,
                     hello["delivery"])
        with session.lock:
            acked = [[seq, session.outcomes[seq]] for seq in hello["unacked"] if seq in session.outcomes]
        self._send_on(me, encode_message(KIND_ACCEPT, version=VERSION_2, window=min(self.window, hello["window"]),
                                          max_frame_bytes=self.max_frame_bytes, acked=acked, t_recv=t_recv,
                                          t_send=time.time()))
        while not self._stop.is_set():
            _, kind, meta_len, deadline = wait_header(conn, (VERSION_2,), time.monotonic() + self.idle_timeout_s,
                                                      self.frame_timeout_s)
            started, t_recv = time.perf_counter(), time.time()
            if kind == KIND_FRAME:
                meta, payload = read_body(conn, VERSION_2, kind, meta_len, self.max_frame_bytes, deadline,
                                          check_meta=lambda m: self._check_v2_meta(m, hello, where, names, me))
                timer = FrameTimer(meta.seq)
                timer.add("receive", (time.perf_counter() - started) * 1000.0)
                self._receive_v2_frame(me, meta, payload, timer, t_recv)
            elif kind == KIND_CLOCK:
                fields, _ = read_body(conn, VERSION_2, kind, meta_len, deadline=deadline)
                session.offset_s = fields["offset_s"]
            elif kind == KIND_END:
                fields, _ = read_body(conn, VERSION_2, kind, meta_len, deadline=deadline)
                if fields["stream"] != hello["stream"]:
                    raise ProtocolError("END names stream {!r} on a connection of stream {!r}".format(
                        fields["stream"], hello["stream"]))
                self._wait_idle(me)  # its frames remembered first (the check below, and the gaps)
                if fields["seq"] <= session.max_seq:
                    raise ProtocolError("END says {} frames were sent (numbered 0 to {}), but this session's frame "
                                        "{} arrived".format(fields["seq"], fields["seq"] - 1, session.max_seq))
                self._end_stream(hello["stream"], fields["seq"], where, session)
                self._send_on(me, encode_message(KIND_ACK, seq=fields["seq"], outcome="end", t_recv=t_recv,
                                                 t_ack=time.time()))
                return
            else:
                raise ProtocolError("an edge may not send {} after HELLO".format(KIND_NAMES[kind]))

    def _send(self, conn, data):
        """Send one message; a peer that takes none of it for ``frame_timeout_s`` (it stopped reading, and its
        buffers are full) is a ProtocolError: it would otherwise hold this thread and its slot for ever.

        The socket's timeout is left alone: the connection's receiver sets it for its own reads while the write
        stage sends acknowledgements, so the wait is a ``select`` here, then a send of what the socket takes (a
        TLSSocket does the same under its lock)."""
        if isinstance(conn, TLSSocket):  # its sendall waits outside its lock, and fails after no progress
            try:
                return conn.sendall(data)
            except socket.timeout:
                raise ProtocolError("the edge does not read the host's messages (none taken for {:g} s)".format(
                    self.frame_timeout_s))
        view, deadline = memoryview(data), time.monotonic() + self.frame_timeout_s
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("the edge does not read the host's messages (none taken for {:g} s)".format(
                    self.frame_timeout_s))
            try:
                _, writable, _ = select.select([], [conn], [], remaining)
            except ValueError:  # closed meanwhile (its descriptor is -1)
                raise ConnectionClosed("the connection was closed")
            if not writable:
                continue
            try:  # takes what fits in the socket's buffer
                sent = conn.send(view)
            except (socket.timeout, BlockingIOError):
                continue
            view = view[sent:]

    def _send_on(self, me, data):
        """:meth:`_send` on connection ``me``, one message at a time (several threads send on it)."""
        with me.send_lock:
            self._send(me.sock, data)

    def _authenticate(self, me, hello):
        """None if the edge has the credentials this host requires for the HELLO's stream, else ``(reason,
        message)``. With a token this is the CHALLENGE / AUTH exchange (edge/security.py)."""
        token, conn = self.credentials.token, me.sock
        if token is None and hello["nonce"] is not None:
            return "unauthorized", ("the edge has a token (--token-file) and this host has none: start the host with "
                                    "the same --token-file, or the edge without")
        if token is not None:
            if hello["nonce"] is None:
                return "unauthorized", ("this host requires a token: start the edge with --token-file FILE (a copy "
                                        "of the host's)")
            nonce = new_nonce()
            conn.sendall(encode_message(KIND_CHALLENGE, nonce=nonce, proof=host_proof(token, hello["nonce"], nonce)))
            conn.settimeout(self.frame_timeout_s)
            try:
                version, kind, meta_len = read_header(conn, versions=(VERSION_2,))
            except ConnectionClosed:  # what an edge with another token does: it checks this host's proof first
                raise Unauthorized("stream {!r}: the edge closed the connection on our CHALLENGE: it does not "
                                   "accept this host's token proof, so its --token-file holds another token than "
                                   "this host's".format(hello["stream"]))
            if kind != KIND_AUTH:
                raise ProtocolError("the edge answered CHALLENGE with {}, not AUTH".format(KIND_NAMES[kind]))
            auth, _ = read_body(conn, version, kind, meta_len, deadline=time.monotonic() + self.frame_timeout_s)
            if not proof_matches(edge_proof(token, nonce, hello["nonce"], hello["stream"], hello["session"]),
                                 auth["proof"]):
                return "unauthorized", ("the edge's token is wrong (its proof does not match this host's "
                                        "--token-file): give the edge the host's token")
        if self.credentials.tls is not None and hello["stream"] != me.identity:
            return "unauthorized", ("the certificate is for {0!r}, not {1!r}: an edge may stream only under its "
                                    "certificate's name. Start it with --name {0}, or issue a certificate for {1} "
                                    "(`latentlink keys edge DIR {1}`)".format(me.identity, hello["stream"]))
        return None

    def _check_hello(self, hello):
        """None if this host can decode what the HELLO describes, else ``(reason, message)``."""
        info = self.decoder.info
        if VERSION_2 not in hello["versions"]:
            return "version", "the edge speaks protocol {} and this host 1 and 2: upgrade the edge".format(
                hello["versions"])
        if hello["packing"] == "lossless":
            return _check_lossless_hello(hello)
        # The checkpoint first (a context-coded edge's identity adds its tables' hash: edge/backends/base.py), so
        # that an edge of another model hears that, not what its coder needs.
        edge_checkpoint = checkpoint_of(hello["model_id"])
        if edge_checkpoint and info.model_id and edge_checkpoint != info.model_id:
            return "model_mismatch", ("the edge's encoder comes from checkpoint {}... and this host's decoder from {}..."
                                      " (another training run: its images would be noise); give both the same "
                                      "profile or export".format(edge_checkpoint[:12], info.model_id[:12]))
        progressive = getattr(self.decoder, "progressive", None)  # edge/rate.py: up to K codes per frame
        if hello.get("progressive") != progressive:
            return "shape_mismatch", ("the edge's model is {} and this host's decoder {}: run the host with the edge's "
                                      "profile (or --decoder)".format(_progressive_text(hello.get("progressive")),
                                                                      _progressive_text(progressive)))
        if tuple(hello["shape"]) != tuple(self.decoder.input_shape):
            return "shape_mismatch", ("the edge sends latents of shape {} and this host's decoder takes {}: run the "
                                      "host with the edge's profile (or --decoder)".format(
                                          hello["shape"], list(self.decoder.input_shape)))
        if tuple(hello["tiles"]) != tuple(info.tiles):
            return "shape_mismatch", "the edge cuts frames into {} tiles and this host's decoder joins {}".format(
                "x".join(map(str, hello["tiles"])), "x".join(map(str, info.tiles)))
        if hello["packing"] == "pickle":
            if not self.accept_pickle:
                return "pickle_refused", ("pickle frames are refused by this host (start it with --accept-pickle, "
                                          "or send with --serializer framed)")
        elif hello["packing"] != ("bits" if progressive else info.packing):  # progressive codes travel as bits
            return "packing_mismatch", "the edge packs latents as {} and this host's decoder expects {}".format(
                hello["packing"], "bits" if progressive else info.packing)
        if hello["entropy"] == "context":
            try:
                identity = info.identity("context")  # reads the tables (entropy.json beside the decoder), once
            except ConfigError as exc:
                return "entropy_unavailable", "this host cannot decode --entropy context: {}".format(exc)
            if hello["model_id"] != identity:
                return "model_mismatch", ("the edge codes with entropy tables {} and this host has {} (model and "
                                          "tables must come from the same export; copy the edge's entropy.json or "
                                          "fit both with `latentlink export entropy`)".format(
                                              hello["model_id"], identity))
        try:
            check_available(hello["entropy"])
        except ConfigError as exc:
            return "entropy_unavailable", "this host cannot decode --entropy {}: {}".format(hello["entropy"], exc)
        return None

    def _take_stream(self, me, hello):
        """Make ``me`` the live connection of the HELLO's stream; returns ``(refusal or None, evicted or None)``."""
        stream, session_id = hello["stream"], hello["session"]
        with self._lock:
            live = self._live.get(stream)
            evicted = None
            if live is not None:
                same = live.session is not None and live.session.id == session_id
                if not same and not _peer_gone(live.raw):
                    return ("name_in_use", "stream {!r} is live from {} (another edge with the same --name?): give "
                            "each edge its own --name".format(stream, live.where)), None
                evicted = live
                evicted.evicted = True
            key = (stream, session_id)
            session = self._sessions.pop(key, None)
            new_session = session is None
            if new_session:
                session = Session(stream, session_id, self.out)
            self._sessions[key] = session  # most recently used last
            while len(self._sessions) > REMEMBERED_SESSIONS:
                self._sessions.popitem(last=False)
            stats = self._stream_stats(stream)
            stats.connections += 1
            if new_session:
                stats.sessions += 1
            stats.ended = False
            session.connection = me
            me.session = session
            self._live[stream] = me
        return None, evicted

    def _stream_stats(self, name):
        """Under the lock: the StreamStats of stream ``name`` (which is connecting), created if new. At most
        ``max_stream_stats`` are kept: a new one makes room by forgetting the oldest ended stream, else the oldest
        not connected; connected streams (at most ``max_connections``) are always kept."""
        stats = self.streams.get(name)
        if stats is not None:
            self.streams.move_to_end(name)
            return stats
        if len(self.streams) >= self.max_stream_stats:
            old = next((s for s in self.streams.values() if s.ended), None) or next(
                (s for s in self.streams.values() if s.name not in self._live), None)
            if old is not None:
                del self.streams[old.name]
                self.forgotten.absorb(old)
                self.forgotten_streams += 1
        stats = self.streams[name] = StreamStats(name)
        return stats

    def _check_v2_meta(self, meta, hello, where, names, me):
        if meta.stream != hello["stream"]:
            raise ProtocolError("a frame of stream {!r} on a connection of stream {!r}".format(
                meta.stream, hello["stream"]))
        if meta.packing != hello["packing"] or meta.entropy != hello["entropy"]:
            raise ProtocolError("a frame packed {} / {} on a connection that said {} / {} in its HELLO".format(
                meta.packing, meta.entropy, hello["packing"], hello["entropy"]))
        self._check_meta(meta, where, names, me, me.session)

    def _receive_v2_frame(self, me, meta, payload, timer, t_recv):
        """A protocol-2 frame: acknowledged at once if its session already handled it, joined to its job if it is
        in flight (a resend after a reconnect), else handed to the pipeline (acknowledged after its write)."""
        session = me.session
        with timer.stage("deserialize"):
            # decompressed first if entropy-coded (bounded: edge/entropy.py, edge/context_model.py); a gateway
            # forwards the payload as received (its workers decode it, with the same bounded functions)
            latents = self._decode_payload(meta, payload)
        new = None
        with session.lock:
            if me.evicted:
                raise ConnectionClosed("replaced by a reconnect of the same session")
            known = session.outcomes.get(meta.seq)
            job = session.in_flight.get(meta.seq) if known is None else None
            if job is not None:
                job.waiters.append(me)  # acknowledged here when that job is done
            elif known is None:
                new = session.in_flight[meta.seq] = _Job(me, meta, latents, timer, session.offset_s, t_recv, ack=True)
        if new is not None:
            # Outside the session's lock: the queue may be full, and the write stage takes that lock.
            if not self._submit(new):
                raise ConnectionClosed("the host is stopping")  # not acknowledged: the edge resends it
            return
        with self._lock:
            self.streams[meta.stream].duplicates += 1
        if known is not None:
            self._send_on(me, encode_message(KIND_ACK, seq=meta.seq, outcome=known, duplicate=True, t_recv=t_recv,
                                             t_done=time.time(), t_ack=time.time()))

    def _decode_payload(self, meta, payload):
        """A frame's latents from its payload, undoing its entropy coding (bounded: edge/entropy.py,
        edge/context_model.py), or a lossless frame's image (edge/lossless.py). A gateway forwards the payload as
        received (its workers decode it, with the same bounded functions). Lossless decoding needs about 30 bytes of
        memory per byte of image for seconds, so at most :data:`LOSSLESS_DECODES` frames decode at once, whatever
        the number of connections: the others wait their turn (their edges' windows fill)."""
        if self.forward is not None:
            return payload
        if meta.packing != "lossless":
            return decode_latents(meta, payload, self._context_model(meta))
        with self._lossless_slots:
            return decode_latents(meta, payload)

    def _context_model(self, meta):
        """The decoder's entropy tables for a context-coded frame (None for others); a host without them refuses
        the frame (protocol 2 refused the HELLO already)."""
        if meta.entropy != "context":
            return None
        try:
            if meta.iterations is not None and hasattr(self.decoder, "context_model"):
                return self.decoder.context_model(meta.iterations)  # a progressive model's first k iterations'
            return self.decoder.info.context_model()
        except ConfigError as exc:
            raise ProtocolError("a context-coded frame, and this host cannot decode it: {}".format(exc))

    def _receive_frame(self, me, meta, payload, timer):
        """A protocol-1 frame or a raw pickle: to the pipeline, without acknowledgement."""
        with timer.stage("deserialize"):
            latents = self._decode_payload(meta, payload)
        if not self._submit(_Job(me, meta, latents, timer)):
            raise ConnectionClosed("the host is stopping")

    def _write(self, job):
        """Write and record one decoded frame; returns ``(outcome, reason)``: "decoded" or "failed"."""
        meta, timer = job.meta, job.timer
        stats = self.streams[meta.stream]
        latency = None if meta.t_capture is None else latency_ms(time.time() - job.offset_s, meta.t_capture)
        with timer.stage("write"):
            # a tiled model's tiles are joined here; a lossless frame is the image already (BGR uint8)
            frame = decoded_frame(meta, job.output, job.latents, self.decoder.info.tiles, latency, timer.stages)
            if self.display:
                self._latest[meta.stream] = frame.image
            for output in self.outputs:
                try:
                    output.write(frame)
                except OutputError as exc:
                    with self._lock:
                        self.write_errors += 1
                    log.error("%s", exc)
                    return "failed", "write error on the host (its log names the output and why)"  # no host paths
        now = time.perf_counter()
        record = timer.record()
        record.update(stream=meta.stream, bytes=FIXED_HEADER.size + meta.meta_len + meta.payload_len,
                      batch=job.batch)
        if meta.iterations is not None:  # a progressive model's frame: the codes it carried
            record["iterations"] = meta.iterations
        # The host's clock read on the edge's; raw pickles carry no capture time.
        record["latency_ms"] = latency  # null: no capture time, or one too far from this host's clock
        with self._lock:
            if latency is None and meta.t_capture is not None:
                if not stats.untimed:  # one line per stream, not one per frame
                    log.warning("%s: stream %r: frame %d was captured at %r (UNIX seconds, edge clock), more than "
                                "a day ago or in the future on this host's clock: decoded, but no latency is "
                                "recorded for such frames (is the edge's clock set?)", job.me.where, meta.stream,
                                meta.seq, meta.t_capture)
                stats.untimed += 1
            if latency is not None:
                self._latencies.append(latency)
            stats.frames += 1
            self._frames.add(record)
            self._first_frame_at = self._first_frame_at or now
            self._last_frame_at = now
            if self.max_frames and self._frames.frames >= self.max_frames:
                self._stop.set()
        for listener in self._record_listeners:  # outside the lock: a report write must not hold up others
            listener(record)
        return "decoded", ""

    def _show(self):
        if not self.display or not self._latest:
            return
        for name, image in list(self._latest.items()):
            cv2.imshow("latentlink: " + name, image)
        cv2.waitKey(1)

    def add_record_listener(self, listener):
        """Call ``listener(record)`` with each decoded frame's record (a dict: ``seq``, ``stream``, ``bytes``,
        ``latency_ms``, ``stages`` in ms, ...), like ``on_record``; add listeners before :meth:`serve`."""
        self._record_listeners.append(listener)

    # Results.
    def snapshot(self):
        """The host's live state for metrics and progress lines, cheap to call every second: a dict with
        ``streams`` (name -> {"decoded", "failed", "gaps", "duplicates", "connected"}), ``frames`` (decoded in
        all), ``failed``, ``protocol_errors``, ``write_errors``, ``refused_connections``, ``timeouts``,
        ``refused_streams`` (edges refused at the handshake), ``dropped_on_stop`` (frames dropped unacknowledged
        as the host stopped), ``queue_depth`` and ``queue_capacity`` (frames waiting to be decoded, and the most that
        may), and ``batches`` (batch size -> batches decoded)."""
        with self._lock:
            streams = {name: {"decoded": s.frames, "failed": s.failed, "gaps": s.gaps, "duplicates": s.duplicates,
                              "connected": name in self._live} for name, s in self.streams.items()}
            return {"streams": streams, "frames": self._frames.frames,
                    "failed": self.forgotten.failed + sum(s.failed for s in self.streams.values()),
                    "protocol_errors": self.protocol_errors, "write_errors": self.write_errors,
                    "refused_connections": self.refused_connections, "refused_streams": self.refused_streams,
                    "timeouts": self.timeouts, "dropped_on_stop": self.dropped_on_stop,
                    "queue_depth": self._decode_queue.qsize(), "queue_capacity": self.queue_size,
                    "batches": dict(self._batches)}

    def _log_progress(self):
        """Every ``progress_s`` while frames flow: one INFO line with each stream's frames/s, the latency (median
        and worst since the last line, ms), the backlog (frames waiting to be decoded) and the batches' mean size."""
        if not self.progress_s:
            return
        now = time.monotonic()
        if self._progress is None:
            self._progress = (now, {}, 0, 0)
            return
        last_at, last, last_batches, last_framesb = self._progress
        if now - last_at < self.progress_s:
            return
        snap = self.snapshot()
        decoded = {name: s["decoded"] for name, s in snap["streams"].items()}
        batches = sum(snap["batches"].values())
        framesb = sum(size * n for size, n in snap["batches"].items())
        with self._lock:
            latencies = list(self._latencies)
            self._latencies.clear()
        self._progress = (now, decoded, batches, framesb)
        rates = ["{} {:.1f}".format(name, (n - last.get(name, 0)) / (now - last_at))
                 for name, n in sorted(decoded.items()) if n > last.get(name, 0)]
        if not rates and not snap["queue_depth"]:
            return  # nothing flowed: no line
        latency = "latency {:.0f} ms median, {:.0f} ms worst".format(statistics.median(latencies),
                                                                     max(latencies)) if latencies else "latency -"
        mean_batch = (framesb - last_framesb) / float(batches - last_batches) if batches > last_batches else 0.0
        log.info("progress: frames/s %s; %s; backlog %d/%d frames; batch %.1f frames; %d decoded, %d failed in all",
                 ", ".join(rates) or "-", latency, snap["queue_depth"], snap["queue_capacity"], mean_batch,
                 snap["frames"], snap["failed"])

    def summary(self):
        """The run's summary (a dict, see :func:`~latentlink.edge.profiler.summarize`) with the host's counts:
        ``failed``, ``protocol_errors``, ``write_errors``, ``streams`` (per stream) and, once streams were forgotten
        (``max_stream_stats``), ``forgotten_streams``: their number and summed counts."""
        notes = {"receive": "from a frame's first bytes to its last; idle time between frames is not counted",
                 "write": "PNG encoding and saving (plus the conversion to an image)" if self.out_dir else
                 "conversion to an image only (no --out)"}
        with self._lock:
            frames = self._frames.frames
            wall_s = (self._last_frame_at - self._first_frame_at) if self._first_frame_at else 0.0
            # fps over the span from the first frame to the last: n frames make n-1 intervals.
            per_frame_wall = wall_s * frames / max(1, frames - 1)
            streams = {name: s.as_dict() for name, s in sorted(self.streams.items())}
            gaps = self.forgotten.gaps + sum(s.gaps for s in self.streams.values())
            failed = self.forgotten.failed + sum(s.failed for s in self.streams.values())
            extra = {"failed": failed, "protocol_errors": self.protocol_errors, "write_errors": self.write_errors,
                     "refused_connections": self.refused_connections, "refused_streams": self.refused_streams,
                     "timeouts": self.timeouts, "dropped_on_stop": self.dropped_on_stop,
                     "batches": {str(size): n for size, n in sorted(self._batches.items())},  # JSON keys
                     "streams": streams}
            if self.forgotten_streams:
                forgotten = self.forgotten.as_dict()
                for key in ("ended", "last_seq"):
                    del forgotten[key]
                extra["forgotten_streams"] = dict(streams=self.forgotten_streams, **forgotten)
            extra["notes"] = notes
            return self._frames.summary(per_frame_wall, dropped=gaps, extra=extra)


def _check_lossless_hello(hello):
    """A lossless stream (``--lossless``) needs no model: its frames are images, whatever this host decodes. Only
    the predictor must be the edge's (its HELLO's model_id; for ``mlp``, the hash of the weights)."""
    predictor = (hello["model_id"] or "").partition("lossless-")[2].partition("-")[0]
    if predictor not in LOSSLESS_PREDICTORS or hello["entropy"] != "none":
        return "bad_hello", "a lossless stream with predictor {!r} and entropy {!r} (this host knows {})".format(
            hello["model_id"], hello["entropy"], ", ".join("lossless-" + p for p in LOSSLESS_PREDICTORS))
    try:
        identity = lossless_codec(predictor).identity
    except ConfigError as exc:
        return "entropy_unavailable", "this host cannot decode --lossless {}: {}".format(predictor, exc)
    if hello["model_id"] != identity:
        return "model_mismatch", ("the edge predicts with {} and this host with {} (the weights in "
                                  "edge/lossless_mlp.json differ: give both the same latentlink version)".format(
                                      hello["model_id"], identity))
    return None


def latents_problem(decoder, meta):
    """Why a frame's latents do not fit ``decoder`` (None if they do; the host and the fleet's workers ask). A
    progressive decoder (edge/rate.py) takes 1 to K codes of its code shape, with the frame's ``iterations`` saying
    how many; others their one input shape, and no ``iterations``."""
    progressive = getattr(decoder, "progressive", None)
    if progressive is None:
        if meta.iterations is not None:
            return ("a progressive model's frame ({} iterations), and this host's decoder is not progressive: run "
                    "the host with the edge's profile or decoder".format(meta.iterations))
        if tuple(meta.shape) != tuple(decoder.input_shape):
            return ("latents of shape {} do not fit the decoder's input {}: run the host with the edge's profile "
                    "or decoder".format(list(meta.shape), list(decoder.input_shape)))
        return None
    if meta.iterations is None:
        return ("a frame without iterations, and this host's decoder is progressive ({} iterations of codes {}): "
                "run the host with the edge's profile or decoder".format(progressive["iterations"],
                                                                        progressive["code_shape"]))
    if meta.iterations > progressive["iterations"] or list(meta.shape[1:]) != progressive["code_shape"]:
        return ("{} iterations of codes {} do not fit the decoder's {} iterations of {}".format(
            meta.iterations, list(meta.shape[1:]), progressive["iterations"], progressive["code_shape"]))
    return None


def _progressive_text(progressive):
    """A HELLO's or a decoder's ``progressive`` in words."""
    if progressive is None:
        return "not progressive"
    return "progressive ({} iterations of codes {})".format(progressive["iterations"], progressive["code_shape"])


def _shutdown(sock, how=socket.SHUT_RDWR):
    """Shut ``sock`` down from another thread than its own. The TCP socket's shutdown, also for a TLS socket: the
    thread using it then reads end-of-stream, and its SSL object is left alone (``SSLSocket.shutdown`` would take it
    away mid-call). ``how`` SHUT_RD: only the reading side (acknowledgements can still be sent)."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _peer_gone(sock):
    """True when the peer of ``sock`` has closed its side (TCP CLOSE_WAIT or CLOSE): a dead edge's connection the
    host has not noticed yet, because its thread is still busy with the backlog. False where the OS does not say."""
    if not hasattr(socket, "TCP_INFO"):
        return False
    try:
        state = bytearray(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except OSError:
        return True  # the socket is already closed
    return state in (7, 8)  # TCP_CLOSE, TCP_CLOSE_WAIT (linux/tcp_states.h)


def _refuse_and_close(sock, reason, message, permanent, linger=False):
    """Answer a connection with REFUSE without reading it (a protocol-1 edge never reads it), then close it;
    ``linger``: wait (up to a second) for the edge to read it first."""
    try:
        sock.settimeout(1.0)
        sock.sendall(encode_message(KIND_REFUSE, reason=reason, message=message, permanent=permanent))
    except OSError:
        pass
    if linger:
        linger_close(sock)
    else:
        sock.close()


def check_display():
    """Raise ConfigError unless this OpenCV can open windows (opencv-python-headless cannot)."""
    try:
        cv2.namedWindow("latentlink")
        cv2.destroyWindow("latentlink")
    except cv2.error:
        raise ConfigError("--display needs an OpenCV with GUI support, and this one has none (the [host] extra "
                          "installs opencv-python-headless): pip install opencv-python, or save frames with --out")
