"""TensorRT + pycuda backend: the Jetson's encoder (a serialized ``.engine`` built on the device itself).

Buffers are allocated once, at load: a page-locked host buffer and a device buffer per tensor (or, with
``mapped=True``, one page-locked buffer that the GPU reads and writes in place: zero-copy, meant for the Nano,
whose CPU and GPU share the same 4 GB; whether it is faster there is unmeasured). A frame then costs one copy
into the input buffer, the enqueue, and the copy out, all on one CUDA stream, with CUDA events around ``encode``
and ``gpu_to_cpu``.

Python 3.6 compatible; pycuda and tensorrt are imported in ``load()``.
"""

import time

import numpy as np

from ..errors import BackendError
from . import trt_api
from .base import Backend, elapsed_ms


def import_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError("pycuda is not importable ({}). On the Jetson: export PATH=/usr/local/cuda/bin:$PATH and "
                           "pip3 install 'pycuda<2021.1' (see the README's Jetson section)".format(exc))
    return cuda


class TensorRTBackend(Backend):
    """Runs a TensorRT engine on CUDA device ``device`` (an index).

    ``mapped``: use mapped page-locked host memory (zero-copy) instead of device buffers plus copies.
    Engines are static: :meth:`infer_batch` runs the frames of a batch one at a time.
    """

    name = "tensorrt"

    def __init__(self, path, role, info=None, device=0, mapped=False):
        super(TensorRTBackend, self).__init__(path, role, info)
        self.device = int(device)
        self.mapped = bool(mapped)
        self.copy_note = ("mapped (zero-copy) host memory: gpu_to_cpu is the wait for the GPU's writes, no copy"
                          if self.mapped else "device-to-host copy into a page-locked buffer")
        self._context = None

    def _load(self):
        trt = trt_api.import_tensorrt()
        cuda = import_pycuda()
        cuda.init()
        flags = cuda.ctx_flags.MAP_HOST if self.mapped else 0
        self._cuda = cuda
        self._context = cuda.Device(self.device).make_context(flags=flags)  # made current in this thread
        try:
            self._load_engine(trt, cuda)
        except BaseException:
            self._close()
            raise
        # Each infer pushes the context and pops it again, so whichever thread calls it (the host decodes in its
        # connection threads, one at a time under its decode lock) finds it current, at the cost of microseconds.
        self._context.pop()

    def _load_engine(self, trt, cuda):
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(self.path, "rb") as f:
            self._engine = self._runtime.deserialize_cuda_engine(f.read())
        if self._engine is None:
            raise BackendError("TensorRT cannot deserialize {}: engines only load on the GPU and TensorRT version "
                               "that built them; rebuild it here with `latentlink export engine`".format(self.path))
        tensors = trt_api.io_tensors(trt, self._engine)
        inputs = [t for t in tensors if t.is_input]
        outputs = [t for t in tensors if not t.is_input]
        io = self.info.io_shapes(self.role)
        if io is not None:  # a progressive model's step: named inputs and outputs (binding or tensor API alike)
            found = ([(t.name, t.shape) for t in inputs], [(t.name, t.shape) for t in outputs])
            if sorted(found[0]) != sorted(io[0]) or sorted(found[1]) != sorted(io[1]):
                raise BackendError("{}: the engine's inputs and outputs are {}, but its metadata {} says {}; rebuild "
                                   "the engine from the ONNX beside that metadata".format(
                                       self.path, found, self.info.path, io))
            self._inputs, self._outputs = inputs, outputs
            self._input, self._output = inputs[0], outputs[0]
            self.input_name = self._input.name
        elif len(inputs) != 1 or len(outputs) != 1:
            raise BackendError("{} has {} inputs and {} outputs; latentlink models have one of each".format(
                self.path, len(inputs), len(outputs)))
        else:
            self._input, self._output = inputs[0], outputs[0]
            self._inputs, self._outputs = inputs, outputs
            self.input_name = self._input.name
        expected_out = self.info.latent_shape if self.role == "encoder" else self.info.input_shape
        checks = [] if io is not None else [(self._input, self.input_shape), (self._output, expected_out)]
        for tensor, expected in checks:
            if -1 in tensor.shape:
                raise BackendError("{}: tensor {!r} has a dynamic shape {} in the engine (built by trtexec from a "
                                   "decoder with a dynamic batch axis?); build it with `latentlink export engine`, "
                                   "which makes it static".format(self.path, tensor.name, tensor.shape))
            if tensor.shape != tuple(expected):
                raise BackendError("{}: tensor {!r} has shape {} in the engine but {} in its metadata {}; rebuild the "
                                   "engine from the ONNX beside that metadata".format(
                                       self.path, tensor.name, tensor.shape, tuple(expected), self.info.path))
        self._exec_context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._host, self._device_mem, addresses = {}, {}, {}
        for tensor in tensors:
            if self.mapped:
                host = cuda.pagelocked_empty(tensor.shape, tensor.dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
                addresses[tensor.name] = host.base.get_device_pointer()
            else:
                host = cuda.pagelocked_empty(tensor.shape, tensor.dtype)
                self._device_mem[tensor.name] = cuda.mem_alloc(host.nbytes)
                addresses[tensor.name] = int(self._device_mem[tensor.name])
            self._host[tensor.name] = host
        self._execute = trt_api.bind_addresses(self._exec_context, self._engine, tensors, addresses)
        # BLOCKING_SYNC: waiting on an event sleeps instead of spinning one of the Nano's 4 CPU cores.
        self._events = [cuda.Event(cuda.event_flags.BLOCKING_SYNC) for _ in range(3)]

    def _infer(self, array):
        self._context.push()
        try:
            return self._run(array)
        finally:
            self._context.pop()

    def _run(self, array):
        """One input, one output: :meth:`_run_named` with the engine's first input fed ``array``."""
        outputs, timings = self._run_named({self._input.name: array})
        return outputs[self._output.name], timings

    def _infer_named(self, feeds):
        self._context.push()
        try:
            return self._run_named(feeds)
        finally:
            self._context.pop()

    def _run_named(self, feeds):
        """Every input copied in (``feeds``: name -> array; float32 -> the engine's input dtype), one enqueue, every
        output copied out; timings in ms, wall and CUDA events."""
        cuda, stream = self._cuda, self._stream
        start_ev, run_ev, copy_ev = self._events
        start = time.perf_counter()
        for tensor in self._inputs:
            np.copyto(self._host[tensor.name], feeds[tensor.name], casting="same_kind")
        start_ev.record(stream)
        if not self.mapped:
            for tensor in self._inputs:
                cuda.memcpy_htod_async(self._device_mem[tensor.name], self._host[tensor.name], stream)
        self._execute(stream.handle)
        run_ev.record(stream)
        run_ev.synchronize()
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        if not self.mapped:
            for tensor in self._outputs:
                cuda.memcpy_dtoh_async(self._host[tensor.name], self._device_mem[tensor.name], stream)
        copy_ev.record(stream)
        copy_ev.synchronize()
        copy_ms = elapsed_ms(start)
        outputs = dict((t.name, self._host[t.name]) for t in self._outputs)
        return outputs, {"run_ms": run_ms, "copy_ms": copy_ms, "run_gpu_ms": run_ev.time_since(start_ev),
                         "copy_gpu_ms": copy_ev.time_since(run_ev)}

    def _close(self):
        if self._context is None:
            return
        if self.loaded:  # after load the context is not current; during a failed load it still is
            self._context.push()
        # Free what lives in the context while it is current, then detach it while still current: pycuda's
        # detach() of a context that is current destroys it (and pops it) from any thread; popping first and
        # detaching from another thread than the one that made it would silently leak it.
        for name in ("_events", "_execute", "_exec_context", "_engine", "_runtime"):
            self.__dict__.pop(name, None)
        for mem in self.__dict__.pop("_device_mem", {}).values():
            mem.free()
        self.__dict__.pop("_host", None)
        self.__dict__.pop("_stream", None)
        self._context.detach()
        self._context = None
