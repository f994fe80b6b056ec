"""`latentlink export check` (will it parse on the target's TensorRT?) and `latentlink export compare` (how far apart?)."""

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.export.__main__ import main  # noqa: E402
from latentlink.export.compare import compare_outputs  # noqa: E402
from latentlink.export.onnx_check import check_onnx  # noqa: E402

from . import fake_tensorrt  # noqa: E402


def save(tmp_path, nodes, inputs, outputs, initializers=(), opset=13, name="m.onnx", domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    path = str(tmp_path / name)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_every_zoo_model_exports_to_onnx_that_passes_the_check(tmp_path):
    """Each registered model, exported at a small size, passes `export check --trt 8.0` (JetPack 4.6's TensorRT, the
    oldest a Nano has: no Sign, no Round) and so every later table."""
    from latentlink.export.models import MODELS, build_model
    from latentlink.export.onnx_export import export_onnx

    assert MODELS
    for name, cls in sorted(MODELS.items()):
        model = build_model(name, **getattr(cls, "test_hparams", {}))
        out = tmp_path / name
        info = export_onnx(model, 32, 32, out)
        for half in (info["encoder"], info["decoder"]):  # the progressive model's: encoder_step, decoder_step
            for trt in ("8.0", "8.2", "8.5", "10"):
                report = check_onnx(str(out / half), trt)
                assert report["ok"], (name, half, trt, report["problems"])
                assert report["opset"] <= 13 and report["nodes"] > 0


def test_shipped_models_pass_and_the_command_says_ok(capsys):
    paths = [load_profile(p).model.encoder for p in ("nano-504", "nano-1008")]
    paths += [load_profile(p).model.decoder for p in ("nano-504", "nano-1008")]
    status = main(["check"] + paths)  # the profiles' target: JetPack 4.6, TensorRT 8.0 (no Sign, no Round)
    out = capsys.readouterr().out.splitlines()
    assert status == 0, "\n".join(out + ["re-export the shipped models: README, 'How the shipped weights were made'"])
    reports = [line for line in out if not line.startswith("  ")]
    assert len(reports) == 4 and all(line.startswith("OK: ") and "opset 13" in line for line in reports)
    # Each report is followed by the Nano time estimate; the encoders' against their profile's budget.
    estimates = [line for line in out if line.startswith("  estimate on jetson-nano")]
    assert len(estimates) == 4 and sum("frame budget 33.0 ms" in line for line in estimates) == 2


@pytest.mark.parametrize("case, expected", [
    ("opset14", "opset 14: TensorRT 8.0 parses opsets 1 to 13"),
    ("bool", "is BOOL"),
    ("unsupported", "Hardmax is not in TensorRT 8.0's ONNX operator table (TensorRT 10 and later have it)"),
    ("custom", "custom domain 'com.acme' needs a TensorRT plugin"),
    ("dynamic", "dynamic or unknown shape ['batch', 4]"),
    ("computed-axes", "input 'axes' (ax) is computed in the graph"),
    ("cubic", "Resize mode 'cubic'"),
    ("constant", "a Constant node"),
    ("garbage", "not a valid ONNX model"),
])
def test_check_names_each_problem(tmp_path, capsys, case, expected):
    x, y = value("x", [1, 4]), value("y", [1, 4])
    if case == "opset14":
        path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=14)
    elif case == "bool":
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        path = save(tmp_path, [helper.make_node("Greater", ["x", "zero"], ["y"])], [x],
                    [value("y", [1, 4], TensorProto.BOOL)], [zero])
    elif case == "unsupported":
        path = save(tmp_path, [helper.make_node("Hardmax", ["x"], ["y"])], [x], [y])
    elif case == "custom":
        path = save(tmp_path, [helper.make_node("Fancy", ["x"], ["y"], domain="com.acme")], [x], [y],
                    domains=["com.acme"])
    elif case == "dynamic":
        path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [value("x", ["batch", 4])],
                    [value("y", ["batch", 4])])
    elif case == "computed-axes":
        nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["ax"]),
                 helper.make_node("Unsqueeze", ["x", "ax"], ["y"])]
        ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("zero", 0), ("one", 1))]
        path = save(tmp_path, nodes, [x], [value("y", [1, 1, 4])], ints)
    elif case == "cubic":
        scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
        path = save(tmp_path, [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
                    [value("x", [1, 1, 2, 2])], [value("y", [1, 1, 4, 4])], [scales])
    elif case == "constant":
        nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1])),
                 helper.make_node("Add", ["x", "c"], ["y"])]
        path = save(tmp_path, nodes, [x], [y])
    else:
        path = str(tmp_path / "m.onnx")
        with open(path, "wb") as f:
            f.write(b"not protobuf at all")
    assert main(["check", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL: ") and expected in out


def test_compare_outputs_reports_the_tolerance_that_would_pass():
    a = np.array([1.0, 2.0, 0.0, 4.0], np.float32)
    b = np.array([1.0, 2.002, 0.0, 3.99], np.float32)
    figures = compare_outputs(a, b)
    assert figures["max_abs"] == pytest.approx(0.01, rel=1e-3) and figures["mean_abs"] == pytest.approx(0.003, rel=1e-2)
    assert figures["max_rel"] == pytest.approx(0.0025, rel=1e-2)
    bits = compare_outputs(np.array([0, 1, 1, 0], np.float32), np.array([0, 1, 0, 0], np.float16), bits=True)
    assert bits["flipped_bits"] == 1 and bits["flipped_fraction"] == 0.25


def test_compare_onnx_with_pytorch_passes_and_writes_json(tiny_profile, tmp_path, capsys):
    profile = load_profile(tiny_profile)
    ckpt = os.path.join(os.path.dirname(os.path.dirname(profile.model.encoder)), "tiny.pt")
    for half in ("encoder", "decoder"):
        path = getattr(profile.model, half)
        report = tmp_path / (half + ".json")
        assert main(["compare", path, ckpt, "--profile", tiny_profile, "--count", "2", "--json", str(report),
                     "--atol", "1e-4"]) == 0
        out = capsys.readouterr().out
        result = json.loads(report.read_text())
        assert result["role"] == half and result["b"]["backend"] == "pytorch-cpu-fp32" and result["passed"]
        if half == "encoder":  # 2 inputs of 8 x 16 x 16 bits
            assert "flipped bits: 0 of 2048 (0.00e+00)" in out
        assert "smallest tolerance that passes" in out and "PASSED" in out


def test_compare_fp16_engine_fails_1e5_and_says_what_would_pass(monkeypatch, tiny_profile, tmp_path, capsys):
    """An FP16 engine's decoder output is near the FP32 reference, not within 1e-5: the command says by how much."""
    import shutil

    from latentlink.export.engine import build_engine

    fake_tensorrt.install(monkeypatch, "8.2")
    folder = tmp_path / "m"
    shutil.copytree(os.path.dirname(load_profile(tiny_profile).model.encoder), str(folder))
    engine = build_engine(str(folder / "decoder.onnx"), log=lambda *_: None)["engine"]
    assert main(["compare", str(folder / "decoder.onnx"), engine, "--count", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED at atol 1.0e-05" in out
    atol = float(out.split("smallest tolerance that passes: atol ")[1].split()[0])
    assert 1e-5 < atol < 1e-2
    assert main(["compare", str(folder / "decoder.onnx"), engine, "--count", "2", "--atol", str(atol * 1.01)]) == 0
