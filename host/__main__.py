"""``latentlink host`` / ``python -m latentlink.host``: receive latents from edges, decode them, store or show the images."""

import logging
import os
import signal
import sys
import threading

from latentlink.edge.cli import (ArgumentParser, add_backend_options, add_run_options, address, backend_options,
                                 check_input_file, check_model_file, check_output_file, check_resolvable, is_loopback,
                                 peak_rss_mb, positive_float, positive_int, run_main, setup_logging)
from latentlink.edge.errors import ConfigError
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import ReportWriter, format_table, host_stages
from latentlink.edge.security import Credentials
from latentlink.edge.sender import parse_address

from .jetstream import check_url, parse_bytes, parse_duration
from .outputs import check_display_available, open_outputs, parse_output, parse_outputs
from .raw_pickle import check_stream_name
from .server import Host
from .triton_backend import is_service, open_decoder

EXAMPLES = """examples:
  latentlink host --listen 0.0.0.0:5760 --out frames/ --report host.json
  latentlink host --profile nano-1008 --display
  latentlink host --out frames/ --out 'file://runs/cam.mp4?fps=15'   (PNGs, and videos runs/cam-<stream>.mp4)
  latentlink host --listen 0.0.0.0:5760 --view 0.0.0.0:8080 --metrics 9100    (watch in a browser; Prometheus)
  latentlink host --listen 127.0.0.1:0 --ready-file port.txt --max-frames 100
  latentlink host --decoder runs/lossy-cae.pt --device cuda --precision fp16   (decode on a GPU)
  latentlink host --decoder triton://gpu-host:8000/decoder --out frames/   (a GPU machine's decode-service)
  latentlink host --postfilter profiles/default/nano-504/postfilter.onnx --out frames/   (the default's filter)
  latentlink host --listen 0.0.0.0:5760 --tls keys/ --out frames/      (keys/: latentlink keys init keys/)
  latentlink host --listen 0.0.0.0:5760 --token-file token.txt          (token.txt: latentlink keys token)
  latentlink host --listen 0.0.0.0:5760 --jetstream nats://127.0.0.1:4222     (a gateway: decode workers do the rest,
                                                                              latentlink worker --jetstream ...)

decoded frames are saved as OUT/<stream>/<seq:06d>.png (seq: the edge's sequence number, from 0); --out takes URIs,
several allowed: file://DIR/ (or a plain DIR: PNGs; the first folder also keeps the delivery journal), file://NAME.mp4
(one video per stream, NAME-<stream>.mp4; ?fps=N, default the profile's capture fps), display://0 (a window)

credentials: without --tls or --token-file anyone who can reach the host can stream into it (fine on loopback; the
host warns when it listens elsewhere). --tls: edges need a certificate from the same CA, and stream only under the
name it carries. --token-file: edges must prove they have the token (not encrypted: prefer --tls across networks)."""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink host", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("--listen", type=address, default="127.0.0.1:5760",
                        help="address to listen on, HOST:PORT (default: %(default)s, this machine only; 0.0.0.0 for "
                             "every interface, so that an edge on the network can connect; port 0 for any free "
                             "port; a bare PORT means 127.0.0.1:PORT)")
    parser.add_argument("--profile", default="nano-504", help="profile name or YAML file (default: %(default)s)")
    parser.add_argument("--decoder", default="default",
                        help="decoder model: .onnx (ONNX Runtime), .pt (PyTorch checkpoint; see --device), .engine "
                             "(TensorRT), triton://HOST:PORT/MODEL (a `latentlink decode-service`), or 'default' for "
                             "the profile's ONNX (default: %(default)s)")
    parser.add_argument("--postfilter", metavar="FILE.onnx",
                        help="run this DnCNN-style post-filter (`latentlink train-postfilter`) on every decoded "
                             "frame, timed as the host stage 'postfilter'; refused unless trained for the decoder's "
                             "model (FILE.json says which)")
    parser.add_argument("--out", action="append", metavar="URI",
                        help="where decoded frames go; repeat for several: a folder (DIR or file://DIR/: PNGs), "
                             "file://NAME.mp4 (a video per stream, NAME-<stream>.mp4; file://NAME.mp4?fps=15), "
                             "display://0 (a window: needs a screen and an OpenCV with GUI support)")
    parser.add_argument("--display", action="store_true", help="same as --out display://0")
    parser.add_argument("--view", type=address, metavar="HOST:PORT",
                        help="serve a live view on http://HOST:PORT/: every stream's latest frame (MJPEG), its "
                             "stages and latency, for machines without a screen (a bare PORT means 127.0.0.1:PORT; "
                             "anyone who can reach it sees the frames)")
    parser.add_argument("--metrics", type=address, metavar="HOST:PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (latentlink_*: frames decoded, "
                             "failed and dropped per stream, stage and latency histograms, queue depth, batches)")
    parser.add_argument("--max-frames", type=positive_int,
                        help="exit after decoding N frames (all streams together)")
    parser.add_argument("--max-streams", type=positive_int,
                        help="exit after N streams have ended (their edge said end-of-stream)")
    parser.add_argument("--max-frame-bytes", type=positive_int, default=None,
                        help="refuse payloads larger than this, and entropy-coded ones that unpack to more "
                             "(default: the profile's transport.max_frame_bytes)")
    parser.add_argument("--max-connections", type=positive_int, default=32,
                        help="edges served at once; more are refused (default: %(default)s)")
    parser.add_argument("--max-connections-per-peer", type=positive_int, default=4,
                        help="connections served at once from one IP address; more are refused (default: "
                             "%(default)s; raise it for more edges behind one NAT address)")
    parser.add_argument("--idle-timeout", type=positive_float, default=60.0,
                        help="close a connection silent this many seconds between frames, in all (default: "
                             "%(default)s)")
    parser.add_argument("--handshake-timeout", type=positive_float, default=5.0,
                        help="a new connection must start its first message within this many seconds, and a "
                             "protocol-2 edge's HELLO arrive whole (default: %(default)s)")
    parser.add_argument("--frame-timeout", type=positive_float, default=10.0,
                        help="a message, once its first byte arrived, must arrive whole within this many seconds "
                             "(default: %(default)s)")
    parser.add_argument("--window", type=positive_int, default=8,
                        help="the most frames a protocol-2 edge may have sent and not yet acknowledged (an edge may "
                             "ask for fewer; default: %(default)s)")
    parser.add_argument("--accept-pickle", action="store_true",
                        help="accept frames of pickled arrays (edge --serializer pickle, the seed pipeline's format); "
                             "off by default: pickle is the riskiest thing a host can parse")
    parser.add_argument("--accept-pickle-raw", action="store_true",
                        help="accept plain-socket clients that send an 8-byte big-endian length and pickle.dumps("
                             "latents) per frame, as the seed pipeline's users do (no latentlink framing): each "
                             "pickle is parsed without an unpickler against the decoder's latent shape, as float32, "
                             "float16 or uint8; off by default (such a connection is refused)")
    parser.add_argument("--raw-stream-name", type=raw_stream_name, metavar="NAME",
                        help="with --accept-pickle-raw: the stream name of those clients' frames (folder under "
                             "--out; default raw-<peer ip>-<peer port>); one such client at a time then")
    parser.add_argument("--tls", metavar="DIR",
                        help="TLS with the credentials of `latentlink keys init DIR`: DIR/host.pem and host.key, and "
                             "edges need a certificate signed by DIR/ca.pem, whose name is the only stream name "
                             "they may use")
    parser.add_argument("--token-file", metavar="FILE",
                        help="edges must prove they have the token in FILE (HMAC challenge; the token never crosses "
                             "the wire): for small setups without certificates; traffic is not encrypted")
    parser.add_argument("--ready-file", help="write HOST:PORT here once listening (for scripts and tests)")
    parser.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                        help="decode up to N frames in one run, across streams (default: %(default)s; 1: one at a "
                             "time). Needs a decoder with a dynamic batch axis (latentlink export onnx makes one); "
                             "others decode a batch's frames one by one")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                        help="once a frame waits to be decoded, wait this long for more to fill the batch (default: "
                             "%(default)s ms; never when a full batch is queued)")
    parser.add_argument("--queue-size", type=positive_int, default=64, metavar="FRAMES",
                        help="the most received frames waiting to be decoded (and in each writer's queue): when "
                             "full, the host stops reading and the edges' windows slow them (default: %(default)s)")
    parser.add_argument("--write-workers", type=positive_int, default=2, metavar="N",
                        help="threads writing decoded frames to the outputs and acknowledging them; one stream's "
                             "frames always go through one, in order (default: %(default)s)")
    parser.add_argument("--progress", type=float, default=5.0, metavar="SECONDS",
                        help="log a progress line this often while frames flow: frames/s per stream, latency, "
                             "backlog (default: %(default)s; 0: off)")
    parser.add_argument("--decode-delay", type=float, default=0.0, metavar="SECONDS",
                        help="for testing and benchmarks only: sleep this long per frame decoded, simulating a "
                             "slower decoder (default: %(default)s, off)")
    fleet = parser.add_argument_group("fleet (a gateway to decode workers: README, Fleets)")
    fleet.add_argument("--jetstream", metavar="URL",
                       help="be a gateway: store each accepted frame in the NATS JetStream server at URL "
                            "(nats://HOST:PORT) for `latentlink worker` processes to decode, instead of decoding "
                            "here; edges are acknowledged once the broker stored the frame (outcome 'stored')")
    fleet.add_argument("--jetstream-max-age", type=parse_duration, metavar="DURATION",
                       help="the broker drops frames older than this (seconds, or 90s, 30m, 12h, 7d; default 24h "
                            "for a new stream, else unchanged)")
    fleet.add_argument("--jetstream-max-bytes", type=parse_bytes, metavar="SIZE",
                       help="the most the broker keeps (bytes, or 500MB, 10GB; default 10GB for a new stream, else "
                            "unchanged); when full, new frames are refused and the gateway retries, so the edges "
                            "wait")
    add_backend_options(parser)
    add_run_options(parser)
    return parser


def raw_stream_name(text):
    """argparse type for --raw-stream-name: a stream name (it becomes a folder under --out)."""
    import argparse

    try:
        return check_stream_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def main(argv=None):
    return run_main(_main, argv)


def check_args(args):
    """Checks of what argparse cannot check alone: the model file, the output paths, the address's name."""
    if args.decoder != "default" and not is_service(args.decoder):
        check_model_file("--decoder", args.decoder, "decoder")
    if args.postfilter:
        check_input_file("--postfilter", args.postfilter, "train one with `latentlink train-postfilter`")
    for option, path in (("--report", args.report), ("--ready-file", args.ready_file)):
        if path:
            check_output_file(option, path)
    for spec in parse_outputs(args.out or []):  # the checks of each URI, before the model loads; opened in serve()
        if spec.kind == "display":
            check_display_available()
    check_resolvable("--listen", args.listen)
    for option, value in (("--view", args.view), ("--metrics", args.metrics)):
        if value:
            check_resolvable(option, value)


def loopback_note(listen):
    """Say that a host on a loopback address is out of the network's reach, and how to open it (not for port 0,
    which scripts and the demo use on one machine)."""
    host, port = parse_address(listen)
    if is_loopback(host) and port != 0:
        logging.getLogger("latentlink.host").info(
            "listening on %s only: edges on this machine can connect, a Jetson on the network cannot; for that, "
            "--listen 0.0.0.0:%d (every interface)", host, port)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    setup_logging(args.verbose)
    if args.jetstream and (args.out or args.display or args.view or args.max_frames or args.accept_pickle_raw):
        raise ConfigError("a gateway (--jetstream) decodes nothing: give --out to the workers (latentlink worker "
                          "--jetstream URL --out DIR), and drop --out, --display, --view, --max-frames and "
                          "--accept-pickle-raw here")
    if args.jetstream:
        check_url(args.jetstream)  # before the model loads
    if (args.jetstream_max_age or args.jetstream_max_bytes) and not args.jetstream:
        raise ConfigError("--jetstream-max-age and --jetstream-max-bytes are for a gateway: add --jetstream URL")
    if args.raw_stream_name and not args.accept_pickle_raw:
        raise ConfigError("--raw-stream-name names the frames of --accept-pickle-raw clients: add --accept-pickle-raw")
    loopback_note(args.listen)
    if args.display:
        check_display_available()
    if args.decode_delay < 0:
        raise ConfigError("bad --decode-delay {}: seconds >= 0".format(args.decode_delay))
    if args.batch_wait_ms < 0 or args.progress < 0:
        raise ConfigError("bad --batch-wait-ms {} or --progress {}: give 0 or more".format(args.batch_wait_ms,
                                                                                        args.progress))
    profile = load_profile(args.profile)
    decoder_path = profile.model.decoder if args.decoder == "default" else args.decoder
    listen = parse_address(args.listen)
    credentials = Credentials.for_host(args.tls, args.token_file)  # missing files fail before the model loads
    report = None
    try:
        with open_decoder(decoder_path, "decoder", **backend_options(args, profile)) as decoder:
            postfilter = None
            if args.postfilter:  # refused here, before the host listens, if trained for another model
                from .postfilter import open_postfilter

                postfilter = open_postfilter(args.postfilter, decoder.info, threads=args.threads)
            meta = {"role": "host", "profile": profile.name, "backend": decoder.name, "decoder": decoder_path,
                    "out": ",".join(args.out) if args.out else None}
            if postfilter is not None:
                meta["postfilter"] = args.postfilter
            if args.report:  # each decoded frame's record is written at once, not kept until the end
                report = ReportWriter(args.report, host_stages(postfilter), profile.budget_ms, meta)
            summary = serve(args, profile, decoder, listen, report, credentials, postfilter)
        meta.update(peak_rss_mb=peak_rss_mb(), stream=",".join(summary["streams"]) or "-")
        if report is not None:
            report.finish(summary, meta)
    finally:
        if report is not None:
            report.close()  # a host that failed leaves an unfinished report, readable up to its last record
    failed = summary.get("failed", 0)
    if not args.quiet:
        print(format_table(summary, "host ({}, {})".format(profile.name, decoder.name)))
        for name, stream in summary["streams"].items():
            print("stream {!r}: {frames} frames decoded, {failed} failed to decode, {gaps} never received (dropped "
                  "or lost by the edge), {duplicates} resent duplicates, {connections} connection(s){}".format(
                      name, "" if stream["ended"] else ", no end-of-stream", **stream))
        if "forgotten_streams" in summary:
            print("{streams} older streams not listed: {frames} frames decoded, {failed} failed to decode, {gaps} "
                  "never received, {duplicates} resent duplicates".format(**summary["forgotten_streams"]))
        print(problems_line(summary))
        if "jetstream" in summary:
            print(gateway_line(summary["jetstream"]))
        if args.report:
            print("report: {}".format(args.report))
    elif failed:
        print(problems_line(summary), file=sys.stderr)  # --quiet: no table, but a failure is never silent
    return 1 if failed else 0


def problems_line(summary):
    """One line of what went wrong: frames that failed (write errors among them), protocol errors, refusals,
    timeouts, frames dropped as the host stopped; or that nothing did."""
    parts = ["{} failed ({} write errors)".format(summary.get("failed", 0), summary.get("write_errors", 0)),
             "{} protocol errors".format(summary.get("protocol_errors", 0)),
             "{} connections refused (limits)".format(summary.get("refused_connections", 0)),
             "{} edges refused at the handshake".format(summary.get("refused_streams", 0)),
             "{} connections timed out".format(summary.get("timeouts", 0))]
    if summary.get("dropped_on_stop"):
        parts.append("{} frames received but not decoded as the host stopped (not acknowledged: edges resend them "
                     "or count them lost)".format(summary["dropped_on_stop"]))
    batches = summary.get("batches") or {}
    if batches:
        frames = sum(int(size) * n for size, n in batches.items())
        parts.append("{} batches, {:.1f} frames each on average".format(sum(batches.values()),
                                                                        frames / float(sum(batches.values()))))
    return "host: {} frames decoded; {}{}".format(summary.get("frames", 0), "; ".join(parts),
                                                  "; exit code 1" if summary.get("failed") else "")


def gateway_line(counts):
    """What a gateway stored in JetStream (``Forwarder.snapshot``)."""
    return ("gateway: {} frames stored in JetStream for the workers ({}), {} of them already there (a resend the "
            "broker dropped as a duplicate), {} publishes retried, {} too large for the broker".format(
                sum(counts["stored"].values()), ", ".join("{} {}".format(name, n) for name, n in sorted(
                    counts["stored"].items())) or "no streams", sum(counts["duplicates"].values()),
                counts["retries"], counts["failed"]))


def handle_signals(host):
    """SIGINT (Ctrl-C) and SIGTERM (kill, timeout, systemd) stop the host the same way: the first finishes the
    frames received (decoded, written, acknowledged), the second drops those still queued; both then write the
    report and print the table. Returns a function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only: a host in a thread is stopped by its owner
    log = logging.getLogger("latentlink.host")
    received = []

    def handler(signum, frame):
        received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if len(received) == 1:
            log.info("%s: stopping; finishing the frames received (%s again to drop them)", name,
                     "Ctrl-C or SIGTERM")
            host.stop()
        else:
            log.warning("%s again: dropping the frames still queued; then the summary and the report", name)
            host.abort()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(signum, old) for signum, old in previous.items()]


def serve(args, profile, decoder, listen, report, credentials, postfilter=None):
    """Serve edges until a stop condition; returns the summary."""
    uris = list(args.out or [])
    if args.display and not any(parse_output(uri).kind == "display" for uri in uris):
        uris.append("display://0")  # --display: an alias
    outputs = open_outputs(uris, fps=profile.capture.fps)
    services = []  # the live view and the metrics server: opened after the host exists, closed with the outputs
    try:
        return _serve(args, profile, decoder, listen, report, credentials, outputs, services, postfilter)
    finally:
        for service in services:
            service.close()
        outputs.close()


def _serve(args, profile, decoder, listen, report, credentials, outputs, services, postfilter=None):
    view = None
    if args.view:
        from .view import LiveView

        view = LiveView(*parse_address(args.view), title="latentlink host ({})".format(profile.name))
        view.open()
        services.append(view)
    forward = None
    if args.jetstream:
        from .jetstream import Forwarder

        forward = Forwarder(args.jetstream, args.jetstream_max_age, args.jetstream_max_bytes)
        services.append(forward)
    host = Host(decoder, budget_ms=profile.budget_ms, out_dir=outputs.out_dir, display=outputs.display,
                max_frames=args.max_frames, max_streams=args.max_streams,
                max_frame_bytes=args.max_frame_bytes or profile.transport.max_frame_bytes,
                idle_timeout_s=args.idle_timeout, frame_timeout_s=args.frame_timeout,
                handshake_timeout_s=args.handshake_timeout, max_connections=args.max_connections,
                max_connections_per_peer=args.max_connections_per_peer, accept_pickle=args.accept_pickle,
                window=args.window, decode_delay_s=args.decode_delay, credentials=credentials,
                on_record=report.add if report is not None else None, accept_pickle_raw=args.accept_pickle_raw,
                raw_stream_name=args.raw_stream_name, outputs=outputs.outputs + ([view] if view else []),
                batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
                queue_size=args.queue_size, write_workers=args.write_workers, progress_s=args.progress,
                forward=forward, postfilter=postfilter)
    if view is not None:
        view.snapshot = host.snapshot
        host.add_record_listener(view.add_record)
        warn_if_exposed("--view", view.address, "sees every decoded frame")
    if args.metrics:
        from .metrics import GatewayCollector, Metrics

        metrics = Metrics(host.snapshot, *parse_address(args.metrics),
                          collectors=[GatewayCollector(forward.snapshot)] if forward else [])
        host.add_record_listener(metrics.add_record)
        metrics.open()
        services.append(metrics)
        warn_if_exposed("--metrics", metrics.address, "reads the host's counts and stream names")
    if args.accept_pickle:
        logging.getLogger("latentlink.host").warning(
            "--accept-pickle: frames of pickled numpy arrays are accepted from any peer; they are parsed "
            "without an unpickler (numeric numpy arrays only, pickle protocols 2-5); without the flag they are "
            "refused")
    if args.accept_pickle_raw:
        logging.getLogger("latentlink.host").warning(
            "--accept-pickle-raw: connections of 8-byte lengths and pickles (no latentlink framing) are "
            "accepted from any peer as stream %s; each pickle is parsed without an unpickler (a float32, float16 "
            "or uint8 array of the decoder's shape %s, pickle protocols 2-5)",
            repr(args.raw_stream_name) if args.raw_stream_name else "raw-<ip>-<port>", list(decoder.input_shape))
    restore = handle_signals(host)  # before the ready file: a script may signal the host as soon as it listens
    try:
        bound = host.bind(*listen)
        log_credentials(args, bound, credentials)
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                f.write("{}:{}\n".format(*bound))
            os.replace(args.ready_file + ".tmp", args.ready_file)
        host.serve()
    finally:
        restore()
    summary = host.summary()
    if forward is not None:
        summary["jetstream"] = forward.snapshot()
    return summary


def warn_if_exposed(option, bound, what):
    """Warn when the live view or the metrics listen beyond this machine: they have no credentials."""
    if not is_loopback(bound[0]):
        logging.getLogger("latentlink.host").warning(
            "%s listens on %s:%d: anyone who can reach it %s (no credentials); keep it on 127.0.0.1 or a trusted "
            "network", option, bound[0], bound[1], what)


def log_credentials(args, bound, credentials):
    """Say who may stream into this host; warn when anyone on the network may."""
    log = logging.getLogger("latentlink.host")
    if credentials.tls is not None:
        log.info("TLS: edges need a certificate signed by %s, and stream only under the name it carries",
                 credentials.ca)
    if credentials.token is not None:
        log.info("token: edges must prove they have the token in %s", args.token_file)
    if not credentials and not is_loopback(bound[0]):
        log.warning("listening on %s:%d without --tls or --token-file: anyone who can reach %s:%d can stream into "
                    "this host%s; use --tls DIR (latentlink keys init) or --token-file", bound[0], bound[1],
                    bound[0], bound[1], " and write files under --out" if args.out else "")



if __name__ == "__main__":
    sys.exit(main())
