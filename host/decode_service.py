"""``latentlink decode-service``: one decoder served to many hosts as a Triton model, with dynamic batching.

A GPU machine runs the decoder once for every host (the workers that receive the edges' frames), which then need no
GPU: ``latentlink host --decoder triton://GPU-HOST:8000/decoder``. The service is NVIDIA's Triton Inference Server
driven by PyTriton (``pip install "latentlink[triton]"``): requests from all hosts are queued, and Triton's dynamic
batcher hands the decoder up to ``--max-batch`` frames per run.

Two models are served over Triton's HTTP/REST protocol (KServe v2):

- ``NAME`` (default "decoder"): input ``latents``, float32, one frame per request, shape ``latent_shape[1:]``
  (C, h, w) (a tiled model's frame keeps its tiles: ``latent_shape``); output ``image``, float32, the decoder's
  output for that frame (3, H, W) (tiled: (tiles, 3, H, W)), as :meth:`Backend.infer` returns it.
- ``NAME-info``: input ``request`` (int32, [1], ignored), output ``info`` (bytes, [1]): JSON ``{"format":
  "latentlink-decode-service", "version": 1, "model": <model.json>, "entropy": <entropy.json text or null>,
  "service": {...}}``: the model's identity (checkpoint hash, shapes, packing) and its entropy tables, so that a
  client decodes exactly what a local decoder would (host/triton_backend.py reads it).
"""

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time

import numpy as np

from latentlink.edge.backends import open_backend
from latentlink.edge.cli import (ArgumentParser, address, backend_options, check_model_file, check_output_file,
                                 check_resolvable, is_loopback, positive_int, run_main, setup_logging)
from latentlink.edge.errors import BackendError, ConfigError
from latentlink.edge.profile import load_profile
from latentlink.edge.rate import is_progressive
from latentlink.edge.sender import parse_address

INFO_FORMAT = "latentlink-decode-service"
INFO_VERSION = 1
INFO_SUFFIX = "-info"  # the metadata model's name: the decoder's name and this

EXAMPLES = """examples:
  latentlink decode-service --decoder profiles/default/nano-504/decoder.onnx --listen 127.0.0.1:8000
  latentlink decode-service --decoder runs/lossy-cae.pt --device cuda --listen 0.0.0.0:8000 --max-batch 32
  latentlink decode-service --decoder decoder.engine --listen 0.0.0.0:8000 --model-name cam-decoder
  then, on each host:  latentlink host --decoder triton://GPU-HOST:8000/decoder --out frames/

the service has no credentials: anyone who can reach --listen can decode through it (and read the model's
metadata); keep it on a trusted network. --metrics serves Triton's Prometheus metrics (nv_inference_*)."""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink decode-service", description=__doc__.split(":", 1)[1].split("\n")[0]
                            .strip(), epilog=EXAMPLES)
    parser.add_argument("--decoder", default="default",
                        help="decoder model: .onnx (ONNX Runtime), .pt (PyTorch; see --device), .engine (TensorRT), "
                             "or 'default' for the profile's ONNX (default: %(default)s)")
    parser.add_argument("--profile", default="nano-504",
                        help="profile whose decoder 'default' means, and a .pt's input size (default: %(default)s)")
    parser.add_argument("--listen", type=address, default="127.0.0.1:8000",
                        help="Triton's HTTP address, HOST:PORT (default: %(default)s, this machine only; 0.0.0.0:8000 "
                             "for the network's hosts; a bare PORT means 127.0.0.1:PORT)")
    parser.add_argument("--model-name", default="decoder", type=model_name,
                        help="the model's name in triton://HOST:PORT/NAME (default: %(default)s)")
    parser.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                        help="the most frames Triton's dynamic batcher joins into one decoder run (default: "
                             "%(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, metavar="MS",
                        help="how long a request may wait for others to fill a batch (default: %(default)s ms)")
    parser.add_argument("--device", default=None,
                        help="where the decoder runs: cpu (default), cuda (a .pt on the GPU, or an .onnx with "
                             "onnxruntime-gpu), or an engine's GPU index")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                        help="a .pt checkpoint's precision (fp16 needs CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the decoder (0: one per core)")
    parser.add_argument("--metrics", type=address, metavar="HOST:PORT",
                        help="serve Triton's Prometheus metrics on http://HOST:PORT/metrics (same host as --listen)")
    parser.add_argument("--ready-file", help="write HOST:PORT here once the models are ready (for scripts and tests)")
    parser.add_argument("--verbose", action="store_true", help="debug logging, and Triton's own log")
    parser.set_defaults(mapped=False)  # backend_options reads it: TensorRT's zero-copy mode is for the Nano
    return parser


def model_name(text):
    """argparse type: a Triton model name (letters, digits, '-', '_', '.'; it is a folder in Triton's repository)."""
    import argparse
    import re

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", text):
        raise argparse.ArgumentTypeError("{!r}: letters, digits, '-', '_' and '.', at most 64, e.g. decoder".format(
            text))
    return text


def main(argv=None):
    return run_main(_main, argv)


def service_info(decoder, decoder_path, output_shape, args):
    """The ``NAME-info`` model's JSON (bytes): the model.json the decoder was loaded with, its entropy tables' text
    (None when the model has none), and what the service itself is."""
    try:
        entropy = decoder.info.context_model().to_json()
    except ConfigError:
        entropy = None  # context-coded frames cannot be decoded through this service; clients say so
    from latentlink import __version__

    service = {"latentlink": __version__, "backend": decoder.name, "decoder": os.path.basename(decoder_path),
               "model_name": args.model_name, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
               "input_shape": list(frame_dims(decoder.input_shape)), "output_shape": list(output_shape)}
    return json.dumps({"format": INFO_FORMAT, "version": INFO_VERSION, "model": decoder.info.data, "entropy": entropy,
                       "service": service}, sort_keys=True).encode("utf-8")


def frame_dims(shape):
    """One frame's shape in a request: the decoder's shape without its batch axis of 1 (a tiled model keeps its
    tiles axis: a frame's tiles travel together)."""
    return tuple(shape[1:]) if shape[0] == 1 else tuple(shape)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("latentlink.decode_service")
    if not args.verbose:  # PyTriton's own progress lines; Triton's server log (I/W/E lines) stays on the console
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    if args.decoder != "default":
        check_model_file("--decoder", args.decoder, "decoder")
    if args.ready_file:
        check_output_file("--ready-file", args.ready_file)
    if args.batch_wait_ms < 0:
        raise ConfigError("bad --batch-wait-ms {}: give 0 or more".format(args.batch_wait_ms))
    check_resolvable("--listen", args.listen)
    host, port = parse_address(args.listen)
    if port == 0:
        raise ConfigError("--listen {}: Triton needs a fixed port, e.g. {}:8000".format(args.listen, host))
    metrics = parse_address(args.metrics) if args.metrics else None
    if metrics and metrics[0] != host:
        raise ConfigError("--metrics {}: Triton serves metrics on --listen's address ({}): give {}:{}".format(
            args.metrics, host, host, metrics[1]))
    for option, address_ in (("--listen", (host, port)), ("--metrics", metrics)):
        if address_:
            check_free(option, *address_)  # before the model loads: Triton itself would only log it and exit
    profile = load_profile(args.profile)
    decoder_path = profile.model.decoder if args.decoder == "default" else args.decoder
    if is_progressive(decoder_path):  # its frames carry 1 to K iterations: no one tensor shape to batch on
        raise ConfigError("--decoder {}: a progressive model's decoder, which the decode service does not serve (each "
                          "frame carries its own number of iterations); decode its frames on the host or a fleet "
                          "worker (--decoder {} there)".format(decoder_path, decoder_path))
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ConfigError("latentlink decode-service needs PyTriton ({}): pip install \".[triton]\" in the latentlink "
                          "folder (Linux x86-64 or aarch64 with glibc 2.35+, Python 3.8+)".format(exc))
    use_own_libpython()
    options = backend_options(args, profile)
    started = time.perf_counter()
    with open_backend(decoder_path, "decoder", **options) as decoder:
        shape = decoder.input_shape
        # One run before serving: it warms the decoder up, and tells the output's shape for the model's config.
        output_shape = frame_dims(decoder.infer(np.zeros(shape, np.float32))[0].shape)
        info = np.array([service_info(decoder, decoder_path, output_shape, args)], dtype=np.object_)

        @batch
        def decode(latents):
            """Triton's batch of frames (N, *frame) -> the decoder, in runs of at most its own batch."""
            frames = [frame.reshape(shape) for frame in latents]
            outputs, _ = decoder.infer_batch(frames)
            return {"image": np.stack([out.reshape(output_shape) for out in outputs]).astype(np.float32, copy=False)}

        def describe(requests):
            return [{"info": info} for _ in requests]

        config = TritonConfig(http_address=host, http_port=port, allow_grpc=False, allow_metrics=bool(metrics),
                              metrics_port=metrics[1] if metrics else None, log_verbose=1 if args.verbose else 0,
                              exit_timeout_secs=5)
        with Triton(config=config) as triton, triton_errors():
            triton.bind(model_name=args.model_name, infer_func=decode, strict=True,
                        inputs=[Tensor(name="latents", dtype=np.float32, shape=frame_dims(shape))],
                        outputs=[Tensor(name="image", dtype=np.float32, shape=output_shape)],
                        config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(
                            max_queue_delay_microseconds=int(args.batch_wait_ms * 1000))))
            triton.bind(model_name=args.model_name + INFO_SUFFIX, infer_func=describe,
                        inputs=[Tensor(name="request", dtype=np.int32, shape=(1,))],
                        outputs=[Tensor(name="info", dtype=bytes, shape=(1,))],
                        config=ModelConfig(batching=False))
            triton.run()
            log.info("serving %s (%s, %s -> %s per frame) as triton://%s:%d/%s, up to %d frames a run; ready in "
                     "%.1f s", decoder_path, decoder.name, list(frame_dims(shape)), list(output_shape), host, port,
                     args.model_name, args.max_batch, time.perf_counter() - started)
            if not is_loopback(host):
                log.warning("--listen %s: anyone who can reach it can decode through this service (no credentials)",
                            args.listen)
            if args.ready_file:
                with open(args.ready_file + ".tmp", "w") as f:
                    f.write("{}:{}\n".format(host, port))
                os.replace(args.ready_file + ".tmp", args.ready_file)
            # SIGTERM (kill, systemd) stops it as Ctrl-C does: PyTriton's serve() ends on KeyboardInterrupt.
            signal.signal(signal.SIGTERM, _interrupt)
            triton.serve()
    log.info("stopped")
    return 0


def check_free(option, host, port):
    """ConfigError when ``host:port`` cannot be listened on (another service has it, or the address is not this
    machine's)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: a recently closed port is free
            s.bind((host, port))
    except OSError as exc:
        raise ConfigError("{} {}:{}: cannot listen there ({}); another program (an earlier decode-service?) may "
                          "have it: pick another port".format(option, host, port, exc.strerror or exc))


@contextlib.contextmanager
def triton_errors():
    """PyTriton's and Triton's failures (a model that does not load, a server that exits) as one BackendError line;
    their details are in Triton's log above it."""
    from pytriton.exceptions import PyTritonError
    from tritonclient.utils import InferenceServerException

    try:
        yield
    except (PyTritonError, InferenceServerException) as exc:
        raise BackendError("Triton failed: {} (Triton's log above has the details; --verbose for more)".format(
            str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__))


def use_own_libpython():
    """Make Triton's Python-backend stub (a separate program that embeds Python) load this interpreter's
    libpython: it links ``libpython3.X.so`` by name, and where the system has another build of the same version
    (pyenv's 3.11.7 beside Debian's 3.11.2) it loaded the system's, whose C modules do not match this standard
    library (the model then fails to load: "'_thread.RLock' object has no attribute '_recursion_count'")."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and os.path.isdir(libdir):
        paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in paths if p != libdir])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
