"""The edge loop: capture -> preprocess -> encode -> (gpu_to_cpu) -> serialize -> (entropy) -> queue -> send, timed
per frame.

``serialize`` is packing and framing; ``entropy`` the optional lossless coding of the packed payload (timed apart:
it runs on the Nano's CPU). All but ``send`` run in the calling thread; ``send`` runs in the :class:`Sender`'s
thread, so a slow network costs queue space (and, by policy, dropped frames), not capture time.
"""

import logging
import socket
import time

from .entropy import check_available, compress
from .errors import ConfigError
from .preprocess import Preprocessor
from .profiler import EDGE_STAGES, FrameTimer, summarize
from .protocol import SERIALIZERS, check_coding, frame_payload, pack_latents
from .sender import Sender

log = logging.getLogger("latentlink.edge")


def run_edge(source, encoder, profile, address, stream, frames=None, serializer=None, drop=None, queue_size=None,
             send_buffer_bytes=None, status_every_s=10.0, entropy=None):
    """Stream ``source`` through ``encoder`` to the host at ``address``; returns ``(summary, records)``.

    ``frames``: stop after this many captured frames (None: until the source ends or Ctrl-C). ``serializer``,
    ``drop``, ``queue_size``, ``send_buffer_bytes`` and ``entropy`` (a coder of :mod:`edge.entropy`) override the
    profile's transport settings. A status line is logged every ``status_every_s`` seconds (frames captured, sent,
    dropped, fps): a long run shows it is alive.
    """
    transport = profile.transport
    serializer = serializer or transport.serializer
    if serializer not in SERIALIZERS:
        raise ConfigError("unknown serializer {!r} (available: {})".format(serializer, ", ".join(SERIALIZERS)))
    packing = "pickle" if serializer == "pickle" else encoder.info.packing
    entropy = entropy or transport.entropy
    check_coding(packing, entropy)  # refused here, not at the first frame
    check_available(entropy)  # a missing library too
    stages = EDGE_STAGES if entropy != "none" else tuple(s for s in EDGE_STAGES if s != "entropy")
    frame_hw = tuple(encoder.info.frame_shape[2:])
    if frame_hw != (profile.input.height, profile.input.width):
        raise ConfigError("the encoder takes {}x{} frames{} but profile {!r} says {}x{}: use the profile it was "
                          "exported for".format(frame_hw[1], frame_hw[0], " (as {}x{} tiles)".format(
                              *encoder.info.tiles) if encoder.info.tiles != (1, 1) else "", profile.name,
                              profile.input.width, profile.input.height))
    # With patch processing (edge/tiles.py) preprocessing also cuts the frame into the encoder's batch of tiles.
    preprocess = Preprocessor(profile.input.width, profile.input.height, profile.input.fit, encoder.info.tiles)
    records = []

    def finish(timer):
        timer.extra["latency_ms"] = round((time.perf_counter() - timer.extra.pop("t0")) * 1000.0, 3)
        records.append(timer.record())

    sender = Sender(address, stream, queue_size=queue_size or transport.queue_size, drop=drop or transport.drop,
                    send_buffer_bytes=send_buffer_bytes or transport.send_buffer_bytes,
                    connect_timeout_s=transport.connect_timeout_s, send_timeout_s=transport.send_timeout_s,
                    max_backoff_s=transport.max_backoff_s, on_sent=finish)
    seq = 0
    started = last_status = time.perf_counter()
    try:
        while frames is None or seq < frames:
            timer = FrameTimer(seq)
            timer.extra["t0"] = time.perf_counter()
            with timer.stage("capture"):
                got = source.read()
            if got is None:
                break
            frame, t_capture = got
            with timer.stage("preprocess"):
                tensor = preprocess(frame)
            latents, timings = encoder.infer(tensor)
            timer.add_backend_timings("encode", "gpu_to_cpu", timings)
            with timer.stage("serialize"):
                payload = pack_latents(latents, packing)
            if entropy != "none":
                with timer.stage("entropy"):
                    payload = compress(payload, entropy)
            with timer.stage("serialize"):
                data = frame_payload(stream, seq, t_capture, latents, packing, payload, entropy)
            timer.extra["bytes"] = len(data)
            sender.submit(data, timer)
            seq += 1
            now = time.perf_counter()
            if now - last_status >= status_every_s:
                last_status = now
                log.info("%d frames captured, %d sent, %d dropped; %.1f fps", seq, sender.sent, sender.dropped,
                         seq / (now - started))
    except KeyboardInterrupt:
        log.info("interrupted after %d frames; sending what is queued", seq)
    finally:
        sender.close()
    wall_s = time.perf_counter() - started
    records.sort(key=lambda r: r["seq"])
    notes = {"gpu_to_cpu": encoder.copy_note} if encoder.copy_note else {}
    summary = summarize(records, stages, profile.budget_ms, wall_s, dropped=sender.dropped, extra={
        "captured": seq, "sent": sender.sent, "dropped_by_policy": sender.dropped_queue,
        "lost_in_send": sender.dropped_send, "reconnects": sender.reconnects, "notes": notes})
    return summary, records


def default_stream_name():
    return socket.gethostname().split(".")[0] or "edge"
