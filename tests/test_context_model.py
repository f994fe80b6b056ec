"""``--entropy context``: the context model of binary latents and its coder (edge/context_model.py), the tables'
fitting and torch mirror (export/rate.py), and the frames on the wire (edge/protocol.py, host/server.py).

Round trips are bit-exact, also across processes and across Python 3.6 + numpy 1.19 (the Nano, when LATENTLINK_PY36
names its interpreter) and this Python; corrupt payloads are a ProtocolError and nothing else.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from latentlink.edge.context_model import (FILENAME, MAX_K, NUM_CLASSES, PROB_ONE, RICE_THRESHOLDS, ContextModel,
                                           all_contexts, passes, rice_class, table_sizes)
from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.protocol import decode_latents, encode_end_of_stream, encode_frame, parse_meta

from .conftest import ROOT, run_cli, running_host
from .test_protocol import read_from_bytes

PY36 = os.environ.get("LATENTLINK_PY36")
SHIPPED = os.path.join(ROOT, "profiles", "default", "nano-504", FILENAME)


def random_model(channels, seed=0, extreme=False):
    rng = np.random.RandomState(seed)
    if extreme:  # near-certain probabilities both ways: the longest Rice parameters
        tables = [rng.choice([1, 2, PROB_ONE - 2, PROB_ONE - 1], size=n) for n in table_sizes(channels)]
    else:
        tables = [rng.randint(1, PROB_ONE, size=n) for n in table_sizes(channels)]
    return ContextModel(channels, tables)


def structured_bits(shape, seed=0):
    """Bits with spatial structure and ordered dither, something like a model's latents."""
    rng = np.random.RandomState(seed)
    n, c, h, w = shape
    level = rng.rand(n, c, 1, 1) + 0.3 * np.sin(np.arange(h)[:, None] / 5.0 + np.arange(w)[None, :] / 7.0)
    return (level > rng.rand(1, 1, h, w)).astype(np.uint8)


def fitted_model(bits):
    from latentlink.edge.context_model import count_contexts, tables_from_counts

    return ContextModel(bits.shape[1], tables_from_counts(count_contexts(bits)))


# --- the model ------------------------------------------------------------------------------------------------------

def test_rice_thresholds_are_the_crossovers_of_the_expected_code_lengths():
    def cost(k, p):  # bits per symbol of Rice codes of the runs between symbols of probability p
        q = (1 - p) ** (2 ** k)
        return p * (k + 1 + q / (1 - q))

    for k, threshold in enumerate(RICE_THRESHOLDS):
        lo, hi = 1e-9, 0.5
        for _ in range(100):  # where k + 1 stops being cheaper than k
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(k + 1, mid) < cost(k, mid) else (lo, mid)
        assert threshold == math.ceil(lo * PROB_ONE), k
    assert len(RICE_THRESHOLDS) == MAX_K and NUM_CLASSES == 2 * (MAX_K + 1)
    assert list(rice_class([1, PROB_ONE - 1, PROB_ONE // 2, PROB_ONE // 2 - 1])) == [2 * MAX_K + 1, 2 * MAX_K, 0, 1]


def test_every_context_reads_only_bits_of_earlier_passes():
    for channels in (1, 3, 8):
        done = set()
        for c, grid, features in passes(channels):
            for taps in features:
                for dc, dy, dx in taps:
                    assert (c + dc, (grid[0] + dy) % 2, (grid[1] + dx) % 2) in done, (c, grid, dc, dy, dx)
            done.add((c, grid[0], grid[1]))
        assert len(done) == 4 * channels


@pytest.mark.parametrize("shape", [(1, 8, 16, 16), (2, 8, 5, 7), (1, 1, 1, 1), (1, 3, 2, 9), (3, 2, 11, 4)])
@pytest.mark.parametrize("extreme", [False, True])
def test_random_bits_round_trip_exactly(shape, extreme):
    model = random_model(shape[1], seed=sum(shape), extreme=extreme)
    rng = np.random.RandomState(len(shape))
    for bits in (rng.randint(0, 2, size=shape).astype(np.uint8), np.zeros(shape, np.uint8), np.ones(shape, np.uint8),
                 structured_bits(shape)):
        payload = model.encode(bits)
        assert np.array_equal(model.decode(payload, shape), bits)
        assert len(payload) <= 2 * bits.size + 200  # the decoder's bound on a valid payload


def test_float_latents_are_read_as_pack_latents_reads_them():
    model = random_model(2)
    bits = structured_bits((1, 2, 6, 6))
    latents = bits.astype(np.float32) * 0.9 + 0.05  # 0.05 and 0.95
    assert model.encode(latents) == model.encode(bits)


def test_fitted_tables_code_structured_bits_near_their_ideal_size_and_far_below_a_bit_each():
    bits = structured_bits((4, 8, 32, 32))
    model = fitted_model(bits)
    payload = model.encode(bits)
    ideal = model.ideal_bits(bits)
    assert ideal / 8 <= len(payload) <= 1.05 * ideal / 8 + NUM_CLASSES * 3
    assert len(payload) < 0.5 * bits.size / 8


def test_tables_round_trip_through_json_exactly(tmp_path):
    model = random_model(8, seed=3)
    path = str(tmp_path / FILENAME)
    model.info = {"photos": 2}
    model.save(path)
    again = ContextModel.load(path)
    assert again.sha256 == model.sha256 and again.info == {"photos": 2}
    assert all(np.array_equal(a, b) and a.dtype == np.uint16 for a, b in zip(again.tables, model.tables))
    assert again.to_json() == model.to_json()
    tables = [t.copy() for t in model.tables]
    tables[0][0] ^= 1
    assert ContextModel(8, tables).sha256 != model.sha256  # the identity covers every entry


def test_a_changed_or_foreign_table_file_is_refused(tmp_path):
    obj = json.loads(random_model(2).to_json())
    obj["tables"][1] = json.loads(random_model(2, seed=9).to_json())["tables"][1]  # same size, other values
    (tmp_path / "changed.json").write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match="the file was changed"):
        ContextModel.load(str(tmp_path / "changed.json"))
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not a latentlink entropy table file"):
        ContextModel.load(str(tmp_path / "other.json"))
    with pytest.raises(ConfigError, match="cannot read entropy tables"):
        ContextModel.load(str(tmp_path / "missing.json"))


def test_the_shipped_tables_load_and_match_their_recorded_hash():
    for size in ("nano-504", "nano-1008"):
        path = os.path.join(ROOT, "profiles", "default", size, FILENAME)
        model = ContextModel.load(path)
        with open(path) as f:
            assert json.load(f)["sha256"] == model.sha256
        assert model.channels == 8 and len(model.tables) == 32


# --- untrusted payloads ------------------------------------------------------------------------------------------------

def test_corrupt_payloads_are_protocol_errors_and_nothing_else():
    shape = (1, 8, 12, 12)
    bits = structured_bits(shape, seed=5)
    model = fitted_model(bits)
    payload = model.encode(bits)
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            model.decode(payload[:cut], shape)
    for extra in (b"\x00", b"\x01", bytes(100)):
        with pytest.raises(ProtocolError):
            model.decode(payload + extra, shape)
    with pytest.raises(ProtocolError, match="longer than"):
        model.decode(bytes(10 ** 6), shape)  # refused before unpacking: no allocation follows the payload's size
    with pytest.raises(ProtocolError, match="more than the"):
        model.decode(b"\xff\xff\xff\xff\x0f" + payload[1:], shape)  # a huge count, bounded by the shape
    with pytest.raises(ProtocolError, match="not a valid varint"):
        model.decode(b"\xff" * 10, shape)
    with pytest.raises(ProtocolError, match="shape"):
        model.decode(payload, (1, 7, 12, 12))  # not the model's channels
    rng = np.random.RandomState(0)
    decoded = 0
    for _ in range(300):  # flipped bits: refused, or (no checksum) some other bits of the right shape
        damaged = bytearray(payload)
        for i in rng.randint(0, len(damaged), size=1 + rng.randint(3)):
            damaged[i] ^= 1 << rng.randint(8)
        try:
            out = model.decode(bytes(damaged), shape)
        except ProtocolError:
            continue
        decoded += 1
        assert out.shape == shape and out.max() <= 1
    for _ in range(300):  # random bytes
        try:
            model.decode(rng.bytes(rng.randint(0, 80)), shape)
        except ProtocolError:
            pass


# --- across processes and Python versions ---------------------------------------------------------------------------

CODE_IN_CHILD = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from latentlink.edge.context_model import ContextModel
model = ContextModel.load({tables!r})
mode, path = sys.argv[1], sys.argv[2]
data = np.load(path + ".npz")
if mode == "encode":
    with open(path + ".bin", "wb") as f:
        f.write(model.encode(data["bits"]))
else:
    with open(path + ".bin", "rb") as f:
        np.save(path + ".out.npy", model.decode(f.read(), data["bits"].shape))
print(sys.version_info[:2], np.__version__)
"""


def _child(python, mode, path, tables):
    run = subprocess.run([python, "-c", CODE_IN_CHILD.format(root=ROOT, tables=tables), mode, path],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _cases(photos_dir):
    """Random, structured, and (with onnxruntime) the shipped encoder's bits of a real photo at 504x504."""
    cases = {"random": np.random.RandomState(1).randint(0, 2, size=(2, 8, 9, 13)).astype(np.uint8),
             "structured": structured_bits((1, 8, 40, 40), seed=2)}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return cases
    from latentlink.edge.backends import open_backend
    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.profile import load_profile
    from latentlink.export.data import list_images, read_bgr

    profile = load_profile("nano-504")
    with open_backend(profile.model.encoder, "encoder") as enc:
        latents, _ = enc.infer(Preprocessor(504, 504, profile.input.fit)(read_bgr(list_images(photos_dir)[0])))
    cases["real"] = (latents > 0.5).astype(np.uint8)
    return cases


@pytest.mark.parametrize("python", [
    pytest.param(sys.executable, id="this-python"),
    pytest.param(PY36, id="python36", marks=pytest.mark.skipif(not PY36, reason="set LATENTLINK_PY36 to run"))])
def test_coded_in_one_process_decoded_in_another(tmp_path, python, photos_dir):
    """The other process (Python 3.6 + numpy 1.19 with LATENTLINK_PY36: the Nano) codes, this one decodes; and back."""
    for name, bits in _cases(photos_dir).items():
        path = str(tmp_path / name)
        np.savez(path + ".npz", bits=bits)
        _child(python, "encode", path, SHIPPED)
        model = ContextModel.load(SHIPPED)
        with open(path + ".bin", "rb") as f:
            payload = f.read()
        assert payload == model.encode(bits), name  # the same bytes from either side
        assert np.array_equal(model.decode(payload, bits.shape), bits), name
        _child(python, "decode", path, SHIPPED)
        assert np.array_equal(np.load(path + ".out.npy"), bits), name


def test_real_latents_of_the_shipped_encoder_round_trip_and_beat_zlib(photos_dir):
    pytest.importorskip("onnxruntime")
    import zlib

    from latentlink.edge.backends import open_backend
    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.profile import load_profile
    from latentlink.export.data import list_images, read_bgr

    profile = load_profile("nano-504")
    model = ContextModel.load(SHIPPED)
    pre = Preprocessor(504, 504, profile.input.fit)
    coded = packed_zlib = 0
    with open_backend(profile.model.encoder, "encoder") as enc:
        for path in list_images(photos_dir):
            latents, _ = enc.infer(pre(read_bgr(path)))
            bits = (latents > 0.5).astype(np.uint8)
            payload = model.encode(latents)
            assert np.array_equal(model.decode(payload, bits.shape), bits)
            coded += len(payload)
            packed_zlib += len(zlib.compress(np.packbits(bits).tobytes(), 6))
    assert coded < packed_zlib


# --- the wire ---------------------------------------------------------------------------------------------------------

def test_frames_carry_context_coded_latents_and_decode_with_the_tables():
    model = random_model(8, seed=4)
    a = structured_bits((1, 8, 8, 8)).astype(np.float32)
    frame = encode_frame("cam0", 2, 1.0, a, "bits", entropy="context", context_model=model)
    meta, payload = read_from_bytes(frame)
    assert meta.entropy == "context" and bytes(payload) == model.encode(a)
    out = decode_latents(meta, payload, model)
    assert out.dtype == np.float32 and np.array_equal(out, a)
    with pytest.raises(ProtocolError, match="no entropy tables"):
        decode_latents(meta, payload)
    with pytest.raises(ConfigError, match="needs the model's probability tables"):
        encode_frame("cam0", 2, 1.0, a, "bits", entropy="context")
    with pytest.raises(ConfigError, match="packing 'bits'"):
        encode_frame("cam0", 2, 1.0, a, "uint8", entropy="context", context_model=model)
    bad = json.dumps({"stream": "s", "seq": 0, "t_capture": 0.0, "dtype": "float32", "shape": [1, 8, 8, 8],
                      "packing": "uint8", "payload_len": 5, "entropy": "context"}).encode()
    with pytest.raises(ProtocolError, match="not 'bits'"):
        parse_meta(bad, 0)


def _connect(host):
    sock = socket.create_connection(host.address, timeout=5)
    return sock


def test_host_decodes_context_frames_and_a_corrupt_one_closes_only_its_connection(tmp_path, tiny_context_profile,
                                                                                   caplog):
    import logging

    from latentlink.edge.backends.base import read_model_info
    from latentlink.edge.profile import load_profile

    profile = load_profile(tiny_context_profile)
    model = read_model_info(profile.model.encoder).context_model()
    frames = [encode_frame("coded", seq, time.time(), structured_bits((1, 8, 16, 16), seed=seq).astype(np.float32),
                           "bits", entropy="context", context_model=model) for seq in range(3)]
    first = encode_frame("broken", 0, time.time(), structured_bits((1, 8, 16, 16)).astype(np.float32), "bits",
                         entropy="context", context_model=model)
    meta, _ = read_from_bytes(first)
    broken = first[:-meta.payload_len] + bytes(meta.payload_len)  # zeros: no valid code
    with running_host(tiny_context_profile, tmp_path) as host, \
            caplog.at_level(logging.ERROR, logger="latentlink.host"):
        good = _connect(host)
        good.sendall(frames[0] + frames[1])
        bad = _connect(host)
        bad.sendall(broken)
        try:
            assert bad.recv(1) == b""  # closed by the host
        except ConnectionResetError:
            pass
        good.sendall(frames[2] + encode_end_of_stream("coded", 3))
        deadline = time.monotonic() + 10
        while not (host.streams.get("coded") and host.streams["coded"].ended):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert host.streams["coded"].frames == 3 and host.protocol_errors == 1
    assert "context-coded payload" in caplog.text


def test_host_refuses_a_hello_whose_tables_it_lacks_or_has_others_of(tiny_profile, tiny_context_profile):
    from latentlink.edge.backends import open_backend
    from latentlink.edge.backends.base import read_model_info
    from latentlink.edge.profile import load_profile
    from latentlink.host.server import Host

    encoder_info = read_model_info(load_profile(tiny_context_profile).model.encoder)
    hello = {"versions": [2], "model_id": encoder_info.identity("context"),
             "shape": list(encoder_info.latent_shape), "tiles": [1, 1], "packing": "bits", "entropy": "context"}
    for profile, expected in ((tiny_context_profile, None), (tiny_profile, "entropy_unavailable")):
        decoder = open_backend(load_profile(profile).model.decoder, "decoder").load()
        try:
            host = Host(decoder)
            refusal = host._check_hello(hello)
            assert (refusal and refusal[0]) == expected, refusal
            other = dict(hello, model_id=encoder_info.model_id + "+ctx-0123456789abcdef")
            if expected is None:
                assert host._check_hello(other)[0] == "model_mismatch"
        finally:
            decoder.close()
    assert encoder_info.identity("zlib") == encoder_info.model_id  # other coders: identity unchanged


def test_edge_to_host_stream_with_context_coding(tmp_path, tiny_context_profile, video_file):
    from .test_end_to_end import assert_host_saved_what_the_model_decodes, stream_video

    edge, edge_report, host_report = stream_video(tmp_path, tiny_context_profile, video_file, "ctx", "--entropy",
                                                  "context")
    assert host_report["frames"] == 24 and host_report["protocol_errors"] == 0 and host_report["failed"] == 0
    assert edge_report["meta"]["entropy"] == "context"
    assert all("entropy" in r["stages"] and "serialize" in r["stages"] for r in edge_report["records"])
    assert_host_saved_what_the_model_decodes(tmp_path, "ctx", video_file, tiny_context_profile)
    packed = 8 * 16 * 16 // 8  # 64x64 frames: 8 planes of 16x16 bits
    assert sum(r["bytes"] for r in edge_report["records"]) < 24 * (packed + 300)


# --- fitting and the torch mirror ---------------------------------------------------------------------------------------

def test_rate_model_estimates_the_ideal_size_and_exports_the_coders_tables():
    torch = pytest.importorskip("torch")
    from latentlink.export.rate import RateModel

    bits = structured_bits((2, 8, 16, 16), seed=7)
    tables = fitted_model(bits)
    rate = RateModel(8, init=tables)
    exported = rate.to_tables()
    assert exported.sha256 == tables.sha256  # float32 logits hold 16-bit probabilities exactly enough
    x = torch.from_numpy(bits.astype(np.float32)).requires_grad_()
    estimate = rate(x)
    assert estimate.shape == (2,)
    for i in range(2):
        assert abs(float(estimate[i].detach()) - tables.ideal_bits(bits[i:i + 1])) < 1e-3 * tables.ideal_bits(bits[i:i + 1])
    estimate.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in rate.parameters())
    fresh = RateModel(8)
    assert abs(float(fresh(x).sum().detach()) - x.numel()) < 1e-3 * x.numel()  # P = 1/2: a bit per bit
    assert len(all_contexts(bits)) == len(list(fresh.parameters())) == 32


def test_export_entropy_writes_tables_that_match_the_export(tmp_path, tiny_context_profile, photos_dir):
    from latentlink.edge.backends.base import read_model_info
    from latentlink.edge.profile import load_profile

    encoder = load_profile(tiny_context_profile).model.encoder
    model = read_model_info(encoder).context_model()
    assert model.info["photos"] == 4 and model.info["size"] == [64, 64]
    folder = os.path.dirname(encoder)
    run = run_cli("latentlink.export", "entropy", "--checkpoint", os.path.join(os.path.dirname(folder), "tiny.pt"),
                  "--photos", photos_dir, "--out", str(tmp_path))
    assert run.returncode == 2 and "model.json" in run.stderr  # no export there
    torch = pytest.importorskip("torch")
    from latentlink.export.models import build_model, save_checkpoint

    save_checkpoint(str(tmp_path / "other.pt"), build_model("lossy-cae", latent_channels=8, encoder_channels=16,
                                                            decoder_channels=16))
    run = run_cli("latentlink.export", "entropy", "--checkpoint", str(tmp_path / "other.pt"), "--photos",
                  photos_dir, "--out", folder)
    assert run.returncode != 0 and "give the checkpoint of that export" in run.stderr
    del torch


def test_train_with_a_rate_term(tmp_path, photos_dir):
    """``train --lmbda``: the rate model's estimate joins the loss, its tables learn, the checkpoint records it."""
    pytest.importorskip("torch")
    from latentlink.cli import main
    from latentlink.export.models import load_checkpoint

    ckpt = tmp_path / "rd.pt"
    assert main(["train", "--data", photos_dir, "--out", str(ckpt), "--steps", "4", "--batch-size", "2",
                 "--crop", "32", "--scales", "64", "--val-every", "4", "--val-split", "0.25", "--lmbda", "0.5",
                 "--hparam", "encoder_channels=8", "--hparam", "decoder_channels=8"]) == 0
    _, meta = load_checkpoint(ckpt)
    assert meta["lmbda"] == 0.5 and meta["step"] == 4
    assert main(["train", "--data", photos_dir, "--out", str(ckpt), "--lmbda", "-1"]) == 2
    assert main(["train", "--data", photos_dir, "--out", str(ckpt), "--steps", "1", "--model", "cae",
                 "--lmbda", "0.5"]) == 2  # not binary latents: refused with the reason
