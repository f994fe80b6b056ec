"""Will this ONNX file parse and build on the Nano's TensorRT 8.2?  (``latentlink export check``)

What is checked, without TensorRT: a valid ONNX model; opset <= 13 (the newest TensorRT 8.2 parses); every node in
the default domain and in TensorRT 8.2's ONNX operator table (onnx-tensorrt ``release/8.2`` ``docs/operators.md``),
with the restrictions that table states for the operators our models use; every tensor shape static; no BOOL
tensor (8.2 fails FP16 builds on them); no ``Constant`` node (latentlink's exports hold constants as initializers,
which 8.2 wants for Conv weights, Squeeze axes, Resize scales and more). One exception to static shapes: a
decoder's (a file named ``decoder*``) first axis may be a named dynamic batch, so that the host decodes several
frames in one run; the shapes are then checked with that axis at 1, and ``latentlink export engine`` builds it
with an optimization profile of model.json's shape (TensorRT engines stay static).

Python 3.6 compatible (needs the ``onnx`` package): it runs on the Nano before an engine build.
"""

import collections
import os

import onnx

MAX_OPSET = 13

# The operators TensorRT 8.2's ONNX parser imports: the names its builtin_op_importers.cpp (TensorRT OSS
# release/8.2) registers; the same as onnx-tensorrt's 8.4 docs/operators.md "Y" rows without Xor (new in 8.4),
# plus Reciprocal. Any other name is looked up as a plugin and fails unless one is registered.
TRT82_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu
Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg
NonMaxSuppression Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where
""".split())

# Operands TensorRT 8.2 needs as initializers (known at build time), by operator: input index -> name. From the
# operator table's restrictions and the 8.2 importer's asserts.
INITIALIZER_INPUTS = {
    "Conv": {1: "W", 2: "B"},
    "ConvTranspose": {1: "W", 2: "B"},
    "InstanceNormalization": {1: "scale", 2: "B"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Slice": {3: "axes"},
    "Upsample": {1: "scales"},
}

# Why a BOOL tensor is a problem (the notes of jetson-facts.md, with a TensorRT 8.2 build log as the source).
BOOL_REASON = ("TensorRT 8.2 FP16 builds fail on BOOL tensors ('cannot use precision Int32 for layer that computes "
               "boolean values'); write the binarizer with float ops: clamp(sign(x), min=0)")


def check_onnx(path, allow_dynamic_batch=None):
    """Check ``path``; returns ``{"path", "ok", "opset", "nodes", "ops": {op: count}, "problems": [str],
    "dynamic_batch": the batch axis's name or None}``. ``allow_dynamic_batch``: accept a named dynamic first axis
    on the graph's input and output (None: for files named ``decoder*``)."""
    problems = []
    report = {"path": str(path), "ok": False, "opset": None, "nodes": 0, "ops": {}, "problems": problems,
              "dynamic_batch": None}
    if allow_dynamic_batch is None:
        allow_dynamic_batch = os.path.basename(str(path)).startswith("decoder")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...: all mean "not usable"
        problems.append("not a valid ONNX model: {}".format(str(exc).splitlines()[0] if str(exc) else exc))
        return report
    if allow_dynamic_batch:
        report["dynamic_batch"] = _fix_batch(model)
    graph = model.graph
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    report["opset"] = max(opsets) if opsets else None
    if report["opset"] is None or report["opset"] > MAX_OPSET:
        problems.append("opset {} > {}: TensorRT 8.2 parses opsets up to {}; export with opset_version={} "
                        "(`latentlink export onnx` does)".format(report["opset"], MAX_OPSET, MAX_OPSET, MAX_OPSET))
    initializers = set(t.name for t in graph.initializer)
    counts = collections.Counter()
    for index, node in enumerate(graph.node):
        counts[node.op_type] += 1
        where = "node {} ({!r}, {})".format(index, node.name, node.op_type)
        if node.domain not in ("", "ai.onnx"):
            problems.append("{}: custom domain {!r} needs a TensorRT plugin".format(where, node.domain))
        elif node.op_type not in TRT82_OPS:
            problems.append("{}: {} is not in TensorRT 8.2's ONNX operator table".format(where, node.op_type))
        if node.op_type == "Constant":
            problems.append("{}: a Constant node; TensorRT 8.2 wants constant operands as initializers "
                            "(export.onnx_export.constants_to_initializers rewrites them)".format(where))
        if node.op_type == "Resize":
            problems.extend(_resize_problems(node, initializers, where))
        for i, name in sorted(INITIALIZER_INPUTS.get(node.op_type, {}).items()):
            if i < len(node.input) and node.input[i] and node.input[i] not in initializers:
                problems.append("{}: input {!r} ({}) is computed in the graph; TensorRT 8.2 needs it as an "
                                "initializer".format(where, name, node.input[i]))
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BOOL for a in node.attribute):
            problems.append("{}: casts to BOOL. {}".format(where, BOOL_REASON))
    report["nodes"] = len(graph.node)
    report["ops"] = dict(sorted(counts.items()))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # strict shape inference raises on graphs it cannot type
        problems.append("shape inference failed: {}".format(str(exc).splitlines()[0]))
        inferred = model
    values = list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info)
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type == onnx.TensorProto.BOOL:
            problems.append("tensor {!r} is BOOL. {}".format(value.name, BOOL_REASON))
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        if not tensor.HasField("shape") or any(not isinstance(d, int) or d <= 0 for d in dims):
            problems.append("tensor {!r} has a dynamic or unknown shape {}; the Nano's engines need static shapes "
                            "(export at one input size per profile)".format(value.name, dims))
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.BOOL:
            problems.append("initializer {!r} is BOOL. {}".format(tensor.name, BOOL_REASON))
    report["ok"] = not problems
    return report


def _fix_batch(model):
    """If the graph's inputs and outputs share a named first axis, set it to 1 in ``model`` (so that the static
    checks apply to the rest) and return its name; else None."""
    values = list(model.graph.input) + list(model.graph.output)
    names = set()
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            return None
        names.add(dims[0].dim_param)
    if len(names) != 1:
        return None
    for value in values:
        value.type.tensor_type.shape.dim[0].dim_value = 1  # clears dim_param (a oneof)
    del model.graph.value_info[:]  # inferred again from the fixed input
    return names.pop()


def _resize_problems(node, initializers, where):
    """Resize on 8.2: nearest or linear only, and ``scales`` an initializer unless ``sizes`` is given."""
    problems = []
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    if mode not in ("nearest", "linear"):
        problems.append("{}: Resize mode {!r}; TensorRT 8.2 resizes nearest or linear only".format(where, mode))
    has_sizes = len(node.input) > 3 and node.input[3]
    if not has_sizes and len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        problems.append("{}: Resize's scales ({}) are computed in the graph; TensorRT 8.2 needs them as an "
                        "initializer (or give sizes)".format(where, node.input[2]))
    return problems


def format_check(report):
    """``OK: path (opset 13, 24 nodes: Conv x9, ...)`` or ``FAIL: path`` and one line per problem."""
    ops = ", ".join("{} x{}".format(op, n) for op, n in report["ops"].items())
    head = "{}: {} (opset {}, {} nodes{}{})".format(
        "OK" if report["ok"] else "FAIL", report["path"], report["opset"], report["nodes"], ": " + ops if ops else "",
        "; dynamic batch axis {!r}".format(report["dynamic_batch"]) if report.get("dynamic_batch") else "")
    return "\n".join([head] + ["  - " + p for p in report["problems"]])
