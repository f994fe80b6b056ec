"""Helpers shared by the command-line entry points: logging setup and the one place errors become exit codes."""

import logging
import sys

from .errors import LatentlinkError


def positive_int(text):
    """argparse type: an integer >= 1 (0 or less would silently mean 'use the default' or hang)."""
    return _positive(text, int)


def positive_float(text):
    """argparse type: a number > 0."""
    return _positive(text, float)


def _positive(text, kind):
    import argparse

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number, got {!r}".format(text))
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0, got {!r}".format(text))
    return value


def add_backend_options(parser):
    """Options that pick where and how a model runs (see ``edge.backends.open_backend``)."""
    parser.add_argument("--device", default=None,
                        help="a .pt checkpoint's device: cpu (default), cuda or cuda:N; an engine's GPU index")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                        help="a .pt checkpoint's precision (default fp32; fp16 needs CUDA). ONNX runs FP32; an "
                             "engine keeps the precision it was built with")
    parser.add_argument("--mapped", action="store_true",
                        help="TensorRT engines: zero-copy mapped host memory instead of device buffers (meant for "
                             "the Nano, whose CPU and GPU share memory)")


def backend_options(args, profile):
    """The ``open_backend`` keyword arguments from :func:`add_backend_options`'s and the threads option."""
    return {"threads": args.threads, "device": args.device, "precision": args.precision, "mapped": args.mapped,
            "input_size": (profile.input.height, profile.input.width)}


def add_run_options(parser):
    """Options every long-running command shares: CPU threads, the report file, output verbosity."""
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime or PyTorch (0: one per "
                        "core)")
    parser.add_argument("--report", help="write each frame's record to this JSON file as the frame completes, and the "
                        "summary at the end (latentlink report FILE prints it)")
    parser.add_argument("--quiet", action="store_true", help="do not print the per-stage table")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def setup_logging(verbose=False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def peak_rss_mb():
    """This process's peak resident memory in MiB (None where the OS does not say).

    Linux's VmHWM first: getrusage's ru_maxrss survives exec, so a host started from a large parent (pytest, a
    notebook) would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024.0, 1)


def run_main(main, argv):
    """Run ``main(argv)``; a :class:`LatentlinkError` becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return main(argv)
    except LatentlinkError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
