"""ONNX Runtime backend: the CPU path (development machines, CI, the host's decoder)."""

import time

import numpy as np

from ..errors import BackendError
from .base import Backend, elapsed_ms


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX file with ONNX Runtime on the CPU execution provider.

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core).
    """

    name = "onnxruntime"
    copy_note = ("ONNX Runtime on the CPU has no device: gpu_to_cpu is the copy of the output into the "
                 "backend's host buffer, near zero")

    def __init__(self, path, role, info=None, threads=0):
        super(OnnxRuntimeBackend, self).__init__(path, role, info)
        self.threads = threads
        self._session = None

    def _load(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: `pip install onnxruntime` (on a PC), or use a "
                               "TensorRT engine on the Jetson")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        try:
            self._session = ort.InferenceSession(self.path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own exception types for unreadable models.
            raise BackendError("ONNX Runtime cannot load {}: {}".format(self.path, exc))
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError("{} has {} inputs and {} outputs; latentlink models have one of each".format(
                self.path, len(inputs), len(outputs)))
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        model_shape = tuple(inputs[0].shape)
        if model_shape != self.input_shape:
            raise BackendError("{}: input {!r} has shape {} but model.json says {}; re-export the model".format(
                self.path, self.input_name, model_shape, self.input_shape))
        self._output = None

    def _infer(self, array):
        start = time.perf_counter()
        result = self._session.run([self.output_name], {self.input_name: array})[0]
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        if self._output is None or self._output.shape != result.shape:
            self._output = np.empty_like(result)  # allocated once, on the first frame
        np.copyto(self._output, result)
        return self._output, {"run_ms": run_ms, "copy_ms": elapsed_ms(start)}

    def _close(self):
        self._session = None
