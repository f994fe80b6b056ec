"""What each TensorRT version's ONNX importer takes: operator tables and the restrictions that matter for our graphs.

Data for ``latentlink export check --trt VERSION`` (export/onnx_check.py). Every table comes from the sources of
onnx-tensorrt (https://github.com/onnx/onnx-tensorrt), the ONNX parser TensorRT ships, at the release tag below:

- the operators: the names its ``DEFINE_BUILTIN_OP_IMPORTER(...)`` registers, in ``builtin_op_importers.cpp``
  (``onnxOpImporters.cpp`` in 10.x), without the ``TRT_*`` and internal fallback importers. Any other name is looked
  up as a plugin and fails unless one is registered. They agree with the "Y" rows of that tag's ``docs/operators.md``
  (the importer also has Reciprocal up to 8.4, HardSwish, Mod and OneHot from 8.5, which the docs leave out);
- the opset range: the first lines of that tag's ``docs/operators.md``;
- the operands that must be initializers: the ``Restrictions`` column of ``docs/operators.md`` and the importer's
  ``ASSERT(inputs.at(i).is_weights() ...)`` lines.

Versions (tag -> commit):
  8.0  release/8.0      8fea430fc1ad452085add61b04045a9efbf2b981  TensorRT 8.0.1, JetPack 4.6 (L4T R32.6.1)
  8.2  release/8.2-GA   85e79f629fb546a75d61e3027fb259a9529144fe  TensorRT 8.2.1, JetPack 4.6.1+ (L4T R32.7.x)
  8.4  release/8.4-GA   1da7332349d5b1196ccfa6dc719b839876f1e83e
  8.5  release/8.5-GA   3b008c466bcb7375aaf5cabf51b289fd34d40c44
  8.6  release/8.6-GA   6ba67d3428e05f690145373ca87fb8d32f98df45
  10   release/10.0-GA  eb43908b02a296ea0594432f06e9d3fac288d672  (10.x only adds operators: 10.0 is the oldest)

8.0 -> 8.2 is the step that matters on the Nano: 8.2 added Sign and Round (the unary SIGN and ROUND operations),
Einsum, GatherND, IsNaN, Scatter, ScatterElements and ScatterND.

Python 3.6 compatible: it runs on the Nano before an engine build.
"""

import collections

from latentlink.edge.errors import ConfigError

SOURCE = "https://github.com/onnx/onnx-tensorrt"

# version -> (onnx-tensorrt tag, its commit)
RELEASES = collections.OrderedDict([
    ("8.0", ("release/8.0", "8fea430fc1ad452085add61b04045a9efbf2b981")),
    ("8.2", ("release/8.2-GA", "85e79f629fb546a75d61e3027fb259a9529144fe")),
    ("8.4", ("release/8.4-GA", "1da7332349d5b1196ccfa6dc719b839876f1e83e")),
    ("8.5", ("release/8.5-GA", "3b008c466bcb7375aaf5cabf51b289fd34d40c44")),
    ("8.6", ("release/8.6-GA", "6ba67d3428e05f690145373ca87fb8d32f98df45")),
    ("10", ("release/10.0-GA", "eb43908b02a296ea0594432f06e9d3fac288d672")),
])
VERSIONS = tuple(RELEASES)
OLDEST = VERSIONS[0]

# version -> (lowest, highest) ONNX opset its docs/operators.md names ("up to Opset 13"; 10.0: "opset 9 to opset 20").
OPSETS = {"8.0": (1, 13), "8.2": (1, 13), "8.4": (1, 17), "8.5": (1, 17), "8.6": (1, 17), "10": (9, 20)}

# TensorRT 8.0's importer (release/8.0, builtin_op_importers.cpp), then what each later release added. No release
# removed an operator.
_OPS_80 = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual HardSigmoid Identity If ImageScaler InstanceNormalization LRN LSTM
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg
NonMaxSuppression Not Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence ScaledTanh Scan Selu Shape Sigmoid Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Unsqueeze Upsample Where
"""
_ADDED = collections.OrderedDict([
    ("8.0", ""),
    ("8.2", "Einsum GatherND IsNaN Round Scatter ScatterElements ScatterND Sign"),
    ("8.4", "HardSwish Shrink Xor"),
    ("8.5", "GridSample MeanVarianceNormalization Mod NonZero OneHot RandomNormal RandomNormalLike RoiAlign Trilu"),
    ("8.6", "GroupNormalization IsInf LayerNormalization"),
    ("10", "CastLike Gelu Hardmax Mish"),
])


def _cumulative():
    tables, ops = {}, set(_OPS_80.split())
    for version, added in _ADDED.items():
        ops |= set(added.split())
        tables[version] = frozenset(ops)
    return tables


OPS = _cumulative()

# Operands that must be initializers (known when the engine is built): (operator, input index, input name, first
# version, last version) it applies to. Sources: docs/operators.md's Restrictions and the importers' asserts.
_INITIALIZER_RULES = [
    ("Clip", 1, "min", "8.0", "8.6"),  # 8.0: "`min` and `max` clip values must be initializers"; 8.2-8.6 assert it
    ("Clip", 2, "max", "8.0", "8.6"),  # on the activation path, the one a float Clip takes
    ("Conv", 1, "W", "8.0", "8.4"),    # 8.2, 8.4: "Weights `W` must be an initializer"
    ("Conv", 2, "B", "8.0", "8.5"),    # "The bias tensor is required to be an initializer for the Conv operator"
    ("ConvTranspose", 1, "W", "8.0", "8.4"),
    ("ConvTranspose", 2, "B", "8.0", "8.4"),
    ("InstanceNormalization", 1, "scale", "8.0", "8.5"),
    ("InstanceNormalization", 2, "B", "8.0", "8.5"),
    ("Pad", 1, "pads", "8.0", "8.0"),  # 8.0: "Zero-constant padding on two dimensions only", pads asserted
    ("Pad", 2, "constant_value", "8.0", "8.0"),
    ("Squeeze", 1, "axes", "8.0", "10"),
    ("Unsqueeze", 1, "axes", "8.0", "10"),
    ("Slice", 3, "axes", "8.0", "10"),
    ("Upsample", 1, "scales", "8.0", "8.2"),  # "The scales input must be an initializer" (8.4 takes a tensor)
]

# Resize's scales must be an initializer (unless sizes is given) up to this version: "Resize scales must be an
# initializer!" in 8.0 and 8.2; 8.4 takes them as a tensor.
RESIZE_SCALES_INITIALIZER_UNTIL = "8.2"


def _key(version):
    return tuple(int(p) for p in version.split("."))


def initializer_inputs(version):
    """``{operator: {input index: input name}}``: the operands TensorRT ``version`` needs as initializers."""
    table = collections.defaultdict(dict)
    for op, index, name, first, last in _INITIALIZER_RULES:
        if _key(first) <= _key(version) <= _key(last):
            table[op][index] = name
    return dict(table)


def resize_scales_need_initializer(version):
    return _key(version) <= _key(RESIZE_SCALES_INITIALIZER_UNTIL)


def resolve_version(text):
    """``"8.0"``, ``"8.2.1"``, ``"8.2.1.8"`` (``tensorrt.__version__``), ``"10"``, ``"10.3"`` -> a table's version.

    A release maps to the table of its major.minor (any 10.x to 10.0's, the oldest 10: later ones only add
    operators). Raises ConfigError for a version without a table, naming the ones there are.
    """
    text = str(text).strip()
    parts = text.split(".")
    if not all(p.isdigit() for p in parts):
        parts = []
    key = "10" if parts and parts[0] == "10" else ".".join(parts[:2])
    if key not in RELEASES:
        raise ConfigError(
            "--trt {}: no ONNX operator table for TensorRT {}; the tables: {} (8.0: JetPack 4.6; 8.2: JetPack "
            "4.6.1 and later; 10: any 10.x), e.g. --trt 8.0".format(text, text, ", ".join(VERSIONS)))
    return key


def describe(version):
    """``TensorRT 8.0 (onnx-tensorrt release/8.0, 8fea430)``: which table a check used."""
    tag, commit = RELEASES[version]
    return "TensorRT {} (onnx-tensorrt {}, {})".format(version, tag, commit[:7])
