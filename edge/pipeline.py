"""The edge loop: capture -> preprocess -> encode -> (gpu_to_cpu) -> serialize -> (entropy) -> queue -> send, timed
per frame.

``serialize`` is packing and framing; ``entropy`` the optional lossless coding of the packed payload (timed apart:
it runs on the Nano's CPU), or with ``--entropy context`` the coding of the latents themselves with the model's
tables (edge/context_model.py), which replaces packing. All but ``send`` run in the calling thread; ``send`` runs in the :class:`Sender`'s
thread, so a slow network or host costs queue space (and, by policy, dropped frames), not capture time.

Every frame processed keeps its stage timings, whatever became of it: the report of an edge whose host never
answered still shows what capture, preprocessing and encoding cost. Each record says its ``outcome`` (see
:data:`latentlink.edge.sender.OUTCOMES`) and, once the host decoded it, ``latency_ms``: capture to decoded.

A frame is counted in the summary (and handed to ``on_record``, e.g. a report writer) as soon as its outcome is
known, then forgotten: the only frames held are those the sender has not settled yet (at most window + queue,
plus the spool's), so an edge that runs for days does not grow.

:class:`EdgeStream` is that loop's body, one frame at a time, shared by ``latentlink edge`` (:func:`run_edge`) and
the Python API's :class:`~latentlink.edge.api.Sender`: the same stages, sender, window, drop policy and accounting.
"""

import collections
import logging
import socket
import time

from .entropy import check_available, compress
from .errors import ConfigError
from .lossless import LosslessCodec
from .preprocess import Preprocessor
from .profiler import EDGE_STAGES, FrameStats, FrameTimer
from .protocol import SERIALIZERS, VERSION, check_coding, frame_payload, pack_latents, raw_pickle_message
from .rate import FixedRate
from .sender import OUTCOMES, Sender

log = logging.getLogger("latentlink.edge")


def run_edge(source, encoder, profile, address, stream, frames=None, serializer=None, drop=None, queue_size=None,
             send_buffer_bytes=None, status_every_s=10.0, entropy=None, window=None, delivery=None,
             wait_for_host_s=None, spool=None, protocol=2, credentials=None, on_record=None, lossless=None,
             rate=None, fps=None):
    """Stream ``source`` through ``encoder`` to the host at ``address``; returns the summary (a dict).

    ``lossless`` (``med`` or ``mlp``): send each frame as captured, coded losslessly (edge/lossless.py), instead
    of encoding it; ``encoder`` is then unused (None).

    ``frames``: stop after this many captured frames (None: until the source ends or Ctrl-C). ``serializer``,
    ``drop``, ``queue_size``, ``send_buffer_bytes``, ``entropy`` (a coder of :mod:`latentlink.edge.entropy`),
    ``window``, ``delivery`` and ``wait_for_host_s`` override the profile's transport settings; ``spool`` is a
    :class:`~latentlink.edge.sender.Spool` for reliable delivery; ``protocol`` 1 talks to hosts older than
    protocol 2. ``credentials``: a :class:`~latentlink.edge.security.Credentials` (TLS, token) for the host.
    A status line is logged every ``status_every_s`` seconds (frames captured, decoded, in flight,
    dropped, fps): a long run shows it is alive. The loop stops early when the host refused the stream or could
    not be reached within ``wait_for_host_s``; the summary's ``refused`` and ``gave_up`` say so.
    ``on_record(record)`` is called in this thread with each frame's record (a dict) once its outcome is known
    (:meth:`latentlink.edge.profiler.ReportWriter.add` writes them to a report); nothing per frame is kept.
    ``rate``: a progressive model's rate policy (:mod:`latentlink.edge.rate`). ``fps``: read the source at most
    this many frames per second, as a camera delivers them (files and synthetic:// are otherwise read as fast as
    the loop goes); None: unpaced.
    """
    edge = EdgeStream(encoder, profile, address, stream, serializer=serializer, drop=drop, queue_size=queue_size,
                      send_buffer_bytes=send_buffer_bytes, entropy=entropy, window=window, delivery=delivery,
                      wait_for_host_s=wait_for_host_s, spool=spool, protocol=protocol, credentials=credentials,
                      on_record=on_record, lossless=lossless, rate=rate)
    started = last_status = next_at = time.perf_counter()
    try:
        while (frames is None or edge.captured < frames) and not edge.stopped:
            if fps:  # a camera's clock: a frame every 1/fps s; a late loop goes on from now, not in a burst
                wait = next_at - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                next_at = max(next_at, time.perf_counter() - 1.0 / fps) + 1.0 / fps
            timer = FrameTimer(edge.captured)
            with timer.stage("capture"):
                got = source.read()
            if got is None:
                break
            frame, t_capture = got
            edge.send_image(frame, t_capture, timer)
            now = time.perf_counter()
            if now - last_status >= status_every_s:
                last_status = now
                counts = edge.sender.counts
                log.info("%d frames captured, %d decoded, %d in flight, %d dropped, %d lost; %.1f fps", edge.captured,
                         counts["decoded"], edge.sender.in_flight, counts["dropped"], counts["lost"],
                         edge.captured / (now - started))
    except KeyboardInterrupt:
        log.info("interrupted after %d frames; delivering what is queued (Ctrl-C again to stop at once)",
                 edge.captured)
    finally:
        summary = edge.close()
    return summary


class EdgeStream(object):
    """One stream from this edge to a host: preprocess -> encode -> (gpu_to_cpu) -> serialize -> (entropy) -> send,
    each frame timed and accounted for. :func:`run_edge` (``latentlink edge``) feeds it a source's frames;
    :class:`latentlink.edge.api.Sender` feeds it a user's images or latents.

    ``encoder``: a loaded backend (its ``info`` says the model, latent shape and packing for the handshake). The
    other arguments are :func:`run_edge`'s. :meth:`close` delivers what is queued, ends the stream and returns
    the summary; after it, the sender has settled every frame, so ``captured`` = decoded + failed + refused +
    dropped + lost (+ sent, protocol 1).
    """

    def __init__(self, encoder, profile, address, stream, serializer=None, drop=None, queue_size=None,
                 send_buffer_bytes=None, entropy=None, window=None, delivery=None, wait_for_host_s=None, spool=None,
                 protocol=2, credentials=None, on_record=None, lossless=None, rate=None):
        transport = profile.transport
        serializer = serializer or transport.serializer
        if serializer not in SERIALIZERS:
            raise ConfigError("unknown serializer {!r} (available: {})".format(serializer, ", ".join(SERIALIZERS)))
        self.lossless = None
        if lossless is not None:  # the frame as captured, coded losslessly: no preprocessing, no encoder
            self.lossless = LosslessCodec(lossless)
            if serializer != "framed":
                raise ConfigError("--lossless frames are framed by latentlink, not sent as --serializer {}: leave "
                                  "--serializer out".format(serializer))
            if entropy not in (None, "none"):
                raise ConfigError("--lossless frames are coded by their predictor, not by --entropy {}: leave "
                                  "--entropy out".format(entropy))
            entropy = "none"  # not the profile's coder: a lossless frame has its own
        # A progressive model (edge/rate.py) sends k of its K codes per frame, k chosen by ``rate`` (default: K).
        self.progressive = getattr(encoder, "progressive", None) if self.lossless is None else None
        if self.progressive is not None and serializer != "framed":
            raise ConfigError("a progressive model's frames say their iterations in latentlink framing: use "
                              "--serializer framed, not {}".format(serializer))
        if rate is not None and self.progressive is None:
            raise ConfigError("--rate and --iterations choose a progressive model's iterations per frame, and {} is "
                              "not progressive (its model.json has no \"progressive\")".format(
                                  "--lossless" if self.lossless is not None else encoder.info.path))
        self.rate = rate if rate is not None or self.progressive is None else FixedRate(encoder.max_iterations)
        if serializer in ("pickle", "pickle-raw"):
            packing = "pickle"
        elif self.lossless is not None:
            packing = "lossless"
        else:
            packing = "bits" if self.progressive is not None else encoder.info.packing
        entropy = entropy or transport.entropy
        delivery = delivery or transport.delivery
        # pickle-raw: an 8-byte length and a pickle per frame, for the seed pipeline's plain sockets: no latentlink
        # framing, handshake or acknowledgements, so the sender works as for a protocol-1 host, without end-of-stream.
        raw = serializer == "pickle-raw"
        check_raw(serializer, entropy, delivery)
        protocol = VERSION if raw else protocol
        check_coding(packing, entropy)  # refused here, not at the first frame
        check_available(entropy)  # a missing library too
        frame_hw = (profile.input.height, profile.input.width) if self.lossless is not None else tuple(
            encoder.info.frame_shape[2:])
        if frame_hw != (profile.input.height, profile.input.width):
            raise ConfigError("the encoder takes {}x{} frames{} but profile {!r} says {}x{}: use the profile it was "
                              "exported for".format(frame_hw[1], frame_hw[0], " (as {}x{} tiles)".format(
                                  *encoder.info.tiles) if encoder.info.tiles != (1, 1) else "", profile.name,
                                  profile.input.width, profile.input.height))
        self.encoder, self.profile, self.stream = encoder, profile, stream
        self.serializer, self.packing, self.entropy, self.delivery = serializer, packing, entropy, delivery
        self.raw, self.protocol, self.on_record = raw, protocol, on_record
        # With patch processing (edge/tiles.py) preprocessing also cuts the frame into the encoder's batch of tiles.
        if self.lossless is None:
            self.preprocess = Preprocessor(profile.input.width, profile.input.height, profile.input.fit,
                                           encoder.info.tiles)
        self.stats = FrameStats(edge_stages(entropy, lossless), profile.budget_ms)
        self.settled = collections.deque()  # timers of frames the sender settled, not yet counted (its threads)
        if self.lossless is not None:
            # The host needs no model for these frames: the predictor's identity instead, and the capture size (each
            # frame's metadata has its own; the host bounds it by its --max-frame-bytes).
            self.context_model = None
            hello = {"model_id": self.lossless.identity, "shape": [profile.capture.height, profile.capture.width, 3],
                     "dtype": "uint8", "packing": packing, "entropy": "none", "tiles": [1, 1]}
        else:
            info = encoder.info
            self.context_model = info.context_model() if entropy == "context" else None  # ConfigError if none
            hello = {"model_id": info.identity(entropy), "shape": [int(d) for d in info.latent_shape],
                     "dtype": info.latent_dtype, "packing": packing, "entropy": entropy,
                     "tiles": [int(n) for n in info.tiles]}
        if self.progressive is not None:  # up to K codes of uint8 bits per frame
            hello.update(shape=[int(d) for d in encoder.wire_shape], dtype="uint8", progressive=self.progressive)
        self.sender = Sender(address, stream, hello=hello, queue_size=queue_size or transport.queue_size,
                             drop=drop or ("block" if delivery == "reliable" else transport.drop),
                             window=window or transport.window, delivery=delivery, protocol=protocol,
                             wait_for_host_s=transport.wait_for_host_s if wait_for_host_s is None else wait_for_host_s,
                             spool=spool, send_buffer_bytes=send_buffer_bytes or transport.send_buffer_bytes,
                             connect_timeout_s=transport.connect_timeout_s, send_timeout_s=transport.send_timeout_s,
                             max_backoff_s=transport.max_backoff_s, end_of_stream=not raw, credentials=credentials,
                             on_settled=self.settled.append)
        if raw:
            log.info("--serializer pickle-raw: each frame goes as an 8-byte big-endian length and "
                     "pickle.dumps(latents), nothing else; frames are counted as sent once written, and closing the "
                     "connection ends the stream")
        self.captured = 0  # frames handed in: the next frame's sequence number
        self.summary = None
        self._started = time.perf_counter()

    @property
    def stopped(self):
        """True once nothing more can be sent (the host refused the stream, could not be reached, or closed)."""
        return self.sender.stopped

    def send_image(self, frame, t_capture, timer=None):
        """Preprocess, encode and send one BGR uint8 frame captured at ``t_capture`` (UNIX seconds); returns False
        when it (or, under ``oldest``, an older frame) was dropped, or nothing more can be sent."""
        timer = timer or FrameTimer(self.captured)
        if self.lossless is not None:
            return self._send_lossless(frame, t_capture, timer)
        with timer.stage("preprocess"):
            tensor = self.preprocess(frame)
        if self.rate is not None:  # k chosen from the link's state now, before the frame is encoded
            iterations = self.rate.choose(self.sender.link_state())
            latents, timings = self.encoder.encode(tensor, iterations)
            timer.add_backend_timings("encode", "gpu_to_cpu", timings)
            return self.send_latents(latents, t_capture, timer)
        latents, timings = self.encoder.infer(tensor)
        timer.add_backend_timings("encode", "gpu_to_cpu", timings)
        return self.send_latents(latents, t_capture, timer)

    def _send_lossless(self, frame, t_capture, timer):
        """``--lossless``: the frame itself, predictively coded (the ``encode`` stage), framed and sent."""
        timer.extra["t_capture"] = t_capture
        with timer.stage("encode"):
            payload = self.lossless.encode(frame)
        with timer.stage("serialize"):
            data = frame_payload(self.stream, timer.seq, t_capture, frame, "lossless", payload, version=self.protocol)
        timer.extra["bytes"] = len(data)
        queued = self.sender.submit(data, timer)
        self.captured += 1
        _count_settled(self.settled, self.stats, self.on_record)
        return queued

    def send_latents(self, latents, t_capture, timer=None):
        """Pack and send latents of the encoder's shape (as its ``infer`` returns them); see :meth:`send_image`."""
        timer = timer or FrameTimer(self.captured)
        timer.extra["t_capture"] = t_capture
        iterations, context_model = None, self.context_model
        if self.progressive is not None:  # its first k codes, (k, C, h, w): k is the frame's iterations
            iterations = int(latents.shape[0])
            timer.extra["iterations"] = iterations
            if context_model is not None:  # the tables of the first k iterations (edge/progressive.py)
                context_model = self.encoder.context_model(iterations)
        if context_model is not None:  # codes the latents themselves: nothing to pack first
            with timer.stage("entropy"):
                payload = context_model.encode(latents)
        else:
            with timer.stage("serialize"):
                payload = pack_latents(latents, self.packing)
            if self.entropy != "none":
                with timer.stage("entropy"):
                    payload = compress(payload, self.entropy)
        with timer.stage("serialize"):
            if self.raw:
                data = raw_pickle_message(payload)
            else:
                data = frame_payload(self.stream, timer.seq, t_capture, latents, self.packing, payload, self.entropy,
                                     version=self.protocol, iterations=iterations)
        timer.extra["bytes"] = len(data)
        queued = self.sender.submit(data, timer)
        self.captured += 1
        _count_settled(self.settled, self.stats, self.on_record)
        return queued

    def close(self):
        """Deliver what is queued and in flight, end the stream; returns the summary (a dict). Idempotent."""
        if self.summary is not None:
            return self.summary
        sender = self.sender
        sender.close()
        wall_s = time.perf_counter() - self._started
        _count_settled(self.settled, self.stats, self.on_record)  # every frame: the sender settled them all
        copy_note = self.encoder.copy_note if self.encoder is not None else None
        notes = {"gpu_to_cpu": copy_note} if copy_note else {}
        if sender.counts["stored"]:
            notes["stored"] = ("frames a gateway (latentlink host --jetstream) stored durably in its broker for decode "
                               "workers: queued, not yet decoded, when acknowledged (the workers' reports say what "
                               "became of them); no latency for them")
        if sender.clock.error_s is not None:
            notes["latency"] = ("capture to decoded on the host; host clock offset {:+.3f} ms, estimated to within "
                                "{:.3f} ms (NTP-style, from the acknowledgements)".format(
                                    sender.clock.offset_s * 1000.0, sender.clock.error_s * 1000.0))
        protocol = self.protocol
        self.summary = self.stats.summary(wall_s, dropped=sender.counts["dropped"], extra={
            "captured": self.captured,
            # "sent" with protocol 1 only, "stored" with a gateway only: other reports keep their usual buckets
            "outcomes": dict((k, sender.counts[k]) for k in OUTCOMES if (k != "sent" or protocol == 1) and (
                k != "stored" or sender.counts["stored"])),
            "protocol": protocol, "serializer": self.serializer, "delivery": self.delivery, "window": sender.window,
            "session": sender.session,
            "reconnects": sender.reconnects, "connection_losses": sender.connection_losses, "resent": sender.resent,
            "duplicates": sender.duplicates, "end_acknowledged": sender.end_acknowledged,
            "refused": {"reason": sender.refusal[0], "message": sender.refusal[1]} if sender.refusal else None,
            "gave_up": sender.gave_up, "clock": {"offset_ms": round(sender.clock.offset_s * 1000.0, 3),
                                                 "error_ms": None if sender.clock.error_s is None else
                                                 round(sender.clock.error_s * 1000.0, 3)},
            "notes": notes})
        if self.rate is not None:  # a progressive model's policy (its iterations per frame: the summary's)
            self.summary["rate"] = self.rate.describe()
        return self.summary


def edge_stages(entropy, lossless=None):
    """The stages the edge times: :data:`EDGE_STAGES`, without ``entropy`` when there is no coder (``"none"``);
    with ``lossless``, capture, encode (the lossless coder), serialize and send."""
    if lossless:
        return ("capture", "encode", "serialize", "send")
    return EDGE_STAGES if entropy != "none" else tuple(s for s in EDGE_STAGES if s != "entropy")


def _count_settled(settled, stats, on_record):
    """Count the settled frames in ``stats``, hand their records to ``on_record``, and let them go. A frame whose
    ``send`` stage is still open (the host's ACK came before the sender's thread closed it) waits for the next
    call, and the frames after it with it, so that records keep the order they were settled in."""
    while settled and not settled[0].timing:
        timer = settled.popleft()
        timer.extra.pop("t_capture", None)
        record = timer.record()
        stats.add(record)
        if on_record is not None:
            on_record(record)


def check_raw(serializer, entropy, delivery):
    """Raise ConfigError where ``--serializer pickle-raw`` meets what it cannot do (entropy, reliable delivery)."""
    if serializer == "pickle-raw" and entropy != "none":
        raise ConfigError("--serializer pickle-raw cannot be entropy-coded (entropy {!r}): its receivers read plain "
                          "pickles; use --entropy none".format(entropy))
    if serializer == "pickle-raw" and delivery == "reliable":
        raise ConfigError("--serializer pickle-raw has no acknowledgements, which --delivery reliable needs: use "
                          "--delivery live, or --serializer framed with a latentlink host")


def default_stream_name():
    return socket.gethostname().split(".")[0] or "edge"
