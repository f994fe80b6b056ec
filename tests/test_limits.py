"""The host's limits: deadlines, connection slots, numbers from the network, and --out's symlinks.

Each finding of the review is a test; those that matter end to end run against a live host in another process
(its report read with a JSON parser that refuses NaN and Infinity, its peak RSS from /proc), and a legit edge must
deliver every frame while the attacks go on. The edge here is written by hand: it retries refusals a real edge would
give up on, and it can send what a real edge never would.
"""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from latentlink.edge.errors import ProtocolError
from latentlink.edge.protocol import (FIXED_HEADER, FLAG_END_OF_STREAM, KIND_ACCEPT, KIND_ACK, KIND_CLOCK, KIND_END,
                                      KIND_FRAME, KIND_HELLO, KIND_REFUSE, MAGIC, VERSION, VERSION_2,
                                      encode_end_of_stream, encode_frame, encode_message, frame_payload,
                                      pack_latents, read_body, read_header)
from latentlink.edge.sender import ClockOffset
from latentlink.host.out_dir import OutDir
from latentlink.host.server import MAX_SEQ_JUMP, Host, StreamStats

from .conftest import ROOT

pytest.importorskip("onnxruntime")

SHAPE = [1, 8, 16, 16]  # the tiny decoder's input (tests/conftest.py)
BIG = 2 ** 63 - 1


# --- helpers ---------------------------------------------------------------------------------------------------

def latent(seq):
    return (np.random.RandomState(seq).rand(*SHAPE) > 0.5).astype(np.float32)


def raw(version, byte, meta, payload=b""):
    """A message built by hand: ``meta`` a dict (sent as JSON, whatever its values) or bytes sent verbatim."""
    if isinstance(meta, dict):
        meta = json.dumps(meta, sort_keys=True).encode()
    return FIXED_HEADER.pack(MAGIC, version, byte, len(meta)) + meta + payload


def frame_meta(stream, seq, t_capture, packing="bits"):
    """The metadata of a frame of the tiny decoder's shape, with any seq and t_capture at all."""
    return {"stream": stream, "seq": seq, "t_capture": t_capture, "dtype": "float32", "shape": SHAPE,
            "packing": packing, "payload_len": len(pack_latents(latent(0), "bits"))}


def raw_frame(version, stream, seq, t_capture):
    kind = KIND_FRAME if version == VERSION_2 else 0
    return raw(version, kind, frame_meta(stream, seq, t_capture), pack_latents(latent(seq % 100), "bits"))


def closed_by_peer(sock, timeout_s=30):
    """Read until the host closes the connection (EOF or reset); False if it is still open after ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def read_message(sock, timeout_s=30):
    sock.settimeout(timeout_s)
    version, kind, meta_len = read_header(sock, versions=(VERSION_2,))
    fields, _ = read_body(sock, version, kind, meta_len, deadline=time.monotonic() + timeout_s)
    return kind, fields


class Edge(object):
    """A protocol-2 edge by hand: HELLO (retried while refused for a reason in ``retry``), FRAMEs, CLOCK, END."""

    def __init__(self, address, stream, source="127.0.0.1"):
        self.address, self.stream, self.source = address, stream, source
        self.session = os.urandom(8).hex()
        self.sock = None
        self.refusals = []  # (reason, message) of each refused HELLO

    def hello(self):
        return encode_message(KIND_HELLO, versions=[2], stream=self.stream, session=self.session, model_id=None,
                              shape=SHAPE, dtype="float32", packing="bits", entropy="none", tiles=[1, 1],
                              delivery="live", window=8, unacked=[], t_send=time.time(), software="test")

    def connect(self, retry=("busy",), within_s=60):
        deadline = time.monotonic() + within_s
        while True:
            sock = socket.create_connection(self.address, timeout=30, source_address=(self.source, 0))
            try:
                sock.sendall(self.hello())
                kind, fields = read_message(sock)
            except (OSError, ProtocolError):
                kind, fields = None, {"reason": "closed", "message": "closed before answering"}
            if kind == KIND_ACCEPT:
                self.sock = sock
                return self
            sock.close()
            self.refusals.append((fields["reason"], fields["message"]))
            assert fields["reason"] in retry, fields
            assert time.monotonic() < deadline, "not accepted within %d s: %s" % (within_s, self.refusals[-3:])
            time.sleep(0.1)

    def send(self, data):
        self.sock.sendall(data)

    def ack(self):
        kind, fields = read_message(self.sock)
        assert kind == KIND_ACK, kind
        return fields

    def frame(self, seq, t_capture=None):
        """Send frame ``seq`` and return its ACK's fields."""
        a = latent(seq % 100)
        t = time.time() if t_capture is None else t_capture
        self.send(frame_payload(self.stream, seq, t, a, "bits", pack_latents(a, "bits"), version=VERSION_2))
        return self.ack()

    def end(self, seq):
        self.send(encode_message(KIND_END, stream=self.stream, seq=seq))
        return self.ack()

    def close(self):
        if self.sock is not None:
            self.sock.close()


def start_host(tmp_path, profile, *args):
    """A host process on a free port, logging to tmp_path/host.log; returns (process, (host, port))."""
    ready = tmp_path / "host.address"
    log = open(str(tmp_path / "host.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file",
                             str(ready), "--profile", profile, "--report", str(tmp_path / "host.json")] + list(args),
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (tmp_path / "host.log").read_text()
        assert time.monotonic() < deadline, "host did not start"
        time.sleep(0.05)
    name, port = ready.read_text().strip().rsplit(":", 1)
    return proc, (name, int(port))


def finish_host(proc, tmp_path, timeout_s=60, code=0):
    """Wait for the host to exit (its --max-streams reached) with exit code ``code`` (1: frames failed); returns
    (report, log). The report must be strict JSON."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "host.log").read_text()
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return strict_json((tmp_path / "host.json").read_text()), out


def strict_json(text):
    def refuse(name):
        raise ValueError("%s in the report: not JSON" % name)

    report = json.loads(text, parse_constant=refuse)
    check_numbers(report)
    return report


def check_numbers(value, where="report"):
    """Every number in a report is finite, and every integer exact in any JSON reader (below 2**53)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_numbers(item, where + "." + key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_numbers(item, "%s[%d]" % (where, i))
    elif isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, int) and not isinstance(value, bool):
        assert abs(value) < 2 ** 53, (where, value)


def vm_hwm_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


class Trickler(object):
    """Sends ``burst`` at once, then ``data`` one byte every ``every_s`` seconds, from a thread, until the host closes
    the connection."""

    def __init__(self, address, data, every_s=0.25, burst=b""):
        self.sock = socket.create_connection(address, timeout=30)
        self.data, self.every_s, self.burst = data, every_s, burst
        self.sent = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.sock.sendall(self.burst)
            for i in range(len(self.data)):
                self.sock.sendall(self.data[i:i + 1])
                self.sent += 1
                time.sleep(self.every_s)
            closed_by_peer(self.sock)
        except OSError:
            pass
        self.closed.set()

    def close(self):
        self.sock.close()


# --- deadlines and connection slots, against a live host ---------------------------------------------------------

def test_trickled_headers_are_cut_off_and_free_their_slots_for_a_legit_edge(tmp_path, tiny_profile):
    # The finding: a header byte every 8 s restarted the idle timer, so 31 tricklers held every slot for minutes
    # (the deadline began after the 8-byte header). Here both slots go to tricklers, a byte a second: one trickles
    # its HELLO, one sends a frame of stream "cam" (taking the name) and then trickles the next header. Both must be
    # cut off within the header (2 s from its first byte), not after it.
    host, address = start_host(tmp_path, tiny_profile, "--max-connections", "2", "--frame-timeout", "2",
                               "--handshake-timeout", "3", "--idle-timeout", "60", "--max-streams", "1",
                               "--out", str(tmp_path / "frames"))
    tricklers = legit = None
    try:
        tricklers = [Trickler(address, Edge(address, "slow").hello(), every_s=1.0),
                     Trickler(address, encode_frame("cam", 1, time.time(), latent(1), "bits"), every_s=1.0,
                              burst=encode_frame("cam", 0, time.time(), latent(0), "bits"))]
        # The legit edge connects after both (the listen queue is first come, first served), is refused as busy
        # until a trickler is cut off, and takes the name "cam" once the squatter is gone.
        legit = Edge(address, "cam").connect(retry=("busy", "name_in_use"), within_s=60)
        for seq in range(10, 16):
            assert legit.frame(seq)["outcome"] == "decoded"
        assert legit.end(16)["outcome"] == "end"
        for t in tricklers:
            assert t.closed.wait(30), "the host did not close a trickler"
        report, out = finish_host(host, tmp_path)
    finally:
        for t in tricklers or []:
            t.close()
        if legit is not None:
            legit.close()
        if host.poll() is None:
            host.kill()
    assert any(reason == "busy" for reason, _ in legit.refusals), legit.refusals  # the slots were all taken
    assert "the host serves 2 connections already (--max-connections)" in out
    assert out.count("not complete in time") == 2, out[-3000:]  # both cut off mid-message, not when idle
    assert out.count("of 8 bytes of its frame header arrived") == 2, out[-3000:]  # ... and within the header
    assert report["protocol_errors"] == 2 and report["refused_connections"] >= 1
    assert all(t.sent < len(t.data) for t in tricklers)  # neither got its message through
    assert report["streams"]["cam"]["frames"] == 1 + 6 and report["streams"]["cam"]["ended"]
    assert sorted(os.listdir(str(tmp_path / "frames" / "cam"))) == ["%06d.png" % s for s in [0] + list(range(10, 16))]


def test_the_per_peer_limit_refuses_the_extra_connection_and_frees_slots_at_once(tmp_path, tiny_profile):
    host, address = start_host(tmp_path, tiny_profile, "--max-connections-per-peer", "2", "--handshake-timeout",
                               "60", "--max-streams", "2")
    held, edges = [], []
    try:
        held = [socket.create_connection(address, timeout=30) for _ in range(2)]  # silent: they just hold slots
        extra = socket.create_connection(address, timeout=30)
        kind, fields = read_message(extra)
        assert kind == KIND_REFUSE and fields["reason"] == "busy" and not fields["permanent"]
        assert fields["message"] == ("the host serves 2 connections from 127.0.0.1 already "
                                     "(--max-connections-per-peer); retrying")
        assert closed_by_peer(extra)
        # Another address is not this one's limit: an edge from 127.0.0.2 gets in and streams.
        other = Edge(address, "other", source="127.0.0.2").connect(retry=())
        edges.append(other)
        assert [other.frame(seq)["outcome"] for seq in range(3)] == ["decoded"] * 3
        # A slot is given back as soon as its connection ends (the host sees the close), not at a timeout (60 s
        # here): the next edge from 127.0.0.1 gets in well before that.
        held.pop().close()
        mine = Edge(address, "mine").connect(retry=("busy",), within_s=30)
        edges.append(mine)
        assert mine.frame(0)["outcome"] == "decoded"
        assert other.end(3)["outcome"] == "end" and mine.end(1)["outcome"] == "end"
        report, out = finish_host(host, tmp_path)
    finally:
        for sock in held:
            sock.close()
        for edge in edges:
            edge.close()
        if host.poll() is None:
            host.kill()
    assert report["refused_connections"] == 1 + len(mine.refusals)
    assert report["streams"]["other"]["frames"] == 3 and report["streams"]["mine"]["frames"] == 1


def test_a_silent_connection_is_closed_at_the_handshake_deadline(tmp_path, tiny_profile):
    host, address = start_host(tmp_path, tiny_profile, "--handshake-timeout", "1", "--idle-timeout", "60",
                               "--max-streams", "1")
    edge = None
    try:
        silent = socket.create_connection(address, timeout=30)
        assert closed_by_peer(silent, timeout_s=30)  # 1 s, not the 60 s idle timeout
        edge = Edge(address, "cam").connect(retry=())
        assert edge.frame(0)["outcome"] == "decoded" and edge.end(1)["outcome"] == "end"
        report, out = finish_host(host, tmp_path)
    finally:
        if edge is not None:
            edge.close()
        if host.poll() is None:
            host.kill()
    assert report["timeouts"] == 1 and report["protocol_errors"] == 0
    assert "said nothing within 1 s of connecting; closing the connection (--handshake-timeout)" in out


# --- numbers from the network, and a host that survives everything, against a live host -------------------------

def test_absurd_numbers_never_reach_the_report_and_a_legit_edge_delivers_every_frame(tmp_path, tiny_profile):
    # Streams that end (and so count towards --max-streams): p1-jump, p2-jump, untimed, legit (last).
    host, address = start_host(tmp_path, tiny_profile, "--max-streams", "4", "--out", str(tmp_path / "frames"))
    legit = None
    hwm = None
    expected_errors = 0
    try:
        legit = Edge(address, "legit").connect(retry=())
        n = 0

        def legit_frame():
            nonlocal n
            assert legit.frame(n)["outcome"] == "decoded"
            n += 1

        def refused(data):
            """``data`` on a new connection: the host closes it as a bad frame."""
            nonlocal expected_errors
            legit_frame()
            sock = socket.create_connection(address, timeout=30)
            try:
                try:
                    sock.sendall(data)
                except OSError:
                    pass
                assert closed_by_peer(sock)
            finally:
                sock.close()
            expected_errors += 1

        # Protocol 1: the review's end-of-stream of seq 2**63 - 1; seq 2**53 (beyond JSON's exact integers); NaN,
        # Infinity and 1e400 (which Python's json reads as inf) as t_capture; an END below a frame already seen.
        refused(raw_frame(VERSION, "p1-big", 0, 1e308) + raw(VERSION, FLAG_END_OF_STREAM, dict(
            frame_meta("p1-big", BIG, 0.0), packing="none", payload_len=0, shape=[1])))
        refused(raw_frame(VERSION, "p1-2-53", 2 ** 53, 0.0))
        for constant in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
            meta = json.dumps(frame_meta("p1-nan", 0, 0.0)).encode().replace(b'"t_capture": 0.0', b'"t_capture": '
                                                                             + constant)
            assert constant in meta
            refused(raw(VERSION, 0, meta, pack_latents(latent(0), "bits")))
        refused(b"".join(raw_frame(VERSION, "p1-back", seq, time.time()) for seq in range(3))
                + encode_end_of_stream("p1-back", 2))
        # Protocol 1 that ends: a jump of 2**53 - 2 sequence numbers is not counted as frames never received.
        sock = socket.create_connection(address, timeout=30)
        sock.sendall(raw_frame(VERSION, "p1-jump", 0, -1e308) + encode_end_of_stream("p1-jump", 2 ** 53 - 1))
        assert closed_by_peer(sock)  # the host closes after an end-of-stream
        sock.close()
        legit_frame()

        # Protocol 2: END of seq 2**63 - 1, CLOCK offsets beyond any clock, END below a frame already seen.
        for bad in [raw(VERSION_2, KIND_END, {"stream": "p2-big", "seq": BIG}),
                    raw(VERSION_2, KIND_CLOCK, {"offset_s": 1e308, "error_s": 0.0}),
                    raw(VERSION_2, KIND_CLOCK, {"offset_s": -1e308, "error_s": 1e308}),
                    raw(VERSION_2, KIND_CLOCK, b'{"error_s":0.0,"offset_s":NaN}')]:
            edge = Edge(address, "p2-big").connect(retry=())
            try:
                assert edge.frame(0, t_capture=1e308)["outcome"] == "decoded"  # decoded, without a latency
                edge.send(bad)
                assert closed_by_peer(edge.sock)
            finally:
                edge.close()
            expected_errors += 1
            legit_frame()
        edge = Edge(address, "p2-back").connect(retry=())
        try:
            assert edge.frame(0)["outcome"] == "decoded" and edge.frame(1)["outcome"] == "decoded"
            edge.send(encode_message(KIND_END, stream="p2-back", seq=1))
            assert closed_by_peer(edge.sock)
        finally:
            edge.close()
        expected_errors += 1
        # Protocol 2 that ends: a frame far ahead, then END (the jump is logged and counted as one jump).
        edge = Edge(address, "p2-jump").connect(retry=())
        try:
            assert edge.frame(0)["outcome"] == "decoded" and edge.frame(2 ** 53 - 2)["outcome"] == "decoded"
            assert edge.end(2 ** 53 - 1)["outcome"] == "end"
        finally:
            edge.close()
        # Times that are no latency: the clock offset as large as CLOCK allows, then capture times from the far
        # past, the far future and 1970: each frame decoded, none with a latency.
        edge = Edge(address, "untimed").connect(retry=())
        try:
            edge.send(encode_message(KIND_CLOCK, offset_s=1e10, error_s=0.0))
            for seq, t_capture in enumerate([1e308, -1e308, 0.0, time.time()]):
                assert edge.frame(seq, t_capture=t_capture)["outcome"] == "decoded"
            assert edge.end(4)["outcome"] == "end"
        finally:
            edge.close()
        for _ in range(3):
            legit_frame()
        assert len(os.listdir(str(tmp_path / "frames" / "legit"))) == n  # an ACK follows the write
        hwm = vm_hwm_mib(host.pid)
        assert legit.end(n)["outcome"] == "end"
        report, out = finish_host(host, tmp_path)
    finally:
        if legit is not None:
            legit.close()
        if host.poll() is None:
            host.kill()
    streams = report["streams"]
    assert streams["legit"]["frames"] == n and streams["legit"]["ended"] and streams["legit"]["gaps"] == 0
    assert sorted(os.listdir(str(tmp_path / "frames" / "legit"))) == ["%06d.png" % i for i in range(n)]
    assert report["protocol_errors"] == expected_errors
    # No absurd counts: the jumps are counted as jumps, nothing else was ever skipped.
    assert report["dropped"] == 0 and report["failed"] == 0
    assert (streams["p1-jump"]["gaps"], streams["p1-jump"]["seq_jumps"], streams["p1-jump"]["ended"]) == (0, 1, True)
    assert (streams["p2-jump"]["gaps"], streams["p2-jump"]["seq_jumps"], streams["p2-jump"]["ended"]) == (0, 1, True)
    assert streams["p2-jump"]["last_seq"] == 2 ** 53 - 2
    assert "p1-big" in streams and not streams["p1-big"]["ended"] and "p2-big" in streams
    # Latencies: the frames captured now (on loopback, well under a minute); the others decoded without one.
    timed = ["legit"] * n + ["p1-back"] * 3 + ["p2-back"] * 2 + ["p2-jump"] * 2
    assert sorted(r["stream"] for r in report["records"] if r["latency_ms"] is not None) == sorted(timed)
    assert report["latency"]["frames"] == len(timed) and 0 <= report["latency"]["max_ms"] < 60000
    assert streams["untimed"]["frames"] == 4 and streams["untimed"]["untimed"] == 4
    assert streams["p1-jump"]["untimed"] == 1 and streams["p2-big"]["untimed"] == 4
    assert out.count("no latency is recorded for such frames") == 4  # one line per stream, not one per frame
    assert "counted as a jump, not as frames never received" in out
    for message in ["bad seq 9223372036854775807 (expected an integer 0 <= seq < 2**53)",
                    "bad seq 9007199254740992", "NaN is not valid JSON", "Infinity is not valid JSON",
                    "bad t_capture inf (must be finite)",
                    "end-of-stream says 2 frames were sent (numbered 0 to 1), but frame 2 arrived on this connection",
                    "seq 9223372036854775807 is not an integer from 0 to 9007199254740991",
                    "CLOCK offset_s 1e+308 is out of range", "offset_s -1e+308 is out of range",
                    "END says 1 frames were sent (numbered 0 to 0), but this session's frame 1 arrived"]:
        assert message in out, message
    # Peak RSS of this host, every attack included: about 80 MiB on x86-64 (see tests/test_safe_pickle.py).
    print("host peak RSS (VmHWM): %.1f MiB" % hwm)
    assert hwm is not None and hwm < 400, hwm


# --- --out refuses symlinks planted inside it, against a live host ---------------------------------------------

def test_symlinks_planted_in_out_are_refused_and_nothing_is_written_outside(tmp_path, tiny_profile):
    real, outside = tmp_path / "real", tmp_path / "outside"
    for folder in (real, outside, outside / "journal", real / "cam"):
        folder.mkdir()
    victim = outside / "victim.png"
    victim.write_bytes(b"not a PNG: must stay as it is")
    os.symlink(str(real), str(tmp_path / "out-link"))  # --out may be the operator's own symlink
    os.symlink(str(outside), str(real / "evil"))  # a stream folder that points outside
    os.symlink(str(victim), str(real / "cam" / "000001.png"))  # a PNG that points at an existing file
    os.symlink(str(outside / "new.png"), str(real / "cam" / "000002.png"))  # ... and at one that does not exist
    os.symlink(str(outside / "journal"), str(real / ".latentlink"))  # the dedup journal's folder
    before = sorted(os.listdir(str(outside))), sorted(os.listdir(str(outside / "journal")))
    host, address = start_host(tmp_path, tiny_profile, "--out", str(tmp_path / "out-link"), "--max-streams", "4")
    edges = []
    try:
        evil = Edge(address, "evil").connect(retry=())
        edges.append(evil)
        acks = [evil.frame(seq) for seq in range(2)]
        assert [a["outcome"] for a in acks] == ["failed", "failed"]
        assert acks[0]["reason"] == "write error on the host (its log names the output and why)"
        assert evil.end(2)["outcome"] == "end" and closed_by_peer(evil.sock)  # and the name is free again
        cam = Edge(address, "cam").connect(retry=())
        edges.append(cam)
        assert [cam.frame(seq)["outcome"] for seq in range(4)] == ["decoded", "failed", "failed", "decoded"]
        assert cam.end(4)["outcome"] == "end"
        # A protocol-1 edge too, and a legit stream on another connection that delivers every frame.
        sock = socket.create_connection(address, timeout=30)
        sock.sendall(encode_frame("evil", 5, time.time(), latent(5), "bits"))
        legit = Edge(address, "legit").connect(retry=())
        edges.append(legit)
        assert [legit.frame(seq)["outcome"] for seq in range(3)] == ["decoded"] * 3
        sock.sendall(encode_end_of_stream("evil", 6))
        assert closed_by_peer(sock)
        sock.close()
        assert legit.end(3)["outcome"] == "end"
        report, out = finish_host(host, tmp_path, code=1)  # frames failed to write: exit code 1
    finally:
        for edge in edges:
            edge.close()
        if host.poll() is None:
            host.kill()
    assert (sorted(os.listdir(str(outside))), sorted(os.listdir(str(outside / "journal")))) == before
    assert victim.read_bytes() == b"not a PNG: must stay as it is"
    assert all(os.path.islink(str(p)) for p in (real / "evil", real / "cam" / "000001.png",
                                                real / "cam" / "000002.png", real / ".latentlink"))
    assert sorted(os.listdir(str(real / "cam"))) == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert sorted(os.listdir(str(real / "legit"))) == ["000000.png", "000001.png", "000002.png"]
    assert report["write_errors"] == 2 + 2 + 1 and report["failed"] == 5
    assert report["streams"]["evil"]["failed"] == 3 and report["streams"]["cam"]["frames"] == 2
    assert report["streams"]["legit"]["frames"] == 3
    real = os.path.realpath(str(real))  # as the host resolved --out
    assert "%s is a symlink; refusing to follow it" % os.path.join(real, "evil") in out
    assert "%s is a symlink; refusing to follow it" % os.path.join(real, "cam", "000001.png") in out
    assert "cannot append to %s" % os.path.join(real, ".latentlink", "cam.delivered") in out
    assert "cannot read %s" % os.path.join(real, ".latentlink", "cam.delivered") in out


# --- the pieces, in one process ----------------------------------------------------------------------------------

def test_a_gap_beyond_the_bound_is_a_jump_not_frames_never_received():
    stats = StreamStats("cam")
    stats.account(0)
    stats.account(MAX_SEQ_JUMP + 1)  # exactly MAX_SEQ_JUMP skipped: an edge could have dropped that many
    stats.account(MAX_SEQ_JUMP + 2 + MAX_SEQ_JUMP + 1)  # one more: a jump
    assert (stats.gaps, stats.seq_jumps) == (MAX_SEQ_JUMP, 1)
    stats.add_gaps(-5, "nothing")
    assert (stats.gaps, stats.seq_jumps) == (MAX_SEQ_JUMP, 1)


def test_the_edge_ignores_clock_exchanges_that_are_no_clock():
    clock = ClockOffset()
    assert clock.add(100.0, 1e308, -1e308, 100.1) is False  # an infinite round trip
    assert clock.add(100.0, 1e308, 1e308, 100.1) is False  # an infinite offset
    assert clock.add(100.0, 5e10, 5e10, 100.1) is False  # finite, but beyond MAX_CLOCK_OFFSET_S
    assert clock.error_s is None and clock.offset_s == 0.0
    assert clock.add(100.0, 1800000100.0, 1800000100.0, 100.1) is True  # a Jetson clock 57 years behind
    assert round(clock.offset_s) == 1800000000


def test_a_peer_that_does_not_read_is_cut_off_when_sending():
    host = Host(None, frame_timeout_s=0.3)
    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setblocking(False)
        try:
            while True:
                ours.send(b"x" * 4096)  # fill both buffers: the peer never reads
        except BlockingIOError:
            pass
        with pytest.raises(ProtocolError, match=r"does not read the host's messages \(none taken for 0.3 s\)"):
            host._send(ours, b"y" * 65536)
    finally:
        ours.close()
        theirs.close()


def test_out_dir_refuses_every_planted_non_file(tmp_path):
    os.mkfifo(str(tmp_path / "fifo"))
    (tmp_path / "out").mkdir()
    out = OutDir(str(tmp_path / "out"))
    (tmp_path / "out" / "cam").mkdir()
    os.mkfifo(str(tmp_path / "out" / "cam" / "fifo.png"))
    (tmp_path / "out" / "cam" / "dir.png").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    os.symlink(str(tmp_path / "fifo"), str(tmp_path / "out" / "cam" / "journal"))
    for action, message in [(lambda: out.write("cam", "fifo.png", b"x"), "is not a regular file"),
                            (lambda: out.write("cam", "dir.png", b"x"), "is not a regular file"),
                            (lambda: out.write("file", "a.png", b"x"), "is not a folder"),
                            (lambda: out.append("cam", "fifo.png", "x"), "is not a regular file"),  # not blocked
                            (lambda: out.append("cam", "journal", "x"), "is a symlink"),
                            (lambda: out.open_text("cam", "fifo.png"), "is not a regular file"),
                            (lambda: out.open_text("cam", "journal"), "is a symlink")]:
        with pytest.raises(OSError, match=message):
            action()
    assert out.open_text("cam", "missing") is None and out.open_text("missing", "x") is None
    out.write("cam", "a.png", b"1")
    out.write("cam", "a.png", b"22")  # a regular file is replaced whole
    out.append("cam", "j", "a\n")
    out.append("cam", "j", "b\n")
    with out.open_text("cam", "j") as f:
        assert f.read() == "a\nb\n"
    assert (tmp_path / "out" / "cam" / "a.png").read_bytes() == b"22"
    assert sorted(os.listdir(str(tmp_path / "out" / "cam"))) == ["a.png", "dir.png", "fifo.png", "j", "journal"]
