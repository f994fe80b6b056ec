"""``latentlink host`` / ``python -m latentlink.host``: receive latents from edges, decode them, store or show the images."""

import argparse
import logging
import os
import sys

from latentlink.edge.backends import open_backend
from latentlink.edge.cli import (add_backend_options, add_run_options, backend_options, peak_rss_mb, positive_float,
                      positive_int, run_main, setup_logging)
from latentlink.edge.errors import ConfigError
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import HOST_STAGES, ReportWriter, format_table
from latentlink.edge.sender import parse_address

from .server import Host, check_display

EXAMPLES = """examples:
  latentlink host --listen 0.0.0.0:5760 --out frames/ --report host.json
  latentlink host --profile nano-1008 --display
  latentlink host --listen 127.0.0.1:0 --ready-file port.txt --max-frames 100
  latentlink host --decoder runs/lossy-cae.pt --device cuda --precision fp16   (decode on a GPU)

decoded frames are saved as OUT/<stream>/<seq:06d>.png (seq: the edge's sequence number, from 0)"""


def get_args_parser():
    parser = argparse.ArgumentParser(prog="latentlink host", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:5760",
                        help="address to listen on, HOST:PORT (default: %(default)s; 0.0.0.0 for every interface, "
                             "port 0 for any free port)")
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


def _main(argv):
    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.display:
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise ConfigError("--display needs a screen, and DISPLAY is not set; save frames with --out DIR instead")
        check_display()
    profile = load_profile(args.profile)
    decoder_path = profile.model.decoder if args.decoder == "default" else args.decoder
    listen = parse_address(args.listen)
    report = None
    try:
        with open_backend(decoder_path, "decoder", **backend_options(args, profile)) as decoder:
            meta = {"role": "host", "profile": profile.name, "backend": decoder.name, "decoder": decoder_path,
                    "out": args.out}
            if args.report:  # each decoded frame's record is written at once, not kept until the end
                report = ReportWriter(args.report, HOST_STAGES, profile.budget_ms, meta)
            summary = serve(args, profile, decoder, listen, report)
        meta.update(peak_rss_mb=peak_rss_mb(), stream=",".join(summary["streams"]) or "-")
        if report is not None:
            report.finish(summary, meta)
    finally:
        if report is not None:
            report.close()  # a host that failed leaves an unfinished report, readable up to its last record
    if not args.quiet:
        print(format_table(summary, "host ({}, {})".format(profile.name, decoder.name)))
        for name, stream in summary["streams"].items():
            print("stream {!r}: {frames} frames decoded, {failed} failed to decode, {gaps} never received (dropped "
                  "or lost by the edge), {duplicates} resent duplicates, {connections} connection(s){}".format(
                      name, "" if stream["ended"] else ", no end-of-stream", **stream))
        if "forgotten_streams" in summary:
            print("{streams} older streams not listed: {frames} frames decoded, {failed} failed to decode, {gaps} "
                  "never received, {duplicates} resent duplicates".format(**summary["forgotten_streams"]))
        if args.report:
            print("report: {}".format(args.report))
    return 0


def serve(args, profile, decoder, listen, report):
    """Serve edges until a stop condition; returns the summary."""
    host = Host(decoder, budget_ms=profile.budget_ms, out_dir=args.out, display=args.display,
                max_frames=args.max_frames, max_streams=args.max_streams,
                max_frame_bytes=args.max_frame_bytes or profile.transport.max_frame_bytes,
                idle_timeout_s=args.idle_timeout, max_connections=args.max_connections,
                accept_pickle=args.accept_pickle, window=args.window,
                on_record=report.add if report is not None else None)
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
    return host.summary()


if __name__ == "__main__":
    sys.exit(main())
