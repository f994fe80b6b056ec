"""ONNX Runtime backend: the CPU path (development machines, CI, the host's decoder)."""

import time

import numpy as np

from ..errors import BackendError
from .base import Backend, elapsed_ms


PROVIDERS = {  # --device -> ONNX Runtime's execution providers, in order of preference
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
MAX_BATCH = 64  # inputs one run may take when the model's batch axis is dynamic (a decoder from export onnx)


def available_providers():
    """The execution providers this onnxruntime build has (empty when onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX file with ONNX Runtime: on the CPU, or with ``device`` "cuda" / "tensorrt" on ONNX Runtime's
    CUDA or TensorRT execution provider (onnxruntime-gpu; unverified in latentlink's CI, which has no GPU).

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core). A model whose first (batch) axis is
    dynamic (decoders exported by ``latentlink export onnx``) takes several frames in one run
    (:meth:`~latentlink.edge.backends.base.Backend.infer_batch`); one with a fixed batch (older exports, and every
    encoder) runs them one at a time.
    """

    name = "onnxruntime"
    copy_note = ("ONNX Runtime on the CPU has no device: gpu_to_cpu is the copy of the output into the "
                 "backend's host buffer, near zero")

    def __init__(self, path, role, info=None, threads=0, device="cpu"):
        super(OnnxRuntimeBackend, self).__init__(path, role, info)
        self.threads = threads
        self.device = device or "cpu"
        if self.device not in PROVIDERS:
            raise BackendError("ONNX Runtime device {!r}: one of {}".format(device, ", ".join(PROVIDERS)))
        if self.device != "cpu":
            self.name = "onnxruntime-" + self.device
            self.copy_note = "ONNX Runtime returns outputs in host memory: copy_ms is the copy into our buffer"
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
        providers = PROVIDERS[self.device]
        if providers[0] not in ort.get_available_providers():
            raise BackendError("--device {}: this onnxruntime has no {} (it has {}); install onnxruntime-gpu, or "
                               "run on the CPU".format(self.device, providers[0],
                                                       ", ".join(ort.get_available_providers())))
        try:
            self._session = ort.InferenceSession(self.path, sess_options=options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own exception types for unreadable models.
            raise BackendError("ONNX Runtime cannot load {}: {}".format(self.path, exc))
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        io = self.info.io_shapes(self.role)
        if io is not None:  # a progressive model's step: named inputs and outputs, all static
            found = ([(i.name, tuple(i.shape)) for i in inputs], [(o.name, tuple(o.shape)) for o in outputs])
            if found != (list(io[0]), list(io[1])):
                raise BackendError("{}: inputs and outputs {} but model.json says {}; re-export the model".format(
                    self.path, found, io))
            self.input_name = io[0][0][0]
            self._output_names = [name for name, _ in io[1]]
            self.max_batch = 1
            return
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError("{} has {} inputs and {} outputs; latentlink models have one of each".format(
                self.path, len(inputs), len(outputs)))
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        model_shape = tuple(inputs[0].shape)
        dynamic_batch = len(model_shape) == len(self.input_shape) and not isinstance(model_shape[0], int)
        if dynamic_batch:
            model_shape = self.input_shape[:1] + model_shape[1:]
        if model_shape != self.input_shape:
            raise BackendError("{}: input {!r} has shape {} but model.json says {}; re-export the model".format(
                self.path, self.input_name, tuple(inputs[0].shape), self.input_shape))
        self.max_batch = MAX_BATCH if dynamic_batch else 1
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

    def _infer_named(self, feeds):
        start = time.perf_counter()
        results = self._session.run(self._output_names, feeds)
        run_ms = elapsed_ms(start)
        # ONNX Runtime returns new arrays each run: they are the backend's outputs as they are, no copy
        return dict(zip(self._output_names, results)), {"run_ms": run_ms, "copy_ms": 0.0}

    def _infer_batch(self, arrays):
        """The inputs joined along the batch axis (a tiled model's tiles stay together), one run, split back."""
        start = time.perf_counter()
        result = self._session.run([self.output_name], {self.input_name: np.concatenate(arrays)})[0]
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        outputs = [part.copy() for part in np.split(result, len(arrays))]
        return outputs, {"run_ms": run_ms, "copy_ms": elapsed_ms(start)}

    def _close(self):
        self._session = None
