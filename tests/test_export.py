"""The Lossy CAE, its training command and its ONNX export (opset 13, static, no BOOL, TensorRT 8.0 ops)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from latentlink.edge.errors import ConfigError  # noqa: E402
from latentlink.export.models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from latentlink.export.models.lossy_cae import Binarizer  # noqa: E402
from latentlink.export.onnx_export import check_graph, export_onnx  # noqa: E402

# Operators that TensorRT 8.0's ONNX parser (JetPack 4.6) has and our layers export to (export/trt_ops.py); the
# binarizer is Clip, Ceil, Abs (8.0 has no Sign). Identity appears when constant folding merges equal initializers
# (untrained PReLU slopes are all 0.25).
TRT80_OPS = {"Conv", "PRelu", "DepthToSpace", "Add", "Mul", "Sub", "Relu", "Sigmoid", "Tanh", "Clip", "Ceil", "Abs",
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


def test_dither_thresholds_spread_16_levels_over_every_4x4_tile():
    from latentlink.export.models.lossy_cae import dither_thresholds

    t = dither_thresholds(8, 10, 13)
    assert t.shape == (1, 8, 10, 13) and t.dtype == np.float32
    for c in range(8):
        tile = t[0, c, 4:8, 4:8]
        assert sorted(tile.ravel().tolist()) == [(2 * b + 1) / 16 - 1 for b in range(16)]
    # Each channel's pattern is shifted differently, so no two channels share a threshold map.
    assert len({t[0, c].tobytes() for c in range(8)}) == 8


def test_dither_lets_a_flat_area_carry_its_level_in_the_share_of_ones():
    torch.manual_seed(0)
    x = torch.full((1, 8, 16, 16), 0.0)
    plain, dithered = Binarizer(dither=False).eval(), Binarizer(dither=True).eval()
    for level in (-0.6, -0.2, 0.3, 0.7):
        # Without dither a flat input gives every position the same bit, whatever the level...
        assert plain(x + level).unique().numel() == 1
        # ...with it, the share of ones over a 4x4 tile follows the level, as P(1) = (1 + x) / 2 does on average.
        share = dithered(x + level)[..., :4, :4].mean().item()
        assert share == pytest.approx((1 + level) / 2, abs=1 / 16)


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


@pytest.mark.parametrize("dither", [0, 1])
def test_onnx_export_is_fit_for_tensorrt_8_0(tmp_path, dither):
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16, dither=dither)
    info = export_onnx(model, 32, 48, tmp_path, profile="t")
    for name in ("encoder.onnx", "decoder.onnx"):
        model_proto = onnx.load(str(tmp_path / name))
        assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) == 13
        assert {n.op_type for n in model_proto.graph.node} <= TRT80_OPS
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
    with pytest.raises(ConfigError, match="dynamic or unknown shape"):
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


def test_grow_a_trained_model_and_train_only_its_decoder(tmp_path, photos_dir):
    from latentlink.cli import main

    small = build_model("lossy-cae", encoder_channels=8, decoder_channels=8, decoder_blocks=1)
    save_checkpoint(tmp_path / "small.pt", small, step=1)
    grown = tmp_path / "grown.pt"
    assert main(["train", "--data", photos_dir, "--out", str(grown), "--init-from", str(tmp_path / "small.pt"),
                 "--hparam", "encoder_channels=8", "--hparam", "decoder_channels=8", "--hparam", "decoder_blocks=2",
                 "--freeze-encoder", "--steps", "2", "--batch-size", "2", "--crop", "32",
                 "--scales", "64", "--val-every", "2", "--val-split", "0.25", "--stochastic-fraction", "0"]) == 0
    model, meta = load_checkpoint(grown)
    assert model.hparams["decoder_blocks"] == 2 and meta["freeze_encoder"]
    assert [h["step"] for h in meta["history"]] == [1]  # the model it grew from
    # The frozen encoder is the small model's, weight for weight; the decoder has trained.
    for name, tensor in small.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], tensor)
    assert not torch.equal(model.decoder.state_dict()["1.weight"], small.decoder.state_dict()["1.weight"])


def test_train_refuses_contradictory_options_with_a_clear_error(tmp_path, photos_dir, capsys):
    from latentlink.cli import main

    common = ["train", "--data", photos_dir, "--out", str(tmp_path / "x.pt"), "--steps", "1"]
    assert main(common + ["--resume", "a.pt", "--hparam", "decoder_blocks=3"]) == 2
    assert "--resume continues a checkpoint as it is" in capsys.readouterr().err
    assert main(common + ["--freeze-encoder"]) == 2  # the default --stochastic-fraction 0.25 would randomize bits
    assert "--freeze-encoder keeps the encoder's bits" in capsys.readouterr().err
    assert main(common + ["--freeze-encoder", "--stochastic-fraction", "0", "--bit-usage", "0.01"]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_bit_usage_trains_the_encoder_and_latent_channels_can_come_from_hparam(tmp_path, photos_dir):
    from latentlink.cli import main

    out = tmp_path / "b.pt"
    assert main(["train", "--data", photos_dir, "--out", str(out), "--hparam", "latent_channels=4",
                 "--hparam", "encoder_channels=8", "--hparam", "decoder_channels=8", "--bit-usage", "0.01",
                 "--steps", "2", "--batch-size", "2", "--crop", "32", "--scales", "64", "--val-every", "2",
                 "--val-split", "0.25"]) == 0
    model, meta = load_checkpoint(out)
    assert model.hparams["latent_channels"] == 4 and meta["bit_usage"] == 0.01


def test_a_checkpoint_from_before_dither_loads_with_the_binarizer_it_was_trained_with(tmp_path):
    model = build_model("lossy-cae", encoder_channels=8, decoder_channels=8, dither=0)
    save_checkpoint(tmp_path / "old.pt", model)
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["hparams"]["dither"]  # as written before the setting existed
    torch.save(ckpt, tmp_path / "old.pt")
    again, _ = load_checkpoint(tmp_path / "old.pt")
    assert again.hparams["dither"] == 0 and not again.encoder[-1].dither
    assert build_model("lossy-cae").encoder[-1].dither  # new models dither


def test_bad_hparam_and_an_init_from_that_fits_only_in_part(tmp_path):
    from latentlink.export.models import copy_matching_weights
    from latentlink.export.train import parse_hparams

    assert parse_hparams(["decoder_blocks=3"]) == {"decoder_blocks": 3}
    with pytest.raises(ConfigError, match="'decoder_blocks=three'.*NAME=INTEGER"):
        parse_hparams(["decoder_blocks=three"])
    with pytest.raises(ConfigError, match="does not take these settings.*wings"):
        build_model("lossy-cae", wings=2)
    save_checkpoint(tmp_path / "other.pt", build_model("lossy-cae", latent_channels=2, encoder_channels=4,
                                                       decoder_channels=4))
    # Same architecture: everything is copied. Other widths: only what still fits (the output layer's bias).
    copied, fresh = copy_matching_weights(build_model("lossy-cae", latent_channels=2, encoder_channels=4,
                                                      decoder_channels=4), load_checkpoint(tmp_path / "other.pt")[0])
    assert fresh == [] and len(copied) > 10
    copied, fresh = copy_matching_weights(build_model("lossy-cae", latent_channels=6, encoder_channels=12,
                                                      decoder_channels=12), load_checkpoint(tmp_path / "other.pt")[0])
    assert copied == ["decoder.8.0.bias"] and len(fresh) > 10


def test_bit_usage_penalty_is_zero_for_a_balanced_uncorrelated_code_and_high_for_a_wasted_one():
    from latentlink.export.losses import bit_usage_penalty

    # All 256 symbols of 8 bits, equally often: every bit is 1 half the time and no two bits correlate.
    symbols = torch.arange(256)
    balanced = ((symbols[:, None] >> torch.arange(8)) & 1).float().T.reshape(1, 8, 16, 16)
    assert bit_usage_penalty(balanced).item() == pytest.approx(0, abs=1e-4)
    # Two copies of 4 bits (perfectly correlated pairs), and channels that are always 1: penalized.
    copied = torch.cat([balanced[:, :4], balanced[:, :4]], dim=1)
    assert bit_usage_penalty(copied).item() > 0.1
    stuck = balanced.clone()
    stuck[:, :2] = 1
    assert bit_usage_penalty(stuck).item() > 0.2
