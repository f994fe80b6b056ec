"""``latentlink <command>``: dispatch to each tool's ``main(argv)``, importing only the tool that runs.

Python 3.6 compatible, because ``latentlink edge`` runs on the Jetson Nano, where the host and export tools (and
their dependencies) are not installed.
"""

import importlib
import sys

from latentlink.edge.cli import COMMANDS as EXTRAS, is_missing_package, missing_dependency, sentence

# command -> (module with main(argv), one-line summary)
COMMANDS = [
    ("demo", "latentlink.demo", "edge and host on loopback, streaming photos through the default model"),
    ("edge", "latentlink.edge.__main__", "capture frames, encode them and send the latents to a host"),
    ("host", "latentlink.host.__main__", "receive latents from edges, decode them, save or show the images"),
    ("worker", "latentlink.host.worker", "a fleet's decode worker: frames from NATS JetStream to images"),
    ("fleet", "latentlink.host.fleet", "a fleet's state: frames waiting in the broker, workers' backlog"),
    ("train", "latentlink.export.train", "train a model on a folder of photos"),
    ("train-postfilter", "latentlink.export.postfilter", "a DnCNN-style post-filter for the host, for a model or JPEG"),
    ("export", "latentlink.export.__main__", "ONNX export, TensorRT 8.0-10 check, engine build, backend comparison"),
    ("eval", "latentlink.export.evaluate", "a model against JPEG, WebP and JPEG 2000: PSNR, MS-SSIM, bpp, RD plot"),
    ("report", "latentlink.edge.profiler", "print the per-stage table of an edge or host report; --plot, --csv"),
    ("decode-service", "latentlink.host.decode_service", "serve a decoder to many hosts (Triton, dynamic batching)"),
    ("keys", "latentlink.keys", "credentials for --tls (a CA, host and edge certificates) or --token-file"),
]

USAGE = """usage: latentlink <command> [options]     (latentlink <command> --help for each)

Learned image compression on the edge: a Jetson encodes camera frames to latents, a host decodes them.

commands:
{}

examples:
  latentlink demo
  latentlink host --listen 0.0.0.0:5760 --out frames/ --report host.json
  latentlink edge --source csi://0 --connect 192.168.1.20:5760 --report edge.json
  latentlink report edge.json host.json
"""


def usage():
    return USAGE.format("\n".join("  {:<16} {}".format(name, sentence(text)) for name, _, text in COMMANDS))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [name for name, _, _ in COMMANDS]
    if not argv:  # a command is required: the usage, on stderr, and the status of a usage error
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from latentlink import __version__

        print("latentlink " + __version__)
        return 0
    if argv[0] not in names:
        print("error: unknown command {!r} (available: {}; see `latentlink --help`)".format(argv[0], ", ".join(names)),
              file=sys.stderr)
        return 2
    module_name = dict((name, module) for name, module, _ in COMMANDS)[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # ImportErrors once the command runs are told the same way, by edge.cli.run_main
        if not is_missing_package(exc):
            raise
        print("error: " + missing_dependency(argv[0], EXTRAS[module_name][1], exc), file=sys.stderr)
        return 2
    return module.main(argv[1:])
