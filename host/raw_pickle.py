"""Length-prefixed pickles from plain-socket clients: ``latentlink host --accept-pickle-raw``.

The seed pipeline's users send latents with ten lines of their own: for each frame, an 8-byte big-endian length,
then ``pickle.dumps(latents)``, on a plain TCP connection, with no latentlink framing, handshake, acknowledgements or
end-of-stream message. :meth:`Host._serve_connection <latentlink.host.server.Host._serve_connection>` hands this
module every connection whose first 8 bytes are not latentlink's magic (``LLNK``).

Without ``--accept-pickle-raw`` such a connection is refused: closed with a log line that says what it looks like,
and counted as a protocol error. With it, the first 8 bytes must be a plausible length (1 to ``--max-frame-bytes``),
and each pickle is parsed by :func:`latentlink.edge.safe_pickle.loads_ndarray`, never by an unpickler, against the
decoder's latent shape (``decoder.input_shape``, batch dimension included) and the dtypes in :data:`DTYPES`, tried
in that order: the wire's float32, float16 and uint8, which latentlink's packings carry (a pickle of another dtype
is refused; ``latents.astype(np.float32)`` before pickling fixes it). Pickle protocols 2 to 5 are accepted, in
either byte order, C or Fortran layout (what ``loads_ndarray`` reads). Each frame then goes through the host's
pipeline (decode queue, batches, write stage) like any other (``OUT/<stream>/<seq:06d>.png``) and is recorded
in the host's report, with ``latency_ms`` null: these frames carry no capture time. Their ``deserialize`` stage
holds two parses: the one here that finds the dtype, and the host's own when it decodes the frame (each linear in
the pickle's length, and small beside ``decode``).

The stream is ``raw-<peer ip>-<peer port>`` (``:`` of an IPv6 address becomes ``-``), or ``--raw-stream-name``;
frames are numbered from 0 on each connection; closing the connection between two pickles ends the stream (counted
by ``--max-streams``); closing it midway, a bad length or a pickle refused by the parser closes the connection as a
bad frame. A stream name is live on one connection at a time, as for latentlink edges.
"""

import logging
import re
import time

from latentlink.edge.errors import ConfigError, ConnectionClosed, ProtocolError
from latentlink.edge.profiler import FrameTimer
from latentlink.edge.protocol import RAW_LENGTH, FrameMeta, _check_stream, recv_exactly, wait_header_bytes
from latentlink.edge.safe_pickle import loads_ndarray

log = logging.getLogger("latentlink.host")

DTYPES = ("float32", "float16", "uint8")  # tried in this order; loads_ndarray needs the dtype it checks against


def check_stream_name(name):
    """``--raw-stream-name``: a valid stream name (it becomes a folder), else ConfigError."""
    _check_stream(name, ConfigError)
    return name


def stream_name(peer):
    """``raw-<ip>-<port>`` for a peer address, in the characters a stream name may use."""
    return ("raw-" + re.sub(r"[^A-Za-z0-9._-]", "-", "{}-{}".format(peer[0], peer[1])))[:64]


def load_latents(payload, shape):
    """The latent array a raw pickle holds, as ``(array, dtype)``; ProtocolError if no accepted dtype fits."""
    errors = []
    for dtype in DTYPES:
        try:
            return loads_ndarray(payload, dtype, shape), dtype
        except ProtocolError as exc:
            errors.append("as {}: {}".format(dtype, exc))
    raise ProtocolError("a raw pickle that is not a {} array of shape {} (pickle protocols 2-5) was refused; {}".format(
        ", ".join(DTYPES[:-1]) + " or " + DTYPES[-1], list(shape), "; ".join(errors)))


def serve_raw_pickles(host, me, names, header):
    """Serve one connection of length-prefixed pickles whose first 8 bytes, ``header``, were already read.

    ``host``: the :class:`~latentlink.host.server.Host`; ``me``: its connection record; ``names``: the list its
    caller frees the live stream name from. Returns at the end of the stream; raises ProtocolError for anything
    that ends the connection early (a refused connection included).
    """
    conn, where = me.sock, me.where
    length = RAW_LENGTH.unpack(bytes(header))[0]
    plausible = 0 < length <= host.max_frame_bytes
    if not host.accept_pickle_raw:
        raise ProtocolError("bad magic {!r} (expected b'LLNK': is this a latentlink edge?){}".format(
            bytes(header[:4]), "; it reads as the 8-byte length of a {}-byte message, as a plain-socket client of "
            "the seed pipeline sends before each pickle: start the host with --accept-pickle-raw to accept "
            "those".format(length) if plausible else ""))
    if not plausible:
        raise ProtocolError("neither a latentlink frame (magic {!r}, expected b'LLNK') nor a length-prefixed pickle "
                            "(length {} is not 1 to --max-frame-bytes {})".format(bytes(header[:4]), length,
                                                                                   host.max_frame_bytes))
    stream = host.raw_stream_name or stream_name(conn.getpeername())
    _take_stream(host, me, names, stream)
    log.info("%s: stream %r connected: length-prefixed pickles (--accept-pickle-raw), parsed without an unpickler; "
             "no handshake, no acknowledgements", where, stream)
    shape = tuple(int(d) for d in host.decoder.input_shape)
    seq = 0
    while not host._stop.is_set():
        if header is None:
            try:  # the idle wait is a total, and a started prefix must arrive whole in time (no trickling)
                header, _ = wait_header_bytes(conn, time.monotonic() + host.idle_timeout_s, host.frame_timeout_s)
            except ConnectionClosed:
                if not host._stop.is_set():
                    host._wait_idle(me)  # its frames accounted first
                    host._end_stream(stream, seq, where)  # a plain client ends its stream by closing
                return
            length = RAW_LENGTH.unpack(bytes(header))[0]
            if not 0 < length <= host.max_frame_bytes:
                raise ProtocolError("raw pickle {} of stream {!r}: length {} is not 1 to --max-frame-bytes {}".format(
                    seq, stream, length, host.max_frame_bytes))
        started = time.perf_counter()
        payload = recv_exactly(conn, length, "pickle", deadline=time.monotonic() + host.frame_timeout_s)
        timer = FrameTimer(seq)
        timer.add("receive", (time.perf_counter() - started) * 1000.0)
        with timer.stage("deserialize"):  # which dtype: the host's own decode_latents parses it once more, below
            _, dtype = load_latents(payload, shape)
        meta = FrameMeta(stream, seq, None, dtype, shape, "pickle", len(payload), 0, 0, "none")
        host._receive_frame(me, meta, payload, timer)  # decoded and written by the host's pipeline
        seq += 1
        header = None


def _take_stream(host, me, names, stream):
    """Make ``stream`` live on this connection, as a protocol-1 edge's first frame does."""
    from .server import StreamStats

    with host._lock:
        if stream in host._live:
            raise ProtocolError("stream {!r} is already connected from {}; give each plain client its own "
                                "connection name (or leave --raw-stream-name out)".format(stream,
                                                                                          host._live[stream].where))
        host._live[stream] = me
        stats = host.streams.setdefault(stream, StreamStats(stream))
        stats.connections += 1
        stats.ended = False
    names.append(stream)
