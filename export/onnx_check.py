"""Will this ONNX file parse and build on a given TensorRT?  (``latentlink export check [--trt VERSION]``)

What is checked, without TensorRT, against the tables of export/trt_ops.py (read from onnx-tensorrt's sources for
each release: 8.0 for JetPack 4.6, 8.2 for JetPack 4.6.1+, 8.4, 8.5, 8.6, 10): a valid ONNX model; the opset in
that version's range; every node in the default domain and in that version's ONNX operator table (8.0 has no Sign
and no Round); the operands it needs as initializers (Conv weights, Clip min and max, Squeeze axes, Resize scales,
...); every tensor shape static (the Nano's engines are built for one input size); no BOOL tensor (8.2 fails FP16
builds on them); no ``Constant`` node (latentlink's exports hold constants as initializers). One exception to static
shapes: a decoder's (a file named ``decoder*``) first axis may be a named dynamic batch, so that the host decodes
several frames in one run; the shapes are then checked with that axis at 1, and ``latentlink export engine`` builds
it with an optimization profile of model.json's shape (TensorRT engines stay static).

Python 3.6 compatible (needs the ``onnx`` package): it runs on the Nano before an engine build.
"""

import collections
import os

import onnx

from . import trt_ops

# Why a BOOL tensor is a problem (the notes of jetson-facts.md, with a TensorRT 8.2 build log as the source; not
# checked on later versions, and latentlink's graphs never need one, so every version refuses them).
BOOL_REASON = ("TensorRT 8.2 FP16 builds fail on BOOL tensors ('cannot use precision Int32 for layer that computes "
               "boolean values'); write the binarizer with float ops (export/models/layers.py: step)")


def check_onnx(path, trt=trt_ops.OLDEST, allow_dynamic_batch=None):
    """Check ``path`` against TensorRT ``trt`` (a version of :data:`trt_ops.VERSIONS`, default the oldest: 8.0).

    Returns ``{"path", "trt", "ok", "opset", "nodes", "ops": {op: count}, "problems": [str], "dynamic_batch": the
    batch axis's name or None}``. ``allow_dynamic_batch``: accept a named dynamic first axis on the graph's input and
    output (None: for files named ``decoder*``).
    """
    trt = trt_ops.resolve_version(trt)
    name = "TensorRT " + trt
    problems = []
    report = {"path": str(path), "trt": trt, "ok": False, "opset": None, "nodes": 0, "ops": {}, "problems": problems,
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
        report["dynamic_batch"] = fix_batch(model)
    graph = model.graph
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    report["opset"] = max(opsets) if opsets else None
    low, high = trt_ops.OPSETS[trt]
    if report["opset"] is None or not low <= report["opset"] <= high:
        problems.append("opset {}: {} parses opsets {} to {}; export with opset_version=13 (`latentlink export "
                        "onnx` does; 13 is in every table's range)".format(report["opset"], name, low, high))
    known_ops = trt_ops.OPS[trt]
    needs_initializer = trt_ops.initializer_inputs(trt)
    initializers = set(t.name for t in graph.initializer)
    counts = collections.Counter()
    for index, node in enumerate(graph.node):
        counts[node.op_type] += 1
        where = "node {} ({!r}, {})".format(index, node.name, node.op_type)
        if node.domain not in ("", "ai.onnx"):
            problems.append("{}: custom domain {!r} needs a TensorRT plugin".format(where, node.domain))
        elif node.op_type not in known_ops:
            problems.append("{}: {} is not in {}'s ONNX operator table{}".format(
                where, node.op_type, name, _first_with(node.op_type)))
        if node.op_type == "Constant":
            problems.append("{}: a Constant node; latentlink's graphs hold constant operands as initializers, which "
                            "TensorRT needs for many (export.onnx_export.constants_to_initializers rewrites "
                            "them)".format(where))
        if node.op_type == "Resize":
            problems.extend(_resize_problems(node, initializers, where, trt))
        for i, operand in sorted(needs_initializer.get(node.op_type, {}).items()):
            if i < len(node.input) and node.input[i] and node.input[i] not in initializers:
                problems.append("{}: input {!r} ({}) is computed in the graph; {} needs it as an "
                                "initializer".format(where, operand, node.input[i], name))
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


def fix_batch(model):
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


def _first_with(op):
    """``" (TensorRT 8.2 and later have it)"``, or nothing when no table has ``op``."""
    for version in trt_ops.VERSIONS:
        if op in trt_ops.OPS[version]:
            return " (TensorRT {} and later have it)".format(version)
    return ""


def _resize_problems(node, initializers, where, trt):
    """Resize: nearest or linear only (every version's table), and up to 8.2 ``scales`` an initializer unless
    ``sizes`` is given."""
    problems = []
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    if mode not in ("nearest", "linear"):
        problems.append("{}: Resize mode {!r}; TensorRT resizes nearest or linear only".format(where, mode))
    has_sizes = len(node.input) > 3 and node.input[3]
    if (trt_ops.resize_scales_need_initializer(trt) and not has_sizes and len(node.input) > 2 and node.input[2]
            and node.input[2] not in initializers):
        problems.append("{}: Resize's scales ({}) are computed in the graph; TensorRT {} needs them as an "
                        "initializer (or give sizes)".format(where, node.input[2], trt))
    return problems


def format_check(report):
    """``OK: path (TensorRT 8.0, opset 13, 24 nodes: Conv x9, ...)`` or ``FAIL: ...`` and one line per problem."""
    ops = ", ".join("{} x{}".format(op, n) for op, n in report["ops"].items())
    head = "{}: {} (TensorRT {}, opset {}, {} nodes{}{})".format(
        "OK" if report["ok"] else "FAIL", report["path"], report["trt"], report["opset"], report["nodes"],
        ": " + ops if ops else "",
        "; dynamic batch axis {!r}".format(report["dynamic_batch"]) if report.get("dynamic_batch") else "")
    return "\n".join([head] + ["  - " + p for p in report["problems"]])
