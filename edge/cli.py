"""Helpers shared by the command-line entry points: argument types and checks, the help layout, logging, progress
bars, and the one place errors become exit codes.

Every bad value a user can type is refused with one line that names the option, the value, the rule and the fix:
numbers and formats by the argparse types below (:class:`Number`, :func:`address`...), paths by the ``check_*``
functions, which each command runs right after parsing and before anything slow starts (a camera, a model, a
training run). Paths are not checked by argparse types because commands are also parsed where their files do not
exist (the documentation's commands in tests, a container's command line). Python 3.6 compatible.
"""

import argparse
import logging
import math
import os
import platform
import socket
import sys

from .errors import ConfigError, LatentlinkError, UsageError


# Numbers.

class Number(object):
    """argparse type: an ``int`` or ``float`` within bounds; refused with the value, the rule and ``note``.

    ``low``/``high``: inclusive bounds; ``above``/``below``: exclusive ones (None: unbounded). NaN and infinities
    are refused.
    """

    def __init__(self, kind=int, low=None, high=None, above=None, below=None, note=""):
        self.kind, self.low, self.high, self.above, self.below, self.note = kind, low, high, above, below, note
        self.__name__ = "whole number" if kind is int else "number"  # argparse's name for the type

    def rule(self):
        """``a whole number >= 1``, ``a number >= 0 and < 1 (the share held out)``..."""
        bounds = [sign + " " + str(value) for sign, value in ((">=", self.low), (">", self.above),
                                                               ("<=", self.high), ("<", self.below))
                  if value is not None]
        text = "a {}{}".format(self.__name__, " " + " and ".join(bounds) if bounds else "")
        return text + (" ({})".format(self.note) if self.note else "")

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or not self.allows(value):
            raise argparse.ArgumentTypeError("got {}; expected {}".format(_as_typed(text), self.rule()))
        return value

    def allows(self, value):
        return ((self.low is None or value >= self.low) and (self.above is None or value > self.above)
                and (self.high is None or value <= self.high) and (self.below is None or value < self.below))


def _as_typed(text):
    """``-2`` bare, ``'abc'`` quoted: a number reads better as it was typed."""
    try:
        float(text)
        return str(text)
    except (TypeError, ValueError):
        return repr(text)


positive_int = Number(int, low=1)
positive_float = Number(float, above=0)
non_negative_int = Number(int, low=0)
non_negative_float = Number(float, low=0)


# Addresses.

def address(text):
    """argparse type: ``HOST:PORT``, ``HOST`` (port 5760), ``[::1]:PORT``, or a bare ``PORT``, which means that port
    on the default address, 127.0.0.1. Returns ``HOST:PORT`` text; whether HOST resolves is checked after parsing
    (:func:`check_resolvable`)."""
    from .sender import parse_address  # at call time: the sender module is heavier than this one

    text = text.strip()
    if text.isdigit():
        text = "127.0.0.1:" + text
    try:
        host, port = parse_address(text)
    except ConfigError:
        host = None
    if not host:
        raise argparse.ArgumentTypeError("got {!r}; expected HOST:PORT with a port from 0 to 65535, e.g. "
                                         "192.168.1.20:5760 (a bare PORT means 127.0.0.1:PORT)".format(text))
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def check_resolvable(option, text):
    """ConfigError at once when the host of address ``text`` is a name that does not resolve (a typo, a machine
    that does not exist): retrying could never help. A temporary DNS failure (a Jetson booting before its network)
    only warns, and the connection is retried as usual."""
    from .sender import parse_address

    host = parse_address(text)[0]
    try:
        socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == getattr(socket, "EAI_AGAIN", None):
            logging.getLogger("latentlink").warning("%s %s: the name does not resolve yet (%s); trying on",
                                                    option, text, exc.strerror or exc)
            return
        raise ConfigError("{} {}: the name {!r} does not resolve ({}); check the spelling, or give the machine's IP "
                          "address, e.g. {} 192.168.1.20:5760".format(option, text, host, exc.strerror or exc, option))
    except UnicodeError:
        raise ConfigError("{} {!r}: {!r} is not a valid host name; give a name or an IP address, e.g. {} "
                          "192.168.1.20:5760".format(option, text, host, option))


def is_loopback(host):
    """True for 127.x.x.x, ::1 and localhost: addresses no other machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")


# Paths, checked after parsing and before any work.

def check_input_file(option, path, hint=""):
    """ConfigError unless ``path`` is a readable file; ``hint`` says where such a file comes from."""
    _check_input(option, path, os.path.isfile, "file", hint)


def check_input_dir(option, path, hint=""):
    """ConfigError unless ``path`` is a readable folder."""
    _check_input(option, path, os.path.isdir, "folder", hint)


def _check_input(option, path, is_kind, kind, hint):
    hint = "; " + hint if hint else ""
    if not os.path.exists(path):
        raise ConfigError("{} {}: no such {} (relative paths start from {}){}".format(option, path, kind, os.getcwd(),
                                                                                     hint))
    if not is_kind(path):
        raise ConfigError("{} {}: expected a {}, but it is a {}{}".format(
            option, path, kind, "file" if kind == "folder" else "folder", hint))
    if not os.access(path, os.R_OK):
        raise ConfigError("{} {}: this user may not read it (check its permissions)".format(option, path))


def check_model_file(option, path, role):
    """ConfigError unless ``path`` is a model file latentlink runs, and the ``role`` half of its pair."""
    from .backends import SUFFIXES, check_role

    check_input_file(option, path, "export one with `latentlink export onnx`, or train a .pt with `latentlink train`")
    if os.path.splitext(path)[1].lower() not in SUFFIXES:
        raise ConfigError("{} {}: not a model file latentlink runs ({})".format(
            option, path, ", ".join(sorted(SUFFIXES))))
    check_role(path, role, option)


def check_output_file(option, path):
    """ConfigError unless ``path`` can be written: not a folder, and its folder exists or can be created. Checked
    before the work, so an hour's run does not end on a typo in its report's path."""
    if os.path.isdir(path):
        raise ConfigError("{} {}: that is a folder; give a file name, e.g. {} {}".format(
            option, path, option, os.path.join(path, "out.json")))
    _check_writable_folder(option, path, os.path.dirname(os.path.abspath(path)))


def check_output_dir(option, path):
    """ConfigError unless ``path`` is a folder, or can be created as one, that this user can write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("{} {}: a file of that name is in the way; give a folder".format(option, path))
    _check_writable_folder(option, path, os.path.abspath(path))


def _check_writable_folder(option, path, folder):
    existing = folder
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError("{} {}: {} is a file, so no folder can be made there; give another path".format(
            option, path, existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("{} {}: this user may not write in {}; give a folder you can write".format(
            option, path, existing))


# Parsers and help.

def sentence(text):
    """``text`` with a capital first letter (help descriptions are sentences)."""
    return text[:1].upper() + text[1:]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written (RawDescriptionHelpFormatter), every option's default shown as
    ArgumentDefaultsHelpFormatter would, except where the help already speaks of its default or there is none to
    show (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the :class:`HelpFormatter`, a capital letter at the start of the description, and errors on
    one line, raised as :class:`UsageError` so that :func:`run_main` prints them as every other error and returns 2
    (in-process callers get a status, not SystemExit): ``error: argument --threads: got -2; expected a whole number
    >= 0 (0: one per core) (see `latentlink edge --help`)``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = sentence(kwargs["description"])
        argparse.ArgumentParser.__init__(self, *args, **kwargs)

    def error(self, message):
        raise UsageError("{} (see `{} --help`)".format(message, self.prog))


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
    parser.add_argument("--threads", type=Number(int, low=0, note="0: one per core"), default=0,
                        help="CPU threads for ONNX Runtime or PyTorch (0: one per core)")
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


# Progress.

class _NoBar(object):
    """What :func:`progress` gives where tqdm is not installed (the Nano): the iterable, and methods that do
    nothing."""

    def __init__(self, iterable=None):
        self.iterable = iterable if iterable is not None else ()

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_description(self, text=None):
        pass

    def set_postfix_str(self, text=""):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def progress(iterable=None, quiet=False, **kwargs):
    """A tqdm progress bar on stderr; it shows only where stderr is a terminal, and not with ``quiet``. Without
    tqdm, a stand-in that shows nothing. ``kwargs`` go to tqdm (desc, total, unit...)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(iterable)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True, **kwargs)


def warn(text):
    """``warning: text`` on stderr, above any progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("warning: " + text, file=sys.stderr)
    else:
        tqdm.write("warning: " + text, file=sys.stderr)


# Errors and missing dependencies.

# The extra of setup.py that brings each command's dependencies, by the module whose main() runs the command.
COMMANDS = {"latentlink.demo": ("demo", "host"), "latentlink.edge.__main__": ("edge", "edge"),
            "latentlink.host.__main__": ("host", "host"), "latentlink.export.train": ("train", "export"),
            "latentlink.export.__main__": ("export", "export"), "latentlink.export.evaluate": ("eval", "export"),
            "latentlink.export.postfilter": ("train-postfilter", "export"),
            "latentlink.edge.profiler": ("report", None), "latentlink.keys": ("keys", "keys"),
            "latentlink.host.decode_service": ("decode-service", "triton"),
            "latentlink.host.worker": ("worker", "fleet"), "latentlink.host.fleet": ("fleet", "fleet")}
# What a missing module is, for the message.
PACKAGES = {"torch": "PyTorch", "cv2": "OpenCV", "onnxruntime": "ONNX Runtime", "onnx": "onnx",
            "pytorch_msssim": "pytorch-msssim", "skimage": "scikit-image", "matplotlib": "matplotlib",
            "tqdm": "tqdm", "yaml": "PyYAML", "numpy": "numpy", "cryptography": "cryptography",
            "pytriton": "PyTriton", "nats": "nats-py"}
CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def missing_dependency(command, extra, exc):
    """The one line for an ImportError of ``command``: what is missing and the extra that brings it."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    what = PACKAGES.get(module, module)
    text = "latentlink {}: {} is not installed ({})".format(command, what, exc)
    if module in ("cv2", "onnxruntime") and platform.machine() == "aarch64":
        return text + "; on a Jetson it comes with JetPack, not pip (see the README's install section)"
    if not extra:
        return text + "; reinstall latentlink"
    fix = "pip install \".[{}]\" in the latentlink folder".format(extra)
    if extra == "export":
        fix = "{} (the CPU build), then {}".format(CPU_TORCH, fix)
    text += "; `latentlink {}` needs the [{}] extra: {}".format(command, extra, fix)
    if module == "onnx" and command == "export":
        text += " (on the Nano, `export check` needs only: pip3 install onnx)"
    return text


def is_missing_package(exc):
    """True for a package that is not installed (ModuleNotFoundError), but not for latentlink's own modules."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and bool(name) and name.split(".")[0] != "latentlink"


def command_of(main):
    """``(command, extra)`` for a tool's main function (see :data:`COMMANDS`); ``(None, None)`` if unknown."""
    name = getattr(main, "__module__", None)
    if name == "__main__":  # python -m latentlink.host: the module's own name is in its spec
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec else name
    return COMMANDS.get(name, (None, None))


def run_main(main, argv):
    """Run ``main(argv)``; a :class:`LatentlinkError` becomes ``error: ...`` on stderr and exit code 2, and so does
    a missing dependency, with the extra that brings it. A Ctrl-C that the command does not handle itself (while a
    model loads, say) is one line and exit code 130 (128 + SIGINT, as shells report it), not a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LatentlinkError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    except ImportError as exc:
        command, extra = command_of(main)
        if command is None or not is_missing_package(exc):
            raise  # a bug (latentlink's own import) or a broken install: the traceback says which
        print("error: " + missing_dependency(command, extra, exc), file=sys.stderr)
        return 2
