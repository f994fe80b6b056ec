"""The Lossy CAE, its training command and its ONNX export (opset 13, static, no BOOL, TensorRT 8.2 ops)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge.errors import ConfigError  # noqa: E402
from export.models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from export.models.lossy_cae import Binarizer  # noqa: E402
from export.onnx_export import check_graph, export_onnx  # noqa: E402

# Operators the TensorRT 8.2 ONNX parser supports that our layers export to (jetson-facts.md).
# Identity appears when constant folding merges equal initializers (untrained PReLU slopes are all 0.25).
TRT82_OPS = {"Conv", "PRelu", "DepthToSpace", "Add", "Mul", "Sub", "Relu", "Sigmoid", "Tanh", "Sign", "Clip",
             "Identity"}


def test_lossy_cae_shapes_and_bits_per_pixel():
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16).eval()
    out = model(torch.rand(2, 3, 32, 48))
    assert out["x_hat"].shape == (2, 3, 32, 48) and out["latents"].shape == (2, 8, 8, 12)
    assert set(out["latents"].unique().tolist()) <= {0.0, 1.0}
    assert model.bits_per_pixel == 0.5 and model.latent_shape(504, 504) == (8, 126, 126)
    assert model.packing == "bits"


def test_binarizer_is_deterministic_in_eval_and_unbiased_in_training():
    binarize = Binarizer()
    x = torch.linspace(-0.99, 0.99, 9)
    assert torch.equal(binarize.eval()(x), (x > 0).float())
    binarize.train()
    torch.manual_seed(0)
    x = torch.full((20000,), 0.5, requires_grad=True)
    bits = binarize(x)
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    assert abs(bits.mean().item() - 0.75) < 0.02  # P(1) = (1 + x) / 2
    bits.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))  # straight through d/dx of (1 + x) / 2


def test_binarizer_trains_on_the_deployed_bits_once_stochastic_is_off():
    binarize = Binarizer().train()
    binarize.stochastic = False
    x = torch.tensor([-0.9, -0.1, 0.1, 0.9], requires_grad=True)
    bits = binarize(x)
    assert bits.tolist() == [0.0, 0.0, 1.0, 1.0]  # what clamp(sign(x), 0) gives at inference
    bits.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))


def test_checkpoint_rebuilds_the_model_alone(tmp_path):
    model = build_model("lossy-cae", latent_channels=4, encoder_channels=8, decoder_channels=8)
    save_checkpoint(tmp_path / "m.pt", model, step=3)
    again, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["step"] == 3 and again.hparams == model.hparams and not again.training
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(again.eval()(x)["x_hat"], model.eval()(x)["x_hat"])


def test_unknown_model_and_bad_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'vae'.*lossy-cae"):
        build_model("vae")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a latentlink checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_onnx_export_is_fit_for_tensorrt_8_2(tmp_path):
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    info = export_onnx(model, 32, 48, tmp_path, profile="t")
    for name in ("encoder.onnx", "decoder.onnx"):
        model_proto = onnx.load(str(tmp_path / name))
        assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) == 13
        assert {n.op_type for n in model_proto.graph.node} <= TRT82_OPS
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar == json.loads(json.dumps(info))
    assert sidecar["input_shape"] == [1, 3, 32, 48] and sidecar["latent_shape"] == [1, 8, 8, 12]
    assert sidecar["packing"] == "bits" and sidecar["opset"] == 13
    assert sidecar["parity"]["latent_mismatch_fraction"] <= 1e-3
    assert sidecar["parity"]["decoder_max_abs_error"] < 1e-4


def test_check_graph_refuses_bool_tensors_and_dynamic_shapes(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, [1, 4])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph = helper.make_graph([helper.make_node("Greater", ["x", "zero"], ["y"])], "g", [x], [y], [zero])
    path = tmp_path / "bool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ConfigError, match="BOOL"):
        check_graph(path)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ConfigError, match="dynamic shape"):
        check_graph(path)


def test_export_refuses_sizes_that_are_not_multiples_of_4(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        export_onnx(build_model("lossy-cae", encoder_channels=8, decoder_channels=8), 30, 32, tmp_path)


def test_train_command_writes_a_checkpoint_that_exports(tmp_path, photos_dir):
    from latentlink.cli import main

    ckpt = tmp_path / "run.pt"
    assert main(["train", "--data", photos_dir, "--out", str(ckpt), "--steps", "3", "--batch-size", "2",
                 "--crop", "32", "--scales", "64", "--val-every", "3", "--val-split", "0.25"]) == 0
    model, meta = load_checkpoint(ckpt)
    assert meta["step"] == 3 and len(meta["val_photos"]) == 1 and np.isfinite(meta["val_psnr_db"])
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "model.json").exists()
    # Resuming keeps the architecture and records the earlier run.
    again = tmp_path / "again.pt"
    assert main(["train", "--data", photos_dir, "--out", str(again), "--resume", str(ckpt), "--steps", "2",
                 "--batch-size", "2", "--crop", "32", "--scales", "64", "--val-every", "2", "--val-split", "0.25",
                 "--stochastic-fraction", "0"]) == 0
    resumed, meta = load_checkpoint(again)
    assert resumed.hparams == model.hparams and meta["step"] == 2 and meta["history"][0]["step"] == 3
