"""The Nano cost model (export/cost_model.py): FLOPs and bytes per node, the estimate in `export check`, `export
onnx` and model.json, and the space-to-depth Lossy CAE it led to. No timing is asserted: only counts and shapes."""

import io
import json
import logging

import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from latentlink.export import cost_model  # noqa: E402
from latentlink.export.__main__ import main  # noqa: E402
from latentlink.export.models import build_model  # noqa: E402
from latentlink.export.onnx_export import export_onnx  # noqa: E402


def tiny_graph():
    """image (1, 3, 8, 8) -> Conv 3x3 pad 1 (4 maps) -> Relu -> Conv 1x1 stride 2 (2 maps) -> (1, 2, 4, 4)."""
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)
    b1 = helper.make_tensor("b1", TensorProto.FLOAT, [4], [0.0] * 4)
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 4, 1, 1], [0.1] * 8)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["out"], strides=[2, 2])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], [w1, b1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_flops_and_bytes_of_a_tiny_graph_are_the_hand_count():
    layers = cost_model.layer_costs(tiny_graph())
    assert [l["op"] for l in layers] == ["Conv", "Relu", "Conv"]
    conv1, relu, conv2 = layers
    # 2 x (4 maps x 8 x 8 outputs) x (3 x 3 x 3 weights each); one op per Relu output; 2 x (2 x 4 x 4) x 4.
    assert conv1["flops"] == 2 * 4 * 64 * 27 == 13824
    assert relu["flops"] == 4 * 64
    assert conv2["flops"] == 2 * 2 * 16 * 4 == 256
    # FP16 bytes: weights (108 + 4 bias), the activation read (3 x 64), the one written (4 x 64).
    assert (conv1["weight_bytes"], conv1["in_bytes"], conv1["out_bytes"]) == (2 * 112, 2 * 192, 2 * 256)
    assert (conv2["weight_bytes"], conv2["in_bytes"], conv2["out_bytes"]) == (2 * 8, 2 * 256, 2 * 32)
    assert conv1["kernel"] == "winograd" and conv2["kernel"] == "compute" and relu["kernel"] == "pointwise"
    est = cost_model.estimate(tiny_graph())
    assert est["gflop"] == round((13824 + 256 + 256) / 1e9, 3)
    assert est["kernels"] == 2  # the Relu rides in the first convolution
    assert 0 < est["low_ms"] <= est["ms"] <= est["high_ms"]


def test_the_shipped_encoders_cost_is_the_hand_count():
    """The Lossy CAE's encoder: 3924 multiply-adds per pixel (5x5 3->48 at 1/2, 3x3 48->96 and 96->8 at 1/4);
    with space_to_depth=1 and 48 channels, 1026 (3x3 12->24 stride 2, 3x3 24->48, 3x3 48->8, all at 1/4)."""
    for hparams, macs_per_pixel in (({}, 25 * 3 * 48 / 4 + 9 * 48 * 96 / 16 + 9 * 96 * 8 / 16),
                                    ({"space_to_depth": 1, "encoder_channels": 48},
                                     9 * 12 * 24 / 16 + 9 * 24 * 48 / 16 + 9 * 48 * 8 / 16)):
        model = build_model("lossy-cae", **hparams).eval()
        buffer = io.BytesIO()
        torch.onnx.export(model.encoder, (torch.zeros(1, 3, 64, 64),), buffer, dynamo=False, opset_version=13)
        layers = cost_model.layer_costs(onnx.load_from_string(buffer.getvalue()))
        conv_flops = sum(l["flops"] for l in layers if l["op"] == "Conv")
        assert conv_flops == 2 * macs_per_pixel * 64 * 64, hparams


def test_check_prints_the_estimate_and_writes_it_to_json(tiny_profile, tmp_path, capsys):
    from latentlink.edge.profile import load_profile

    profile = load_profile(tiny_profile)
    out = tmp_path / "check.json"
    assert main(["check", profile.model.encoder, profile.model.decoder, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("estimate on jetson-nano") == 2 and "wrote " + str(out) in printed
    document = json.loads(out.read_text())
    assert set(document) == {"ok", "estimate", "files"} and document["ok"] is True
    estimate = document["estimate"]
    assert estimate["device"] == "jetson-nano"
    assert 0 < estimate["low_ms"] <= estimate["ms"] <= estimate["high_ms"]
    assert estimate == document["files"][0]["estimate"]  # the encoder's, the half the Nano runs
    assert [f["path"] for f in document["files"]] == [profile.model.encoder, profile.model.decoder]


def test_check_without_an_estimate_still_checks(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    # A dynamic width (a named batch axis alone would be costed at 1, as the host's decoders are)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "width"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert main(["check", str(path)]) == 1  # the dynamic shape fails the check, as before
    assert "no estimate: cannot cost" in capsys.readouterr().out


def test_export_onnx_warns_when_the_encoder_misses_the_budget(tmp_path, caplog):
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    with caplog.at_level(logging.WARNING, logger="latentlink.export"):
        info = export_onnx(model, 32, 32, tmp_path / "tight", budget_ms=0.001, quiet=True)
    assert any("may not fit the Nano's frame budget" in r.getMessage() and "frame budget 0.0 ms: misses"
               in r.getMessage() for r in caplog.records)
    assert set(info["estimate"]) >= {"device", "ms", "low_ms", "high_ms"}
    saved = json.loads((tmp_path / "tight" / "model.json").read_text())
    assert saved["estimate"] == json.loads(json.dumps(info["estimate"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentlink.export"):
        export_onnx(model, 32, 32, tmp_path / "roomy", budget_ms=1000.0, quiet=True)
    assert not [r for r in caplog.records if "frame budget" in r.getMessage()]


def test_verdicts():
    est = {"ms": 20.0, "low_ms": 15.0, "high_ms": 40.0}
    assert cost_model.verdict(est, 50.0) == "fits"
    assert cost_model.verdict(est, 33.0) == "may miss"
    assert cost_model.verdict(est, 10.0) == "misses"


def test_space_to_depth_keeps_the_default_model_and_reuses_its_decoder():
    from latentlink.export.models.registry import copy_matching_weights

    default = build_model("lossy-cae")
    assert default.hparams == {"latent_channels": 8, "encoder_channels": 96, "decoder_channels": 96,
                               "decoder_blocks": 1, "dither": 1}  # unchanged: old checkpoints load as before
    assert isinstance(default.encoder[0], torch.nn.Conv2d) and default.encoder[0].kernel_size == (5, 5)
    s2d = build_model("lossy-cae", space_to_depth=1, encoder_channels=48).eval()
    assert s2d.hparams["space_to_depth"] == 1
    assert isinstance(s2d.encoder[0], torch.nn.PixelUnshuffle)
    with torch.no_grad():
        out = s2d(torch.rand(1, 3, 64, 96))
    assert out["latents"].shape == (1, 8, 16, 24) and out["x_hat"].shape == (1, 3, 64, 96)
    copied, fresh = copy_matching_weights(s2d, default)
    assert all(name.startswith("decoder.") for name in copied)
    assert sorted(n for n in s2d.state_dict() if n.startswith("decoder.")) == sorted(copied)
    assert all(name.startswith("encoder.") for name in fresh)
