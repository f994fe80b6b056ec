"""Inference backends behind one interface (see :class:`base.Backend`).

``open_backend(path, role)`` picks the backend from the model file:

- ``.onnx``: ONNX Runtime on the CPU (development machines, CI, the host); ``device`` "cuda" or "tensorrt": ONNX
  Runtime's CUDA or TensorRT execution provider, where onnxruntime-gpu is installed (unverified here: no GPU);
- ``.engine`` / ``.plan``: TensorRT + pycuda on the GPU (the Jetson; build the engine there with
  ``latentlink export engine``);
- ``.pt``: PyTorch, from a ``latentlink train`` checkpoint, on the CPU or CUDA, FP32 or FP16.

Each backend module imports its heavy library lazily, in ``load()``, so ``edge`` imports on any machine.
"""

import os

from ..errors import BackendError, ConfigError
from .base import Backend, ModelInfo, read_model_info

__all__ = ["Backend", "ModelInfo", "check_role", "declared_role", "open_backend", "read_model_info", "role_from_name",
           "SUFFIXES"]

SUFFIXES = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt": "pytorch", ".pth": "pytorch"}


def role_from_name(path):
    """"decoder" for a file named ``decoder*`` (as ``latentlink export onnx/engine`` name them), else "encoder"."""
    return "decoder" if os.path.basename(path).startswith("decoder") else "encoder"


def declared_role(path):
    """"encoder" or "decoder" as the model's metadata names the file (model.json's ``encoder``/``decoder`` entries;
    an engine's sidecar, by the ONNX file it was built from), else by its name (``encoder*``, ``decoder*``); None
    when nothing says (a .pt checkpoint holds both halves)."""
    if os.path.splitext(path)[1].lower() in (".pt", ".pth"):
        return None
    name = os.path.basename(path)
    try:
        meta = read_model_info(path).data
    except ConfigError:
        meta = {}
    name = os.path.basename(str(meta.get("onnx") or name))  # an engine: the ONNX file it was built from
    for role in ("encoder", "decoder"):
        if meta.get(role) == name:
            return role
    for role in ("encoder", "decoder"):
        if name.startswith(role):
            return role
    return None


def check_role(path, role, option=None):
    """ConfigError when ``path`` is the other half of a model pair than ``role``: a decoder given as the edge's
    encoder fails with a shape error that would send the user re-exporting a model that is fine."""
    found = declared_role(path)
    if found is None or found == role:
        return
    where = {"encoder": "the edge (latentlink edge --encoder)", "decoder": "the host (latentlink host --decoder)"}
    sibling = os.path.join(os.path.dirname(path), os.path.basename(path).replace(found, role, 1))
    article = {"encoder": "an", "decoder": "a"}
    raise ConfigError("{}{} is {} {}, not {} {}: pass it to {}{}".format(
        option + " " if option else "", path, article[found], found, article[role], role, where[found],
        "; the {} beside it is {}".format(role, sibling) if os.path.isfile(sibling) else ""))


def open_backend(path, role, threads=0, device=None, precision=None, input_size=None, mapped=False):
    """An unloaded backend for the ``role`` ("encoder" or "decoder") model file at ``path``.

    ``threads``: CPU threads (ONNX Runtime, PyTorch on the CPU; 0: the library's default). ``device``: "cpu",
    "cuda" or "cuda:N" for PyTorch; the GPU index for TensorRT. ``precision``: "fp32" or "fp16" for PyTorch (an
    engine's precision is fixed when it is built). ``input_size``: (height, width) in pixels, which a PyTorch
    checkpoint needs (exported files carry their shapes). ``mapped``: TensorRT with zero-copy host memory.
    Use it as a context manager (``with open_backend(...) as enc: enc.infer(x)``), or call ``load()``/``close()``.
    """
    if role not in ("encoder", "decoder"):
        raise ValueError("role must be 'encoder' or 'decoder', got {!r}".format(role))
    if not os.path.isfile(path):
        raise BackendError("model file {!r} does not exist; export one with `latentlink export onnx` (or, if it is "
                           "a shipped default, reinstall latentlink)".format(path))
    kind = SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise BackendError("no backend for {!r}: latentlink runs {} files".format(path, ", ".join(sorted(SUFFIXES))))
    check_role(path, role)
    if kind == "onnxruntime" and precision not in (None, "fp32"):
        raise ConfigError("--precision {}: {} runs in FP32 with ONNX Runtime; FP16 needs a .pt checkpoint on "
                          "CUDA or a TensorRT engine".format(precision, path))
    if mapped and kind != "tensorrt":
        raise ConfigError("--mapped applies to TensorRT engines (.engine); {} runs with {}".format(path, kind))
    if kind == "tensorrt" and precision is not None:
        raise ConfigError("--precision {}: an engine's precision is fixed when it is built; rebuild with `latentlink "
                          "export engine` (--fp32 for FP32)".format(precision))
    if kind == "onnxruntime":
        from .onnxruntime_backend import PROVIDERS, OnnxRuntimeBackend, available_providers

        if device not in (None, "cpu"):
            wanted = PROVIDERS.get(device, [None])[0]
            if wanted is None or wanted not in available_providers():
                raise ConfigError("--device {}: ONNX models run on the CPU here{}; for the GPU install "
                                  "onnxruntime-gpu (then --device cuda or --device tensorrt: ONNX Runtime's CUDA or "
                                  "TensorRT execution provider), or give a .pt checkpoint or a TensorRT "
                                  ".engine".format(device, "" if wanted is None else
                                                   " (this onnxruntime has no {})".format(wanted)))
        return OnnxRuntimeBackend(path, role, threads=threads, device=device or "cpu")
    if kind == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        index = str(device or "0").replace("cuda", "").lstrip(":") or "0"
        if not index.isdigit():
            raise ConfigError("--device {!r}: a TensorRT engine runs on a CUDA GPU: give its index (0) or "
                              "cuda:N".format(device))
        return TensorRTBackend(path, role, device=int(index), mapped=mapped)
    from .torch_backend import TorchBackend

    return TorchBackend(path, role, input_size=input_size, device=device or "cpu", precision=precision or "fp32",
                        threads=threads)
