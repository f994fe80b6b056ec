"""Small fakes of TensorRT's two Python API surfaces and of pycuda.driver, for CPU-only tests.

No TensorRT or GPU exists where this project is tested, so the version dispatch, buffer sizing and error paths of
``edge.backends.trt_api``, ``edge.backends.tensorrt_backend`` and ``export.engine`` run against these fakes.
They follow the real signatures, method by method, of:

- TensorRT 8.2 (the Nano's; binding API): ``Builder(logger)`` with ``create_network(flags)``,
  ``create_builder_config()``, ``platform_has_fast_fp16/int8``, ``build_engine``, ``build_serialized_network(network,
  config)``; ``IBuilderConfig.max_workspace_size`` and ``set_flag``; ``OnnxParser(network, logger).parse(model)``,
  ``num_errors``, ``get_error(i)`` -> ``code() desc() file() func() line() node()``; ``Runtime(logger).
  deserialize_cuda_engine(bytes)``; ``ICudaEngine.num_bindings, get_binding_name(i), binding_is_input(i),
  get_binding_shape(i), get_binding_dtype(i), create_execution_context()``; ``IExecutionContext.execute_async_v2(
  bindings, stream_handle)``; ``nptype``.
- TensorRT 10.x (tensor API): no binding API, ``max_workspace_size`` or ``build_engine``;
  ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``; ``ICudaEngine.num_io_tensors,
  get_tensor_name(i), get_tensor_mode(name), get_tensor_shape(name), get_tensor_dtype(name)``;
  ``IExecutionContext.set_tensor_address(name, ptr), execute_async_v3(stream_handle)``; parser errors add
  ``node_name()`` and ``node_operator()``.
- pycuda.driver: ``init, Device(i).name(), Device.make_context(flags), Context.push/pop/detach, ctx_flags.MAP_HOST,
  pagelocked_empty(shape, dtype, order, mem_flags), host_alloc_flags.DEVICEMAP, HostAllocation.get_device_pointer,
  mem_alloc(n), DeviceAllocation.free, memcpy_htod_async(dest, src, stream), memcpy_dtoh_async(dest, src, stream),
  Stream().handle/synchronize, Event(flags).record(stream)/synchronize/time_since(start), event_flags``.

What the fakes do instead of a GPU: "device memory" is host memory behind integer addresses; an engine is the ONNX
bytes plus its precision, and executing it runs the ONNX file in ONNX Runtime on what the bindings point at. An FP16
engine rounds its output through float16, so FP16-vs-FP32 comparisons behave like the real thing (near, not equal).
Every call checks what the real one would refuse: wrong buffer sizes, a missing address, a context that is not
current, mapped memory without ``MAP_HOST``.
"""

import itertools
import json
import sys
import threading
import time
import types
import weakref

import numpy as np

# ---------------------------------------------------------------------------------------------------- pycuda.driver


class FakeCudaError(RuntimeError):
    pass


class _Cuda(object):
    """State of one fake CUDA driver: device memory by address, the context stack, counters tests look at."""

    def __init__(self):
        self.memory = {}  # address -> bytearray: device buffers, freed by DeviceAllocation.free
        self.mapped = weakref.WeakValueDictionary()  # address -> mapped host buffer, freed with its last array
        self.stack = []  # current contexts, innermost last
        self.contexts_alive = 0
        self.contexts_leaked = 0  # detached while not current, from another thread: pycuda leaks those silently
        self.pending = {}  # stream handle -> operations enqueued and not yet run (copies, inferences, events)
        self.device_allocations = 0
        self.copies = 0
        self._addresses = itertools.count(0x10000, 0x1000000)

    def new_address(self, buffer, mapped=False):
        address = next(self._addresses)
        (self.mapped if mapped else self.memory)[address] = buffer
        return address

    def buffer_at(self, address, nbytes, what):
        buffer = self.memory.get(address, self.mapped.get(address))
        if buffer is None:
            raise FakeCudaError("{}: {:#x} is not an allocation (freed, or never allocated)".format(what, address))
        if len(buffer) != nbytes:
            raise FakeCudaError("{}: {} bytes at {:#x}, {} expected".format(what, len(buffer), address, nbytes))
        return buffer

    def enqueue(self, stream_handle, operation):
        """Run ``operation`` when the stream is synchronized (CUDA's asynchrony: nothing happens at enqueue)."""
        if stream_handle is None:  # the legacy default stream: this fake runs it at once
            operation()
        else:
            self.pending.setdefault(stream_handle, []).append(operation)

    def run_pending(self, stream_handle, until=None):
        """Run the stream's operations in order, up to and including ``until`` (all of them if None)."""
        queue = self.pending.get(stream_handle, [])
        while queue:
            operation = queue.pop(0)
            operation()
            if operation is until:
                return

    def require_context(self, what):
        if not self.stack:
            raise FakeCudaError("{}: no current CUDA context (invalid context)".format(what))
        return self.stack[-1]


def make_pycuda():
    """A fresh fake ``pycuda`` package and its ``pycuda.driver`` module (with a ``_state`` for tests)."""
    state = _Cuda()
    driver = types.ModuleType("pycuda.driver")
    driver._state = state
    driver.Error = driver.LogicError = FakeCudaError
    driver.ctx_flags = types.SimpleNamespace(SCHED_AUTO=0, MAP_HOST=8)
    driver.host_alloc_flags = types.SimpleNamespace(PORTABLE=1, DEVICEMAP=2, WRITECOMBINED=4)
    driver.event_flags = types.SimpleNamespace(DEFAULT=0, BLOCKING_SYNC=1, DISABLE_TIMING=2, INTERPROCESS=4)
    initialized = []

    def init(flags=0):
        initialized.append(True)

    class Context(object):
        def __init__(self, flags):
            self.flags = flags
            self.alive = True
            self.thread = threading.get_ident()
            state.contexts_alive += 1

        def push(self):
            state.stack.append(self)

        @staticmethod
        def pop():
            if not state.stack:
                raise FakeCudaError("cuCtxPopCurrent failed: no current context")
            state.stack.pop()

        def detach(self):
            """As pycuda: a current context is destroyed and popped; a context that is not current is destroyed
            only from the thread that made it (here: never from another thread) and otherwise leaked."""
            if state.stack and state.stack[-1] is self:
                state.stack.pop()
            elif threading.get_ident() != self.thread:
                state.contexts_leaked += 1
                return
            self.alive = False
            state.contexts_alive -= 1

    class Device(object):
        def __init__(self, index):
            if not initialized:
                raise FakeCudaError("cuInit has not been called")
            if index != 0:
                raise FakeCudaError("invalid device ordinal {}".format(index))

        def name(self):
            return "Fake GPU 9000"

        def make_context(self, flags=0):
            context = Context(flags)
            state.stack.append(context)
            return context

    class HostAllocation(bytearray):
        device_pointer = None

        def get_device_pointer(self):
            if self.device_pointer is None:
                raise FakeCudaError("get_device_pointer: memory was not allocated with host_alloc_flags.DEVICEMAP")
            return self.device_pointer

    def pagelocked_empty(shape, dtype, order="C", mem_flags=0):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        host = HostAllocation(nbytes)
        if mem_flags & driver.host_alloc_flags.DEVICEMAP:
            if not state.require_context("pagelocked_empty").flags & driver.ctx_flags.MAP_HOST:
                raise FakeCudaError("mapped host memory needs a context made with ctx_flags.MAP_HOST")
            host.device_pointer = state.new_address(host, mapped=True)
        return np.ndarray(shape, dtype, buffer=host, order=order)

    class DeviceAllocation(object):
        def __init__(self, nbytes):
            state.require_context("mem_alloc")
            self.address = state.new_address(bytearray(nbytes))
            state.device_allocations += 1

        def __int__(self):
            return self.address

        __index__ = __int__

        def free(self):
            state.memory.pop(self.address, None)

    def mem_alloc(nbytes):
        return DeviceAllocation(int(nbytes))

    def memcpy_htod_async(dest, src, stream=None):
        state.require_context("memcpy_htod_async")
        src = np.asarray(src)

        def copy():  # reads the page-locked source when the stream gets there, as the DMA would
            state.buffer_at(int(dest), src.nbytes, "memcpy_htod_async")[:] = np.ascontiguousarray(src).tobytes()
            state.copies += 1

        state.enqueue(stream.handle if stream is not None else None, copy)

    def memcpy_dtoh_async(dest, src, stream=None):
        state.require_context("memcpy_dtoh_async")

        def copy():
            buffer = state.buffer_at(int(src), dest.nbytes, "memcpy_dtoh_async")
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(buffer), dtype=np.uint8)
            state.copies += 1

        state.enqueue(stream.handle if stream is not None else None, copy)

    class Stream(object):
        _handles = itertools.count(0x7000)

        def __init__(self, flags=0):
            state.require_context("Stream")
            self.handle = next(self._handles)

        def synchronize(self):
            state.run_pending(self.handle)

    class Event(object):
        def __init__(self, flags=0):
            state.require_context("Event")
            if flags & driver.event_flags.DISABLE_TIMING:
                raise FakeCudaError("an event made with DISABLE_TIMING cannot be timed")
            self.t = None
            self._stream = self._marker = None

        def record(self, stream=None):
            self.t = None

            def mark():
                self.t = time.perf_counter()

            self._stream, self._marker = (stream.handle if stream is not None else None), mark
            state.enqueue(self._stream, mark)
            return self

        def synchronize(self):
            state.run_pending(self._stream, until=self._marker)
            return self

        def time_since(self, start):
            """ms from ``start`` to this event, as pycuda's ``Event.time_since``; both must have completed."""
            if self.t is None or start.t is None:
                raise FakeCudaError("cuEventElapsedTime: an event has not completed (synchronize first)")
            return (self.t - start.t) * 1000.0

    for value in (init, Context, Device, HostAllocation, pagelocked_empty, DeviceAllocation, mem_alloc,
                  memcpy_htod_async, memcpy_dtoh_async, Stream, Event):
        setattr(driver, value.__name__, value)
    package = types.ModuleType("pycuda")
    package.driver = driver
    return package, driver


# ---------------------------------------------------------------------------------------------------------- tensorrt

# Operators the fake parser imports: those our exported models use (a stand-in for TensorRT's op table).
FAKE_PARSER_OPS = {"Conv", "PRelu", "DepthToSpace", "Add", "Sub", "Mul", "Relu", "Tanh", "Sigmoid", "Sign", "Clip",
                   "Ceil", "Floor", "Abs", "Identity", "Concat", "Reshape", "Transpose"}
ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"


def make_tensorrt(api="8.2", driver=None, fast_fp16=True, fast_int8=False, fail_build=False, fail_execute=False,
                  fail_address=False):
    """A fake ``tensorrt`` module with the ``api`` "8.2" (binding) or "10" (tensor) surface.

    ``driver``: the fake pycuda.driver whose memory engines read and write. ``fail_build``: the builder returns
    None, as TensorRT does when a build fails (out of memory on a Nano, say). ``fail_execute``/``fail_address``:
    ``execute_async_v2/v3`` and ``set_tensor_address`` return False, as TensorRT does when it refuses them.
    """
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "8.2.1.8" if api == "8.2" else "10.3.0.26"
    tensor_api = api != "8.2"
    state = driver._state if driver is not None else None
    trt.built = []  # (onnx bytes length, precision, workspace bytes) per build, for tests

    class DataType(object):
        FLOAT, HALF, INT8, INT32, BOOL = "FLOAT", "HALF", "INT8", "INT32", "BOOL"

    trt.DataType = DataType
    _np = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}
    trt.nptype = lambda dtype: _np[dtype]

    class Logger(object):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=1):
            self.min_severity = min_severity

    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")

    class Network(object):
        def __init__(self, flags):
            if not tensor_api and not flags & 1:
                raise RuntimeError("the ONNX parser needs an explicit-batch network on TensorRT 8")
            self.onnx_bytes = None

        @property
        def num_inputs(self):
            return len(onnx.load_from_string(self.onnx_bytes).graph.input)

        def get_input(self, index):
            return NetworkInput(self, index)

    class NetworkInput(object):
        """A network input: ``shape`` with -1 for a dynamic axis, settable (the dims propagate to the outputs that
        share the axis's name, as TensorRT's shape inference would)."""

        def __init__(self, network, index):
            self.network, self.index = network, index
            self.name = onnx.load_from_string(network.onnx_bytes).graph.input[index].name

        @property
        def shape(self):
            value = onnx.load_from_string(self.network.onnx_bytes).graph.input[self.index]
            return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)

        @shape.setter
        def shape(self, dims):
            proto = onnx.load_from_string(self.network.onnx_bytes)
            names = {}
            for d, size in zip(proto.graph.input[self.index].type.tensor_type.shape.dim, dims):
                if d.dim_param:
                    names[d.dim_param] = size
                d.dim_value = size
            for value in proto.graph.output:
                for d in value.type.tensor_type.shape.dim:
                    if d.dim_param in names:
                        d.dim_value = names[d.dim_param]
            self.network.onnx_bytes = proto.SerializeToString()

    class ParserError(object):
        def __init__(self, node, op, name, desc):
            self._node, self._op, self._name, self._desc = node, op, name, desc

        def code(self):
            return "UNSUPPORTED_NODE"

        def desc(self):
            return self._desc

        def file(self):
            return "ModelImporter.cpp"

        def func(self):
            return "parseGraph"

        def line(self):
            return 4871

        def node(self):
            return self._node

    class ParserError10(ParserError):
        def node_name(self):
            return self._name

        def node_operator(self):
            return self._op

    class OnnxParser(object):
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse(self, model, path=None):
            proto = onnx.load_from_string(bytes(model))
            for index, node in enumerate(proto.graph.node):
                if node.op_type not in FAKE_PARSER_OPS:
                    error_class = ParserError10 if tensor_api else ParserError
                    self.errors.append(error_class(index, node.op_type, node.name, "No importer registered for op: "
                                                   + node.op_type))
            self.network.onnx_bytes = bytes(model)
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    trt.OnnxParser = OnnxParser

    class Config(object):
        def __init__(self):
            self.flags, self.workspace = set(), None

        def set_flag(self, flag):
            self.flags.add(flag)

    if tensor_api:
        def set_memory_pool_limit(self, pool, pool_size):
            assert pool == "WORKSPACE"
            self.workspace = pool_size

        Config.set_memory_pool_limit = set_memory_pool_limit
    else:
        Config.max_workspace_size = property(lambda self: self.workspace,
                                             lambda self, value: setattr(self, "workspace", value))

    class Builder(object):
        platform_has_fast_fp16 = fast_fp16
        platform_has_fast_int8 = fast_int8

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            if config.workspace is None:
                raise AssertionError("the workspace was never limited")
            trt.built.append((len(network.onnx_bytes), "FP16" in config.flags, config.workspace))
            if fail_build:
                return None
            header = json.dumps({"fp16": "FP16" in config.flags}).encode() + b"\n"
            return memoryview(ENGINE_MAGIC + header + network.onnx_bytes)

    if not tensor_api:
        def build_engine(self, network, config):
            raise AssertionError("build_engine is deprecated in 8.2; latentlink must call build_serialized_network")

        Builder.build_engine = build_engine
    trt.Builder = Builder

    class Engine(object):
        def __init__(self, data):
            header, onnx_bytes = data[len(ENGINE_MAGIC):].split(b"\n", 1)
            self.fp16 = json.loads(header.decode())["fp16"]
            proto = onnx.load_from_string(onnx_bytes)
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            initializers = set(t.name for t in proto.graph.initializer)
            inputs = [v for v in proto.graph.input if v.name not in initializers]
            self.io = [(v.name, is_input, tuple(d.dim_value for d in v.type.tensor_type.shape.dim))
                       for v, is_input in [(v, True) for v in inputs] + [(v, False) for v in proto.graph.output]]

        def create_execution_context(self):
            return (Context10 if tensor_api else Context8)(self)

    class Engine8(Engine):
        num_bindings = property(lambda self: len(self.io))

        def get_binding_name(self, index):
            return self.io[index][0]

        def binding_is_input(self, index):
            return self.io[index][1]

        def get_binding_shape(self, index):
            return self.io[index][2]

        def get_binding_dtype(self, index):
            return DataType.FLOAT

    class Engine10(Engine):
        num_io_tensors = property(lambda self: len(self.io))

        def _find(self, name):
            return next(io for io in self.io if io[0] == name)

        def get_tensor_name(self, index):
            return self.io[index][0]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if self._find(name)[1] else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return self._find(name)[2]

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

    class Context(object):
        def __init__(self, engine):
            self.engine = engine

        def _run(self, addresses, stream_handle):
            state.require_context("execute")
            missing = [name for name, _, _ in self.engine.io if addresses.get(name) is None]
            if missing:
                raise RuntimeError("no address for {}".format(missing))
            if fail_execute:
                return False
            state.enqueue(stream_handle, lambda: self._infer(addresses))
            return True

        def _infer(self, addresses):
            feeds = {}
            for name, is_input, shape in self.engine.io:
                nbytes = int(np.prod(shape)) * 4
                buffer = state.buffer_at(addresses[name], nbytes, "binding " + name)
                if is_input:
                    feeds[name] = np.frombuffer(bytes(buffer), dtype=np.float32).reshape(shape)
            outputs = self.engine.session.run(None, feeds)
            for (name, is_input, shape), value in zip([io for io in self.engine.io if not io[1]], outputs):
                if self.engine.fp16:  # an FP16 engine's output carries FP16 rounding
                    value = value.astype(np.float16).astype(np.float32)
                state.buffer_at(addresses[name], value.nbytes, "binding " + name)[:] = value.tobytes()

    class Context8(Context):
        def execute_async_v2(self, bindings, stream_handle, input_consumed=None):
            if len(bindings) != len(self.engine.io):
                raise RuntimeError("execute_async_v2: {} bindings for {} tensors".format(len(bindings),
                                                                                         len(self.engine.io)))
            return self._run(dict((io[0], b) for io, b in zip(self.engine.io, bindings)), stream_handle)

    class Context10(Context):
        def __init__(self, engine):
            Context.__init__(self, engine)
            self.addresses = {}

        def set_tensor_address(self, name, memory):
            if fail_address:
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            missing = [io[0] for io in self.engine.io if io[0] not in self.addresses]
            if missing:
                raise RuntimeError("execute_async_v3: no address for {}".format(missing))
            return self._run(self.addresses, stream_handle)

    class Runtime(object):
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            state.require_context("deserialize_cuda_engine")
            data = bytes(serialized_engine)
            if not data.startswith(ENGINE_MAGIC):
                return None  # TensorRT logs the reason and returns None
            return (Engine10 if tensor_api else Engine8)(data)

    trt.Runtime = Runtime
    return trt


def install(monkeypatch, api="8.2", **options):
    """Put a fake ``tensorrt`` (``api`` "8.2" or "10") and fake ``pycuda`` into ``sys.modules``; returns both."""
    package, driver = make_pycuda()
    trt = make_tensorrt(api, driver=driver, **options)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, driver
