"""The fleet's broker: NATS JetStream between a gateway (``latentlink host --jetstream``) and decode workers
(``latentlink worker``).

One JetStream *stream* (:data:`STREAM`) holds the frames: file storage, work-queue retention (a message is removed
once a worker acknowledged it), limits on age and bytes, and a duplicate window. Each edge stream (camera) has its own
subject, ``latentlink.frames.<stream>`` (:func:`subject`). A message is one frame as a protocol-2 FRAME message
(header + metadata + payload: :func:`frame_message`, parsed again by the worker with the bounded functions of
``latentlink.edge.protocol``: :func:`parse_frame_message`), with headers:

==========================  ========================================================================================
``Nats-Msg-Id``             ``<stream>/<session>/<seq>``: JetStream drops a second publish of it within the duplicate
                            window (a gateway restarted, the edge resending what it had in flight)
``Latentlink-Session``      the edge's session (hex; ``p1`` + hex for protocol-1 connections)
``Latentlink-Offset``       the gateway's clock minus the edge's, seconds (the edge's CLOCK estimate)
``Latentlink-Received``     when the gateway received the frame (UNIX seconds, its clock)
==========================  ========================================================================================

Workers mark each frame they write in a JetStream key-value bucket (:data:`MARKS`), key
``<stream>.<session>.<seq>`` (:func:`mark_key`): ``claimed <worker>`` before the write, ``written`` after it, each by
an atomic create or compare-and-set on the key's revision. So a frame redelivered after a worker died, or published
twice, is written at most once more in the one case nobody can tell apart (a worker killed after its write and before
its mark: the frame is written again, the PNG replaced by the same file), and never counted twice.

asyncio is nats-py's model; the host is threads. :class:`Broker` runs one event loop in a thread and lets the host's
threads call into it (:meth:`Broker.call`).
"""

import asyncio
import logging
import math
import threading
import time

from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.protocol import (FIXED_HEADER, KIND_FRAME, MAX_CLOCK_OFFSET_S, VERSION_2, parse_header,
                                      parse_meta, reframe)

log = logging.getLogger("latentlink.fleet")

STREAM = "LATENTLINK"  # the JetStream stream's name
SUBJECT_PREFIX = "latentlink.frames."
CONSUMER = "workers"  # the durable pull consumer every worker shares
MARKS = "latentlink_marks"  # the key-value bucket of claimed and written frames
DEFAULT_MAX_AGE_S = 24 * 3600.0  # a frame older than a day is dropped by the broker (--jetstream-max-age)
DEFAULT_MAX_BYTES = 10 << 30  # 10 GiB of frames at most: 20 minutes of 1,500 frames/s at 7.5 KB (--jetstream-max-bytes)
DUPLICATE_WINDOW_S = 120.0  # JetStream's default: a republished Nats-Msg-Id within 2 minutes is dropped
DEFAULT_MARKS_TTL_S = 900.0  # how long a written mark is kept (must outlive redeliveries: many ack-waits)


def token(stream):
    """A stream name as one subject token or key part: dots (allowed in stream names, separators in NATS) become
    ``=`` (never in a stream name, so two streams never share a token)."""
    return stream.replace(".", "=")


def subject(stream):
    """The subject of an edge stream's frames."""
    return SUBJECT_PREFIX + token(stream)


def mark_key(stream, session, seq):
    return "{}.{}.{}".format(token(stream), session, seq)


def msg_id(stream, session, seq):
    return "{}/{}/{}".format(stream, session, seq)


def frame_message(meta, payload):
    """The bytes of a protocol-2 FRAME message carrying ``payload`` with metadata ``meta`` (a validated
    ``FrameMeta``): byte for byte what this project's edges send (edge/protocol.py's ``reframe``: a progressive
    model's ``iterations`` too; unknown extra keys an edge may add are not kept)."""
    return reframe(meta, payload)


def parse_frame_message(data, max_payload_bytes):
    """``(FrameMeta, payload)`` of a message's bytes; anything but one whole FRAME message, within the limits, is a
    ProtocolError (the bytes come from the broker, which anyone who may publish to it can fill)."""
    if len(data) < FIXED_HEADER.size:
        raise ProtocolError("a message of {} bytes is no latentlink frame".format(len(data)))
    view = memoryview(data)
    _, kind, meta_len = parse_header(view[:FIXED_HEADER.size], (VERSION_2,))
    if kind != KIND_FRAME:
        raise ProtocolError("a protocol-2 message of kind {}, not FRAME".format(kind))
    end = FIXED_HEADER.size + meta_len
    if len(data) < end:
        raise ProtocolError("a message of {} bytes announces {} bytes of metadata".format(len(data), meta_len))
    meta = parse_meta(view[FIXED_HEADER.size:end], 0, max_payload_bytes)
    if len(data) != end + meta.payload_len:
        raise ProtocolError("a message of {} bytes, and its metadata says {}".format(
            len(data), end + meta.payload_len))
    return meta, bytes(view[end:])


def parse_headers(headers):
    """``(session, offset_s, t_recv)`` from a message's headers, checked: a session of 1 to 66 characters from
    ``0-9a-fp`` (hex, ``p1`` prefix), a clock offset within MAX_CLOCK_OFFSET_S, a finite receive time."""
    headers = headers or {}
    session = headers.get("Latentlink-Session", "")
    if not 1 <= len(session) <= 66 or session.strip("0123456789abcdefp"):
        raise ProtocolError("bad Latentlink-Session header {!r}".format(session[:80]))
    try:
        offset_s = float(headers.get("Latentlink-Offset", "0"))
        t_recv = float(headers.get("Latentlink-Received", "0"))
    except ValueError:
        raise ProtocolError("bad Latentlink-Offset or Latentlink-Received header")
    if not (math.isfinite(offset_s) and abs(offset_s) <= MAX_CLOCK_OFFSET_S and math.isfinite(t_recv)):
        raise ProtocolError("Latentlink-Offset {!r} or Latentlink-Received {!r} out of range".format(offset_s,
                                                                                                    t_recv))
    return session, offset_s, t_recv


def _nats():
    """The nats-py package, or a ConfigError that says how to install it."""
    try:
        import nats
    except ImportError:
        raise ConfigError("--jetstream needs the nats-py package: pip install nats-py (the [fleet] extra installs "
                          "it)")
    return nats


def check_url(url):
    """ConfigError unless ``url`` looks like a NATS server URL (nats://HOST:PORT, tls://HOST:PORT)."""
    if not isinstance(url, str) or "://" not in url or url.split("://", 1)[0] not in ("nats", "tls"):
        raise ConfigError("bad --jetstream {!r}: give the NATS server as nats://HOST:PORT, e.g. "
                          "nats://127.0.0.1:4222".format(url))
    return url


class Broker(object):
    """A NATS connection on its own event loop thread, for threaded code: :meth:`call` runs a coroutine there and
    waits for its result. ``url``: nats://HOST:PORT. Reconnects for ever (a broker restarted is found again);
    ``connect_timeout_s`` bounds the first connection only."""

    def __init__(self, url, name="latentlink", connect_timeout_s=10.0):
        self.url, self.name = check_url(url), name
        self.nc = self.js = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="latentlink-nats")
        self._thread.start()
        try:
            self.call(self._connect(connect_timeout_s), connect_timeout_s + 5)
        except BaseException:
            self.close()
            raise

    async def _connect(self, timeout_s):
        self.nc = await connect(self.url, self.name, timeout_s)
        self.js = self.nc.jetstream()

    def call(self, coro, timeout=None):
        """Run ``coro`` on the broker's loop; its result (or exception) here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        if self.nc is not None:
            try:
                self.call(self.nc.close(), 10)
            except Exception as exc:  # closing must not hide what made the caller stop
                log.debug("closing the NATS connection: %s", exc)
            self.nc = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def connect(url, name, timeout_s=10.0):
    """A NATS connection that reconnects for ever (every 0.5 s) and says so in the log."""
    nats = _nats()
    held = []  # the connection, once made: a disconnection of our own close() is no news

    async def disconnected():
        if held and not (held[0].is_closed or held[0].is_draining or getattr(held[0], "_closing", False)):
            log.warning("lost the connection to the NATS server %s; reconnecting", url)

    async def reconnected():
        log.info("reconnected to the NATS server %s", url)

    async def error(exc):
        log.debug("NATS: %s", exc)

    try:
        nc = await nats.connect(url, name=name, connect_timeout=timeout_s, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, allow_reconnect=True, disconnected_cb=disconnected,
                                reconnected_cb=reconnected, error_cb=error)
        held.append(nc)
        return nc
    except Exception as exc:  # nats-py raises its own errors, and OSError, for an unreachable server
        raise ConfigError("cannot connect to the NATS server at {} ({}): is nats-server running there with "
                          "JetStream on (nats-server -js)?".format(url, exc or type(exc).__name__))


async def ensure_stream(js, max_age_s=None, max_bytes=None):
    """Create the frames' stream if missing (work-queue retention, file storage, the duplicate window), or update
    its limits when given (None: keep the existing ones, or the defaults for a new stream)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        info = None
    if info is not None:
        config = info.config
        if (max_age_s is None or config.max_age == max_age_s) and (max_bytes is None or config.max_bytes == max_bytes):
            return info
        config.max_age = max_age_s if max_age_s is not None else config.max_age
        config.max_bytes = max_bytes if max_bytes is not None else config.max_bytes
        log.info("JetStream stream %s: limits now %.0f s, %d bytes", STREAM, config.max_age, config.max_bytes)
        return await js.update_stream(config)
    config = StreamConfig(name=STREAM, subjects=[SUBJECT_PREFIX + ">"], retention=RetentionPolicy.WORK_QUEUE,
                          storage=StorageType.FILE, discard=DiscardPolicy.NEW, duplicate_window=DUPLICATE_WINDOW_S,
                          max_age=DEFAULT_MAX_AGE_S if max_age_s is None else max_age_s,
                          max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
                          description="latentlink frames: gateway -> decode workers")
    log.info("JetStream stream %s created (subjects %s>, file storage, work queue, at most %.0f s and %d bytes)",
             STREAM, SUBJECT_PREFIX, config.max_age, config.max_bytes)
    return await js.add_stream(config)


def parse_duration(text):
    """``--jetstream-max-age`` and similar: seconds, or with a unit: ``90s``, ``30m``, ``12h``, ``7d``."""
    import argparse

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = str(text).strip()
    factor = units.get(text[-1:], None)
    try:
        value = float(text[:-1] if factor else text) * (factor or 1)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("bad duration {!r}: seconds, or a number with s, m, h or d (e.g. 24h)"
                                         .format(text))
    return value


def parse_bytes(text):
    """``--jetstream-max-bytes``: bytes, or with a unit: ``500MB``, ``10GB``, ``1TB`` (powers of 1024)."""
    import argparse

    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    text = str(text).strip().upper()
    factor = next((f for u, f in units.items() if text.endswith(u)), 1)
    try:
        value = int(float(text[:-2] if factor > 1 else text) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError("bad size {!r}: bytes, or a number with KB, MB, GB or TB (e.g. 10GB)"
                                         .format(text))
    return value


class Forwarder(object):
    """The gateway's forward step (``Host(forward=...)``): publish a batch of received frames to JetStream and wait
    for the broker's acknowledgements (each frame stored in the stream's file store).

    :meth:`forward` sets each job's ``outcome``: "stored" once JetStream acknowledged it (a duplicate the broker
    dropped counts: it is stored already), "failed" for a frame the broker refuses for good (larger than its
    max_payload), or "dropped" when the host stops while the broker is unreachable (not acknowledged to the edge,
    which resends it). While the broker is down the step retries, so the host's queue fills and the edges' windows
    hold them back: backpressure, nothing lost. Counts per stream for the metrics: :attr:`stored`,
    :attr:`duplicates`; :attr:`retries` publishes retried, :attr:`failed`.
    """

    def __init__(self, url, max_age_s=None, max_bytes=None, publish_timeout_s=5.0, give_up_s=10.0):
        self.broker = Broker(url, name="latentlink-gateway")
        self.publish_timeout_s, self.give_up_s = publish_timeout_s, give_up_s
        info = self.broker.call(ensure_stream(self.broker.js, max_age_s, max_bytes), 30)
        self.max_payload = self.broker.nc.max_payload
        self.stored, self.duplicates = {}, {}
        self.retries = self.failed = 0
        self._lock = threading.Lock()
        self._sessions = {}  # protocol-1 connection -> its made-up session
        log.info("gateway: frames go to JetStream stream %s on %s (%d messages there now); the broker takes messages "
                 "of at most %d bytes", STREAM, url, info.state.messages, self.max_payload)

    def close(self):
        self.broker.close()

    def _session(self, job):
        session = job.me.session
        if session is not None:
            return session.id
        with self._lock:  # protocol 1: no session; one made up per connection, so that numbers never collide
            made = self._sessions.get(job.me)
            if made is None:
                import os

                made = self._sessions[job.me] = "p1" + os.urandom(8).hex()
                if len(self._sessions) > 4096:
                    self._sessions.pop(next(iter(self._sessions)))
            return made

    def forward(self, jobs, stopping, aborting):
        """Publish ``jobs`` (host _Job objects: ``meta``, the raw payload in ``latents``, ``t_recv``, ``offset_s``);
        ``stopping()`` / ``aborting()`` say whether the host stops (then a broker outage is not waited out for
        long) or aborts (not waited out at all)."""
        items = []
        for job in jobs:
            meta, session = job.meta, self._session(job)
            data = frame_message(meta, job.latents)
            if len(data) > self.max_payload:
                job.outcome, job.reason = "failed", ("the frame of {} bytes is larger than the broker's max_payload "
                                                     "({} bytes): raise it in nats-server's configuration".format(
                                                         len(data), self.max_payload))
                log.error("stream %r frame %d: %s", meta.stream, meta.seq, job.reason)
                with self._lock:
                    self.failed += 1
                continue
            headers = {"Nats-Msg-Id": msg_id(meta.stream, session, meta.seq), "Latentlink-Session": session,
                       "Latentlink-Offset": repr(float(job.offset_s)),
                       "Latentlink-Received": repr(float(job.t_recv or time.time()))}
            items.append((job, subject(meta.stream), data, headers))
        since = None
        while items:
            results = self.broker.call(self._publish_all(items), self.publish_timeout_s * 2 + 5)
            left = []
            for item, result in zip(items, results):
                job = item[0]
                if isinstance(result, BaseException):
                    left.append(item)
                    continue
                job.outcome = "stored"
                with self._lock:
                    self.stored[job.meta.stream] = self.stored.get(job.meta.stream, 0) + 1
                    if result.duplicate:
                        self.duplicates[job.meta.stream] = self.duplicates.get(job.meta.stream, 0) + 1
            if not left:
                break
            now = time.monotonic()
            if since is None:
                since = now
                log.warning("JetStream did not take %d frames (%s); retrying until it does (the edges wait)",
                            len(left), next(r for r in results if isinstance(r, BaseException)) or "timeout")
            if aborting() or (stopping() and now - since > self.give_up_s):
                for job, _, _, _ in left:
                    job.outcome = "dropped"
                log.warning("stopping: %d frames not stored (the broker did not answer); not acknowledged, so the "
                            "edges resend them", len(left))
                break
            with self._lock:
                self.retries += len(left)
            items = left
            time.sleep(0.25)

    async def _publish_all(self, items):
        js, timeout = self.broker.js, self.publish_timeout_s
        return await asyncio.gather(*[js.publish(subj, data, timeout=timeout, stream=STREAM, headers=headers)
                                      for _, subj, data, headers in items], return_exceptions=True)

    def snapshot(self):
        with self._lock:
            return {"stored": dict(self.stored), "duplicates": dict(self.duplicates), "retries": self.retries,
                    "failed": self.failed}
