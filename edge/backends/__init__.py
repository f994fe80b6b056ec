"""Inference backends behind one interface (see :class:`base.Backend`).

``open_backend(path)`` picks the backend from the model file: ``.onnx`` -> ONNX Runtime. TensorRT engines
(``.engine``) and PyTorch checkpoints (``.pt``) plug in here (TensorRT + pycuda on the Nano, PyTorch on CPU/CUDA).
Each backend module imports its heavy library lazily, in ``load()``, so ``edge`` imports on any machine.
"""

import os

from ..errors import BackendError
from .base import Backend, ModelInfo, read_model_info

__all__ = ["Backend", "ModelInfo", "open_backend", "read_model_info"]


def open_backend(path, role, **options):
    """An unloaded backend for the ``role`` ("encoder" or "decoder") model file at ``path``.

    Use it as a context manager (``with open_backend(...) as enc: enc.infer(x)``), or call ``load()``/``close()``.
    """
    if role not in ("encoder", "decoder"):
        raise ValueError("role must be 'encoder' or 'decoder', got {!r}".format(role))
    if not os.path.isfile(path):
        raise BackendError("model file {!r} does not exist; export one with `latentlink export onnx` (or, if it is "
                           "a shipped default, reinstall latentlink)".format(path))
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".onnx":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, role, **options)
    raise BackendError("no backend for {!r} files ({}); this version runs .onnx models with ONNX Runtime".format(
        suffix or "extension-less", path))
