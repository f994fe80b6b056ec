"""`export check --trt VERSION` (the ONNX importer tables of export/trt_ops.py), profiles' targets, and the binarizer
and rounding written with TensorRT 8.0's operations: bit for bit what Sign and Round gave."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from latentlink.edge.errors import ConfigError  # noqa: E402
from latentlink.edge.preprocess import Preprocessor, fit_frame  # noqa: E402
from latentlink.edge.profile import JETPACK_TENSORRT, load_profile  # noqa: E402
from latentlink.edge.sources import open_source  # noqa: E402
from latentlink.export import trt_ops  # noqa: E402
from latentlink.export.__main__ import _installed_table, main  # noqa: E402
from latentlink.export.models import load_checkpoint  # noqa: E402
from latentlink.export.models.layers import round_half_even, step  # noqa: E402
from latentlink.export.onnx_check import check_onnx  # noqa: E402

from .test_export_tools import save, value  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "profiles", "default", "lossy-cae.pt")


def old_step(x):
    """The binarizer as shipped before: ONNX Sign, which TensorRT 8.0 cannot parse."""
    return torch.clamp(torch.sign(x), min=0)


def same_bits(a, b):
    """Equal as float32 bit patterns (+0.0 and -0.0 differ here)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def float_bits(start, count, seed=0):
    """``count`` random float32 bit patterns at or above the pattern ``start`` (NaNs removed)."""
    rng = np.random.RandomState(seed)
    bits = rng.randint(start, 2 ** 31 - 1, size=count, dtype=np.int64).astype(np.uint32)
    x = bits.view(np.float32)
    return x[~np.isnan(x)]


def step_cases():
    """Zeros of both signs, the tiniest and largest floats, infinities, and random bit patterns of both signs."""
    tiny = np.float32(1.4e-45)
    special = np.array([0.0, -0.0, tiny, -tiny, 1e-38, -1e-38, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 3e38, -3e38,
                        np.inf, -np.inf], np.float32)
    rand = float_bits(0, 200000)
    return np.concatenate([special, rand, -rand])


def round_cases():
    """Every tie k + 0.5 and integer k of 0..255, the floats next to them, and random floats in [0, 256)."""
    k = np.arange(256, dtype=np.float32)
    points = np.concatenate([k, k + np.float32(0.5), k + np.float32(0.25), k + np.float32(0.75)])
    near = np.concatenate([np.nextafter(points, np.float32(-1)), np.nextafter(points, np.float32(300))])
    rand = np.random.RandomState(1).uniform(0, 256, 200000).astype(np.float32)
    small = float_bits(0, 50000, seed=2)
    small = small[small < 1]
    return np.concatenate([points, near[near >= 0], rand, small, np.array([0.0, 255.0], np.float32)])


def test_step_is_clamp_sign_bit_for_bit_in_torch():
    x = torch.from_numpy(step_cases())
    assert same_bits(step(x).numpy(), old_step(x).numpy())
    assert set(np.unique(step(x).numpy()).tolist()) == {0.0, 1.0}


def test_round_half_even_is_torch_round_bit_for_bit_ties_included():
    y = torch.from_numpy(round_cases())
    assert same_bits(round_half_even(y).numpy(), torch.round(y).numpy())
    k = np.arange(256, dtype=np.float32)
    ties = torch.from_numpy(k + np.float32(0.5))  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2: halves go to the even neighbour
    assert same_bits(round_half_even(ties).numpy(), np.where(k % 2 == 0, k, k + 1))


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def run_onnx(fn, x, tmp_path, name):
    """``fn`` exported as the shipped models are (opset 13, TorchScript exporter), run by ONNX Runtime on ``x``."""
    from latentlink.export.onnx_export import _export, constants_to_initializers

    path = tmp_path / (name + ".onnx")
    _export(_Fn(fn).eval(), torch.from_numpy(x), path, "x", "y")
    constants_to_initializers(path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], ops


def test_exported_graphs_match_the_old_ones_in_onnx_runtime_and_parse_on_8_0(tmp_path):
    """ONNX Runtime runs Sign + Clip and Round (the old graphs) and the new ones: the same bits, ties included."""
    x = step_cases()
    new, new_ops = run_onnx(step, x, tmp_path, "step")
    old, old_ops = run_onnx(old_step, x, tmp_path, "sign")
    assert "Sign" in old_ops and new_ops <= trt_ops.OPS["8.0"] and "Sign" not in new_ops
    assert same_bits(new, old)
    y = round_cases()
    new, new_ops = run_onnx(round_half_even, y, tmp_path, "round_half_even")
    old, old_ops = run_onnx(torch.round, y, tmp_path, "round")
    assert "Round" in old_ops and new_ops <= trt_ops.OPS["8.0"] and "Round" not in new_ops
    assert same_bits(new, old)
    report = check_onnx(str(tmp_path / "step.onnx"), "8.0")
    assert report["ok"], report["problems"]
    assert not check_onnx(str(tmp_path / "sign.onnx"), "8.0")["ok"]


def photo_batch(photos_dir, size):
    with open_source("file://" + photos_dir) as source:
        frames = [fit_frame(frame, size, size) for frame, _ in source]
    prep = Preprocessor(size, size)
    return np.concatenate([prep(frame).copy() for frame in frames])


def test_shipped_encoder_gives_the_same_bits_on_real_photos_in_torch_and_onnx(tmp_path, photos_dir):
    """The shipped checkpoint on real photos: the new binarizer's bits are the old one's, in PyTorch and as ONNX."""
    from latentlink.export.models import lossy_cae
    from latentlink.export.onnx_export import _export, constants_to_initializers

    model, _ = load_checkpoint(CHECKPOINT)
    x = photo_batch(photos_dir, 128)
    with torch.no_grad():
        new = model.encoder(torch.from_numpy(x)).numpy()
        binarizer = model.encoder[-1]
        pre = model.encoder[:-1](torch.from_numpy(x))
        thresholds = torch.from_numpy(lossy_cae.dither_thresholds(*pre.shape[1:]))
        old = old_step(pre - thresholds if binarizer.dither else pre).numpy()
    assert same_bits(new, old) and 0.2 < new.mean() < 0.8  # real bits, both values well used
    paths = {}
    for label, fn in (("new", step), ("old", old_step)):
        binarizer_step = lossy_cae.step
        lossy_cae.step = fn
        try:
            paths[label] = tmp_path / (label + ".onnx")
            _export(model.encoder, torch.from_numpy(x[:1]), paths[label], "image", "latents")
            constants_to_initializers(paths[label])
        finally:
            lossy_cae.step = binarizer_step
    outputs = {}
    for label, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[label] = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
    assert same_bits(outputs["new"], outputs["old"]) and same_bits(outputs["new"], new)
    assert check_onnx(str(paths["new"]), "8.0")["ok"] and not check_onnx(str(paths["old"]), "8.0")["ok"]


@pytest.mark.parametrize("name", ["cae", "cyclegan"])
def test_uint8_encoders_round_as_round_did_on_real_photos(tmp_path, photos_dir, name):
    """cae and cyclegan encoders (8-bit latents): the new rounding gives Round's integers, in PyTorch and ONNX."""
    from latentlink.export.models import MODELS, build_model
    from latentlink.export.models import layers
    from latentlink.export.onnx_export import _export, constants_to_initializers

    torch.manual_seed(0)
    model = build_model(name, **MODELS[name].test_hparams).eval()
    x = photo_batch(photos_dir, 64)
    with torch.no_grad():
        new = model.encoder(torch.from_numpy(x)).numpy()
        old = torch.round(model.encoder[:-1](torch.from_numpy(x)) * 255.0).numpy()
    assert same_bits(new, old) and len(np.unique(new)) > 10
    outputs = {}
    for label, fn in (("new", round_half_even), ("old", torch.round)):
        saved = layers.round_half_even
        layers.round_half_even = fn
        try:
            path = tmp_path / (label + ".onnx")
            _export(model.encoder, torch.from_numpy(x[:1]), path, "image", "latents")
            constants_to_initializers(path)
        finally:
            layers.round_half_even = saved
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[label] = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(len(x))])
        assert check_onnx(str(path), "8.0")["ok"] == (label == "new")
    assert same_bits(outputs["new"], outputs["old"])


@pytest.mark.parametrize("op", ["Sign", "Round"])
def test_sign_and_round_fail_on_8_0_and_pass_on_8_2(tmp_path, capsys, op):
    path = save(tmp_path, [helper.make_node(op, ["x"], ["y"])], [value("x", [1, 4])], [value("y", [1, 4])])
    assert main(["check", "--trt", "8.0", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: ") and "(TensorRT 8.0, opset 13" in out
    assert "{} is not in TensorRT 8.0's ONNX operator table (TensorRT 8.2 and later have it)".format(op) in out
    for trt in ("8.2", "8.2.1", "8.5", "10", "10.3"):
        assert main(["check", "--trt", trt, path]) == 0
    assert capsys.readouterr().out.count("OK: ") == 5


def test_unknown_tensorrt_version_is_a_clear_error(tmp_path, capsys):
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [value("x", [1, 4])], [value("y", [1, 4])])
    for bad in ("9.9", "7.1", "eight"):
        assert main(["check", "--trt", bad, path]) == 2
        err = capsys.readouterr().err
        assert "--trt {}: no ONNX operator table for TensorRT {}".format(bad, bad) in err
        assert "8.0, 8.2, 8.4, 8.5, 8.6, 10" in err and "e.g. --trt 8.0" in err


def test_check_defaults_to_the_profiles_jetpack(tmp_path, capsys):
    path = save(tmp_path, [helper.make_node("Sign", ["x"], ["y"])], [value("x", [1, 4])], [value("y", [1, 4])])
    for jetpack, status, trt in (("4.6", 1, "8.0"), ("4.6.1", 0, "8.2"), ("4.6.6", 0, "8.2")):
        profile = tmp_path / "p{}.yaml".format(jetpack)
        profile.write_text("name: p\nmodel: {encoder: e.onnx, decoder: d.onnx}\ninput: {width: 8, height: 8}\n"
                           "target: {device: jetson-nano, jetpack: \"%s\"}\n" % jetpack)
        assert main(["check", "--profile", str(profile), path]) == status
        assert "(TensorRT {}, opset 13".format(trt) in capsys.readouterr().out
    assert main(["check", path]) == 1  # the shipped profiles target JetPack 4.6: TensorRT 8.0
    assert load_profile("nano-504").target.tensorrt == "8.0" == load_profile("nano-1008").target.tensorrt


def write_profile(tmp_path, target):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: {encoder: e.onnx, decoder: d.onnx}\ninput: {width: 8, height: 8}\n" + target)
    return str(path)


@pytest.mark.parametrize("target, message", [
    ("target: {jetpack: \"5.1\"}\n", "target.jetpack '5.1' does not run on a jetson-nano (it runs JetPack 4.6, "
                                     "4.6.1, 4.6.2, 4.6.3, 4.6.4, 4.6.5, 4.6.6)"),
    ("target: {jetpack: 4.6}\n", "target.jetpack must be a string, got 4.6 (quote it: \"4.6\")"),
    ("target: {jetpack: \"4.5\"}\n", "target.jetpack must be one of 4.6, 4.6.1"),
    ("target: {device: jetson-tk1}\n", "target.device must be one of jetson-nano, jetson-xavier, jetson-orin"),
])
def test_profile_target_is_validated(tmp_path, target, message):
    with pytest.raises(ConfigError) as err:
        load_profile(write_profile(tmp_path, target))
    assert message in str(err.value)


def test_profile_target_maps_jetpack_to_tensorrt(tmp_path):
    assert load_profile(write_profile(tmp_path, "")).target.as_dict() == {
        "device": "jetson-nano", "jetpack": "4.6", "tensorrt": "8.0"}
    orin = load_profile(write_profile(tmp_path, "target: {device: jetson-orin, jetpack: \"6.2\"}\n"))
    assert orin.target.tensorrt == "10"
    assert set(JETPACK_TENSORRT.values()) <= set(trt_ops.VERSIONS)
    assert [v for v, t in JETPACK_TENSORRT.items() if t == "8.0"] == ["4.6"]


def test_tables_grow_and_name_their_sources():
    """Each release's table holds the one before (none removed an operator); 8.2 is where Sign and Round arrived."""
    for older, newer in zip(trt_ops.VERSIONS, trt_ops.VERSIONS[1:]):
        assert trt_ops.OPS[older] < trt_ops.OPS[newer]
    assert not {"Sign", "Round"} & trt_ops.OPS["8.0"] and {"Sign", "Round"} <= trt_ops.OPS["8.2"]
    assert {"Abs", "Ceil", "Floor", "Clip", "Conv", "PRelu", "DepthToSpace", "Tanh", "Sigmoid"} <= trt_ops.OPS["8.0"]
    assert set(trt_ops.RELEASES) == set(trt_ops.OPS) == set(trt_ops.OPSETS)
    assert all(len(commit) == 40 for _, commit in trt_ops.RELEASES.values())
    assert trt_ops.initializer_inputs("8.0")["Clip"] == {1: "min", 2: "max"}
    assert "Clip" not in trt_ops.initializer_inputs("10")
    assert trt_ops.OPSETS["10"] == (9, 20)


def test_clip_bounds_computed_in_the_graph_fail_on_8_0(tmp_path):
    nodes = [helper.make_node("Neg", ["lo"], ["hi"]), helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    lo = helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0])
    path = save(tmp_path, nodes, [value("x", [1, 4])], [value("y", [1, 4])], [lo])
    report = check_onnx(path, "8.0")
    assert report["problems"] == ["node 1 ('', Clip): input 'max' (hi) is computed in the graph; TensorRT 8.0 needs "
                                  "it as an initializer"]
    assert check_onnx(path, "10")["ok"]


def test_engine_precheck_uses_the_installed_tensorrts_table():
    class Trt(object):
        pass

    for version, table in (("8.0.1.6", "8.0"), ("8.2.1.8", "8.2"), ("10.3.0.26", "10"), ("9.1.0", "8.0")):
        Trt.__version__ = version
        assert _installed_table(Trt) == table
