"""Rate that follows the link (edge/rate.py): the adaptive policy, the wire's ``iterations`` and ``progressive``, the
host's checks, and an edge process streaming to a host process with ``--rate adaptive``.

The progressive model here is the test double of tests/progressive_double.py (8x8 cells' mean colours, one bit per
iteration), so these tests need neither PyTorch nor a trained model. Exact outcomes only, never timings.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.protocol import (FIXED_HEADER, KIND_HELLO, MAX_ITERATIONS, VERSION_2, encode_frame, encode_message,
                                      frame_payload, pack_latents, parse_fields, parse_meta)
from latentlink.edge.rate import AdaptiveRate, FixedRate, ProgressiveBackend, make_rate
from latentlink.edge.sender import LinkState

from . import progressive_double
from .conftest import ROOT

pytestmark = pytest.mark.timeout(120)
K, SIZE = 6, 64
CODE_SHAPE = (3, SIZE // 8, SIZE // 8)


def link(in_flight=0, waiting=0, window=4, rtts_ms=(), connected=True):
    return LinkState(in_flight, waiting, window, list(rtts_ms), connected)


# The adaptive policy, as a pure function of the link's state.
def test_a_filling_window_lowers_iterations_by_halves_within_the_bounds():
    rate = AdaptiveRate(2, 8, cooldown=4)
    chosen = [rate.choose(link(in_flight=4, waiting=2)) for _ in range(30)]
    assert chosen[0] == 4  # halved at once: 8 // 2
    assert chosen[:5] == [4, 4, 4, 4, 4]  # then held for the cooldown (the window: 4 frames)
    assert chosen[5] == 2
    assert min(chosen) == 2 and chosen[-1] == 2  # never below --min-iterations
    assert rate.decreases == 2


def test_a_growing_ack_round_trip_lowers_iterations_and_one_late_ack_does_not():
    rate = AdaptiveRate(1, 8)
    for _ in range(20):  # a quiet link: 10 ms round trips, one frame in flight
        assert rate.choose(link(in_flight=1, rtts_ms=[10.0])) == 8
    assert rate.srtt_ms == rate.long_ms == 10.0
    # One ACK four times as late: srtt moves a quarter of the way (17.5 ms < 1.5 x 10.9 + 20 ms): no change.
    assert rate.choose(link(in_flight=1, rtts_ms=[40.0])) == 8
    # Round trips that keep growing (a queue building up on the link): congested, k halves.
    chosen = [rate.choose(link(in_flight=1, rtts_ms=[200.0])) for _ in range(3)]
    assert chosen[-1] < 8 and rate.decreases >= 1


def test_round_trips_that_grow_slowly_do_not_lower_iterations():
    rate = AdaptiveRate(1, 8)
    # From 10 to 100 ms over 200 frames (bigger frames, a busier host): the long average follows; nothing queues.
    chosen = [rate.choose(link(in_flight=1, rtts_ms=[10.0 + 0.45 * i])) for i in range(200)]
    assert set(chosen) == {8} and rate.decreases == 0


def test_a_host_that_stops_answering_fills_the_window_and_lowers_iterations():
    rate = AdaptiveRate(1, 8)
    rate.choose(link(in_flight=1, rtts_ms=[10.0]))
    # No acknowledgement arrives any more: frames pile up in flight, the window fills.
    chosen = [rate.choose(link(in_flight=min(4, n))) for n in range(2, 20)]
    assert chosen[0] == 8 and chosen[1] == 4 and chosen[-1] == 1  # halved once 3 of 4 are in flight


def test_fast_acks_raise_iterations_one_at_a_time_up_to_the_bound():
    rate = AdaptiveRate(1, 5, start=1, raise_after=8)
    chosen = [rate.choose(link(in_flight=0, rtts_ms=[5.0])) for _ in range(60)]
    assert chosen[:7] == [1] * 7 and chosen[7] == 2  # 8 clear frames in a row for each step
    assert chosen[15] == 3
    assert max(chosen) == 5 and chosen[-1] == 5  # never above --max-iterations
    assert all(b - a in (0, 1) for a, b in zip(chosen, chosen[1:]))  # additive increase


def test_the_dead_band_and_a_lost_connection_hold_iterations():
    rate = AdaptiveRate(1, 8, start=4)
    # 5 of 8 frames in flight (0.5 < fill < 0.75), steady round trips: neither congested nor clear
    chosen = [rate.choose(link(in_flight=5, window=8, rtts_ms=[30.0])) for _ in range(30)]
    # the window drains, but round trips have grown (srtt 60 ms against 30 lately): between 1.25 x 30 + 20 and
    # 1.5 x 30 + 20 ms, still neither
    rate.srtt_ms = 60.0
    chosen += [rate.choose(link(in_flight=0)) for _ in range(30)]
    assert set(chosen) == {4}
    assert set(rate.choose(link(in_flight=4, waiting=4, connected=False)) for _ in range(10)) == {4}


def test_noise_around_a_quiet_link_does_not_oscillate():
    rate = AdaptiveRate(1, 8)
    rng = np.random.RandomState(0)
    chosen = []
    for _ in range(300):  # round trips of 10 to 50 ms, 0 to 2 frames in flight at a window of 4
        chosen.append(rate.choose(link(in_flight=int(rng.randint(0, 3)), rtts_ms=[10.0 + 40.0 * rng.rand()])))
    assert set(chosen) == {8} and rate.decreases == 0


def test_alternating_congestion_and_clear_does_not_raise_before_eight_clear_frames():
    rate = AdaptiveRate(1, 8, start=2, cooldown=1000)
    chosen = []
    for i in range(100):  # a window that fills every 5th frame: never 8 clear frames in a row
        chosen.append(rate.choose(link(in_flight=4 if i % 5 == 4 else 0)))
    assert chosen[:4] == [2] * 4 and set(chosen[4:]) == {1}


def test_rate_options_are_checked_against_the_model():
    assert isinstance(make_rate(None, 6), FixedRate) and make_rate(None, 6).iterations == 6
    assert make_rate("fixed", 6, iterations=3).choose(link()) == 3
    adaptive = make_rate("adaptive", 6, min_iterations=2)
    assert (adaptive.min_iterations, adaptive.max_iterations, adaptive.iterations) == (2, 6, 6)
    for kwargs in ({"rate": "fixed", "iterations": 7}, {"rate": "adaptive", "min_iterations": 5, "max_iterations": 3},
                   {"rate": "fixed", "min_iterations": 2}, {"rate": "adaptive", "iterations": 3},
                   {"rate": "sometimes"}):
        rate = kwargs.pop("rate")
        with pytest.raises(ConfigError):
            make_rate(rate, 6, **kwargs)


# The wire.
def codes(k):
    return (np.arange(k * int(np.prod(CODE_SHAPE))).reshape((k,) + CODE_SHAPE) % 3 == 0).astype(np.uint8)


def meta_of(data):
    _, byte, meta_len = FIXED_HEADER.unpack(data[:FIXED_HEADER.size])[1:]
    return parse_meta(data[FIXED_HEADER.size:FIXED_HEADER.size + meta_len], 0)


def test_a_progressive_frame_carries_its_iterations_and_others_stay_as_they_were():
    data = frame_payload("cam", 3, 1.5, codes(4), "bits", pack_latents(codes(4), "bits"), version=VERSION_2,
                         iterations=4)
    meta = meta_of(data)
    assert meta.iterations == 4 and meta.shape == (4,) + CODE_SHAPE
    plain = encode_frame("cam", 3, 1.5, codes(1), "bits")
    assert b"iterations" not in plain and meta_of(plain).iterations is None


@pytest.mark.parametrize("field, shape, packing", [
    ("0", [1, 3, 8, 8], "bits"), (str(MAX_ITERATIONS + 1), [MAX_ITERATIONS + 1, 1, 1, 1], "bits"),
    ('"2"', [2, 3, 8, 8], "bits"), ("true", [1, 3, 8, 8], "bits"), ("2.0", [2, 3, 8, 8], "bits"),
    ("null", [2, 3, 8, 8], "bits"), ("2", [3, 3, 8, 8], "bits"), ("2", [2, 192], "bits"),
    ("2", [2, 3, 8, 8], "uint8")])
def test_bad_iterations_are_a_protocol_error(field, shape, packing):
    n = int(np.prod(shape))
    size = (n + 7) // 8 if packing == "bits" else n
    meta = ('{"dtype":"uint8","iterations":%s,"packing":"%s","payload_len":%d,"seq":0,"shape":%s,"stream":"c",'
            '"t_capture":0.0}' % (field, packing, size, json.dumps(shape).replace(" ", ""))).encode()
    with pytest.raises(ProtocolError):
        parse_meta(meta, 0)
    if field == "null":
        return  # a sender without iterations makes a plain frame
    with pytest.raises(ConfigError):  # and the sender refuses to make one
        frame_payload("c", 0, 0.0, np.zeros(shape, np.uint8), packing, bytes(size), version=VERSION_2,
                      iterations=json.loads(field))


def hello(**changes):
    fields = dict(versions=[2], stream="cam", session="0123456789abcdef", model_id="ab" * 32,
                  shape=[K] + list(CODE_SHAPE), dtype="uint8", packing="bits", entropy="none", tiles=[1, 1],
                  delivery="live", window=4, unacked=[], t_send=0.0,
                  progressive={"iterations": K, "code_shape": list(CODE_SHAPE)})
    fields.update(changes)
    return fields


def test_the_hello_says_progressive_and_is_checked():
    fields = parse_fields(KIND_HELLO, encode_message(KIND_HELLO, **hello())[FIXED_HEADER.size:])
    assert fields["progressive"] == {"iterations": K, "code_shape": list(CODE_SHAPE)}
    plain = dict(hello(shape=[1] + list(CODE_SHAPE)))
    del plain["progressive"]
    assert parse_fields(KIND_HELLO, encode_message(KIND_HELLO, **plain)[FIXED_HEADER.size:])["progressive"] is None
    for bad in ({"iterations": 0, "code_shape": [3, 8, 8]}, {"iterations": K, "code_shape": [3, 8]},
                {"iterations": K, "code_shape": [3, 8, 9]}, {"iterations": "6", "code_shape": [3, 8, 8]}, [K],
                {"iterations": K + 1, "code_shape": [3, 8, 8]}):
        body = json.dumps(hello(progressive=bad)).encode()
        with pytest.raises(ProtocolError):
            parse_fields(KIND_HELLO, body)


# The host's checks (a Host object, no network).
@pytest.fixture
def double_model(tmp_path, monkeypatch):
    """A progressive double's profile; the double is latentlink.edge.progressive in this process."""
    monkeypatch.setitem(sys.modules, "latentlink.edge.progressive", progressive_double)
    return progressive_double.write_model(str(tmp_path / "double"), iterations=K, size=SIZE)


def open_double(profile, role):
    from latentlink.edge.profile import load_profile
    from latentlink.edge.rate import open_model

    model = load_profile(profile).model
    return open_model(model.encoder if role == "encoder" else model.decoder, role).load()


def test_the_host_checks_a_progressive_hello_and_each_frame_against_its_decoder(double_model):
    from latentlink.host.server import Host

    decoder = open_double(double_model, "decoder")
    assert isinstance(decoder, ProgressiveBackend) and decoder.input_shape == (K,) + CODE_SHAPE
    host = Host(decoder)
    check = host._check_hello
    assert check(parse_fields(KIND_HELLO, json.dumps(hello()).encode())) is None
    plain = hello(shape=[1] + list(CODE_SHAPE))
    del plain["progressive"]
    assert check(parse_fields(KIND_HELLO, json.dumps(plain).encode()))[0] == "shape_mismatch"
    other = hello(shape=[K + 1] + list(CODE_SHAPE), progressive={"iterations": K + 1, "code_shape": list(CODE_SHAPE)})
    assert check(parse_fields(KIND_HELLO, json.dumps(other).encode()))[0] == "shape_mismatch"

    def frame(k, shape=None, iterations="same"):
        a = np.zeros(shape or (k,) + CODE_SHAPE, np.uint8)
        return meta_of(frame_payload("cam", 0, 0.0, a, "bits", pack_latents(a, "bits"), version=VERSION_2,
                                     iterations=a.shape[0] if iterations == "same" else iterations))

    assert host._latents_problem(frame(1)) is None and host._latents_problem(frame(K)) is None
    assert "do not fit" in host._latents_problem(frame(K + 1))  # k outside 1..K
    assert "do not fit" in host._latents_problem(frame(2, (2, 3, 8, 4)))  # another code shape
    assert "without iterations" in host._latents_problem(frame(1, iterations=None))


def test_progressive_codes_decode_to_a_better_image_with_more_iterations(double_model):
    from latentlink.edge.preprocess import psnr, to_image

    encoder, decoder = open_double(double_model, "encoder"), open_double(double_model, "decoder")
    y, x = np.mgrid[0:SIZE, 0:SIZE] / float(SIZE)
    image = np.stack([y, x, (x + y) / 2])[None].astype(np.float32)
    # the double's best: each 8x8 cell's mean
    reference = to_image(np.repeat(np.repeat(image[0].reshape(3, 8, 8, 8, 8).mean(axis=(2, 4)), 8, 1), 8, 2)[None])
    scores = []
    for k in range(1, K + 1):
        outputs, _ = decoder.infer_batch([encoder.encode(image, k)[0]])
        scores.append(psnr(reference, to_image(outputs[0])))
    assert scores == sorted(scores) and scores[-1] > scores[0] + 10


# Edge process -> host process.
def spawn(log, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(str(log), "w") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.progressive_double"] + [str(a) for a in args], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def test_edge_with_adaptive_rate_to_host_every_frame_accounted_for(procs, tmp_path):
    profile = progressive_double.write_model(str(tmp_path / "double"), iterations=K, size=SIZE)
    ready, frames = tmp_path / "address", 40
    host = spawn(tmp_path / "host.log", "host", "--listen", "127.0.0.1:0", "--ready-file", ready, "--profile",
                 profile, "--out", tmp_path / "out", "--report", tmp_path / "host.json", "--max-streams", "1",
                 "--decode-delay", "0.01", "--quiet")
    procs.append(host)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert host.poll() is None and time.monotonic() < deadline, (tmp_path / "host.log").read_text()
        time.sleep(0.05)
    # Unpaced frames and a host that takes 10 ms a frame: the window fills, so the policy has work to do.
    edge = spawn(tmp_path / "edge.log", "edge", "--source", "synthetic://", "--connect", ready.read_text().strip(),
                 "--profile", profile, "--name", "cam", "--frames", frames, "--rate", "adaptive",
                 "--min-iterations", "2", "--drop", "block", "--report", tmp_path / "edge.json", "--quiet")
    procs.append(edge)
    assert edge.wait(60) == 0, (tmp_path / "edge.log").read_text()
    assert host.wait(60) == 0, (tmp_path / "host.log").read_text()

    edge_report = json.loads((tmp_path / "edge.json").read_text())
    host_report = json.loads((tmp_path / "host.json").read_text())
    assert edge_report["captured"] == frames and edge_report["outcomes"]["decoded"] == frames
    assert sum(edge_report["outcomes"].values()) == frames
    sent = {r["seq"]: r["iterations"] for r in edge_report["records"]}
    received = {r["seq"]: r["iterations"] for r in host_report["records"]}
    assert sent == received and sorted(sent) == list(range(frames))  # each frame's iterations, end to end
    assert all(2 <= k <= K for k in sent.values())
    assert sent[0] == K  # the first frame at the most (--max-iterations: the model's K)
    summary = edge_report["iterations"]
    assert summary["frames"] == frames and summary["min"] == min(sent.values())
    assert summary["max"] == max(sent.values())
    assert summary["mean"] == pytest.approx(sum(sent.values()) / float(frames), abs=1e-3)
    assert sum(v["frames"] for v in summary["by_iterations"].values()) == frames
    assert edge_report["rate"]["rate"] == "adaptive" and edge_report["rate"]["min_iterations"] == 2
    assert host_report["iterations"]["frames"] == frames and host_report["streams"]["cam"]["frames"] == frames
    # Bytes follow the iterations: the header, the metadata, and k * 3 * 8 * 8 bits.
    for record in edge_report["records"]:
        assert record["bytes"] > record["iterations"] * 3 * 8 * 8 // 8
    from latentlink.report_views import frame_rows, join_by_seq

    columns, rows = frame_rows(edge_report)
    assert "iterations" in columns and [row["iterations"] for row in rows] == [sent[r["seq"]] for r in rows]
    columns, rows, _ = join_by_seq(edge_report, host_report)
    assert "iterations" in columns and dict((row["seq"], row["iterations"]) for row in rows) == sent
    pngs = sorted(os.listdir(str(tmp_path / "out" / "cam")))
    assert len(pngs) == frames
    for name in pngs:
        image = cv2.imread(str(tmp_path / "out" / "cam" / name))
        assert image is not None and image.shape == (SIZE, SIZE, 3)


def test_a_frame_with_more_iterations_than_the_model_is_a_protocol_error_closing_its_connection(double_model, tmp_path):
    from latentlink.host.server import Host

    host = Host(open_double(double_model, "decoder"), out_dir=str(tmp_path / "out"), idle_timeout_s=5,
                frame_timeout_s=2)
    host.bind("127.0.0.1", 0)
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(host.address, timeout=5) as sock:
            sock.sendall(encode_message(KIND_HELLO, **hello()))
            sock.recv(4096)  # ACCEPT
            good = codes(2)
            sock.sendall(frame_payload("cam", 0, time.time(), good, "bits", pack_latents(good, "bits"),
                                       version=VERSION_2, iterations=2))
            bad = np.zeros((K + 1,) + CODE_SHAPE, np.uint8)  # valid on the wire (k <= 64), not for this model
            sock.sendall(frame_payload("cam", 1, time.time(), bad, "bits", pack_latents(bad, "bits"),
                                       version=VERSION_2, iterations=K + 1))
            try:
                while sock.recv(4096):  # the good frame's ACK, then the host closes this connection
                    pass
            except ConnectionResetError:  # closed with the bad frame's payload unread
                pass
        deadline = time.monotonic() + 10
        while host.snapshot()["protocol_errors"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        snap = host.snapshot()
        assert snap["frames"] == 1 and snap["streams"]["cam"]["failed"] == 1
    finally:
        host.stop()
        thread.join(10)


def test_the_python_api_sends_a_progressive_models_frames_at_a_fixed_rate(double_model, tmp_path):
    from latentlink.edge.api import Sender
    from latentlink.host.server import Host

    records = []
    host = Host(open_double(double_model, "decoder"), idle_timeout_s=5, frame_timeout_s=2, on_record=records.append)
    host.bind("127.0.0.1", 0)
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    try:
        image = np.full((48, 80, 3), 120, np.uint8)
        with Sender("{}:{}".format(*host.address), name="api", profile=double_model, drop="block", rate="fixed",
                    iterations=3) as sender:
            for _ in range(5):
                sender.send_image(image)
        assert sender.summary["outcomes"]["decoded"] == 5 and sender.summary["iterations"]["mean"] == 3.0
        with pytest.raises(ConfigError):
            Sender("{}:{}".format(*host.address), profile=double_model, rate="fixed", iterations=K + 1)
    finally:
        host.stop()
        thread.join(10)
    assert sorted(r["iterations"] for r in records) == [3] * 5


def test_a_real_progressive_model_end_to_end_through_the_host(tmp_path):
    """The zoo's progressive model (small, untrained, exported at 64x64): the edge's k codes, zstd-coded on the
    wire, decode on the host to exactly the image the codec gives for those k codes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from latentlink.edge.api import Sender
    from latentlink.edge.preprocess import Preprocessor, to_image
    from latentlink.edge.progressive import open_progressive
    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_progressive
    from latentlink.host.server import Host

    folder = tmp_path / "model"
    torch.manual_seed(0)
    model = build_model("progressive", iterations=3, channels=16, state_channels=8)
    save_checkpoint(str(tmp_path / "tiny.pt"), model)
    export_progressive(model, SIZE, SIZE, str(folder), checkpoint=str(tmp_path / "tiny.pt"), quiet=True)
    profile = tmp_path / "progressive.yaml"
    profile.write_text("name: tiny-progressive\nmodel:\n  encoder: model/encoder_step.onnx\n  decoder: "
                       "model/decoder_step.onnx\ninput:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n".format(SIZE))
    rng = np.random.RandomState(1)
    images = [cv2.GaussianBlur(rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8), (9, 9), 3) for _ in range(3)]
    from latentlink.edge.rate import open_model

    with open_model(str(tmp_path / "tiny.pt"), "decoder", input_size=(SIZE, SIZE)) as checkpoint:  # a .pt too
        assert isinstance(checkpoint, ProgressiveBackend) and checkpoint.input_shape == (3, 8, 8, 8)
    host = Host(open_model(str(folder / "decoder_step.onnx"), "decoder").load(), out_dir=str(tmp_path / "out"),
                idle_timeout_s=5, frame_timeout_s=5)
    host.bind("127.0.0.1", 0)
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    try:
        with Sender("{}:{}".format(*host.address), name="real", profile=str(profile), drop="block", entropy="zstd",
                    rate="fixed", iterations=2) as sender:
            for image in images:
                sender.send_image(image)
        assert sender.summary["outcomes"]["decoded"] == 3 and sender.summary["iterations"]["max"] == 2
    finally:
        host.stop()
        thread.join(10)
        host.decoder.close()
    with open_progressive(str(folder), "encoder") as codec:
        for seq, image in enumerate(images):
            codes, _ = codec.encode(Preprocessor(SIZE, SIZE)(image), 2)
            expected = to_image(codec.decode(codes)[0])
            got = cv2.imread(str(tmp_path / "out" / "real" / "{:06d}.png".format(seq)))
            assert np.array_equal(got, expected)
