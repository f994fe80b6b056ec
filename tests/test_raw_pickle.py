"""Plain sockets of length-prefixed pickles, the seed pipeline's format: the host's --accept-pickle-raw
(host/raw_pickle.py) and the edge's --serializer pickle-raw (a protocol-1 sender without end-of-stream)."""

import logging
import os
import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest

from latentlink.edge.backends import open_backend
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import FrameTimer, load_report
from latentlink.edge.protocol import encode_end_of_stream, encode_frame, raw_pickle_message
from latentlink.edge.sender import Sender
from latentlink.host.raw_pickle import stream_name

from .conftest import run_cli, running_host
from .test_host import Exploit, closed_by_peer, connect, latents, wait_until


@pytest.fixture(params=[True], ids=["accept-pickle-raw"])
def host(tiny_profile, tmp_path, request):
    with running_host(tiny_profile, tmp_path, accept_pickle_raw=request.param) as server:
        yield server


refusing_host = pytest.mark.parametrize("host", [False], ids=["default"], indirect=True)


def message(array, protocol=4):
    return raw_pickle_message(pickle.dumps(array, protocol=protocol))


def stream_of(sock):
    return stream_name(sock.getsockname())


@refusing_host
def test_raw_pickles_are_refused_by_default_with_a_log_line_that_says_what_to_do(host, caplog):
    sock = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(message(latents(0)))
        assert closed_by_peer(sock)
    wait_until(lambda: host.protocol_errors == 1)
    size = len(pickle.dumps(latents(0), protocol=4))
    assert ("bad frame: bad magic b'\\x00\\x00\\x00\\x00' (expected b'LLNK': is this a latentlink edge?); it reads as "
            "the 8-byte length of a %d-byte message, as a plain-socket client of the seed pipeline sends before each "
            "pickle: start the host with --accept-pickle-raw to accept those; closing this connection" % size
            in caplog.text)
    assert not host.streams and not os.path.exists(os.path.join(host.out_dir, stream_of(sock)))


@refusing_host
def test_junk_that_is_no_plausible_length_gets_no_pickle_hint(host, caplog):
    sock = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_by_peer(sock)
    wait_until(lambda: host.protocol_errors == 1)
    assert "bad magic b'GET '" in caplog.text and "accept-pickle-raw" not in caplog.text


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_accepted_dtype_layout_and_pickle_protocol_is_decoded(host, tmp_path, protocol):
    frames = [latents(0), latents(1).astype(np.float16), latents(2).astype(np.uint8),
              np.asfortranarray(latents(3)), latents(4).astype(">f4")]
    sock = connect(host)
    for z in frames:
        sock.sendall(message(z, protocol))
    sock.close()  # the end of a plain client's stream
    wait_until(lambda: host.streams and next(iter(host.streams.values())).ended)
    (stream, stats), = host.streams.items()
    assert stream.startswith("raw-127.0.0.1-")
    assert stats.frames == 5 and stats.gaps == 0 and stats.failed == 0 and host.protocol_errors == 0
    assert sorted(os.listdir(os.path.join(host.out_dir, stream))) == ["{:06d}.png".format(i) for i in range(5)]
    summary, records = host.summary(), host.test_records
    assert [r["seq"] for r in records] == list(range(5)) and "latency" not in summary
    assert [r["bytes"] for r in records] == [len(message(z, protocol)) for z in frames]
    assert all(r["latency_ms"] is None for r in records)


def test_the_decoded_image_is_the_decoders_of_those_latents(host, tiny_profile):
    import cv2

    from latentlink.edge.preprocess import to_image

    sock = connect(host)
    sock.sendall(message(latents(7)))
    stream = stream_of(sock)
    sock.close()
    wait_until(lambda: stream in host.streams and host.streams[stream].ended)
    with open_backend(load_profile(tiny_profile).model.decoder, "decoder") as decoder:
        expected = to_image(decoder.infer(latents(7))[0])
    assert np.array_equal(cv2.imread(os.path.join(host.out_dir, stream, "000000.png")), expected)


@pytest.mark.parametrize("payload, why", [
    (pickle.dumps(latents(0).astype(np.float64)), "as float32: pickle payload refused"),  # no accepted dtype
    (pickle.dumps(np.ones((1, 8, 8, 8), np.float32)), "does not match the metadata's [1, 8, 16, 16]"),
    (pickle.dumps(latents(0), protocol=1), "protocol"),
    (pickle.dumps({"latents": latents(0)}), "pickle payload refused"),
    (pickle.dumps(Exploit("/tmp/latentlink-raw-pwned"), protocol=3), "system is not allowed"),
    (b"\x80\x04" + bytes(100), "pickle payload refused"),
])
def test_a_refused_pickle_closes_only_its_connection(host, caplog, payload, why):
    good = connect(host)
    good.sendall(message(latents(0)))
    bad = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        bad.sendall(raw_pickle_message(payload))
        assert closed_by_peer(bad)
    wait_until(lambda: host.protocol_errors == 1)
    assert "a raw pickle that is not a float32, float16 or uint8 array of shape [1, 8, 16, 16]" in caplog.text
    assert why in caplog.text and "closing this connection" in caplog.text
    assert not os.path.exists("/tmp/latentlink-raw-pwned")
    good.sendall(message(latents(1)))
    good_stream = stream_of(good)
    good.close()
    wait_until(lambda: good_stream in host.streams and host.streams[good_stream].ended)
    assert host.streams[good_stream].frames == 2 and host.streams[stream_of(bad)].frames == 0


@pytest.mark.parametrize("length", [0, 64 << 20])
def test_a_bad_length_later_in_the_stream_closes_the_connection(host, caplog, length):
    sock = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(message(latents(0)) + struct.pack(">Q", length))
        assert closed_by_peer(sock)
    wait_until(lambda: host.protocol_errors == 1)
    expected = "raw pickle 1 of stream %r: length %d is not 1 to --max-frame-bytes" % (stream_of(sock), length)
    assert expected in caplog.text
    assert host.streams[stream_of(sock)].frames == 1 and not host.streams[stream_of(sock)].ended


def test_an_implausible_first_length_is_neither_latentlink_nor_a_pickle(host, caplog):
    sock = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert closed_by_peer(sock)
    wait_until(lambda: host.protocol_errors == 1)
    assert "neither a latentlink frame (magic b'GET '" in caplog.text and not host.streams


def test_a_close_in_the_middle_of_a_pickle_is_a_bad_frame_not_an_end(host, caplog):
    sock = connect(host)
    data = message(latents(0))
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(data + data[:100])
        stream = stream_of(sock)
        sock.close()
        wait_until(lambda: host.protocol_errors == 1)
    assert "connection closed after 92 of %d bytes of pickle" % (len(data) - 8) in caplog.text
    assert host.streams[stream].frames == 1 and not host.streams[stream].ended


def test_latentlink_edges_are_served_beside_plain_clients(host):
    raw = connect(host)
    raw.sendall(message(latents(0)))
    edge = connect(host)
    edge.sendall(encode_frame("cam0", 0, time.time(), latents(1), "bits") + encode_end_of_stream("cam0", 1))
    raw_stream = stream_of(raw)
    raw.close()
    wait_until(lambda: "cam0" in host.streams and host.streams["cam0"].ended and raw_stream in host.streams
               and host.streams[raw_stream].ended)
    assert host.streams["cam0"].frames == 1 and host.streams[raw_stream].frames == 1
    summary = host.summary()
    assert summary["latency"]["frames"] == 1  # the edge's frame has a capture time, the plain client's none


def test_a_named_raw_stream_is_live_on_one_connection_at_a_time(host, caplog):
    host.raw_stream_name = "seedcam"
    first = connect(host)
    first.sendall(message(latents(0)))
    wait_until(lambda: "seedcam" in host.streams and host.streams["seedcam"].frames == 1)
    second = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        second.sendall(message(latents(1)))
        assert closed_by_peer(second)
    assert "stream 'seedcam' is already connected from 127.0.0.1:" in caplog.text
    first.close()
    wait_until(lambda: host.streams["seedcam"].ended)
    third = connect(host)  # the name is free again: numbered from 0 once more
    third.sendall(message(latents(2)) + message(latents(3)))
    third.close()
    wait_until(lambda: host.streams["seedcam"].frames == 3 and host.streams["seedcam"].ended)
    assert sorted(os.listdir(os.path.join(host.out_dir, "seedcam"))) == ["000000.png", "000001.png"]
    assert host.streams["seedcam"].connections == 2


def test_stream_names_of_peers():
    assert stream_name(("127.0.0.1", 5760)) == "raw-127.0.0.1-5760"
    assert stream_name(("::ffff:10.0.0.2", 40000)) == "raw---ffff-10.0.0.2-40000"
    assert stream_name(("fe80::1%eth0", 1)) == "raw-fe80--1-eth0-1"


def test_host_options(tiny_profile):
    done = run_cli("latentlink.host", "--profile", tiny_profile, "--raw-stream-name", "cam")
    assert done.returncode == 2 and "--raw-stream-name names the frames of --accept-pickle-raw clients" in done.stderr
    done = run_cli("latentlink.host", "--accept-pickle-raw", "--raw-stream-name", "../etc")
    assert done.returncode == 2 and "bad stream name '../etc'" in done.stderr


# --- the edge's side ------------------------------------------------------------------------------------------------

def plain_receiver():
    """A listening socket and a thread that collects every byte of one connection; returns (address, result)."""
    server = socket.create_server(("127.0.0.1", 0))
    result = {}

    def run():
        conn, _ = server.accept()
        data = b""
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        result["data"] = data
        conn.close()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return server.getsockname()[:2], result


@pytest.mark.parametrize("end_of_stream", [False, True])
def test_a_protocol1_sender_without_end_of_stream_sends_the_frames_and_nothing_else(end_of_stream):
    address, result = plain_receiver()
    sender = Sender(address, "raw", protocol=1, drop="block", end_of_stream=end_of_stream)
    messages = [message(latents(seq), 3) for seq in range(3)]
    for seq, data in enumerate(messages):
        timer = FrameTimer(seq)
        timer.extra["t_capture"] = time.time()
        sender.submit(data, timer)
    sender.close()
    result["thread"].join(10)
    expected = b"".join(messages)
    if end_of_stream:  # the default: a protocol-1 host is told the stream ended
        assert result["data"] == expected + encode_end_of_stream("raw", 3)
    else:
        assert result["data"] == expected
    assert sender.counts["sent"] == 3 and sender.counts["lost"] == 0


@pytest.mark.parametrize("extra, error", [
    (["--entropy", "zlib"], "error: --serializer pickle-raw cannot be entropy-coded (entropy 'zlib')"),
    (["--delivery", "reliable"], "error: --serializer pickle-raw has no acknowledgements, which --delivery reliable"),
])
def test_the_edge_refuses_what_pickle_raw_cannot_do(tiny_profile, extra, error):
    done = run_cli("latentlink.edge", "--source", "synthetic://", "--profile", tiny_profile, "--serializer",
                   "pickle-raw", "--frames", "1", "--connect", "127.0.0.1:9", *extra)
    assert done.returncode == 2 and done.stderr.startswith(error), done.stderr


def test_an_edge_with_pickle_raw_streams_to_a_host_with_accept_pickle_raw(tmp_path, tiny_profile, video_file):
    from .test_end_to_end import assert_host_saved_what_the_model_decodes, start_host

    host, address = start_host(tmp_path, tiny_profile, "--accept-pickle-raw", "--raw-stream-name", "clip")
    edge = run_cli("latentlink.edge", "--source", "file://" + video_file, "--connect", address, "--profile",
                   tiny_profile, "--drop", "block", "--serializer", "pickle-raw")
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    assert host.returncode == 0 and "stream 'clip' ended" in host_out, host_out
    assert "frames: 24 captured = 0 decoded + 0 failed + 0 refused + 0 dropped + 0 lost + 24 sent" in edge.stdout
    assert_host_saved_what_the_model_decodes(tmp_path, "clip", video_file, tiny_profile)


def test_a_python36_edge_with_pickle_raw_streams_to_this_host(tmp_path, tiny_profile, video_file):
    """The Nano's interpreter: Python 3.6 + numpy 1.19 pickles (protocol 3, numpy.core names) to numpy 2 here."""
    import subprocess

    from .conftest import ROOT
    from .test_end_to_end import assert_host_saved_what_the_model_decodes, start_host
    from .test_report_views import python36

    py36 = python36()
    host, address = start_host(tmp_path, tiny_profile, "--accept-pickle-raw", "--raw-stream-name", "nano")
    edge = subprocess.run([py36, "-m", "latentlink.edge", "--source", "file://" + video_file, "--connect", address,
                           "--profile", tiny_profile, "--drop", "block", "--serializer", "pickle-raw", "--report",
                           str(tmp_path / "edge.json")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)
    host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = load_report(str(tmp_path / "edge.json"))
    assert report["outcomes"]["sent"] == 24 and report["serializer"] == "pickle-raw"
    host_report = load_report(str(tmp_path / "host.json"))
    assert host_report["frames"] == 24 and host_report["streams"]["nano"]["ended"]
    assert_host_saved_what_the_model_decodes(tmp_path, "nano", video_file, tiny_profile)
