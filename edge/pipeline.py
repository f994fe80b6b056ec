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
"""

import collections
import logging
import socket
import time

from .entropy import check_available, compress
from .errors import ConfigError
from .preprocess import Preprocessor
from .profiler import EDGE_STAGES, FrameStats, FrameTimer
from .protocol import SERIALIZERS, VERSION, check_coding, frame_payload, pack_latents, raw_pickle_message
from .sender import OUTCOMES, Sender

log = logging.getLogger("latentlink.edge")


def run_edge(source, encoder, profile, address, stream, frames=None, serializer=None, drop=None, queue_size=None,
             send_buffer_bytes=None, status_every_s=10.0, entropy=None, window=None, delivery=None,
             wait_for_host_s=None, spool=None, protocol=2, credentials=None, on_record=None):
    """Stream ``source`` through ``encoder`` to the host at ``address``; returns the summary (a dict).

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
    """
    transport = profile.transport
    serializer = serializer or transport.serializer
    if serializer not in SERIALIZERS:
        raise ConfigError("unknown serializer {!r} (available: {})".format(serializer, ", ".join(SERIALIZERS)))
    packing = "pickle" if serializer in ("pickle", "pickle-raw") else encoder.info.packing
    entropy = entropy or transport.entropy
    delivery = delivery or transport.delivery
    # pickle-raw: an 8-byte length and a pickle per frame, for the seed pipeline's plain sockets: no latentlink
    # framing, handshake or acknowledgements, so the sender works as for a protocol-1 host, without end-of-stream.
    raw = serializer == "pickle-raw"
    check_raw(serializer, entropy, delivery)
    protocol = VERSION if raw else protocol
    check_coding(packing, entropy)  # refused here, not at the first frame
    check_available(entropy)  # a missing library too
    stages = edge_stages(entropy)
    frame_hw = tuple(encoder.info.frame_shape[2:])
    if frame_hw != (profile.input.height, profile.input.width):
        raise ConfigError("the encoder takes {}x{} frames{} but profile {!r} says {}x{}: use the profile it was "
                          "exported for".format(frame_hw[1], frame_hw[0], " (as {}x{} tiles)".format(
                              *encoder.info.tiles) if encoder.info.tiles != (1, 1) else "", profile.name,
                              profile.input.width, profile.input.height))
    # With patch processing (edge/tiles.py) preprocessing also cuts the frame into the encoder's batch of tiles.
    preprocess = Preprocessor(profile.input.width, profile.input.height, profile.input.fit, encoder.info.tiles)
    stats = FrameStats(stages, profile.budget_ms)
    settled = collections.deque()  # timers of frames the sender settled, not yet counted (appended by its threads)
    delivery = delivery or transport.delivery
    info = encoder.info
    context_model = info.context_model() if entropy == "context" else None  # ConfigError now if it has none
    hello = {"model_id": info.identity(entropy), "shape": [int(d) for d in info.latent_shape],
             "dtype": info.latent_dtype, "packing": packing, "entropy": entropy,
             "tiles": [int(n) for n in info.tiles]}
    sender = Sender(address, stream, hello=hello, queue_size=queue_size or transport.queue_size,
                    drop=drop or ("block" if delivery == "reliable" else transport.drop),
                    window=window or transport.window, delivery=delivery, protocol=protocol,
                    wait_for_host_s=transport.wait_for_host_s if wait_for_host_s is None else wait_for_host_s,
                    spool=spool, send_buffer_bytes=send_buffer_bytes or transport.send_buffer_bytes,
                    connect_timeout_s=transport.connect_timeout_s, send_timeout_s=transport.send_timeout_s,
                    max_backoff_s=transport.max_backoff_s, end_of_stream=not raw, credentials=credentials,
                    on_settled=settled.append)
    if raw:
        log.info("--serializer pickle-raw: each frame goes as an 8-byte big-endian length and pickle.dumps(latents), "
                 "nothing else; frames are counted as sent once written, and closing the connection ends the stream")
    seq = 0
    started = last_status = time.perf_counter()
    try:
        while (frames is None or seq < frames) and not sender.stopped:
            timer = FrameTimer(seq)
            with timer.stage("capture"):
                got = source.read()
            if got is None:
                break
            frame, t_capture = got
            timer.extra["t_capture"] = t_capture
            with timer.stage("preprocess"):
                tensor = preprocess(frame)
            latents, timings = encoder.infer(tensor)
            timer.add_backend_timings("encode", "gpu_to_cpu", timings)
            if entropy == "context":  # codes the latents themselves: nothing to pack first
                with timer.stage("entropy"):
                    payload = context_model.encode(latents)
            else:
                with timer.stage("serialize"):
                    payload = pack_latents(latents, packing)
                if entropy != "none":
                    with timer.stage("entropy"):
                        payload = compress(payload, entropy)
            with timer.stage("serialize"):
                if raw:
                    data = raw_pickle_message(payload)
                else:
                    data = frame_payload(stream, seq, t_capture, latents, packing, payload, entropy, version=protocol)
            timer.extra["bytes"] = len(data)
            sender.submit(data, timer)
            seq += 1
            _count_settled(settled, stats, on_record)
            now = time.perf_counter()
            if now - last_status >= status_every_s:
                last_status = now
                counts = sender.counts
                log.info("%d frames captured, %d decoded, %d in flight, %d dropped, %d lost; %.1f fps", seq,
                         counts["decoded"], sender.in_flight, counts["dropped"], counts["lost"],
                         seq / (now - started))
    except KeyboardInterrupt:
        log.info("interrupted after %d frames; delivering what is queued (Ctrl-C again to stop at once)", seq)
    finally:
        sender.close()
    wall_s = time.perf_counter() - started
    _count_settled(settled, stats, on_record)  # every frame: close() returned, so the sender settled them all
    notes = {"gpu_to_cpu": encoder.copy_note} if encoder.copy_note else {}
    if sender.clock.error_s is not None:
        notes["latency"] = ("capture to decoded on the host; host clock offset {:+.3f} ms, estimated to within "
                            "{:.3f} ms (NTP-style, from the acknowledgements)".format(
                                sender.clock.offset_s * 1000.0, sender.clock.error_s * 1000.0))
    return stats.summary(wall_s, dropped=sender.counts["dropped"], extra={
        "captured": seq, "outcomes": dict((k, sender.counts[k]) for k in OUTCOMES if k != "sent" or protocol == 1),
        "protocol": protocol, "serializer": serializer, "delivery": delivery, "window": sender.window,
        "session": sender.session,
        "reconnects": sender.reconnects, "connection_losses": sender.connection_losses, "resent": sender.resent,
        "duplicates": sender.duplicates, "end_acknowledged": sender.end_acknowledged,
        "refused": {"reason": sender.refusal[0], "message": sender.refusal[1]} if sender.refusal else None,
        "gave_up": sender.gave_up, "clock": {"offset_ms": round(sender.clock.offset_s * 1000.0, 3),
                                             "error_ms": None if sender.clock.error_s is None else
                                             round(sender.clock.error_s * 1000.0, 3)},
        "notes": notes})


def edge_stages(entropy):
    """The stages the edge times: :data:`EDGE_STAGES`, without ``entropy`` when there is no coder (``"none"``)."""
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
