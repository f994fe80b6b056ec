"""Will this model fit the frame budget on a Jetson Nano?  A roofline cost model of an ONNX graph.

An estimate, never a measurement: nothing here has been checked against a Nano by this project. What it does:

1. Per layer (ONNX node, shapes from ONNX shape inference): FLOPs (2 per multiply-add; bias adds are not counted,
   they ride in the convolution's epilogue) and bytes moved at FP16 (weights, activations in, activations out).
2. Per kernel, the way TensorRT runs the graph: a convolution absorbs the chain of pointwise ops that follows it
   (activation, bias, residual add, the binarizer's Sub/Sign/Clip), reshapes and concatenations cost nothing, and
   the FP32 input and output bindings are reformatted from and to FP16.
3. A roofline per kernel: ``max(FLOPs / (peak x efficiency), bytes / bandwidth) + launch``. The efficiencies are
   calibrated on published TensorRT FP16 latencies of ResNet-18/34/50 on a Nano (:data:`CALIBRATION`); 3x3 stride-1
   convolutions get their own (TensorRT runs them as Winograd, more useful work per cycle than the rest).
4. A range: ``low_ms`` assumes the best kernels (efficiencies x1.25, 85 % of the memory bandwidth), ``high_ms``
   the worst plausible ones (efficiencies x0.6, narrow layers filling a fraction of a GEMM tile, every pointwise op
   its own pass over memory, 50 % of the bandwidth). Checked against networks not used to calibrate
   (:data:`VALIDATION`; ``python -m benchmarks.cost_model`` prints the table).

Python 3.6 compatible (needs the ``onnx`` package): ``latentlink export check`` runs it on the Nano.
"""

import collections

import onnx

# The Jetson Nano (Maxwell GM20B, 128 CUDA cores at 921.6 MHz): 472 GFLOPS FP16 (2 per FMA, 2 FP16 per lane),
# 25.6 GB/s of LPDDR4 shared with the CPU (NVIDIA's Jetson Nano module data sheet).
Device = collections.namedtuple("Device", "name peak_gflops bandwidth_gbs efficiency winograd_efficiency "
                                          "bandwidth_efficiency launch_ms")
JETSON_NANO = Device(
    name="jetson-nano", peak_gflops=472.0, bandwidth_gbs=25.6,
    # Fitted to CALIBRATION by `python -m benchmarks.cost_model --calibrate` (least squares on log time).
    efficiency=0.52, winograd_efficiency=0.80,
    bandwidth_efficiency=0.70,  # assumed: what a streaming kernel gets of LPDDR4's peak (not calibrated)
    launch_ms=0.01,             # assumed: per-kernel launch and tail cost
)
DEVICES = {JETSON_NANO.name: JETSON_NANO}

# Published TensorRT FP16 latencies on a Jetson Nano, batch 1, 224x224 (torch2trt's benchmark table, Latency
# (TensorRT) column, ms; JetPack 4.x, TensorRT 6/7): name -> ms.
SOURCE = "https://github.com/NVIDIA-AI-IOT/torch2trt/blob/master/benchmarks/JETSON_NANO.md"
CALIBRATION = collections.OrderedDict([("resnet18", 11.4), ("resnet34", 20.2), ("resnet50", 29.8)])
VALIDATION = collections.OrderedDict([
    ("resnet101", 51.1), ("resnet152", 72.3), ("alexnet", 14.7), ("squeezenet1_0", 7.6), ("squeezenet1_1", 4.34),
    ("vgg11", 55.1), ("vgg13", 68.7), ("vgg16", 85.1), ("densenet121", 24.8),
])

FP16_BYTES = 2
FP32_BYTES = 4

# Ops TensorRT runs without a kernel of their own: views, and Concat (producers write into its buffer).
FREE_OPS = frozenset("Reshape Flatten Squeeze Unsqueeze Identity Dropout Concat Constant Shape".split())
# Ops that a convolution's epilogue (or one pointwise kernel) absorbs.
POINTWISE_OPS = frozenset("""Relu PRelu LeakyRelu Clip Sigmoid Tanh HardSigmoid Elu Selu Softplus BatchNormalization
Add Sub Mul Div Sign Round Abs Neg Exp Log Sqrt Pow Max Min Greater Less Equal Where Not Cast Erf""".split())
# Ops with weights that do the heavy lifting.
COMPUTE_OPS = frozenset("Conv ConvTranspose Gemm MatMul".split())
# A narrow GEMM (few output channels, or a short reduction) fills only part of a kernel's tile (high_ms only).
TILE = 32


def load(model):
    """An ``onnx.ModelProto`` from a path or a ModelProto, with inferred shapes. A named dynamic batch axis (the
    host's decoders have one) is costed at 1: one frame, as the per-frame estimates mean."""
    from .onnx_check import fix_batch

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's model stays as it was
    fix_batch(model)
    return onnx.shape_inference.infer_shapes(model)


def layer_costs(model):
    """One dict per ONNX node: ``name, op, flops, weight_bytes, in_bytes, out_bytes`` (FP16 bytes), plus
    ``inputs``/``outputs`` (tensor names) and what :func:`estimate` needs (``kernel``, ``narrow``).

    ``weight_bytes``: initializers the node reads; ``in_bytes``: activations it reads; ``out_bytes``: what it
    writes. FLOPs: Conv ``2 N Cout Hout Wout (Cin/group) kh kw``; Gemm/MatMul ``2 M N K``; pools one per window
    element; pointwise ops one per output element; views and copies none.
    """
    model = load(model)
    graph = model.graph
    shapes = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor = value.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        if tensor.HasField("shape") and all(d > 0 for d in dims):  # [] is a scalar
            shapes[value.name] = dims
    weights = {}
    for tensor in graph.initializer:
        weights[tensor.name] = list(tensor.dims)
    layers = []
    for index, node in enumerate(graph.node):
        ins = [n for n in node.input if n]
        act_in = [n for n in ins if n not in weights]
        w_in = [n for n in ins if n in weights]
        out_shapes = [shapes.get(n) for n in node.output]
        if any(s is None for s in out_shapes) and node.op_type not in FREE_OPS:
            raise ValueError("node {} ({}, {}): output shape unknown; export with static shapes".format(
                index, node.name or "unnamed", node.op_type))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        flops, narrow = _flops(node.op_type, [shapes.get(n) or weights.get(n) for n in ins], out_shapes, attrs)
        layers.append({
            "name": node.name or "{}_{}".format(node.op_type, index), "op": node.op_type, "flops": flops,
            "weight_bytes": FP16_BYTES * sum(_numel(weights[n]) for n in w_in),
            "in_bytes": FP16_BYTES * sum(_numel(shapes[n]) for n in act_in if n in shapes),
            "out_bytes": FP16_BYTES * sum(_numel(s) for s in out_shapes),
            "inputs": act_in, "outputs": list(node.output), "narrow": narrow,
            "kernel": "free" if node.op_type in FREE_OPS else
                      "pointwise" if node.op_type in POINTWISE_OPS else
                      "winograd" if _winograd(node.op_type, weights.get(node.input[1]) if len(node.input) > 1
                                              else None, attrs) else "compute",
        })
    return layers


def estimate(model, device="jetson-nano"):
    """Predicted time of one inference (batch as exported) on ``device``, FP16 TensorRT engine.

    Returns ``{"device", "ms", "low_ms", "high_ms", "gflop", "mbytes", "kernels"}``: ``ms`` the calibrated
    prediction, ``low_ms``..``high_ms`` the range (see the module docstring), ``gflop`` the FLOPs (1e9),
    ``mbytes`` the bytes the fused kernels move (1e6), ``kernels`` how many kernels that is.
    """
    dev = DEVICES[device] if not isinstance(device, Device) else device
    model = load(model)
    layers = layer_costs(model)
    io_bytes = _binding_bytes(model)
    central = _time(layers, dev, io_bytes, scale=1.0, bandwidth=dev.bandwidth_efficiency)
    low = _time(layers, dev, io_bytes, scale=1.25, bandwidth=0.85)
    high = _time(layers, dev, io_bytes, scale=0.6, bandwidth=0.5, fuse=False, narrow=True)
    kernels = _kernels(layers, fuse=True)
    return collections.OrderedDict([
        ("device", dev.name), ("ms", round(central, 2)), ("low_ms", round(low, 2)), ("high_ms", round(high, 2)),
        ("gflop", round(sum(l["flops"] for l in layers) / 1e9, 3)),
        ("mbytes", round((sum(k["bytes"] for k in kernels) + io_bytes) / 1e6, 1)), ("kernels", len(kernels)),
    ])


def format_estimate(est, budget_ms=None):
    """One line: ``estimate on jetson-nano (...): 32.6 ms (range 26.2-71.9), 7.99 GFLOP, 103 MB moved`` and,
    with ``budget_ms`` (the profile's frame budget), whether it fits and what it leaves for the other stages."""
    text = ("estimate on {device} (FP16 TensorRT; a model, never measured here): {ms:.1f} ms (range "
            "{low_ms:.1f}-{high_ms:.1f}), {gflop:.2f} GFLOP, {mbytes:.0f} MB moved".format(**est))
    if budget_ms:
        text += "; frame budget {:.1f} ms: {}".format(budget_ms, verdict(est, budget_ms))
        if est["ms"] <= budget_ms:
            text += " ({:.1f} ms of it left for capture, preprocessing and sending)".format(budget_ms - est["ms"])
    return text


def verdict(est, budget_ms):
    """``fits``, ``may miss`` (the range straddles the budget) or ``misses`` (the prediction is over it)."""
    if est["ms"] > budget_ms:
        return "misses"
    return "fits" if est["high_ms"] <= budget_ms else "may miss"


def estimate_file(path, device="jetson-nano"):
    """``(estimate, None)`` for an ONNX file, or ``(None, reason)`` where the graph cannot be costed (a .pt or
    .engine file, dynamic shapes, an unreadable file): callers print the reason and carry on."""
    if not str(path).lower().endswith(".onnx"):
        return None, "the cost model reads ONNX graphs; export one with `latentlink export onnx`"
    try:
        return estimate(path, device), None
    except Exception as exc:  # onnx raises DecodeError, ValidationError, InferenceError...: all mean "no estimate"
        return None, "cannot cost {}: {}".format(path, (str(exc).splitlines() or [type(exc).__name__])[0])


def budget_for(onnx_path):
    """The frame budget (ms) of the profile that ``model.json`` beside ``onnx_path`` names, or None."""
    import json
    import os

    meta = os.path.join(os.path.dirname(os.path.abspath(str(onnx_path))), "model.json")
    try:
        with open(meta) as f:
            name = json.load(f).get("profile")
        if not name:
            return None
        from latentlink.edge.profile import load_profile

        return load_profile(name).budget_ms
    except Exception:  # noqa: BLE001 - no model.json, or a profile that is not installed here: no budget to say
        return None


# --- internals ---------------------------------------------------------------------------------------------------

def _numel(shape):
    n = 1
    for d in shape or []:
        n *= d
    return n


def _flops(op, in_shapes, out_shapes, attrs):
    """(FLOPs, narrow factor in (0, 1]: the share of a GEMM tile a Conv/Gemm fills)."""
    out = out_shapes[0]
    if op in ("Conv", "ConvTranspose") and len(in_shapes) > 1 and in_shapes[1]:
        w = in_shapes[1]
        group = attrs.get("group", 1)
        if op == "Conv":  # weight (Cout, Cin/group, kh, kw)
            k, cout = _numel(w[1:]), w[0]
            macs = _numel(out) * k
        else:  # weight (Cin, Cout/group, kh, kw): every input element meets Cout/group x kh x kw weights
            k, cout = _numel(w[1:]), w[1] * group
            macs = _numel(in_shapes[0]) * k
        return 2 * macs, min(1.0, cout / float(TILE)) * min(1.0, k / float(TILE))
    if op in ("Gemm", "MatMul") and len(in_shapes) > 1 and in_shapes[0] and in_shapes[1]:
        a, b = in_shapes[0], in_shapes[1]
        k = a[0] if attrs.get("transA") else a[-1]
        return 2 * _numel(out) * k, 1.0
    if op in ("MaxPool", "AveragePool"):
        return _numel(out) * _numel(attrs.get("kernel_shape", [1])), 1.0
    if op in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax"):
        return _numel(in_shapes[0]), 1.0
    if op in FREE_OPS or op in ("Transpose", "DepthToSpace", "SpaceToDepth", "Pad", "Slice", "Resize",
                                "Upsample"):
        return 0, 1.0
    return _numel(out), 1.0  # pointwise and anything else: one operation per output element


def _winograd(op, weight, attrs):
    """3x3, stride 1, dense, undilated Conv: what TensorRT runs with Winograd kernels."""
    return (op == "Conv" and weight is not None and list(weight[2:]) == [3, 3] and attrs.get("group", 1) == 1
            and all(s == 1 for s in attrs.get("strides", [1, 1])) and all(d == 1 for d in attrs.get("dilations", [1, 1])))


def _binding_bytes(model):
    """FP32 input and output bindings reformatted to and from FP16: read 4 + write 2 bytes per element."""
    names = set(t.name for t in model.graph.initializer)
    values = [v for v in list(model.graph.input) + list(model.graph.output) if v.name not in names]
    return sum(_numel([d.dim_value for d in v.type.tensor_type.shape.dim]) * (FP32_BYTES + FP16_BYTES)
               for v in values)


def _kernels(layers, fuse):
    """Group layers into kernels: a compute layer and the single-consumer chain of pointwise ops after it."""
    consumers = collections.Counter(name for l in layers for name in l["inputs"])
    kernels, absorbed = [], {}
    for layer in layers:
        if layer["kernel"] == "free":
            continue
        host = None
        if fuse and layer["kernel"] == "pointwise":
            feeds = [absorbed[n] for n in layer["inputs"] if n in absorbed and consumers[n] == 1]
            host = feeds[0] if feeds else None
        if host is not None:  # the output of the host's chain is read once, here: it never reaches memory
            chained = [n for n in layer["inputs"] if absorbed.get(n) is host and consumers[n] == 1]
            host["flops"] += layer["flops"]
            host["bytes"] += layer["weight_bytes"] + layer["in_bytes"] + layer["out_bytes"] - 2 * sum(
                host["out_sizes"][n] for n in chained)
            for n in chained:
                del absorbed[n]
        else:
            host = {"flops": layer["flops"], "kernel": layer["kernel"], "narrow": layer["narrow"], "out_sizes": {},
                    "bytes": layer["weight_bytes"] + layer["in_bytes"] + layer["out_bytes"]}
            kernels.append(host)
        for n in layer["outputs"]:
            absorbed[n] = host
        sizes = layer["out_bytes"] // max(1, len(layer["outputs"]))
        host["out_sizes"].update((n, sizes) for n in layer["outputs"])
    return kernels


def _time(layers, dev, io_bytes, scale, bandwidth, fuse=True, narrow=False):
    """Milliseconds: the roofline of every kernel, plus the bindings' reformat."""
    bytes_per_ms = dev.bandwidth_gbs * 1e6 * bandwidth
    total = io_bytes / bytes_per_ms + (2 * dev.launch_ms if io_bytes else 0.0)
    for kernel in _kernels(layers, fuse):
        eff = dev.winograd_efficiency if kernel["kernel"] == "winograd" else dev.efficiency
        eff = min(0.95, eff * scale) * (kernel["narrow"] if narrow else 1.0)
        flops_per_ms = dev.peak_gflops * 1e6 * eff
        total += max(kernel["flops"] / flops_per_ms, kernel["bytes"] / bytes_per_ms) + dev.launch_ms
    return total
