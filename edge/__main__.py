"""``latentlink edge`` / ``python -m latentlink.edge``: capture, encode and send frames to a host, profiling every stage."""

import logging
import sys

from .cli import (ArgumentParser, add_backend_options, add_run_options, address, backend_options, check_model_file,
                  check_output_dir, check_output_file, check_resolvable, non_negative_float, peak_rss_mb,
                  positive_float, positive_int, run_main, setup_logging)
from .entropy import CODERS, check_available
from .errors import ConfigError
from .lossless import PREDICTORS
from .pipeline import check_raw, default_stream_name, edge_stages, run_edge
from .profile import load_profile
from .profiler import ReportWriter, emit, format_table
from .protocol import SERIALIZERS
from .protocol import DELIVERIES, PERMANENT_REFUSALS
from .rate import RATES, is_progressive, make_rate, open_model
from .security import Credentials
from .sender import DROP_POLICIES, Spool, parse_address
from .sources import open_source

EXAMPLES = """examples:
  latentlink edge csi://0 --connect 192.168.1.20:5760 --profile nano-504        (or --source csi://0)
  latentlink edge --source file://clip.mp4 --connect 127.0.0.1:5760 --frames 200 --report edge.json
  latentlink edge --source v4l2:///dev/video0 --encoder my-model/encoder.onnx --profile my-site.yaml
  latentlink edge --source csi://0 --encoder engines/encoder.<sha>.trt8.2.1.8.NVIDIA-Tegra-X1.fp16.engine --mapped
  latentlink edge --source csi://0 --encoder runs/lossy-cae.pt --device cuda --precision fp16
  latentlink edge --source csi://0 --delivery reliable --spool /var/spool/latentlink --spool-bytes 200000000
  latentlink edge --source csi://0 --connect 192.168.1.20:5760 --name cam0 --tls keys/
        (keys/ca.pem and keys/edges/cam0.pem + cam0.key, from `latentlink keys init` / `latentlink keys edge`)
  latentlink edge --source csi://0 --connect 192.168.1.20:5760 --token-file token.txt
  latentlink edge --source csi://0 --connect 192.168.1.20:5760 --lossless mlp
        (each frame as captured, rebuilt bit for bit on the host: no encoder, no loss)
  latentlink edge --source csi://0 --encoder progressive/encoder.onnx --rate adaptive --min-iterations 2
        (a progressive model: each frame's iterations follow the link; --rate fixed --iterations 4 for a fixed rate)
  latentlink edge --source file://clip.mp4 --fps 15 --connect 127.0.0.1:5760    (a file paced like a camera)

sources: csi://N (Jetson CSI camera), v4l2:///dev/videoN (USB camera), file://clip.mp4 (video),
         file://photos/ (images in name order), file://img.png, rtsp://..., synthetic:// (test pattern)

exit status: 0 when every frame was decoded or dropped by the --drop policy; 1 when the host refused the stream (or
its credentials: TLS certificate, token), or frames were lost under --drop block or --delivery reliable (the counts
are printed); 2 for bad options."""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink edge", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="where frames come from, e.g. csi://0 (see below); the same as --source")
    parser.add_argument("--source", help="where frames come from, as INPUT (see below)")
    parser.add_argument("--connect", type=address, default="127.0.0.1:5760",
                        help="host address HOST:PORT; a bare PORT means 127.0.0.1:PORT, a bare HOST port 5760 "
                             "(default: %(default)s)")
    parser.add_argument("--profile", default="nano-504",
                        help="profile name or YAML file: model, input size, budget, transport (default: %(default)s)")
    parser.add_argument("--encoder", default="default",
                        help="encoder model: .onnx (ONNX Runtime), .engine (TensorRT, built by `latentlink export "
                             "engine`), .pt (PyTorch checkpoint), or 'default' for the profile's ONNX (default: "
                             "%(default)s)")
    parser.add_argument("--name", default=None, help="stream name shown by the host (default: this machine's name)")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="stop after N frames (default: until the source ends)")
    parser.add_argument("--loop", action="store_true", help="restart file sources at their end")
    parser.add_argument("--serializer", choices=SERIALIZERS, default=None,
                        help="framed (packed latents, default); pickle (pickled arrays in latentlink frames, for "
                             "a host with --accept-pickle); pickle-raw (an 8-byte big-endian length and "
                             "pickle.dumps(latents) per frame and nothing else, as the seed pipeline's plain-socket "
                             "receivers expect: no handshake or acknowledgements, frames counted as sent)")
    parser.add_argument("--entropy", choices=CODERS, default=None,
                        help="lossless coding of the packed latents before sending, on the CPU: zlib (always "
                             "there), lz4 (pip install lz4), zstd (pip install zstandard), context (binary latents "
                             "coded with the model's probability tables, entropy.json beside it: the smallest; "
                             "numpy only); default: the profile's transport.entropy (none unless it says)")
    parser.add_argument("--lossless", choices=PREDICTORS, default=None,
                        help="send each frame as captured (its native size, no encoder), coded losslessly: the host "
                             "rebuilds it bit for bit. The predictor: med (JPEG-LS's median edge detector) or mlp "
                             "(a small learned one, about 25 %% fewer bits on photos, slower); numpy only")
    parser.add_argument("--drop", choices=DROP_POLICIES, default=None,
                        help="when the send queue is full drop the oldest frame (live view), the newest, or block "
                             "(never drop); default from the profile")
    parser.add_argument("--queue-size", type=positive_int, default=None,
                        help="frames that may wait beyond the window; default from the profile")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="frames sent and not yet acknowledged by the host (the host may grant fewer); a small "
                             "window bounds latency whatever the network buffers hold; default from the profile")
    parser.add_argument("--delivery", choices=DELIVERIES, default=None,
                        help="live: a frame in flight when a connection dies is lost (default from the profile); "
                             "reliable: it is resent after the reconnect, the host decodes each frame once, and "
                             "nothing is dropped (a full queue blocks capture or spills to --spool)")
    parser.add_argument("--spool", metavar="DIR", help="with --delivery reliable: frames that do not fit in the "
                        "queue wait in files here (kept only while the edge runs)")
    parser.add_argument("--spool-bytes", type=positive_int, default=100 << 20, metavar="BYTES",
                        help="the most the spool may hold (default: %(default)s)")
    parser.add_argument("--wait-for-host", type=non_negative_float, default=None, metavar="SECONDS",
                        help="give up when the host has been unreachable this long, counting what was not "
                             "delivered as lost (0: wait forever; default from the profile: forever)")
    parser.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                        help="2 (default): handshake, acknowledgements, exact accounting; 1: for hosts older than "
                             "protocol 2 (frames are only counted as sent)")
    parser.add_argument("--tls", metavar="DIR",
                        help="TLS: verify the host against DIR/ca.pem (and the address in --connect), and present "
                             "DIR/edges/NAME.pem and NAME.key, NAME being --name (`latentlink keys edge DIR NAME`)")
    parser.add_argument("--tls-ca", metavar="FILE", help="with --tls: the CA certificate, if not DIR/ca.pem")
    parser.add_argument("--token-file", metavar="FILE",
                        help="prove to the host that this edge has the token in FILE, and make the host prove it too "
                             "(the host's --token-file; protocol 2)")
    parser.add_argument("--rate", choices=RATES, default=None,
                        help="a progressive model's iterations per frame: fixed (--iterations N for every frame; "
                             "default) or adaptive (each frame's follow the link: fewer when acknowledgements lag, "
                             "more when they come back fast, within --min-iterations and --max-iterations)")
    parser.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                        help="with --rate fixed: iterations per frame (default: all the model has)")
    parser.add_argument("--min-iterations", type=positive_int, default=None, metavar="N",
                        help="with --rate adaptive: the fewest iterations a frame gets (default: 1)")
    parser.add_argument("--max-iterations", type=positive_int, default=None, metavar="N",
                        help="with --rate adaptive: the most iterations a frame gets, and the first frames' "
                             "(default: all the model has)")
    parser.add_argument("--fps", type=positive_float, default=None,
                        help="read the source at most this many frames per second, as a camera would deliver them "
                             "(files and synthetic:// are otherwise read as fast as frames are encoded)")
    parser.add_argument("--send-buffer", type=positive_int, default=None, metavar="BYTES",
                        help="socket send buffer (SO_SNDBUF); default from the profile")
    add_backend_options(parser)
    add_run_options(parser)
    return parser


def main(argv=None):
    return run_main(_main, argv)


def check_args(parser, args):
    """Checks of what argparse cannot check alone: INPUT or --source, the model file, the output paths, and
    that the host's name resolves (a typo would otherwise be retried forever)."""
    if args.input and args.source and args.input != args.source:
        parser.error("two inputs: {} and --source {}; give one (INPUT and --source mean the same)".format(
            args.input, args.source))
    args.source = args.source or args.input
    if not args.source:
        parser.error("no input: give it first, e.g. `latentlink edge csi://0`, or as --source csi://0")
    scheme = args.source.partition("://")[0].lower() if "://" in args.source else "file"
    if args.loop and scheme != "file":
        parser.error("--loop restarts files, folders and images at their end; {} has no end: leave --loop "
                     "out".format(args.source))
    if args.lossless and args.encoder != "default":
        parser.error("--lossless sends frames without an encoder: leave --encoder {} out".format(args.encoder))
    if args.encoder != "default":
        check_model_file("--encoder", args.encoder, "encoder")
    if args.report:
        check_output_file("--report", args.report)
    if args.spool:
        check_output_dir("--spool", args.spool)
    check_resolvable("--connect", args.connect)


def _main(argv):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_logging(args.verbose)
    profile = load_profile(args.profile)
    encoder_path = profile.model.encoder if args.encoder == "default" else args.encoder
    address = parse_address(args.connect)
    stream = args.name or default_stream_name()
    capture = profile.capture
    entropy = args.entropy or profile.transport.entropy
    if args.lossless:
        if args.entropy not in (None, "none") or args.serializer not in (None, "framed"):
            raise ConfigError("--lossless frames are coded by their predictor and framed by latentlink: leave "
                              "--entropy and --serializer out")
        entropy = "none"
        encoder_path = "lossless-" + args.lossless
    check_available(entropy)  # before the camera and the model are opened: a missing library fails at once
    delivery = args.delivery or profile.transport.delivery
    if delivery == "reliable" and args.drop not in (None, "block"):
        raise ConfigError("--delivery reliable never drops frames, so it cannot take --drop {}: leave --drop out, "
                          "or use --delivery live".format(args.drop))
    check_raw(args.serializer or profile.transport.serializer, entropy, delivery)  # before camera and model open
    if args.spool and delivery != "reliable":
        raise ConfigError("--spool holds frames for --delivery reliable only: add --delivery reliable")
    spool = Spool(args.spool, args.spool_bytes) if args.spool else None
    if args.token_file and args.protocol == 1:
        raise ConfigError("--token-file is proved in protocol 2's handshake, which protocol 1 does not have: drop "
                          "--protocol 1, or use --tls DIR")
    credentials = Credentials.for_edge(args.tls, stream, args.tls_ca, args.token_file)
    rate_options = (args.rate, args.iterations, args.min_iterations, args.max_iterations)
    if args.lossless and any(option is not None for option in rate_options):
        raise ConfigError("--rate and --iterations choose a progressive model's iterations per frame; --lossless "
                          "sends each frame whole: leave them out")
    if any(option is not None for option in rate_options) and is_progressive(encoder_path) is False:
        raise ConfigError(not_progressive(encoder_path))  # before the camera opens (a checkpoint: once loaded)
    report = None
    try:
        with open_source(args.source, capture.width, capture.height, capture.fps, loop=args.loop) as source, \
                (_NoEncoder() if args.lossless else open_model(encoder_path, "encoder",
                                                               **backend_options(args, profile))) as encoder:
            rate = None
            if args.lossless:
                logging.getLogger("latentlink.edge").info(
                    "stream %r: %s -> lossless (%s predictor, frames as captured) -> %s:%d", stream,
                    source.description, args.lossless, address[0], address[1])
                meta = {"role": "edge", "stream": stream, "profile": profile.name, "backend": encoder.name,
                        "encoder": encoder_path, "source": source.uri, "packing": "lossless", "entropy": entropy}
            else:
                logging.getLogger("latentlink.edge").info(
                    "stream %r: %s -> %s (%s, %s packing, entropy %s) -> %s:%d", stream, source.description,
                    encoder_path, encoder.name, encoder.info.packing, entropy, address[0], address[1])
                meta = {"role": "edge", "stream": stream, "profile": profile.name, "backend": encoder.name,
                        "encoder": encoder_path, "source": source.uri, "packing": encoder.info.packing,
                        "entropy": entropy, "input_shape": list(encoder.info.input_shape),
                        "latent_shape": list(encoder.info.latent_shape)}
                if getattr(encoder, "progressive", None) is not None:  # edge/rate.py: k of K codes per frame
                    rate = make_rate(*(rate_options[:1] + (encoder.max_iterations,) + rate_options[1:]),
                                     window=args.window or profile.transport.window)
                    meta.update(rate=rate.describe(), progressive=encoder.progressive, packing="bits")
                elif any(option is not None for option in rate_options):
                    raise ConfigError(not_progressive(encoder_path))
            if args.report:  # each frame's record is written as its outcome arrives, not kept until the end
                report = ReportWriter(args.report, edge_stages(entropy, args.lossless), profile.budget_ms, meta)
            summary = run_edge(source, encoder, profile, address, stream, frames=args.frames,
                               serializer=args.serializer, drop=args.drop, queue_size=args.queue_size,
                               send_buffer_bytes=args.send_buffer, entropy=entropy, window=args.window,
                               delivery=delivery, wait_for_host_s=args.wait_for_host, spool=spool,
                               protocol=args.protocol, credentials=credentials,
                               on_record=report.add if report else None, lossless=args.lossless, rate=rate,
                               fps=args.fps)
        meta["peak_rss_mb"] = peak_rss_mb()
        if report is not None:
            report.finish(summary, meta)
    finally:
        if report is not None:
            report.close()  # a run that failed leaves an unfinished report, readable up to its last record
    if not args.quiet:
        title = "edge {!r} ({}, {}, {})".format(stream, profile.name, encoder.name, source.uri)
        emit(format_table(summary, title))  # never a UnicodeEncodeError under a C locale (Python 3.6, systemd)
        if args.report:
            print("report: {}".format(args.report))
    return exit_status(summary, args.drop or ("block" if delivery == "reliable" else profile.transport.drop))


class _NoEncoder(object):
    """--lossless: in place of the encoder's backend (nothing to load or run)."""
    name = "none"
    copy_note = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def not_progressive(encoder_path):
    return ("--rate, --iterations, --min-iterations and --max-iterations choose a progressive model's iterations per "
            "frame, and {} is not progressive (its model.json has no \"progressive\")".format(encoder_path))


def exit_status(summary, drop):
    """1 when the host refused the stream or frames were lost where none may be (``block``, ``reliable``)."""
    outcomes = summary["outcomes"]
    refused = summary.get("refused")
    if refused:
        if refused["reason"] in PERMANENT_REFUSALS:
            print("error: the host refused the stream ({}): {} ({} frames refused)".format(
                refused["reason"], refused["message"], outcomes["refused"]), file=sys.stderr)
        else:  # this edge's own decision (TLS, token, no answer)
            print("error: stopped ({}): {} ({} frames not sent)".format(refused["reason"], refused["message"],
                                                                        outcomes["refused"]), file=sys.stderr)
        return 1
    if outcomes["lost"] and (drop == "block" or summary["delivery"] == "reliable"):
        print("error: {} of {} frames were lost{}".format(
            outcomes["lost"], summary["captured"], ": " + summary["gave_up"] if summary.get("gave_up") else
            " (connections to the host died with frames in flight)"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
