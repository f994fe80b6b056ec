"""The progressive model (export/models/progressive.py) and its edge codec (edge/progressive.py): shapes, the step
exports (opset 13, static, no BOOL, TensorRT 8.0's ops), ONNX against PyTorch, multi-input backends (ONNX Runtime,
PyTorch, fake TensorRT 8.2 and 10), the coders, and the shipped model's quality rising with every iteration."""

import os

import numpy as np
import pytest

from latentlink.edge.errors import BackendError, ConfigError

from . import fake_tensorrt
from .conftest import ROOT

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64
ITERATIONS = 3
SHIPPED = os.path.join(ROOT, "profiles", "default", "progressive-504")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small untrained progressive model (3 iterations) saved and exported at 64x64; returns the folder."""
    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_progressive

    folder = tmp_path_factory.mktemp("progressive")
    torch.manual_seed(0)
    model = build_model("progressive", iterations=ITERATIONS, channels=16, state_channels=8)
    save_checkpoint(str(folder / "tiny.pt"), model)
    export_progressive(model, SIZE, SIZE, str(folder), checkpoint=str(folder / "tiny.pt"), quiet=True)
    return folder


def frame(seed=0):
    """A smooth random image (1, 3, 64, 64) in [0, 1]."""
    from latentlink.export.onnx_export import _smooth_random

    return _smooth_random(SIZE, SIZE, seed).numpy()


def test_model_shapes_and_training_loss():
    from latentlink.export.losses import get_loss
    from latentlink.export.models import build_model

    model = build_model("progressive", iterations=4, code_channels=8, channels=16, state_channels=8)
    x = torch.rand(2, 3, 32, 48)
    out = model(x)
    assert out["latents"].shape == (2, 32, 4, 6) and len(out["x_hats"]) == 4
    assert out["x_hat"].shape == x.shape and model.latent_shape(32, 48) == (32, 4, 6)
    assert model.bits_per_pixel == 4 * 8 / 64
    loss = model.training_loss(x, out, get_loss("mix"))
    loss.backward()  # every iteration's loss reaches the weights
    assert all(p.grad is not None for p in model.parameters())


def test_codec_shapes_and_errors(tiny):
    from latentlink.edge.progressive import open_progressive

    with open_progressive(str(tiny), "encoder") as codec:
        assert codec.max_iterations == ITERATIONS and codec.code_shape == (8, 8, 8)
        assert codec.input_shape == (1, 3, SIZE, SIZE)
        codes, timings = codec.encode(frame(), 2)
        assert codes.shape == (2, 8, 8, 8) and codes.dtype == np.uint8 and set(np.unique(codes)) <= {0, 1}
        assert {"encode", "decode", "gpu_to_cpu"} <= set(timings)
        image, timings = codec.decode(codes)
        assert image.shape == (1, 3, SIZE, SIZE) and image.dtype == np.float32
        assert image.min() >= 0 and image.max() <= 1 and timings["iterations"] == 2
        assert [k for k, _, _ in codec.decode_steps(codes)] == [1, 2]
        for bad in (0, ITERATIONS + 1, 1.5, True):
            with pytest.raises(ConfigError, match="iterations"):
                codec.encode(frame(), bad)
        with pytest.raises(ConfigError, match="shape"):
            codec.decode(codes[:, :4])
        with pytest.raises(ConfigError, match="iterations"):
            codec.decode(np.zeros((ITERATIONS + 1, 8, 8, 8), np.uint8))
        with pytest.raises(ConfigError, match="shape"):
            codec.encode(np.zeros((1, 3, 32, 32), np.float32), 1)
    with open_progressive(str(tiny / "decoder_step.onnx"), "decoder") as host:
        assert host.encoder is None
        with pytest.raises(ConfigError, match="role 'encoder'"):
            host.encode(frame(), 1)
        np.testing.assert_array_equal(host.decode(codes)[0], image)


def test_the_first_iterations_do_not_depend_on_how_many_follow(tiny):
    from latentlink.edge.progressive import open_progressive

    with open_progressive(str(tiny / "model.json"), "encoder") as codec:
        all_codes, _ = codec.encode(frame(1), ITERATIONS)
        np.testing.assert_array_equal(codec.encode(frame(1), 1)[0], all_codes[:1])


def test_onnx_steps_match_pytorch(tiny):
    from latentlink.edge.progressive import open_progressive
    from latentlink.export.models import load_checkpoint

    model, _ = load_checkpoint(str(tiny / "tiny.pt"))
    with torch.no_grad():
        out = model(torch.from_numpy(frame(2)))
    reference = out["latents"].numpy().reshape(ITERATIONS, 8, 8, 8)
    with open_progressive(str(tiny), "encoder") as onnx_codec, \
            open_progressive(str(tiny / "tiny.pt"), "encoder", input_size=(SIZE, SIZE)) as torch_codec:
        codes, _ = onnx_codec.encode(frame(2), ITERATIONS)
        assert np.mean(codes != reference) < 1e-3
        np.testing.assert_array_equal(torch_codec.encode(frame(2), ITERATIONS)[0], codes)
        expected = np.clip(out["x_hat"].numpy(), 0, 1)
        np.testing.assert_allclose(onnx_codec.decode(reference)[0], expected, atol=1e-5)
        np.testing.assert_allclose(torch_codec.decode(reference)[0], expected, atol=1e-5)


def test_step_exports_fit_tensorrt_8_0(tiny):
    import json

    from latentlink.export.onnx_check import check_onnx

    info = json.loads((tiny / "model.json").read_text())
    assert info["progressive"]["iterations"] == ITERATIONS and info["progressive"]["code_shape"] == [8, 8, 8]
    assert info["parity"]["code_mismatch_fraction"] == 0.0
    for name in ("encoder_step.onnx", "decoder_step.onnx"):
        report = check_onnx(str(tiny / name), "8.0")
        assert report["ok"], report["problems"]
        assert report["opset"] == 13 and report["dynamic_batch"] is None
        assert not {"LSTM", "GRU", "RNN", "Sign", "Round"} & set(report["ops"])
        graph = onnx.load(str(tiny / name)).graph
        for value in list(graph.input) + list(graph.output):
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim)  # static
        assert len(graph.input) == 2 and len(graph.output) == 2  # the state in and out


def test_single_input_calls_are_refused_with_the_way_out(tiny):
    from latentlink.edge.backends import open_backend

    with open_backend(str(tiny / "encoder_step.onnx"), "encoder") as step:
        assert step.multi_io
        with pytest.raises(BackendError, match="infer_named"):
            step.infer(frame())
        with pytest.raises(BackendError, match="takes inputs"):
            step.infer_named({"residual": frame()})
        with pytest.raises(BackendError, match="shape"):
            step.infer_named({"residual": frame(), "state": np.zeros((1, 8, 4, 4), np.float32)})


@pytest.mark.parametrize("entropy", ["none", "zlib", "zstd", "lz4"])
def test_codes_through_the_coders(tiny, entropy):
    from latentlink.edge import protocol
    from latentlink.edge.progressive import open_progressive

    if entropy in ("zstd", "lz4"):
        pytest.importorskip(entropy if entropy == "lz4" else "zstandard")
    with open_progressive(str(tiny), "encoder") as codec:
        codes, _ = codec.encode(frame(3), 2)
    message = protocol.encode_frame("cam", 0, 1.0, codes, "bits", entropy)
    _, flags, meta_len = protocol.parse_header(message[:8])
    meta = protocol.parse_meta(message[8:8 + meta_len], flags)
    decoded = protocol.decode_latents(meta, message[8 + meta_len:])
    np.testing.assert_array_equal(decoded, codes)


def test_context_coder_per_iteration(tiny, photos_dir):
    from latentlink.edge.progressive import open_progressive
    from latentlink.edge.protocol import code_latents
    from latentlink.export.models import load_checkpoint
    from latentlink.export.rate import fit_context_model

    model, _ = load_checkpoint(str(tiny / "tiny.pt"))
    photos = sorted(os.path.join(photos_dir, name) for name in os.listdir(photos_dir))
    fit_context_model(model, photos, SIZE, SIZE).save(str(tiny / "entropy.json"))
    with open_progressive(str(tiny), "decoder") as codec:
        codes = (np.random.default_rng(0).random((2,) + codec.code_shape) > 0.7).astype(np.uint8)
        coder = codec.context_model(2)
        payload = code_latents(codes, "bits", "context", coder)
        np.testing.assert_array_equal(coder.decode(payload, codes.shape), codes)
        assert codec.context_model(ITERATIONS).model.channels == ITERATIONS * 8
    os.remove(str(tiny / "entropy.json"))


@pytest.mark.parametrize("api", ["8.2", "10"])
def test_tensorrt_steps_run_named_io(monkeypatch, tiny, api):
    from latentlink.edge.backends import open_backend
    from latentlink.export.engine import build_engine

    fake_tensorrt.install(monkeypatch, api)
    feeds = {"residual": frame(4) - 0.5, "state": np.random.default_rng(1).random((1, 8, 8, 8), np.float32)}
    meta = build_engine(str(tiny / "encoder_step.onnx"), precision="fp32", log=lambda _: None)
    with open_backend(meta["engine"], "encoder") as engine, \
            open_backend(str(tiny / "encoder_step.onnx"), "encoder") as reference:
        out, timings = engine.infer_named(feeds)
        expected, _ = reference.infer_named(feeds)
        assert set(out) == {"codes", "new_state"} and "run_gpu_ms" in timings
        for name in out:
            np.testing.assert_array_equal(out[name], expected[name])
        with pytest.raises(BackendError, match="infer_named"):
            engine.infer(feeds["residual"])
    for path in os.listdir(str(tiny)):
        if path.endswith((".engine", ".engine.json")):
            os.remove(str(tiny / path))


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.json")), reason="no shipped progressive model")
def test_shipped_model_improves_with_every_iteration():
    """On a real photo at 504x504: PSNR rises with the iterations."""
    import cv2

    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.progressive import open_progressive

    data = pytest.importorskip("skimage.data")
    bgr = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # a real photo, 512x512
    with open_progressive(SHIPPED, "encoder") as codec:
        x = np.array(Preprocessor(codec.input_shape[3], codec.input_shape[2], "center-crop")(bgr))
        codes, _ = codec.encode(x, codec.max_iterations)
        psnr = [10 * np.log10(1 / np.mean((np.round(image * 255) / 255 - x) ** 2))
                for _, image, _ in codec.decode_steps(codes)]
    # the gains shrink with k (the last iterations add tenths of a dB); none may cost more than a little
    assert all(b > a - 0.05 for a, b in zip(psnr, psnr[1:])), psnr
    assert psnr[3] > psnr[0] + 2 and psnr[-1] > psnr[3], psnr


def test_eval_draws_the_curve_from_one_model(tiny, photos_dir):
    """`latentlink eval --progressive`: one point per iteration count, the rate growing with every iteration."""
    from latentlink.edge.profile import load_profile
    from latentlink.export.evaluate import evaluate_progressive

    profile = load_profile("nano-504")
    profile.input.width = profile.input.height = SIZE
    curve = evaluate_progressive(photos_dir, profile, str(tiny), codecs=("jpeg",), entropy="zlib", quiet=True)
    assert sorted(curve) == list(range(1, ITERATIONS + 1))
    assert all(len(rows) == 4 and rows[0]["model"]["iterations"] == k for k, rows in curve.items())
    for photo in range(4):
        sizes = [curve[k][photo]["model"]["bytes"] for k in sorted(curve)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
