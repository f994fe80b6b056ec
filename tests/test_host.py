"""The host against good, bad and malicious peers, in one process: every bad peer loses only its connection."""

import logging
import os
import pickle
import socket
import threading
import time

import numpy as np
import pytest

from latentlink.edge.backends import open_backend
from latentlink.edge.profile import load_profile
from latentlink.edge.protocol import (FIXED_HEADER, KIND_REFUSE, MAGIC, VERSION, VERSION_2, encode_end_of_stream,
                                      encode_frame, read_body, read_header)
from latentlink.host.server import Host

from .conftest import running_host


@pytest.fixture(params=[False], ids=["default"])
def host(tiny_profile, tmp_path, request):
    with running_host(tiny_profile, tmp_path, accept_pickle=request.param) as server:
        yield server


def latents(seed):
    return (np.random.default_rng(seed).random((1, 8, 16, 16)) > 0.5).astype(np.float32)


def connect(server):
    return socket.create_connection(server.address, timeout=5)


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def closed_by_peer(sock):
    """True when the host has closed this connection (recv gives EOF or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Exploit(object):
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


pickle_host = pytest.mark.parametrize("host", [True], ids=["accept-pickle"], indirect=True)


def test_pickle_frames_are_refused_by_default(host, caplog):
    sock = connect(host)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        sock.sendall(encode_frame("legacy", 0, time.time(), latents(0), "pickle"))
        assert closed_by_peer(sock)
    wait_until(lambda: host.protocol_errors == 1)
    assert "pickle frames are refused by this host (start it with --accept-pickle" in caplog.text
    assert host.streams["legacy"].frames == 0


@pickle_host
def test_malicious_pickle_is_refused_while_another_edge_streams(host, tmp_path, caplog):
    marker = str(tmp_path / "pwned")
    good = connect(host)
    for seq in range(3):
        good.sendall(encode_frame("good", seq, time.time(), latents(seq), "bits"))
    evil = connect(host)
    payload = pickle.dumps(Exploit(marker), protocol=3)
    meta = ('{"dtype":"float32","packing":"pickle","payload_len":%d,"seq":0,"shape":[1,8,16,16],'
            '"stream":"evil","t_capture":0.0}' % len(payload)).encode()
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        evil.sendall(FIXED_HEADER.pack(MAGIC, VERSION, 0, len(meta)) + meta + payload)
        assert closed_by_peer(evil)
    for seq in range(3, 6):
        good.sendall(encode_frame("good", seq, time.time(), latents(seq), "bits"))
    good.sendall(encode_end_of_stream("good", 6))
    wait_until(lambda: host.streams.get("good") and host.streams["good"].ended)
    assert not os.path.exists(marker)
    assert host.streams["good"].frames == 6 and host.protocol_errors == 1
    assert "system is not allowed" in caplog.text and "closing this connection" in caplog.text
    assert sorted(os.listdir(str(tmp_path / "frames" / "good"))) == ["{:06d}.png".format(i) for i in range(6)]


@pickle_host
def test_pickled_arrays_from_the_seed_pipeline_are_accepted(host):
    sock = connect(host)
    sock.sendall(encode_frame("legacy", 0, time.time(), latents(0), "pickle"))
    sock.sendall(encode_end_of_stream("legacy", 1))
    wait_until(lambda: host.streams.get("legacy") and host.streams["legacy"].ended)
    assert host.streams["legacy"].frames == 1


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                # not latentlink at all
    FIXED_HEADER.pack(MAGIC, 99, 0, 2) + b"{}",          # unknown protocol version
    FIXED_HEADER.pack(MAGIC, VERSION, 0, 9) + b"not json!",  # metadata that is not JSON
    FIXED_HEADER.pack(MAGIC, VERSION, 0x80, 2) + b"{}",  # a reserved flag bit
])
def test_malformed_frames_close_only_their_connection(host, junk):
    bad = connect(host)
    bad.sendall(junk)
    assert closed_by_peer(bad)
    good = connect(host)
    good.sendall(encode_frame("after", 0, time.time(), latents(0), "bits") + encode_end_of_stream("after", 1))
    wait_until(lambda: host.streams.get("after") and host.streams["after"].ended)
    assert host.protocol_errors == 1


def test_entropy_coded_frames_decode_and_a_corrupt_one_closes_only_its_connection(host, caplog):
    frames = [encode_frame("coded", seq, time.time(), latents(seq), "bits", entropy="zlib") for seq in range(3)]
    good = connect(host)
    good.sendall(frames[0] + frames[1])
    bad = connect(host)
    frame = bytearray(encode_frame("broken", 0, time.time(), latents(0), "bits", entropy="zlib"))
    frame[-8:] = b"\xff" * 8  # the end of the zlib stream (and its checksum)
    with caplog.at_level(logging.ERROR, logger="latentlink.host"):
        bad.sendall(bytes(frame))
        assert closed_by_peer(bad)
    good.sendall(frames[2] + encode_end_of_stream("coded", 3))
    wait_until(lambda: host.streams.get("coded") and host.streams["coded"].ended)
    assert host.streams["coded"].frames == 3 and host.protocol_errors == 1
    assert "bad frame: zlib payload of" in caplog.text and "closing this connection" in caplog.text
    assert [r["bytes"] for r in host.test_records] == [len(f) for f in frames]  # the compressed frames
    assert host.summary()["bytes_per_frame"] == round(sum(len(f) for f in frames) / 3.0, 3)


def test_oversized_payload_is_refused_before_reading_it(host):
    meta = ('{"dtype":"float32","packing":"float32","payload_len":%d,"seq":0,"shape":[1,64,1024,4096],'
            '"stream":"big","t_capture":0.0}' % (4 * 64 * 1024 * 4096)).encode()
    sock = connect(host)
    sock.sendall(FIXED_HEADER.pack(MAGIC, VERSION, 0, len(meta)) + meta)  # and no payload at all
    assert closed_by_peer(sock)  # refused at once, not after a read timeout
    assert host.protocol_errors == 1


def test_wrong_latent_shape_counts_as_failed(host):
    sock = connect(host)
    sock.sendall(encode_frame("odd", 0, time.time(), np.ones((1, 8, 8, 8), np.float32), "bits"))
    assert closed_by_peer(sock)
    assert host.streams["odd"].failed == 1 and host.streams["odd"].frames == 0


def test_sequence_gaps_are_reported_apart_from_failures(host):
    sock = connect(host)
    for seq in (0, 1, 4, 5, 9):
        sock.sendall(encode_frame("gappy", seq, time.time(), latents(seq), "bits"))
    sock.sendall(encode_end_of_stream("gappy", 10))
    wait_until(lambda: host.streams.get("gappy") and host.streams["gappy"].ended)
    summary = host.summary()
    assert summary["streams"]["gappy"]["gaps"] == 5 and summary["streams"]["gappy"]["failed"] == 0
    assert summary["dropped"] == 5 and summary["frames"] == 5
    assert [r["seq"] for r in host.test_records] == [0, 1, 4, 5, 9]
    assert set(summary["stages"]) == {"receive", "deserialize", "decode", "write", "total"}


# --- findings of the security review, each one a test ----------------------------------------------------------
def test_a_peer_that_trickles_a_frame_is_cut_off_at_the_frame_deadline(tiny_profile):
    decoder = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load()
    server = Host(decoder, idle_timeout_s=30, frame_timeout_s=0.5)
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        frame = encode_frame("slow", 0, time.time(), latents(0), "bits")
        sock = connect(server)
        sent = 0
        for i in range(40):  # one byte every 0.1 s would take 4 s for 40 bytes; each recv alone is quick
            try:
                sock.sendall(frame[i:i + 1])
            except OSError:
                break
            sent += 1
            time.sleep(0.1)
        wait_until(lambda: server.protocol_errors == 1)
        assert sent < 40
    finally:
        server.stop()
        thread.join(10)
        decoder.close()


def test_wrong_shape_is_refused_from_the_metadata_before_any_payload(host):
    meta = ('{"dtype":"float32","packing":"float32","payload_len":%d,"seq":0,"shape":[1,8,256,256],'
            '"stream":"shape","t_capture":0.0}' % (4 * 8 * 256 * 256)).encode()
    sock = connect(host)
    sock.sendall(FIXED_HEADER.pack(MAGIC, VERSION, 0, len(meta)) + meta)  # 2 MiB announced, none sent
    assert closed_by_peer(sock)
    assert host.streams["shape"].failed == 1


def test_frames_missing_at_the_start_and_end_are_gaps(host):
    sock = connect(host)
    for seq in (3, 4):
        sock.sendall(encode_frame("ends", seq, time.time(), latents(seq), "bits"))
    sock.sendall(encode_end_of_stream("ends", 8))  # the edge captured 0..7
    wait_until(lambda: host.streams.get("ends") and host.streams["ends"].ended)
    assert host.streams["ends"].gaps == 3 + 3 and host.streams["ends"].frames == 2


def test_a_failed_frame_is_not_also_a_gap(host):
    first = connect(host)
    first.sendall(encode_frame("mixed", 0, time.time(), latents(0), "bits"))
    first.sendall(encode_frame("mixed", 1, time.time(), np.ones((1, 8, 8, 8), np.float32), "bits"))
    assert closed_by_peer(first)
    again = connect(host)
    again.sendall(encode_frame("mixed", 2, time.time(), latents(2), "bits") + encode_end_of_stream("mixed", 3))
    wait_until(lambda: host.streams["mixed"].ended)
    stats = host.streams["mixed"]
    assert (stats.frames, stats.failed, stats.gaps, stats.connections) == (2, 1, 0, 2)


def test_a_second_live_connection_with_the_same_stream_name_is_refused(host):
    first = connect(host)
    first.sendall(encode_frame("twin", 0, time.time(), latents(0), "bits"))
    wait_until(lambda: "twin" in host.streams)
    second = connect(host)
    second.sendall(encode_frame("twin", 0, time.time(), latents(0), "bits"))
    assert closed_by_peer(second)
    first.sendall(encode_frame("twin", 1, time.time(), latents(1), "bits") + encode_end_of_stream("twin", 2))
    wait_until(lambda: host.streams["twin"].ended)
    assert host.streams["twin"].frames == 2


def test_connections_beyond_the_limit_are_refused(tiny_profile):
    decoder = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load()
    server = Host(decoder, max_connections=2)
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        held = [connect(server), connect(server)]
        wait_until(lambda: sum(t.is_alive() for t in server._threads) == 2)
        extra = connect(server)
        version, kind, meta_len = read_header(extra, versions=(VERSION_2,))  # a protocol-2 REFUSE, then the close
        fields, _ = read_body(extra, version, kind, meta_len)
        assert kind == KIND_REFUSE and fields["reason"] == "busy" and not fields["permanent"]
        assert closed_by_peer(extra)
        for sock in held:
            sock.close()
    finally:
        server.stop()
        thread.join(10)
        decoder.close()


def test_listening_on_a_busy_port_is_a_clear_error(host, tiny_profile):
    from latentlink.edge.errors import ConfigError

    other = Host(host.decoder)
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:%d" % host.address[1]):
        other.bind("127.0.0.1", host.address[1])


def test_display_without_gui_support_is_a_clear_error(monkeypatch):
    import cv2

    from latentlink.edge.errors import ConfigError
    from latentlink.host.server import check_display

    def no_gui(name):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(cv2, "namedWindow", no_gui)
    with pytest.raises(ConfigError, match="opencv-python-headless"):
        check_display()


def test_stream_counts_are_bounded_and_forgotten_streams_still_add_up(host):
    """Bounded memory per stream name: past max_stream_stats, the oldest ended stream is folded into the totals."""
    host.max_stream_stats = 3
    for i in range(5):  # five edges, one after the other: stream i sends frames 0..i with frame 0 missing
        name = "cam{}".format(i)
        sock = connect(host)
        for seq in range(1, i + 2):
            sock.sendall(encode_frame(name, seq, time.time(), latents(seq), "bits"))
        sock.sendall(encode_end_of_stream(name, i + 2))
        wait_until(lambda: host.streams.get(name) and host.streams[name].ended)
        sock.close()
    assert list(host.streams) == ["cam2", "cam3", "cam4"]
    summary = host.summary()
    assert summary["frames"] == 1 + 2 + 3 + 4 + 5 and summary["dropped"] == 5  # every stream's missing frame 0
    assert list(summary["streams"]) == ["cam2", "cam3", "cam4"]
    assert summary["forgotten_streams"] == {"streams": 2, "frames": 1 + 2, "gaps": 2, "failed": 0, "duplicates": 0,
                                            "connections": 2, "sessions": 0, "seq_jumps": 0, "untimed": 0}
    assert sum(s["frames"] for s in summary["streams"].values()) + summary["forgotten_streams"]["frames"] == 15
    assert len(host.test_records) == 15
