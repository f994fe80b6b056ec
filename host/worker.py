"""``latentlink worker`` / ``python -m latentlink.host.worker``: a decode worker of a fleet. It pulls frames that a
gateway (``latentlink host --jetstream``) stored in NATS JetStream, decodes them and writes them to the same outputs
as a host (``--out``), then acknowledges them to JetStream.

Any number of workers share one durable pull consumer (:data:`~latentlink.host.jetstream.CONSUMER`): each fetches a
batch of up to ``--batch-size`` frames, so they share the work. Per batch:

1. each message is parsed with the bounded protocol functions (a message that is no valid frame, or does not fit this
   decoder, is terminated with a log line: never redelivered, never a crash);
2. each frame is claimed in the marks bucket (``claimed <worker>``, an atomic create); a frame already marked
   ``written`` is acknowledged and skipped (a duplicate); a frame another worker claimed is taken over only if
   JetStream redelivers it (that worker missed the ack-wait: it died or hung), by a compare-and-set on the claim;
3. the batch is decoded (``Backend.infer_batch``) and each frame written to the outputs;
4. each mark becomes ``written`` (compare-and-set on our claim: a worker that lost its claim meanwhile does not mark,
   nor acknowledge), then the message is acknowledged (and the acknowledgement confirmed by the broker).

A worker killed anywhere leaves its unacknowledged frames to be redelivered after ``--ack-wait`` seconds. Killed
between step 3 and 4, the frame is written again by the next worker (a PNG replaced by the same PNG; a video would
get the frame twice); it is marked and counted once. A frame whose output fails (disk full) is redelivered after a
delay (``nak``) and retried. A frame whose latents cannot be decoded is terminated (marked ``failed``).
"""

import asyncio
import logging
import os
import signal
import socket
import sys
import time

from latentlink.edge.cli import (ArgumentParser, add_backend_options, add_run_options, address, backend_options,
                                 check_model_file, check_output_file, peak_rss_mb, positive_float, positive_int,
                                 run_main, setup_logging)
from latentlink.edge.errors import BackendError, ConfigError, LatentlinkError, ProtocolError
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import FrameStats, FrameTimer, ReportWriter, format_table, host_stages
from latentlink.edge.protocol import decode_latents, latency_ms
from latentlink.edge.sender import parse_address

from . import jetstream as fleet
from .outputs import FolderOutput, OutputError, decoded_frame, open_outputs, parse_outputs
from .server import latents_problem
from .triton_backend import is_service, open_decoder

log = logging.getLogger("latentlink.worker")
WRITTEN, FAILED = b"written", b"failed"
RETRY_DELAY_S = 5.0  # an output that failed: the frame comes back after this long
BACKLOG_EVERY_S = 5.0  # how often the worker reads the broker's backlog (metrics, progress line)

EXAMPLES = """examples:
  latentlink worker --jetstream nats://127.0.0.1:4222 --out frames/
  latentlink worker --jetstream nats://broker:4222 --decoder runs/lossy-cae.pt --device cuda --out frames/
  latentlink worker --jetstream nats://127.0.0.1:4222 --out frames/ --idle-exit 10 --report worker.json

start as many as the decoders keep up with, on any machines that reach the broker; a gateway feeds them:
  latentlink host --listen 0.0.0.0:5760 --jetstream nats://127.0.0.1:4222"""


class _Item(object):
    """One message of a batch on its way: parsed, claimed, decoded, written, marked, acknowledged."""

    __slots__ = ("msg", "meta", "payload", "session", "offset_s", "key", "revision", "timer", "outcome", "latents",
                 "output", "reason")

    def __init__(self, msg, meta, payload, session, offset_s):
        self.msg, self.meta, self.payload, self.session, self.offset_s = msg, meta, payload, session, offset_s
        self.key = fleet.mark_key(meta.stream, session, meta.seq)
        self.revision = None
        self.timer = FrameTimer(meta.seq)
        self.outcome = self.latents = self.output = None
        self.reason = ""


class Worker(object):
    """Decode frames from JetStream at ``url`` with ``decoder`` and write them to ``outputs`` (Output objects).

    ``batch_size``: frames fetched and decoded at once; ``ack_wait_s``: how long JetStream waits for a worker's
    acknowledgement before it redelivers (a setting of the shared consumer: the last worker started sets it);
    ``marks_ttl_s``: how long the marks bucket keeps a frame's mark (a new bucket only); ``max_frame_bytes``: the
    largest payload accepted; ``max_frames``: stop after writing this many; ``idle_exit_s``: stop once no frame came
    for this long (None: never); ``decode_delay_s``: tests only, sleep per frame decoded; ``on_record``: each written
    frame's record (a report's ``add``)."""

    def __init__(self, url, decoder, outputs, budget_ms=33.0, batch_size=8, ack_wait_s=30.0,
                 marks_ttl_s=fleet.DEFAULT_MARKS_TTL_S, max_frame_bytes=4 << 20, max_frames=None, idle_exit_s=None,
                 decode_delay_s=0.0, on_record=None, progress_s=5.0):
        self.url = fleet.check_url(url)
        self.decoder, self.outputs = decoder, list(outputs)
        self.batch_size, self.ack_wait_s, self.marks_ttl_s = batch_size, ack_wait_s, marks_ttl_s
        self.max_frame_bytes, self.max_frames, self.idle_exit_s = max_frame_bytes, max_frames, idle_exit_s
        self.decode_delay_s, self.on_record, self.progress_s = decode_delay_s, on_record, progress_s
        self.id = "{}-{}-{}".format(socket.gethostname().split(".")[0] or "worker", os.getpid(), os.urandom(3).hex())
        self.stats = FrameStats(host_stages(None), budget_ms)  # a worker runs no post-filter
        self.counts = {}  # stream -> {outcome: frames}
        self.redelivered = self.batches = self.taken_over = 0
        self.backlog = {}
        self._stop = None
        self._first = self._last = None

    # Results.
    def _count(self, stream, outcome):
        per = self.counts.setdefault(stream, {})
        per[outcome] = per.get(outcome, 0) + 1

    def total(self, outcome):
        return sum(per.get(outcome, 0) for per in self.counts.values())

    def snapshot(self):
        """For the metrics: ``streams`` (stream -> {outcome: frames}), ``redelivered``, ``batches``, ``backlog``."""
        return {"streams": {s: dict(c) for s, c in self.counts.items()}, "redelivered": self.redelivered,
                "batches": self.batches, "backlog": dict(self.backlog)}

    def summary(self):
        wall = (self._last - self._first) if self._first else 0.0
        frames = self.stats.frames
        return self.stats.summary(wall * frames / max(1, frames - 1), dropped=0, extra={
            "worker": self.id, "written": self.total("written"), "duplicates": self.total("duplicate"),
            "failed": self.total("failed"), "terminated": self.total("terminated"), "redelivered": self.redelivered,
            "taken_over": self.taken_over, "batches": self.batches,
            "streams": {s: dict(c) for s, c in sorted(self.counts.items())}, "backlog": dict(self.backlog),
            "notes": {"decode": "the decoder's time per frame (a batch's time shared out)",
                      "write": "the outputs (PNG encoding and saving), and the conversion to an image"}})

    def stop(self):
        if self._stop is not None:
            self._stop.set()

    # The loop.
    def run(self):
        """Serve until :meth:`stop` (a signal), ``max_frames`` or ``idle_exit_s``; returns the summary."""
        asyncio.run(self._run())
        return self.summary()

    async def _run(self):
        from nats.errors import TimeoutError as NatsTimeout

        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if sys.platform != "win32":
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._signal, signum)
        nc = await fleet.connect(self.url, "latentlink-worker " + self.id)
        try:
            js = nc.jetstream()
            await fleet.ensure_stream(js)
            self.kv = await self._marks(js)
            self.js = js
            sub = await self._subscribe(js)
            log.info("worker %s: decoding frames of JetStream stream %s on %s (batches of %d, ack-wait %g s)",
                     self.id, fleet.STREAM, self.url, self.batch_size, self.ack_wait_s)
            idle_since = time.monotonic()
            next_backlog = next_progress = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_backlog:
                    next_backlog = now + BACKLOG_EVERY_S
                    await self._read_backlog(js)
                if self.progress_s and now >= next_progress:
                    if next_progress:
                        self._log_progress()
                    next_progress = now + self.progress_s
                try:
                    msgs = await sub.fetch(self.batch_size, timeout=1.0)
                except (NatsTimeout, asyncio.TimeoutError):
                    if self.idle_exit_s and time.monotonic() - idle_since > self.idle_exit_s:
                        log.info("no frame for %g s (--idle-exit): stopping", self.idle_exit_s)
                        break
                    continue
                except Exception as exc:  # the broker restarting, a connection lost: retried (nats-py reconnects)
                    log.warning("fetching from JetStream failed (%s: %s); retrying", type(exc).__name__, exc)
                    await asyncio.sleep(0.5)
                    continue
                idle_since = time.monotonic()
                try:
                    await self._handle(msgs)
                except Exception:  # a bug must cost this batch (redelivered after ack-wait), never the worker
                    log.exception("unexpected error handling a batch of %d messages (they are redelivered after "
                                  "the ack-wait)", len(msgs))
                if self.max_frames and self.total("written") >= self.max_frames:
                    log.info("%d frames written (--max-frames): stopping", self.total("written"))
                    break
        finally:
            await nc.close()

    def _signal(self, signum):
        log.info("%s: stopping after this batch", signal.Signals(signum).name)
        self.stop()

    async def _marks(self, js):
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError, NotFoundError

        try:
            return await js.key_value(fleet.MARKS)
        except (BucketNotFoundError, NotFoundError):
            pass
        return await js.create_key_value(KeyValueConfig(bucket=fleet.MARKS, history=1, ttl=self.marks_ttl_s,
                                                        storage=StorageType.FILE,
                                                        description="latentlink: frames claimed and written"))

    async def _subscribe(self, js):
        from nats.js.api import AckPolicy, ConsumerConfig

        config = ConsumerConfig(durable_name=fleet.CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s,
                                max_deliver=-1, max_ack_pending=4096, filter_subject=fleet.SUBJECT_PREFIX + ">")
        try:
            info = await js.consumer_info(fleet.STREAM, fleet.CONSUMER)
        except Exception:
            info = None
        if info is not None and info.config.ack_wait != self.ack_wait_s:
            log.info("the shared consumer's ack-wait was %g s; now %g s", info.config.ack_wait, self.ack_wait_s)
            await js.add_consumer(fleet.STREAM, config)  # an update: ack-wait may change on a durable consumer
        return await js.pull_subscribe(fleet.SUBJECT_PREFIX + ">", durable=fleet.CONSUMER, stream=fleet.STREAM,
                                       config=config)

    async def _read_backlog(self, js):
        try:
            info = await js.stream_info(fleet.STREAM)
            consumer = await js.consumer_info(fleet.STREAM, fleet.CONSUMER)
        except Exception as exc:
            log.debug("cannot read the backlog: %s", exc)
            return
        self.backlog = {"messages": info.state.messages, "bytes": info.state.bytes,
                        "ack_pending": consumer.num_ack_pending, "redelivered": consumer.num_redelivered}

    def _log_progress(self):
        log.info("progress: %d written, %d duplicates skipped, %d failed, %d terminated, %d redelivered; broker "
                 "backlog %s frames", self.total("written"), self.total("duplicate"), self.total("failed"),
                 self.total("terminated"), self.redelivered, self.backlog.get("messages", "?"))

    # One batch.
    async def _handle(self, msgs):
        items = []
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                self.redelivered += 1
            try:
                items.append(self._parse(msg))
            except ProtocolError as exc:
                log.error("a bad message on %s (JetStream sequence %d): %s; terminated (never redelivered)",
                          msg.subject[:200], msg.metadata.sequence.stream, exc)
                self._count("-", "terminated")
                await _quietly(msg.term())
        claimed = [item for item, ok in zip(items, await asyncio.gather(*[self._claim(i) for i in items])) if ok]
        if not claimed:
            return
        await asyncio.gather(*[_quietly(item.msg.in_progress()) for item in claimed])  # the ack-wait starts again
        await asyncio.get_running_loop().run_in_executor(None, self._decode_and_write, claimed)
        self.batches += 1
        await asyncio.gather(*[self._settle(item) for item in claimed])

    def _parse(self, msg):
        """A message as an _Item, or a ProtocolError: bytes that are no frame, headers out of range, a subject that
        is not the frame's stream's, latents this decoder cannot take."""
        meta, payload = fleet.parse_frame_message(msg.data, self.max_frame_bytes)
        session, offset_s, _ = fleet.parse_headers(msg.headers)
        if msg.subject != fleet.subject(meta.stream):
            raise ProtocolError("a frame of stream {!r} on subject {}".format(meta.stream, msg.subject[:200]))
        problem = None if meta.packing == "lossless" else latents_problem(self.decoder, meta)
        if problem is not None:  # the message ends (term); the words say "host", the fix is the same
            raise ProtocolError(problem)
        return _Item(msg, meta, payload, session, offset_s)

    async def _claim(self, item):
        """Claim ``item``'s frame in the marks bucket; True if this worker is to write it. A frame written (or
        failed) already is acknowledged here; one another worker holds is left to it unless redelivered."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv, mine = self.kv, ("claimed " + self.id).encode()
        try:
            try:
                item.revision = await kv.create(item.key, mine)
                return True
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(item.key)
            except KeyNotFoundError:  # expired or deleted meanwhile: claim it afresh
                item.revision = await kv.create(item.key, mine)
                return True
            if entry.value in (WRITTEN, FAILED):
                self._count(item.meta.stream, "duplicate")
                await item.msg.ack_sync()
                return False
            if item.msg.metadata.num_delivered <= 1:
                # A first delivery, and the frame is claimed already: a second copy of it in the stream (published
                # again after the duplicate window, or after a broker restart); it comes back after the ack-wait,
                # when the claim is written, or is taken over from a worker that is gone.
                await item.msg.nak(delay=self.ack_wait_s)
                return False
            item.revision = await kv.update(item.key, mine, last=entry.revision)
            if entry.value != mine:
                self.taken_over += 1
                log.info("stream %r frame %d: taking it over from %s (delivered %d times: that worker missed the "
                         "ack-wait)", item.meta.stream, item.meta.seq, entry.value.decode("utf-8", "replace")[8:80],
                         item.msg.metadata.num_delivered)
            return True
        except KeyWrongLastSequenceError:  # another worker took it over first
            return False
        except Exception as exc:  # the broker unreachable: the message comes back after the ack-wait
            log.warning("stream %r frame %d: cannot claim it (%s: %s); it is redelivered later", item.meta.stream,
                        item.meta.seq, type(exc).__name__, exc)
            return False

    def _decode_and_write(self, items):
        """In a thread: decode ``items`` in one batch and write each to the outputs; sets each item's outcome
        ("written", "failed": the latents cannot be decoded, "retry": an output failed)."""
        good = []
        for item in items:
            try:
                with item.timer.stage("deserialize"):
                    item.latents = decode_latents(item.meta, item.payload, self._context_model(item.meta))
                good.append(item)
            except (ProtocolError, ConfigError) as exc:
                item.outcome, item.reason = "failed", str(exc)
        lossless = [item for item in good if item.meta.packing == "lossless"]
        for item in lossless:  # the image itself, rebuilt by decode_latents: no decoder run (edge/lossless.py)
            item.output = item.latents
        self._decode([item for item in good if item.meta.packing != "lossless"])
        for item in good:
            if item.outcome is None:
                self._write(item)

    def _context_model(self, meta):
        if meta.entropy != "context":
            return None
        if meta.iterations is not None and hasattr(self.decoder, "context_model"):
            return self.decoder.context_model(meta.iterations)  # a progressive model's first k iterations' tables
        return self.decoder.info.context_model()  # ConfigError without the tables: the frame fails

    def _decode(self, items):
        if not items:
            return
        started = time.perf_counter()
        try:
            outputs, _ = self.decoder.infer_batch([item.latents.astype("float32", copy=False) for item in items])
        except BackendError as exc:
            if len(items) > 1:
                for item in items:
                    self._decode([item])
                return
            items[0].outcome, items[0].reason = "failed", "decode failed: {}".format(exc)
            return
        if self.decode_delay_s:  # tests: a slower decoder, so that a worker killed holds frames
            time.sleep(self.decode_delay_s * len(items))
        per_frame = (time.perf_counter() - started) * 1000.0 / len(items)
        for item, output in zip(items, outputs):
            item.output = output
            item.timer.add("decode", per_frame)

    def _write(self, item):
        meta, timer = item.meta, item.timer
        with timer.stage("write"):
            latency = latency_ms(time.time() - item.offset_s, meta.t_capture)
            frame = decoded_frame(meta, item.output, item.latents, self.decoder.info.tiles, latency, timer.stages)
            for output in self.outputs:
                try:
                    output.write(frame)
                except OutputError as exc:
                    item.outcome, item.reason = "retry", str(exc)
                    return
        item.outcome = "written"
        record = timer.record()
        record.update(stream=meta.stream, bytes=frame.bytes, latency_ms=latency)
        self.stats.add(record)
        now = time.perf_counter()
        self._first, self._last = self._first or now, now
        if self.on_record is not None:
            self.on_record(record)

    async def _settle(self, item):
        """Mark and acknowledge a written frame; terminate a failed one; send back one an output could not take."""
        from nats.js.errors import KeyWrongLastSequenceError

        meta = item.meta
        try:
            if item.outcome == "retry":
                log.error("stream %r frame %d: %s; retried in %g s", meta.stream, meta.seq, item.reason,
                          RETRY_DELAY_S)
                await item.msg.nak(delay=RETRY_DELAY_S)
                return
            try:
                await self.kv.update(item.key, WRITTEN if item.outcome == "written" else FAILED, last=item.revision)
            except KeyWrongLastSequenceError:
                log.warning("stream %r frame %d: another worker took it over while this one wrote it (this worker "
                            "was slower than the ack-wait, %g s): not counted here", meta.stream, meta.seq,
                            self.ack_wait_s)
                return
            if item.outcome == "written":
                await item.msg.ack_sync()
                self._count(meta.stream, "written")
            else:
                log.error("stream %r frame %d cannot be decoded: %s; terminated", meta.stream, meta.seq, item.reason)
                await item.msg.term()
                self._count(meta.stream, "failed")
        except Exception as exc:  # the broker unreachable: redelivered after the ack-wait, and found marked
            # Not counted: the redelivery finds the mark "written" (a duplicate), or still our claim (the broker
            # went down before the mark), and then writes the frame again (the same PNG) and counts it.
            log.warning("stream %r frame %d: cannot mark or acknowledge it (%s: %s); it is redelivered after the "
                        "ack-wait", meta.stream, meta.seq, type(exc).__name__, exc)


async def _quietly(coro):
    try:
        await coro
    except Exception as exc:
        log.debug("JetStream: %s", exc)


# The command.
def get_args_parser():
    parser = ArgumentParser(prog="latentlink worker", description=__doc__.split("\n\n")[0].split(":", 1)[1].strip(),
                            epilog=EXAMPLES)
    parser.add_argument("--jetstream", required=True, metavar="URL",
                        help="the NATS JetStream server the gateway stores frames in (nats://HOST:PORT)")
    parser.add_argument("--profile", default="nano-504", help="profile name or YAML file (default: %(default)s)")
    parser.add_argument("--decoder", default="default",
                        help="decoder model: .onnx, .pt (see --device), .engine, triton://HOST:PORT/MODEL (a decode "
                             "service, `latentlink decode-service`), or 'default' for the profile's ONNX "
                             "(default: %(default)s)")
    parser.add_argument("--out", action="append", metavar="URI",
                        help="where decoded frames go, as for latentlink host: a folder (DIR or file://DIR/: PNGs, "
                             "OUT/<stream>/<seq:06d>.png), file://NAME.mp4 (frames of several workers arrive out of "
                             "order: prefer PNGs); several allowed")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="frames fetched and decoded at once (default: %(default)s)")
    parser.add_argument("--ack-wait", type=positive_float, default=30.0, metavar="SECONDS",
                        help="a frame a worker has not acknowledged within this time is redelivered to another "
                             "(a worker that died); shared by all workers (default: %(default)s)")
    parser.add_argument("--marks-ttl", type=positive_float, default=fleet.DEFAULT_MARKS_TTL_S, metavar="SECONDS",
                        help="how long the marks of written frames are kept, for deduplication (a new bucket "
                             "only; default: %(default)s; keep it well above --ack-wait)")
    parser.add_argument("--max-frame-bytes", type=positive_int, default=None,
                        help="refuse payloads larger than this (default: the profile's transport.max_frame_bytes)")
    parser.add_argument("--metrics", type=address, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (latentlink_worker_*, the broker's "
                             "backlog, stage histograms)")
    parser.add_argument("--max-frames", type=positive_int, help="exit after writing N frames")
    parser.add_argument("--idle-exit", type=positive_float, metavar="SECONDS",
                        help="exit once no frame came for this long (scripts, benchmarks)")
    parser.add_argument("--progress", type=float, default=5.0, metavar="SECONDS",
                        help="log a progress line this often (default: %(default)s; 0: off)")
    parser.add_argument("--decode-delay", type=float, default=0.0, metavar="SECONDS",
                        help="for testing only: sleep this long per frame decoded (default: off)")
    add_backend_options(parser)
    add_run_options(parser)
    return parser


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)
    fleet.check_url(args.jetstream)
    if args.decoder != "default" and not is_service(args.decoder):  # triton://: host/triton_backend.py
        check_model_file("--decoder", args.decoder, "decoder")
    if args.report:
        check_output_file("--report", args.report)
    if any(spec.kind == "display" for spec in parse_outputs(args.out or [])):
        raise ConfigError("a worker shows no window: give it --out DIR (PNGs) or file://NAME.mp4")
    if args.decode_delay < 0 or args.progress < 0:
        raise ConfigError("bad --decode-delay {} or --progress {}: give 0 or more".format(args.decode_delay,
                                                                                          args.progress))
    fleet._nats()  # the missing package said before the model loads
    profile = load_profile(args.profile)
    decoder_path = profile.model.decoder if args.decoder == "default" else args.decoder
    report = None
    opened = open_outputs(args.out or [], fps=profile.capture.fps)
    services = []
    try:
        with open_decoder(decoder_path, "decoder", **backend_options(args, profile)) as decoder:
            outputs = ([FolderOutput(_out_dir(opened.out_dir))] if opened.out_dir else []) + opened.outputs
            meta = {"role": "worker", "profile": profile.name, "backend": decoder.name, "decoder": decoder_path,
                    "out": ",".join(args.out) if args.out else None, "jetstream": args.jetstream}
            if args.report:
                report = ReportWriter(args.report, host_stages(None), profile.budget_ms, meta)
            worker = Worker(args.jetstream, decoder, outputs, budget_ms=profile.budget_ms, batch_size=args.batch_size,
                            ack_wait_s=args.ack_wait, marks_ttl_s=args.marks_ttl,
                            max_frame_bytes=args.max_frame_bytes or profile.transport.max_frame_bytes,
                            max_frames=args.max_frames, idle_exit_s=args.idle_exit, decode_delay_s=args.decode_delay,
                            on_record=report.add if report is not None else None, progress_s=args.progress)
            if args.metrics:
                from .metrics import Metrics, WorkerCollector

                metrics = Metrics(None, *parse_address(args.metrics), collectors=[WorkerCollector(worker.snapshot)])
                worker.metrics = metrics
                metrics.open()
                services.append(metrics)
            summary = worker.run()
        meta.update(peak_rss_mb=peak_rss_mb(), worker=worker.id)
        if report is not None:
            report.finish(summary, meta)
    finally:
        for service in services:
            service.close()
        opened.close()
        if report is not None:
            report.close()
    if not args.quiet:
        print(format_table(summary, "worker {} ({}, {})".format(worker.id, profile.name, decoder.name)))
    print(worker_line(summary), file=sys.stdout if not args.quiet else sys.stderr)
    return 1 if summary["failed"] else 0


def worker_line(summary):
    return ("worker {worker}: {written} frames written, {duplicates} duplicates skipped (written already), {failed} "
            "failed to decode, {terminated} bad messages terminated, {redelivered} redelivered to this worker, "
            "{taken_over} taken over from another".format(**summary))


def _out_dir(path):
    from .out_dir import OutDir

    return OutDir(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LatentlinkError as exc:  # pragma: no cover (run_main handles these)
        print("error: {}".format(exc), file=sys.stderr)
        sys.exit(2)
