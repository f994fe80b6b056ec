"""One TensorRT surface over two APIs: the binding API (TensorRT 8.0/8.2, the Nano's) and the tensor API (8.5+, 10.x).

TensorRT 8.5 added name-based I/O (``num_io_tensors``, ``set_tensor_address``, ``execute_async_v3``) and 10.0 removed
the binding API (``num_bindings``, ``execute_async_v2``), ``max_workspace_size`` and ``build_engine``. Every helper
here picks the call by feature detection (``hasattr``), never by version number, so the same code runs on the
Nano's 8.0 or 8.2 and on a desktop's 10.x. ``tests/fake_tensorrt.py`` fakes both surfaces for the CPU-only CI.

Python 3.6 compatible: runs on the Nano.
"""

import collections
import os

import numpy as np

from ..errors import BackendError

TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # where JetPack puts it (not on PATH)

IOTensor = collections.namedtuple("IOTensor", "name index is_input shape dtype")
IOTensor.__doc__ = "An engine input or output: name, binding index, direction, shape (tuple) and numpy dtype."


def import_tensorrt():
    """The ``tensorrt`` module, or a BackendError that says where it comes from."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError("TensorRT's Python bindings are not importable ({}). On a Jetson they come with JetPack, "
                           "for the system Python 3.6 only (/usr/lib/python3.6/dist-packages/tensorrt): run with "
                           "/usr/bin/python3, or create the venv with --system-site-packages. On a PC, "
                           "`pip install tensorrt`.".format(exc))
    return tensorrt


def nptype(trt, dtype):
    """The numpy dtype of a TensorRT DataType. Not ``trt.nptype``: TensorRT 8.x's refers to ``np.bool``, which
    numpy >= 1.24 removed, so it fails on a desktop with a current numpy."""
    for name, numpy_type in (("FLOAT", np.float32), ("HALF", np.float16), ("INT8", np.int8), ("INT32", np.int32),
                             ("BOOL", np.bool_), ("UINT8", np.uint8), ("INT64", np.int64)):
        if dtype == getattr(trt.DataType, name, None):
            return np.dtype(numpy_type)
    raise BackendError("TensorRT data type {} has no numpy equivalent here".format(dtype))


def has_tensor_api(engine):
    """True for engines with the name-based I/O API (TensorRT >= 8.5); False for the binding API (8.2)."""
    return hasattr(engine, "num_io_tensors")


def io_tensors(trt, engine):
    """The engine's inputs and outputs as :class:`IOTensor` s, in binding (I/O index) order."""
    tensors = []
    if has_tensor_api(engine):
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            tensors.append(IOTensor(name, i, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                    tuple(engine.get_tensor_shape(name)),
                                    nptype(trt, engine.get_tensor_dtype(name))))
    else:
        for i in range(engine.num_bindings):
            tensors.append(IOTensor(engine.get_binding_name(i), i, bool(engine.binding_is_input(i)),
                                    tuple(engine.get_binding_shape(i)),
                                    nptype(trt, engine.get_binding_dtype(i))))
    return tensors


def bind_addresses(context, engine, tensors, addresses):
    """Point the engine's I/O at device ``addresses`` (a dict name -> int pointer); returns ``execute(stream)``.

    Addresses are bound once, at load: buffers are allocated once and never move, so no frame re-binds them.
    ``execute(stream_handle)`` enqueues one inference on the CUDA stream and raises BackendError if TensorRT
    refuses it.
    """
    if has_tensor_api(engine):
        for tensor in tensors:
            if not context.set_tensor_address(tensor.name, int(addresses[tensor.name])):
                raise BackendError("TensorRT refused the address of tensor {!r}".format(tensor.name))

        def execute(stream_handle):
            if not context.execute_async_v3(stream_handle=stream_handle):
                raise BackendError("TensorRT execute_async_v3 failed (see TensorRT's log above)")
    else:
        bindings = [0] * len(tensors)
        for tensor in tensors:
            bindings[tensor.index] = int(addresses[tensor.name])

        def execute(stream_handle):
            if not context.execute_async_v2(bindings=bindings, stream_handle=stream_handle):
                raise BackendError("TensorRT execute_async_v2 failed (see TensorRT's log above)")
    return execute


def create_network(trt, builder):
    """An explicit-batch network definition: 8.x's ONNX parser needs the flag; 10.x ignores it (always explicit)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return builder.create_network(0 if flag is None else 1 << int(flag))


def set_workspace(trt, config, nbytes):
    """Limit the builder's scratch memory to ``nbytes`` (the Nano's builds get "Killed" above about 256 MB)."""
    if hasattr(config, "set_memory_pool_limit"):  # 8.4+
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(nbytes))
    else:  # 8.2
        config.max_workspace_size = int(nbytes)


def build_serialized(builder, network, config):
    """Build and serialize the engine (TensorRT 8.0+ and 10.x): bytes, or None when the build failed (TensorRT's
    logger said why)."""
    plan = builder.build_serialized_network(network, config)
    return bytes(plan) if plan is not None else None


def parser_errors(parser):
    """The ONNX parser's errors, one line each, naming the node that failed (index, and name/op where known)."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = "node {}".format(error.node())
        details = []
        for method in ("node_name", "node_operator"):  # TensorRT 10 names the node; 8.2 gives its index only
            if hasattr(error, method):
                value = getattr(error, method)()
                if value:
                    details.append(str(value))
        if details:
            where += " ({})".format(", ".join(details))
        lines.append("{}: {} [{}]".format(where, error.desc(), error.code()))
    return lines


def trtexec_command(onnx_path, engine_path, precision="fp16", workspace_mb=256):
    """The equivalent ``trtexec`` command line, in TensorRT 8.2's flag spelling (the Nano's), and the copy of the
    model's metadata that ``latentlink edge`` needs beside the engine."""
    words = [TRTEXEC, "--onnx=" + onnx_path, "--saveEngine=" + engine_path]
    if precision == "fp16":
        words.append("--fp16")
    words += ["--workspace={}".format(int(workspace_mb)), "--buildOnly", "--verbose"]
    model_json = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), "model.json")
    if os.path.basename(onnx_path).startswith("decoder"):
        # A decoder's batch axis is dynamic (export onnx): trtexec needs its shape. The engine it builds then
        # has a dynamic input, which latentlink's TensorRT backend refuses: prefer `latentlink export engine`,
        # which builds a static one (unverified here: no GPU).
        try:
            from .base import read_model_info

            shape = "x".join(str(d) for d in read_model_info(onnx_path).latent_shape)
            words[3:3] = ["--{}Shapes=latents:{}".format(kind, shape) for kind in ("min", "opt", "max")]
        except Exception:  # no model.json: the command without shapes (a static decoder needs none)
            pass
    return " ".join(words) + "\ncp {} {}.json".format(model_json, engine_path)
