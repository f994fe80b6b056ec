"""Lossless mode (``--lossless med|mlp``, edge/lossless.py): exact round trips, the wire format's checks, hostile
payloads (only ever a ProtocolError), the MLP's exact-arithmetic bounds, and an edge process streaming real photos to
a host process whose PNGs are the photos pixel for pixel."""

import glob
import os
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from latentlink.edge import lossless
from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.lossless import (FEATURES, HEADER, HIDDEN_CLIP, NUM_CLASSES, PREDICTORS, LosslessCodec,
                                      codec, decode)
from latentlink.edge.protocol import FIXED_HEADER, VERSION_2, decode_latents, frame_payload, parse_meta

from .conftest import ROOT
from .test_end_to_end import start_host


def images():
    """Odd sizes and contents: single pixels, single rows and columns, flat, noise, gradients, saturated edges."""
    rng = np.random.RandomState(0)
    out = [np.zeros((1, 1, 3), np.uint8), np.full((1, 9, 3), 255, np.uint8), rng.randint(0, 256, (7, 1, 3)),
           rng.randint(0, 256, (13, 17, 3)), np.zeros((4, 5, 3), np.uint8)]
    y, x, c = np.indices((20, 33, 3))
    out.append((x * 7 + y * 3 + c * 90) % 256)
    out.append(np.where((x + y) % 9 < 4, 0, 255) + 0 * c)  # hard edges, 0 and 255: the residuals wrap
    return [np.ascontiguousarray(a, dtype=np.uint8) for a in out]


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_round_trips_are_exact_and_deterministic(predictor):
    coder = LosslessCodec(predictor)
    for image in images():
        payload = coder.encode(image)
        assert payload == coder.encode(image.copy())
        out = decode(payload, image.shape)
        assert out.dtype == np.uint8 and out.shape == image.shape and (out == image).all(), image.shape


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_real_photos_round_trip_and_the_mlp_codes_them_smaller(photos_dir, predictor):
    sizes = {}
    for path in sorted(glob.glob(os.path.join(photos_dir, "*.png"))):
        image = cv2.imread(path)
        for name in PREDICTORS:
            payload = codec(name).encode(image)
            assert (decode(payload, image.shape) == image).all()
            sizes[name] = sizes.get(name, 0) + len(payload)
    assert sizes["mlp"] < sizes["med"]  # the learned predictor earns its keep (README: the bpp table)


def inspection_image(h=48, w=64, noise=False):
    """A flat background (exactly flat, or with sensor-like noise) and an object: where run mode matters."""
    image = np.full((h, w, 3), 128, np.uint8)
    if noise:
        image = np.clip(image + np.random.RandomState(3).normal(0, 1, image.shape), 0, 255).astype(np.uint8)
    image[h // 4:h // 2, w // 3:w // 2] = (40, 90, 200)
    return image


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_run_mode_codes_flat_areas_for_almost_nothing(predictor):
    """A plain Rice code costs at least a bit a sample: 3 bpp on a flat background. Run mode codes the runs of
    zeros instead."""
    image = inspection_image(240, 320)
    payload = codec(predictor).encode(image)
    assert (decode(payload, image.shape) == image).all()
    assert len(payload) * 8.0 / (240 * 320) < 0.3
    modes = bytearray(payload[HEADER.size:HEADER.size + NUM_CLASSES])
    assert any(mode & lossless.RUN_MODE for mode in modes)
    noisy = inspection_image(60, 80, noise=True)
    assert (decode(codec(predictor).encode(noisy), noisy.shape) == noisy).all()


def test_a_non_contiguous_frame_codes_as_its_copy():
    image = images()[5]
    view = image[:, ::-1]
    assert codec("med").encode(view) == codec("med").encode(np.ascontiguousarray(view))


def test_the_encoder_refuses_what_is_not_a_bgr_uint8_image():
    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(ConfigError):
            codec("med").encode(bad)
    with pytest.raises(ConfigError, match="unknown lossless predictor"):
        LosslessCodec("jpeg")


def test_the_mlp_weights_keep_every_sum_exact_in_float32():
    """Every product and partial sum of the MLP is an integer below 2**24, whatever the input: float32 holds them
    exactly in any order of addition, so numpy 1.19 on ARM and numpy 2 on x86 predict the same."""
    mlp = codec("mlp").mlp
    for layer in mlp.layers:
        raw = layer["raw"]
        w1, b1, w2 = np.abs(raw["w1"]), np.abs(raw["b1"]), np.abs(raw["w2"])
        assert np.array(raw["w1"]).shape[0] == FEATURES
        # |inputs| <= 255 (differences of 8-bit samples, MED between its neighbours)
        assert (255 * w1.sum(axis=0) + b1).max() < 2 ** 24
        assert HIDDEN_CLIP * w2.sum() + abs(raw["b2"]) < 2 ** 24
    assert os.path.getsize(lossless.WEIGHTS_FILE) < 8192


def test_the_mlp_predicts_the_same_on_extreme_inputs():
    """Saturated features (all +-255) stay within the int16 correction and decode exactly."""
    image = np.zeros((9, 9, 3), np.uint8)
    image[::2, ::2] = 255
    image[1::2, 1::2, 1] = 255
    payload = codec("mlp").encode(image)
    assert (decode(payload, image.shape) == image).all()


def test_the_weights_identity_is_checked():
    payload = bytearray(codec("mlp").encode(images()[3]))
    payload[2] ^= 0xFF  # the weights' hash in the header: another edge's weights
    with pytest.raises(ProtocolError, match="same predictor and weights"):
        decode(bytes(payload), images()[3].shape)
    assert codec("mlp").identity.startswith("lossless-mlp-") and codec("med").identity == "lossless-med"


def test_changed_weights_file_is_refused(tmp_path):
    text = open(lossless.WEIGHTS_FILE).read().replace('"w2": [', '"w2": [1, ', 1)
    (tmp_path / "w.json").write_text(text)
    with pytest.raises(ConfigError):
        LosslessCodec("mlp", weights=str(tmp_path / "w.json"))


# --- hostile payloads -------------------------------------------------------------------------------------------
def _refused(payload, shape):
    with pytest.raises(ProtocolError):
        decode(payload, shape)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_corrupt_payloads_are_a_protocol_error(predictor):
    image = images()[5]
    good = codec(predictor).encode(image)
    counts_at = HEADER.size + NUM_CLASSES
    cases = [b"", good[:5], good[:HEADER.size], good[:-1], good + b"\x00", good + b"\xff",
             good[:counts_at] + b"\xff\xff\xff\xff\xff\xff", good[:counts_at] + bytes(100000),
             b"\x02" + good[1:], good[:1] + b"\x07" + good[2:],
             good[:HEADER.size] + b"\x09" + good[HEADER.size + 1:],  # k = 9
             good[:10] + bytes(4) + good[14:]]  # CRC
    for payload in cases:
        _refused(payload, image.shape)
    for shape in [(20, 32, 3), (21, 33, 3), (20, 33, 1), (20, 33), (0, 33, 3)]:
        _refused(good, shape)


def test_random_mutations_decode_or_are_refused():
    """Flipped bits, cut and spliced bytes: a ProtocolError, or (rarely) another valid image, never anything else,
    and never a wrong image that passes its CRC silently for the original's shape."""
    rng = np.random.RandomState(1)
    for predictor, image in [(p, a) for p in PREDICTORS for a in (images()[5], inspection_image())]:
        good = bytearray(codec(predictor).encode(image))
        for trial in range(150):
            bad = bytearray(good)
            for _ in range(1 + trial % 4):
                bad[rng.randint(len(bad))] ^= 1 << rng.randint(8)
            if trial % 5 == 0:
                bad = bad[:rng.randint(len(bad))] + bad[rng.randint(len(bad)):]
            try:
                out = decode(bytes(bad), image.shape)
            except ProtocolError:
                continue
            assert out.shape == image.shape and zlib.crc32(out.tobytes()) == HEADER.unpack(bytes(bad[:14]))[3]


def test_garbage_of_every_length_is_refused_quickly():
    rng = np.random.RandomState(2)
    for n in (0, 1, 13, 14, 56, 57, 200, 5000):
        _refused(rng.randint(0, 256, n).astype(np.uint8).tobytes(), (64, 64, 3))


# --- the wire -----------------------------------------------------------------------------------------------------
def _frame(image, predictor="med"):
    data = frame_payload("cam", 0, 1.0, image, "lossless", codec(predictor).encode(image), version=VERSION_2)
    header = FIXED_HEADER.unpack(data[:FIXED_HEADER.size])
    meta_bytes = data[FIXED_HEADER.size:FIXED_HEADER.size + header[3]]
    return meta_bytes, data[FIXED_HEADER.size + header[3]:]


def test_a_lossless_frame_carries_the_image_through_the_protocol():
    image = images()[6]
    meta_bytes, payload = _frame(image, "mlp")
    meta = parse_meta(meta_bytes, 0)
    assert meta.packing == "lossless" and meta.shape == image.shape and meta.dtype == "uint8"
    assert (decode_latents(meta, payload) == image).all()


def test_lossless_metadata_is_checked():
    image = images()[6]
    meta_bytes, _ = _frame(image)
    for old, new in [(b'"dtype":"uint8"', b'"dtype":"float32"'), (b'"shape":[20,33,3]', b'"shape":[20,33,4]'),
                     (b'"shape":[20,33,3]', b'"shape":[1,20,33,3]'),
                     (b'"packing":"lossless"', b'"entropy":"zlib","packing":"lossless"')]:
        assert old in meta_bytes
        with pytest.raises(ProtocolError):
            parse_meta(meta_bytes.replace(old, new), 0)
    # the decoded image is bounded by the frame limit: 20 * 33 * 3 bytes is over twice 200 bytes
    with pytest.raises(ProtocolError, match="max-frame-bytes"):
        parse_meta(meta_bytes, 0, max_payload_bytes=200)
    parse_meta(meta_bytes, 0, max_payload_bytes=1000)


def test_the_host_checks_a_lossless_hello_without_its_model():
    from latentlink.host.server import _check_lossless_hello

    hello = {"model_id": codec("mlp").identity, "entropy": "none"}
    assert _check_lossless_hello(hello) is None
    assert _check_lossless_hello(dict(hello, model_id="lossless-med")) is None
    assert _check_lossless_hello(dict(hello, model_id="lossless-mlp-0123456789ab"))[0] == "model_mismatch"
    assert _check_lossless_hello(dict(hello, model_id="lossless-png"))[0] == "bad_hello"
    assert _check_lossless_hello(dict(hello, model_id=None))[0] == "bad_hello"
    assert _check_lossless_hello(dict(hello, entropy="zlib"))[0] == "bad_hello"


# --- edge process -> host process ---------------------------------------------------------------------------------
def _run_edge(address, source, *extra):
    return subprocess.run([sys.executable, "-m", "latentlink.edge", "--source", source, "--connect", address,
                           "--name", "inspect", "--drop", "block"] + list(extra), cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("predictor, protocol", [("med", "2"), ("mlp", "2"), ("med", "1")])
def test_edge_to_host_reproduces_real_photos_pixel_for_pixel(tmp_path, photos_dir, predictor, protocol):
    """Real photos of different sizes through --source folder; the host (with its default model, which these
    frames do not use) writes PNGs that are the photos exactly. Protocol 1 (no HELLO) too."""
    sources = sorted(glob.glob(os.path.join(photos_dir, "*.png")))
    host, address = start_host(tmp_path, "nano-504")
    edge = _run_edge(address, photos_dir, "--lossless", predictor, "--protocol", protocol,
                     "--report", str(tmp_path / "edge.json"))
    host_out, _ = host.communicate(timeout=120)
    assert edge.returncode == 0, edge.stderr + host_out
    assert "encode" in edge.stdout and "preprocess" not in edge.stdout
    written = sorted(glob.glob(str(tmp_path / "frames" / "inspect" / "*.png")))
    assert len(written) == len(sources) == 4
    for source, out in zip(sources, written):
        a, b = cv2.imread(source, cv2.IMREAD_UNCHANGED), cv2.imread(out, cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and (a == b).all(), (source, out)


def test_edge_refuses_lossless_with_a_coder_or_an_encoder(tmp_path, photos_dir):
    for extra in (["--entropy", "zlib"], ["--serializer", "pickle"], ["--encoder", "x.onnx"]):
        edge = _run_edge("127.0.0.1:9", photos_dir, "--lossless", "med", *extra)
        assert edge.returncode == 2 and "--lossless" in edge.stderr, edge.stderr


@pytest.mark.skipif(not os.environ.get("LATENTLINK_PY36"), reason="set LATENTLINK_PY36 to a Python 3.6 interpreter")
def test_python36_edge_codes_lossless_for_this_host(tmp_path, photos_dir):
    """The edge on Python 3.6 + numpy 1.19 (the Nano's), the host on this Python and numpy: the learned predictor
    must agree bit for bit across them (its float32 sums are exact integers), or the CRC refuses the frame."""
    host, address = start_host(tmp_path, "nano-504")
    edge = subprocess.run([os.environ["LATENTLINK_PY36"], "-m", "latentlink.edge", "--source", photos_dir,
                           "--connect", address, "--name", "inspect", "--drop", "block", "--lossless", "mlp"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
    host_out, _ = host.communicate(timeout=120)
    assert edge.returncode == 0, edge.stderr + host_out
    sources = sorted(glob.glob(os.path.join(photos_dir, "*.png")))
    written = sorted(glob.glob(str(tmp_path / "frames" / "inspect" / "*.png")))
    assert len(written) == len(sources)
    for source, out in zip(sources, written):
        assert (cv2.imread(source) == cv2.imread(out)).all(), (source, out)
