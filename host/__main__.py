"""``latentlink host`` / ``python -m latentlink.host``: receive latents from edges, decode them, store or show the images."""

import logging
import os
import sys

from latentlink.edge.backends import open_backend
from latentlink.edge.cli import (ArgumentParser, add_backend_options, add_run_options, address, backend_options,
                                 check_model_file, check_output_dir, check_output_file, check_resolvable, is_loopback,
                                 peak_rss_mb, positive_float, positive_int, run_main, setup_logging)
from latentlink.edge.errors import ConfigError
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import format_table, write_report
from latentlink.edge.sender import parse_address

from .server import Host, check_display

EXAMPLES = """examples:
  latentlink host --listen 0.0.0.0:5760 --out frames/ --report host.json
  latentlink host --profile nano-1008 --display
  latentlink host --listen 127.0.0.1:0 --ready-file port.txt --max-frames 100
  latentlink host --decoder runs/lossy-cae.pt --device cuda --precision fp16   (decode on a GPU)

decoded frames are saved as OUT/<stream>/<seq:06d>.png (seq: the edge's sequence number, from 0)"""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink host", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("--listen", type=address, default="127.0.0.1:5760",
                        help="address to listen on, HOST:PORT (default: %(default)s, this machine only; 0.0.0.0 for "
                             "every interface, so that an edge on the network can connect; port 0 for any free "
                             "port; a bare PORT means 127.0.0.1:PORT)")
    parser.add_argument("--profile", default="nano-504", help="profile name or YAML file (default: %(default)s)")
    parser.add_argument("--decoder", default="default",
                        help="decoder model: .onnx (ONNX Runtime), .pt (PyTorch checkpoint; see --device), .engine "
                             "(TensorRT), or 'default' for the profile's ONNX (default: %(default)s)")
    parser.add_argument("--out", help="save decoded frames under this folder")
    parser.add_argument("--display", action="store_true", help="show decoded frames in a window (needs a screen)")
    parser.add_argument("--max-frames", type=positive_int,
                        help="exit after decoding N frames (all streams together)")
    parser.add_argument("--max-streams", type=positive_int,
                        help="exit after N streams have ended (their edge said end-of-stream)")
    parser.add_argument("--max-frame-bytes", type=positive_int, default=None,
                        help="refuse payloads larger than this, and entropy-coded ones that unpack to more "
                             "(default: the profile's transport.max_frame_bytes)")
    parser.add_argument("--max-connections", type=positive_int, default=32,
                        help="edges served at once; more are refused (default: %(default)s)")
    parser.add_argument("--idle-timeout", type=positive_float, default=60.0,
                        help="close a connection silent this many seconds between frames (default: %(default)s)")
    parser.add_argument("--window", type=positive_int, default=8,
                        help="the most frames a protocol-2 edge may have sent and not yet acknowledged (an edge may "
                             "ask for fewer; default: %(default)s)")
    parser.add_argument("--accept-pickle", action="store_true",
                        help="accept frames of pickled arrays (edge --serializer pickle, the seed pipeline's format); "
                             "off by default: pickle is the riskiest thing a host can parse")
    parser.add_argument("--ready-file", help="write HOST:PORT here once listening (for scripts and tests)")
    add_backend_options(parser)
    add_run_options(parser)
    return parser


def main(argv=None):
    return run_main(_main, argv)


def check_args(args):
    """Checks of what argparse cannot check alone: the model file, the output paths, the address's name."""
    if args.decoder != "default":
        check_model_file("--decoder", args.decoder, "decoder")
    for option, path in (("--report", args.report), ("--ready-file", args.ready_file)):
        if path:
            check_output_file(option, path)
    if args.out:
        check_output_dir("--out", args.out)
    check_resolvable("--listen", args.listen)


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
    loopback_note(args.listen)
    if args.display:
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise ConfigError("--display needs a screen, and DISPLAY is not set; save frames with --out DIR instead")
        check_display()
    profile = load_profile(args.profile)
    decoder_path = profile.model.decoder if args.decoder == "default" else args.decoder
    listen = parse_address(args.listen)
    with open_backend(decoder_path, "decoder", **backend_options(args, profile)) as decoder:
        host = Host(decoder, budget_ms=profile.budget_ms, out_dir=args.out, display=args.display,
                    max_frames=args.max_frames, max_streams=args.max_streams,
                    max_frame_bytes=args.max_frame_bytes or profile.transport.max_frame_bytes,
                    idle_timeout_s=args.idle_timeout, max_connections=args.max_connections,
                    accept_pickle=args.accept_pickle, window=args.window)
        if args.accept_pickle:
            logging.getLogger("latentlink.host").warning(
                "--accept-pickle: frames of pickled numpy arrays are accepted from any peer; they are parsed "
                "without an unpickler (numeric numpy arrays only, pickle protocols 2-5); without the flag they are "
                "refused")
        bound = host.bind(*listen)
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                f.write("{}:{}\n".format(*bound))
            os.replace(args.ready_file + ".tmp", args.ready_file)
        host.serve()
        summary, records = host.summary()
    meta = {"role": "host", "peak_rss_mb": peak_rss_mb(),
            "stream": ",".join(summary["streams"]) or "-", "profile": profile.name,
            "backend": decoder.name, "decoder": decoder_path, "out": args.out}
    if args.report:
        write_report(args.report, summary, records, meta)
    if not args.quiet:
        print(format_table(summary, "host ({}, {})".format(profile.name, decoder.name)))
        for name, stream in summary["streams"].items():
            print("stream {!r}: {frames} frames decoded, {failed} failed to decode, {gaps} never received (dropped "
                  "or lost by the edge), {duplicates} resent duplicates, {connections} connection(s){}".format(
                      name, "" if stream["ended"] else ", no end-of-stream", **stream))
        if args.report:
            print("report: {}".format(args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
