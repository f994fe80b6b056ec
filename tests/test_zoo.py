"""The model zoo: every model trains, exports to ONNX that matches PyTorch, and streams edge -> host; patch
processing splits frames into tiles on the edge and the host puts them back together."""

import os
import threading

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from latentlink.edge.backends import open_backend  # noqa: E402
from latentlink.edge.errors import ConfigError  # noqa: E402
from latentlink.edge.pipeline import run_edge  # noqa: E402
from latentlink.edge.preprocess import Preprocessor, fit_frame, to_image  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.edge.sources import open_source  # noqa: E402
from latentlink.edge.tiles import join_tiles, parse_tiles, split_tiles  # noqa: E402
from latentlink.export.models import MODELS, build_model, load_checkpoint  # noqa: E402
from latentlink.export.onnx_export import export_onnx  # noqa: E402
from latentlink.export.train import get_args_parser, train  # noqa: E402
from latentlink.host.server import Host  # noqa: E402

SIZE = 64  # pixels a side: a multiple of every model's downscale (crae's is 32)


def train_briefly(name, photos_dir, out, *extra):
    args = ["--model", name, "--data", photos_dir, "--out", str(out), "--steps", "3", "--crop", "64",
            "--batch-size", "2", "--scales", "160", "--val-every", "3", "--threads", "1", "--loss", "ssim"]
    for key, value in getattr(MODELS[name], "test_hparams", {}).items():
        args += ["--hparam", "{}={}".format(key, value)]
    assert train(get_args_parser().parse_args(args + list(extra))) == 0
    return load_checkpoint(out)


def write_profile(folder, size):
    path = folder / "profile.yaml"
    path.write_text("name: zoo\nmodel:\n  encoder: onnx/encoder.onnx\n  decoder: onnx/decoder.onnx\n"
                    "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n"
                    "transport:\n  queue_size: 2\n  drop: block\n  max_backoff_s: 0.5\n".format(size))
    return load_profile(str(path))


def stream(profile, photos_dir, out_dir):
    """Every photo through the edge pipeline to a host on loopback; returns (edge summary, host summary)."""
    with open_backend(profile.model.decoder, "decoder") as decoder, \
            open_backend(profile.model.encoder, "encoder") as encoder, \
            open_source("file://" + photos_dir) as source:
        host = Host(decoder, out_dir=str(out_dir), max_streams=1, idle_timeout_s=10)
        address = host.bind("127.0.0.1", 0)
        thread = threading.Thread(target=host.serve, daemon=True)
        thread.start()
        try:
            edge_summary = run_edge(source, encoder, profile, address, "zoo")
            thread.join(30)
        finally:
            host.stop()
        return edge_summary, host.summary()


def photos(photos_dir, size):
    """Each photo as the edge sees it (BGR, fitted to the profile's size), in the source's order."""
    with open_source("file://" + photos_dir) as source:
        return [fit_frame(frame, size, size) for frame, _ in source]


# The progressive model streams by steps, not through the one-shot encoder/decoder pipeline: tests/test_progressive.py
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"progressive"}))
def test_every_zoo_model_trains_exports_matching_onnx_and_streams_to_the_host(name, tmp_path, photos_dir):
    model, meta = train_briefly(name, photos_dir, tmp_path / "model.pt")
    assert meta["step"] == 3 and model.name == name
    info = export_onnx(model, SIZE, SIZE, tmp_path / "onnx", checkpoint=tmp_path / "model.pt")
    assert info["opset"] == 13 and info["packing"] == model.packing

    # ONNX Runtime against PyTorch on a real photo, through the backends the edge and host use.
    profile = write_profile(tmp_path, SIZE)
    frame = photos(photos_dir, SIZE)[0]
    x = Preprocessor(SIZE, SIZE)(frame).copy()
    with open_backend(profile.model.encoder, "encoder") as enc, open_backend(profile.model.decoder, "decoder") as dec:
        latents = enc.infer(x)[0].copy()
        decoded = dec.infer(latents)[0].copy()
    with torch.no_grad():
        ref_latents = model.encoder(torch.from_numpy(x)).numpy()
        ref_decoded = model.decoder(torch.from_numpy(latents)).numpy()
    if model.packing in ("bits", "uint8"):
        assert np.mean(latents != ref_latents) <= 1e-3
    else:
        np.testing.assert_allclose(latents, ref_latents, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decoded, ref_decoded, rtol=1e-4, atol=1e-4)

    edge, host = stream(profile, photos_dir, tmp_path / "frames")
    assert edge["frames"] == host["frames"] == 4 and host["failed"] == 0
    saved = sorted(os.listdir(str(tmp_path / "frames" / "zoo")))
    assert len(saved) == 4
    assert cv2.imread(str(tmp_path / "frames" / "zoo" / saved[0])).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("name, tile", [("lossy-cae", 64), ("crae", 128)])
def test_patch_processing_runs_end_to_end_and_the_host_reassembles_the_frame(name, tile, tmp_path, photos_dir):
    frame_size = 2 * tile  # crae: 128-pixel tiles, as seed 000's patches; 4 x 4 latents each
    model, meta = train_briefly(name, photos_dir, tmp_path / "model.pt", "--tiles", "2x2")
    assert meta["tiles"] == [2, 2]
    # An untrained crae's output is mostly below 0, so its PNGs come out black; lift it into view, or a mix-up of
    # the tiles' order would go unnoticed.
    with torch.no_grad():
        model.decoder[-1][0].bias += 0.5
    info = export_onnx(model, frame_size, frame_size, tmp_path / "onnx", tiles=tuple(meta["tiles"]))
    assert info["tiles"] == [2, 2] and info["input_shape"][:1] == [4] and info["frame_shape"][2:] == [frame_size] * 2
    profile = write_profile(tmp_path, frame_size)

    edge, host = stream(profile, photos_dir, tmp_path / "frames")
    assert edge["frames"] == host["frames"] == 4 and host["failed"] == 0

    # What the host wrote is the whole frame, each quarter the model's reconstruction of that quarter alone.
    model.eval()
    distinct = 0  # quarters unlike each other: else a mix-up of the tiles' order would pass unnoticed
    for seq, frame in enumerate(photos(photos_dir, frame_size)):
        saved = cv2.imread(str(tmp_path / "frames" / "zoo" / "{:06d}.png".format(seq)))
        assert saved.shape == (frame_size, frame_size, 3)
        x = Preprocessor(frame_size, frame_size)(frame)
        distinct += np.abs(saved[:tile, tile:].astype(int) - saved[tile:, :tile]).max() > 1
        for row in range(2):
            for col in range(2):
                window = (slice(None), slice(None), slice(row * tile, (row + 1) * tile),
                          slice(col * tile, (col + 1) * tile))
                with torch.no_grad():
                    quarter = to_image(model(torch.from_numpy(np.ascontiguousarray(x[window])))["x_hat"].numpy())
                diff = np.abs(saved[window[2], window[3]].astype(int) - quarter.astype(int))
                assert diff.max() <= 1, (seq, row, col)  # ONNX Runtime vs PyTorch: at most a rounding step
    assert distinct


def test_tiles_split_row_major_and_join_back():
    frame = np.arange(2 * 4 * 6, dtype=np.float32).reshape(1, 2, 4, 6)
    tiles = split_tiles(frame, (2, 3))
    assert tiles.shape == (6, 2, 2, 2)
    assert np.array_equal(tiles[1], frame[0, :, 0:2, 2:4])  # second tile: top row, middle column
    assert np.array_equal(tiles[3], frame[0, :, 2:4, 0:2])  # fourth tile: bottom row, first column
    assert np.array_equal(join_tiles(tiles, (2, 3)), frame)
    out = np.empty_like(tiles)
    assert split_tiles(frame, (2, 3), out=out) is out


def test_bad_tile_grids_are_refused_with_the_fix():
    assert parse_tiles("2x2") == (2, 2) and parse_tiles("1X4") == (1, 4)
    for bad in ("2", "2x", "0x2", "axb"):
        with pytest.raises(ConfigError, match="ROWSxCOLS|at least 1"):
            parse_tiles(bad)
    with pytest.raises(ConfigError, match="does not split into 3x3 equal tiles"):
        split_tiles(np.zeros((1, 3, 64, 64), np.float32), (3, 3))
    model = build_model("crae", **MODELS["crae"].test_hparams)
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        export_onnx(model, 96, 96, "/nonexistent", tiles=(2, 2))  # 48-pixel tiles


def test_an_edge_profile_that_does_not_match_the_tiled_frame_is_refused(tmp_path):
    model = build_model("lossy-cae", latent_channels=4, encoder_channels=8, decoder_channels=8)
    export_onnx(model, 64, 64, tmp_path / "onnx", tiles=(2, 2))
    profile = write_profile(tmp_path, 32)  # the tile size, not the frame size
    with open_backend(profile.model.encoder, "encoder") as enc:
        with pytest.raises(ConfigError, match=r"takes 64x64 frames \(as 2x2 tiles\) but profile 'zoo' says 32x32"):
            run_edge(None, enc, profile, ("127.0.0.1", 9), "zoo")


def test_the_zoo_models_are_what_their_papers_say():
    crae = build_model("crae")
    x = torch.rand(1, 3, 512, 512)
    with torch.no_grad():
        out = crae.eval()(x)
    assert out["latents"].shape == (1, 44, 16, 16) and out["x_hat"].shape == x.shape
    assert crae.bits_per_pixel == 1.375 and crae.packing == "float32"  # seed 000, Table VI: 1.375 bpp
    grey = build_model("crae", channels=1, latent_bits=16)
    with torch.no_grad():
        y = grey.eval()(x)["x_hat"]
    assert grey.packing == "float16" and torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    cae = build_model("cae")
    with torch.no_grad():
        latents = cae.eval().encoder(torch.rand(1, 3, 1008, 1008))
    assert latents.shape == (1, 3, 252, 252) and cae.packing == "uint8"  # the deck: 1008 -> 252, 8 bits
    assert torch.equal(latents, latents.round()) and latents.min() >= 0 and latents.max() <= 255
    gan = build_model("cyclegan")
    assert gan.latent_shape(504, 504) == (3, 252, 252)  # the deck: 504 -> 252
    assert "discriminators" not in dict(gan.encoder.named_children()) and len(gan.discriminators) == 2


@pytest.mark.parametrize("name", ["cae", "crae"])  # crae declares its packing per instance (float32 or float16)
def test_bit_usage_is_refused_for_models_without_binary_latents(name, tmp_path, photos_dir):
    with pytest.raises(ConfigError, match="--bit-usage shapes binary latents; model '{}' sends".format(name)):
        train_briefly(name, photos_dir, tmp_path / "model.pt", "--bit-usage", "0.01")


def test_straight_through_rounding_passes_gradients():
    cae = build_model("cae", width=8).train()
    x = torch.rand(1, 3, 32, 32)
    cae(x)["x_hat"].mean().backward()
    assert cae.encoder[0].weight.grad.abs().sum() > 0
