"""ONNX -> serialized TensorRT engine, built on the GPU that will run it (the Nano), cached like jetson-inference.

The engine's file name carries everything it depends on: ``<onnx stem>.<ONNX SHA-256, 8 hex>.trt<TensorRT
version>.<GPU name>.<precision>.engine``. A matching engine is reused; one built from another ONNX checksum or
TensorRT version for the same stem, GPU and precision is stale and replaced. Metadata (the model.json facts plus
TensorRT version, GPU, precision, workspace, build time) goes to ``<engine>.json`` beside it, never into the engine
bytes, so ``trtexec`` and Triton still read the engine.

Python 3.6 compatible: this runs on the Nano, whose TensorRT bindings exist for its system Python 3.6 only.
"""

import glob
import io
import json
import os
import re
import tempfile
import time

from latentlink.edge.backends.base import file_sha256 as sha256_of, read_model_info
from latentlink.edge.backends import trt_api
from latentlink.edge.errors import BackendError, ConfigError

PRECISIONS = ("fp16", "fp32")
DEFAULT_WORKSPACE_MB = 256  # 1 GB builds get "Killed" on the 4 GB Nano; 256 MB works


def gpu_name(device=0):
    """The CUDA device's name (pycuda), else the board's (``/proc/device-tree/model``), else ``unknown-gpu``."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device(device).name()
    except Exception:  # pycuda missing, or no driver: the name is a label, not worth failing the build over
        pass
    try:
        with io.open("/proc/device-tree/model", encoding="utf-8", errors="replace") as f:
            return f.read().strip("\x00 \n") or "unknown-gpu"
    except (OSError, IOError):
        return "unknown-gpu"


def _label(text):
    """A file-name-safe label: runs of anything but letters, digits and '.' become '-'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def engine_path(onnx_path, out_dir, sha256, trt_version, gpu, precision):
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    name = "{}.{}.trt{}.{}.{}.engine".format(stem, sha256[:8], _label(trt_version), _label(gpu), precision)
    return os.path.join(out_dir, name)


def stale_engines(path, onnx_path, gpu, precision):
    """Engines in ``path``'s folder built earlier from the same ONNX file for the same GPU and precision, with
    another ONNX checksum or TensorRT version: what ``path`` replaces. Told apart by their sidecars, not by their
    names: every profile's encoder is called ``encoder.onnx``, and one folder may hold engines of several."""
    folder = os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    stale = []
    for candidate in sorted(glob.glob(os.path.join(folder, glob.escape(stem) + ".*.engine"))):
        if os.path.abspath(candidate) == os.path.abspath(path):
            continue
        try:
            with io.open(candidate + ".json", encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, IOError, ValueError):
            continue  # no readable sidecar: not ours to delete
        if (meta.get("onnx") == os.path.abspath(onnx_path) and meta.get("gpu") == gpu
                and meta.get("precision") == precision):
            stale.append(candidate)
    return stale


def refuse_int8(gpu, has_fast_int8):
    """INT8 is not offered: say why, for this GPU."""
    if not has_fast_int8:
        raise ConfigError("INT8 refused: {} has no fast INT8 (the Jetson Nano's Maxwell GPU, sm_53, has none); "
                          "build FP16 (the default), which is about twice FP32's speed there".format(gpu))
    raise ConfigError("INT8 refused: it needs a calibration set and per-tensor scales, which latentlink does not "
                      "build; binary latents sit on a threshold that INT8 rounding would move. Build FP16")


def build_engine(onnx_path, out_dir=None, precision="fp16", workspace_mb=DEFAULT_WORKSPACE_MB, force=False,
                 log=print):
    """Build (or reuse) the engine for ``onnx_path``; returns its sidecar metadata (a dict, ``engine`` = path).

    ``out_dir``: where the engine goes (default: beside the ONNX file). ``force``: rebuild even if cached.
    Raises ConfigError for bad input, BackendError when TensorRT is missing or the build fails.
    """
    if precision not in PRECISIONS:
        raise ConfigError("precision {!r} is not one of {}".format(precision, ", ".join(PRECISIONS)))
    if workspace_mb < 16:
        raise ConfigError("--workspace {} MB is too small for any build; the Nano's default is {} MB".format(
            workspace_mb, DEFAULT_WORKSPACE_MB))
    if not os.path.isfile(onnx_path):
        raise ConfigError("ONNX file {!r} does not exist; export one with `latentlink export onnx`".format(onnx_path))
    info = read_model_info(onnx_path)  # the model.json beside the ONNX: shapes and packing for the sidecar
    out_dir = out_dir or os.path.dirname(os.path.abspath(onnx_path))
    trt = trt_api.import_tensorrt()
    gpu = gpu_name()
    sha = sha256_of(onnx_path)
    path = engine_path(onnx_path, out_dir, sha, trt.__version__, gpu, precision)
    sidecar = path + ".json"
    if os.path.isfile(path) and os.path.isfile(sidecar) and not force:
        log("reusing {} (same ONNX SHA-256, TensorRT {}, GPU and precision)".format(path, trt.__version__))
        with io.open(sidecar, encoding="utf-8") as f:
            meta = json.load(f)
        meta.update(engine=os.path.abspath(path), reused=True)  # the folder may have moved since the build
        return meta
    _check_writable(out_dir)  # before the build: a Nano build takes minutes
    started = time.time()
    plan = _build(trt, onnx_path, precision, workspace_mb, gpu, log)
    build_s = time.time() - started
    try:
        for old in stale_engines(path, onnx_path, gpu, precision):
            log("replacing stale engine {} (built from another ONNX checksum or TensorRT version)".format(old))
            for stale in (old, old + ".json"):
                if os.path.exists(stale):
                    os.remove(stale)
        _write_atomic(path, plan)
    except (OSError, IOError) as exc:
        raise ConfigError("cannot write the engine to {} ({}); pass --out DIR with a folder you can write".format(
            out_dir, exc.strerror or exc))
    meta = dict(info.data)
    meta.pop("parity", None)  # PyTorch-vs-ONNX Runtime figures say nothing about this engine
    meta.update({
        "format": "latentlink-engine", "engine": os.path.abspath(path), "onnx": os.path.abspath(onnx_path),
        "onnx_sha256": sha, "tensorrt": trt.__version__, "gpu": gpu, "precision": precision,
        "workspace_mb": int(workspace_mb), "build_s": round(build_s, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine_bytes": len(plan), "reused": False,
    })
    try:
        _write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    except (OSError, IOError) as exc:
        raise ConfigError("cannot write {} ({})".format(sidecar, exc.strerror or exc))
    return meta


def _build(trt, onnx_path, precision, workspace_mb, gpu, log):
    logger = trt.Logger(trt.Logger.WARNING)
    if hasattr(trt, "init_libnvinfer_plugins"):  # 8.2 imports InstanceNormalization as a plugin
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = trt_api.create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        parsed = parser.parse(f.read())
    if not parsed:
        errors = trt_api.parser_errors(parser) or ["(the parser gave no details; rerun with trtexec --verbose)"]
        raise BackendError("TensorRT {0} cannot parse {1}:\n  {2}\nrun `latentlink export check --trt {0} {1}` for "
                           "what this TensorRT's ONNX importer accepts".format(trt.__version__, onnx_path,
                                                                                "\n  ".join(errors)))
    config = builder.create_builder_config()
    trt_api.set_workspace(trt, config, workspace_mb << 20)
    _fix_dynamic_batch(trt, builder, network, config, onnx_path, log)
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            log("warning: {} has no fast FP16; the FP16 engine may be no faster than FP32".format(gpu))
        config.set_flag(trt.BuilderFlag.FP16)
    log("building a {} engine from {} on {} with TensorRT {} (workspace {} MB); this takes minutes on a "
        "Nano".format(precision.upper(), onnx_path, gpu, trt.__version__, workspace_mb))
    plan = trt_api.build_serialized(builder, network, config)
    if plan is None:
        raise BackendError("TensorRT could not build {} (its log above says why). On a Nano, a build that is "
                           "'Killed' ran out of memory: close other programs or lower --workspace (now {} MB)".format(
                               onnx_path, workspace_mb))
    return plan


def _fix_dynamic_batch(trt, builder, network, config, onnx_path, log):
    """A decoder exported with a dynamic batch axis (for the host's batches on ONNX Runtime) is built with
    model.json's shape as its input shape: the engine stays static, as TensorRT on the Nano wants, and the host's
    TensorRT backend decodes one frame per run. (Unverified on a GPU here: latentlink's CI has none.)"""
    if not hasattr(network, "num_inputs"):
        return
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if -1 in tuple(tensor.shape):
            tensor.shape = tuple(read_model_info(onnx_path).latent_shape)  # a network input's dims may be set
            log("{}: dynamic batch axis fixed to {} for the engine".format(onnx_path, list(tensor.shape)))


def _check_writable(folder):
    """Create ``folder`` if needed and write a probe file in it; ConfigError naming the fix if that fails."""
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (OSError, IOError) as exc:
        raise ConfigError("cannot write engines to {} ({}); pass --out DIR with a folder you can write".format(
            folder, exc.strerror or exc))


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
