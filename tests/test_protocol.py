"""Tests of the latentlink wire format (edge/protocol.py); they run on Python 3.6 + numpy 1.19 and 3.11 + numpy 2."""
import json
import os
import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from latentlink.edge.errors import ConfigError, ConnectionClosed, ProtocolError
from latentlink.edge.protocol import (
    DEFAULT_MAX_PAYLOAD_BYTES, DTYPES, FIXED_HEADER, FLAG_END_OF_STREAM, MAGIC, MAX_ELEMENTS, MAX_META_BYTES,
    KIND_CLOCK, KIND_END, MAX_AHEAD_S, MAX_CLOCK_OFFSET_S, MAX_LATENCY_S, MAX_SEQ, PACKINGS, VERSION,
    FrameMeta, decode_latents, encode_end_of_stream, encode_frame, encode_message, latency_ms, pack_latents,
    parse_fields, parse_fixed_header, parse_meta, payload_size, read_frame, recv_exactly, unpack_latents,
    wait_header)
from latentlink.edge.safe_pickle import loads_ndarray

# No example database: keeps the working tree clean; no deadline: the Jetson-era interpreter is slow.
# filter_too_much: Hypothesis itself discards float16 draws that the dtype cannot hold; a run that happens to draw many
# such is slow, not wrong (it failed CI once this way, at random)
FAST = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- helpers -------------------------------------------------------------------------------------------------


def read_from_bytes(data, **kwargs):
    """Feed ``data`` to read_frame through a real socketpair; the writer then closes its side (EOF)."""
    writer, reader = socket.socketpair()
    reader.settimeout(10)  # a bug that waits forever must fail, not hang the suite

    def write():
        try:
            writer.sendall(data)
            writer.shutdown(socket.SHUT_WR)
        except OSError:  # the reader may give up (and close) before everything was written
            pass

    thread = threading.Thread(target=write)
    thread.start()
    try:
        return read_frame(reader, **kwargs)
    finally:
        reader.close()
        thread.join()
        writer.close()


def raw_frame(meta, flags=0, payload=b"", magic=MAGIC, version=VERSION, meta_len=None):
    """A frame built by hand from the spec (``meta`` a dict, or bytes sent verbatim)."""
    if isinstance(meta, dict):
        meta = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return FIXED_HEADER.pack(magic, version, flags, len(meta) if meta_len is None else meta_len) + meta + payload


def good_meta(**changes):
    meta = {"stream": "cam0", "seq": 3, "t_capture": 1.5, "dtype": "float32", "shape": [2, 3],
            "packing": "float32", "payload_len": 24}
    meta.update(changes)
    return meta


def check_round_trip(a, out):
    assert isinstance(out, np.ndarray)
    assert out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == a.tobytes()  # bitwise: also -0.0 and NaN payloads
    assert out.flags.writeable


# --- golden bytes --------------------------------------------------------------------------------------------

def test_golden_bits_frame():
    # Metadata, sorted keys, no spaces: 116 = 0x74 bytes (counted by hand: 1+18+17+16+8+14+16+25+1).
    meta = (b'{"dtype":"float32","packing":"bits","payload_len":2,"seq":7,"shape":[1,9],'
            b'"stream":"cam0","t_capture":1700000000.25}')
    assert len(meta) == 0x74
    # Bits 1,0,1,1,0,0,0,1 -> 0b10110001 = 0xb1; the ninth bit 1, zero-padded -> 0b10000000 = 0x80.
    expected = b"LLNK" + b"\x01" + b"\x00" + b"\x00\x74" + meta + b"\xb1\x80"
    frame = encode_frame("cam0", 7, 1700000000.25, np.array([[1, 0, 1, 1, 0, 0, 0, 1, 1]], dtype=np.float32), "bits")
    assert frame == expected
    meta_out, payload = read_from_bytes(frame)
    assert meta_out == FrameMeta("cam0", 7, 1700000000.25, "float32", (1, 9), "bits", 2, 0, 0x74)
    assert decode_latents(meta_out, payload).tolist() == [[1, 0, 1, 1, 0, 0, 0, 1, 1]]


def test_golden_end_of_stream():
    meta = (b'{"dtype":"uint8","packing":"none","payload_len":0,"seq":8,"shape":[1],'
            b'"stream":"cam0","t_capture":0.0}')
    assert len(meta) == 0x66  # 1+17+17+16+8+12+16+15+1
    expected = b"LLNK" + b"\x01" + b"\x01" + b"\x00\x66" + meta
    assert encode_end_of_stream("cam0", 8) == expected
    meta_out, payload = read_from_bytes(expected)
    assert meta_out.flags & FLAG_END_OF_STREAM and meta_out.seq == 8 and payload == b""
    with pytest.raises(ProtocolError):
        decode_latents(meta_out, payload)


def test_1008_model_bits_latent_fits_in_64k():
    a = (np.random.RandomState(0).rand(8, 252, 252) > 0.5).astype(np.float32)
    assert payload_size("bits", a.shape) == 63504 == len(pack_latents(a, "bits"))
    frame = encode_frame("cam0", 1, 1.0, a, "bits")
    assert len(frame) <= 65536 + FIXED_HEADER.size + MAX_META_BYTES
    meta, payload = read_from_bytes(frame)
    check_round_trip(a, decode_latents(meta, payload))


def test_payload_size():
    assert payload_size("bits", (3, 3)) == 2
    assert payload_size("uint8", (3, 3)) == 9
    assert payload_size("float16", (3, 3)) == 18
    assert payload_size("float32", (3, 3)) == 36
    assert payload_size("pickle", (3, 3)) is None


# --- round trips ---------------------------------------------------------------------------------------------

def elements_for(packing, dtype):
    """Values that ``packing`` must carry exactly for an array of ``dtype``."""
    dt = np.dtype(dtype)
    if packing == "bits":
        values = st.integers(0, 1)
    elif dt.kind in "iu":
        lo, hi = int(np.iinfo(dt).min), int(np.iinfo(dt).max)
        bound = {"uint8": (0, 255), "float16": (-2048, 2048), "float32": (-2 ** 24, 2 ** 24)}.get(packing)
        if bound:  # integers the packing represents exactly
            lo, hi = max(lo, bound[0]), min(hi, bound[1])
        return st.integers(lo, hi)
    elif packing == "uint8":
        values = st.integers(0, 255)
    elif packing == "pickle":
        return st.floats(width=8 * dt.itemsize)  # NaN and infinities too: pickle is bitwise
    else:
        width = min(8 * dt.itemsize, 16 if packing == "float16" else 32)
        return st.floats(width=width, allow_nan=False, allow_infinity=False)
    return values.map(float) if dt.kind == "f" else values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing", PACKINGS)
def test_round_trip(packing, dtype):
    @settings(max_examples=12, **FAST)
    @given(a=arrays(dtype, array_shapes(min_dims=1, max_dims=4, max_side=6), elements=elements_for(packing, dtype)),
           seq=st.integers(0, 2 ** 53 - 1), t_capture=st.floats(allow_nan=False, allow_infinity=False))
    def run(a, seq, t_capture):
        # pure functions
        payload = pack_latents(a, packing)
        meta = FrameMeta("s", seq, t_capture, dtype, a.shape, packing, len(payload), 0)
        check_round_trip(a, unpack_latents(payload, meta))
        # the whole frame through a socket
        meta, payload = read_from_bytes(encode_frame("cam-0_x.y", seq, t_capture, a, packing))
        assert (meta.stream, meta.seq, meta.t_capture, meta.dtype, meta.shape, meta.packing, meta.flags) == (
            "cam-0_x.y", seq, t_capture, dtype, a.shape, packing, 0)
        check_round_trip(a, decode_latents(meta, payload))
    run()


def test_uint8_rounds_and_clips():
    a = np.array([-3.0, 0.4, 2.6, 254.5, 300.0, np.inf], dtype=np.float32)
    assert list(pack_latents(a, "uint8")) == [0, 0, 3, 254, 255, 255]  # rint: half to even
    assert list(pack_latents(np.array([-5, 7, 1000], dtype=np.int16), "uint8")) == [0, 7, 255]
    assert list(pack_latents(np.array([-128, 127], dtype=np.int8), "uint8")) == [0, 127]


@pytest.mark.parametrize("packing", ["float32", "float16", "pickle"])
def test_non_native_and_non_contiguous_arrays(packing):
    a = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran-ordered
    meta, payload = read_from_bytes(encode_frame("cam0", 0, 0, a, packing))
    out = decode_latents(meta, payload)
    assert out.dtype == np.float32 and np.array_equal(out, a)


def test_several_frames_then_clean_close():
    writer, reader = socket.socketpair()
    frames = [encode_frame("cam0", i, 1.0, np.full((2, 2), i, np.uint8), "uint8") for i in range(3)]
    writer.sendall(b"".join(frames) + encode_end_of_stream("cam0", 3))
    writer.close()
    try:
        for i in range(3):
            meta, payload = read_frame(reader)
            assert meta.seq == i and decode_latents(meta, payload).tolist() == [[i, i], [i, i]]
        meta, _ = read_frame(reader)
        assert meta.flags == FLAG_END_OF_STREAM
        with pytest.raises(ConnectionClosed):
            read_frame(reader)
    finally:
        reader.close()


# --- sending side --------------------------------------------------------------------------------------------

def test_sender_refuses_bad_arguments():
    a = np.zeros((2, 2), np.float32)
    with pytest.raises(ConfigError) as info:
        encode_frame("cam0", 0, 0.0, a, "bitz")
    assert str(info.value) == "unknown packing 'bitz' (available: bits, uint8, float16, float32, pickle)"
    with pytest.raises(ConfigError):
        pack_latents(a, "bitz")
    for stream in ["", "a/b", "../etc", "..", ".", "x" * 65, "cam 0", u"caméra", None, 5]:
        with pytest.raises(ConfigError) as info:
            encode_frame(stream, 0, 0.0, a, "bits")
        assert repr(stream) in str(info.value)
    with pytest.raises(ConfigError):
        encode_end_of_stream("a/b", 0)
    for seq, t in [(True, 0.0), (-1, 0.0), (2 ** 63, 0.0), (2 ** 53, 0.0), (1.0, 0.0), (0, float("nan")), (0, "now"), (0, True)]:
        with pytest.raises(ConfigError):
            encode_frame("cam0", seq, t, a, "bits")
    for bad in [np.zeros((2, 2), bool), np.zeros(3, np.uint32), np.float32(1.0), np.zeros((0, 3), np.float32),
                np.zeros((1,) * 7, np.float32), np.array(["a"])]:
        with pytest.raises(ConfigError):
            encode_frame("cam0", 0, 0.0, bad, "bits")
    # numpy scalars are fine as seq / t_capture
    assert encode_frame("cam0", np.int64(3), np.float64(2.5), a, "bits") == encode_frame("cam0", 3, 2.5, a, "bits")


# --- malformed frames ----------------------------------------------------------------------------------------

MALFORMED = [
    ("bad magic", raw_frame(good_meta(), magic=b"GET ", payload=bytes(24))),
    ("bad version", raw_frame(good_meta(), version=7, payload=bytes(24))),
    ("version 0", raw_frame(good_meta(), version=0, payload=bytes(24))),
    ("meta_len over 4096", raw_frame(good_meta(), meta_len=4097) + b" " * 5000),
    ("meta empty", raw_frame(b"")),
    ("meta not JSON", raw_frame(b"{not json")),
    ("meta not UTF-8", raw_frame(b'{"stream":"\xff\xfe"}')),
    ("meta JSON array", raw_frame(b"[1,2,3]")),
    ("meta JSON string", raw_frame(b'"hello"')),
    ("meta JSON null", raw_frame(b"null")),
    ("meta deeply nested", raw_frame(b"[" * 4000)),
    ("t_capture NaN", raw_frame(json.dumps(good_meta(t_capture=float("nan"))).encode(), payload=bytes(24))),
    ("t_capture Infinity", raw_frame(b'{"t_capture":Infinity}')),
    ("t_capture 1e999", raw_frame(json.dumps(good_meta()).replace("1.5", "1e999").encode(), payload=bytes(24))),
    ("t_capture huge int", raw_frame(good_meta(t_capture=10 ** 400), payload=bytes(24))),
    ("t_capture string", raw_frame(good_meta(t_capture="now"), payload=bytes(24))),
    ("t_capture bool", raw_frame(good_meta(t_capture=True), payload=bytes(24))),
    ("seq bool", raw_frame(good_meta(seq=True), payload=bytes(24))),
    ("seq negative", raw_frame(good_meta(seq=-1), payload=bytes(24))),
    ("seq 2**63", raw_frame(good_meta(seq=2 ** 63), payload=bytes(24))),
    ("seq 2**63 - 1", raw_frame(good_meta(seq=2 ** 63 - 1), payload=bytes(24))),
    ("seq 2**53", raw_frame(good_meta(seq=2 ** 53), payload=bytes(24))),
    ("seq float", raw_frame(good_meta(seq=3.0), payload=bytes(24))),
    ("seq string", raw_frame(good_meta(seq="3"), payload=bytes(24))),
    ("stream empty", raw_frame(good_meta(stream=""), payload=bytes(24))),
    ("stream traversal", raw_frame(good_meta(stream="../etc"), payload=bytes(24))),
    ("stream dot-dot", raw_frame(good_meta(stream=".."), payload=bytes(24))),
    ("stream too long", raw_frame(good_meta(stream="x" * 65), payload=bytes(24))),
    ("stream newline", raw_frame(good_meta(stream="cam0\n"), payload=bytes(24))),
    ("stream not str", raw_frame(good_meta(stream=["cam0"]), payload=bytes(24))),
    ("shape float entry", raw_frame(good_meta(shape=[2.0, 3]), payload=bytes(24))),
    ("shape bool entry", raw_frame(good_meta(shape=[True, 6], payload_len=24), payload=bytes(24))),
    ("shape negative", raw_frame(good_meta(shape=[-2, -3]), payload=bytes(24))),
    ("shape zero", raw_frame(good_meta(shape=[0, 3], payload_len=0))),
    ("shape empty", raw_frame(good_meta(shape=[], payload_len=4), payload=bytes(4))),
    ("shape 7 dims", raw_frame(good_meta(shape=[1] * 7, payload_len=4), payload=bytes(4))),
    ("shape dim > 2**20", raw_frame(good_meta(shape=[2 ** 20 + 1], payload_len=4 * (2 ** 20 + 1)))),
    ("shape too many elements", raw_frame(good_meta(shape=[2 ** 14, 2 ** 14], packing="bits", payload_len=2 ** 25))),
    ("shape not list", raw_frame(good_meta(shape=6, payload_len=24), payload=bytes(24))),
    ("shape dict", raw_frame(good_meta(shape={"a": 1}), payload=bytes(24))),
    ("unknown packing", raw_frame(good_meta(packing="bitz"), payload=bytes(24))),
    ("packing none without flag", raw_frame(good_meta(packing="none", payload_len=0))),
    ("packing list", raw_frame(good_meta(packing=["bits"]), payload=bytes(24))),
    ("unknown dtype", raw_frame(good_meta(dtype="complex64"), payload=bytes(24))),
    ("dtype object", raw_frame(good_meta(dtype="object"), payload=bytes(24))),
    ("dtype list", raw_frame(good_meta(dtype=["float32"]), payload=bytes(24))),
    ("payload_len mismatch", raw_frame(good_meta(payload_len=23), payload=bytes(23))),
    ("payload_len bits mismatch", raw_frame(good_meta(packing="bits", payload_len=2), payload=bytes(2))),
    ("payload_len negative", raw_frame(good_meta(payload_len=-24), payload=bytes(24))),
    ("payload_len bool", raw_frame(good_meta(shape=[1], packing="uint8", payload_len=True), payload=bytes(1))),
    ("payload_len string", raw_frame(good_meta(payload_len="24"), payload=bytes(24))),
    ("end of stream with packing", raw_frame(good_meta(), flags=FLAG_END_OF_STREAM, payload=bytes(24))),
    ("end of stream with payload", raw_frame(good_meta(packing="none", payload_len=1), flags=1, payload=b"x")),
    ("truncated header", raw_frame(good_meta())[:5]),
    ("truncated meta", raw_frame(good_meta())[:40]),
    ("truncated payload", raw_frame(good_meta(), payload=bytes(20))),
    ("pickle garbage", raw_frame(good_meta(packing="pickle", payload_len=6), payload=b"\x80\x03garb")),
    ("pickle empty", raw_frame(good_meta(packing="pickle", payload_len=0))),
] + [("reserved flag 0x%02x" % bit, raw_frame(good_meta(), flags=bit, payload=bytes(24)))
     for bit in (0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)] + [
    ("missing key %s" % key, raw_frame(dict((k, v) for k, v in good_meta().items() if k != key), payload=bytes(24)))
    for key in sorted(good_meta())]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[name for name, _ in MALFORMED])
def test_malformed_frame_is_protocol_error(data):
    with pytest.raises(ProtocolError):
        meta, payload = read_from_bytes(data)
        decode_latents(meta, payload)  # some frames are only invalid once decoded (pickle garbage)


def test_error_messages_quote_the_bad_value():
    def message(fn, *args):
        with pytest.raises(ProtocolError) as info:
            fn(*args)
        return str(info.value)

    assert message(parse_fixed_header, b"GET / HT") == (
        "bad magic b'GET ' (expected b'LLNK': is this a latentlink edge?)")
    assert message(parse_fixed_header, FIXED_HEADER.pack(MAGIC, 7, 0, 10)) == (
        "unsupported protocol version 7 (this host speaks 1)")
    assert "0x04" in message(parse_fixed_header, FIXED_HEADER.pack(MAGIC, 1, 0x05, 10))
    assert "4097" in message(parse_fixed_header, FIXED_HEADER.pack(MAGIC, 1, 0, 4097))
    assert message(parse_fixed_header, b"LLNK") == "fixed header is 4 bytes (expected 8)"
    meta = json.dumps(good_meta(packing="pickle", payload_len=99999999)).encode()
    assert message(parse_meta, meta, 0) == (
        "payload of 99999999 bytes exceeds the limit of 33554432 bytes (raise --max-frame-bytes if this is legitimate)")
    assert parse_meta(meta, 0, 10 ** 8).payload_len == 99999999  # the limit is the caller's
    assert "shape [0, 3] has a dimension of 0" in message(parse_meta, json.dumps(good_meta(shape=[0, 3])).encode(), 0)
    assert "'bitz'" in message(parse_meta, json.dumps(good_meta(packing="bitz")).encode(), 0)
    assert "'seq'" in message(parse_meta, json.dumps({"stream": "x"}).encode(), 0)
    assert "'../x'" in message(parse_meta, json.dumps(good_meta(stream="../x")).encode(), 0)
    assert parse_fixed_header(FIXED_HEADER.pack(MAGIC, 1, FLAG_END_OF_STREAM, 4096)) == (FLAG_END_OF_STREAM, 4096)


def test_extra_meta_keys_are_ignored():
    meta_bytes = json.dumps(good_meta(future="x", codec={"a": [1]})).encode()
    meta = parse_meta(meta_bytes, 0)
    assert meta == FrameMeta("cam0", 3, 1.5, "float32", (2, 3), "float32", 24, 0, len(meta_bytes))
    t_capture = parse_meta(json.dumps(good_meta(t_capture=2)).encode(), 0).t_capture
    assert isinstance(t_capture, float) and t_capture == 2.0


def test_largest_allowed_shape_is_accepted_without_reading_it():
    meta = parse_meta(json.dumps(good_meta(shape=[2 ** 20, 2 ** 7], packing="bits", payload_len=2 ** 24)).encode(), 0)
    assert meta.shape == (2 ** 20, 2 ** 7) and 2 ** 27 == MAX_ELEMENTS


def test_payload_over_limit_is_refused_before_reading_it():
    writer, reader = socket.socketpair()
    reader.settimeout(5)
    sentinel = b"NOT-READ-YET"
    try:
        writer.sendall(raw_frame(good_meta(packing="pickle", payload_len=DEFAULT_MAX_PAYLOAD_BYTES + 1)) + sentinel)
        with pytest.raises(ProtocolError) as info:
            read_frame(reader)
        assert "exceeds the limit of %d bytes" % DEFAULT_MAX_PAYLOAD_BYTES in str(info.value)
        # a smaller limit chosen by the caller applies too
        writer.sendall(raw_frame(good_meta()) + sentinel)
        assert recv_exactly(reader, len(sentinel)) == bytearray(sentinel)
        with pytest.raises(ProtocolError):
            read_frame(reader, max_payload_bytes=23)
        assert recv_exactly(reader, len(sentinel)) == bytearray(sentinel)
        # a payload_len that the shape and packing do not imply is refused before reading, too
        writer.sendall(raw_frame(good_meta(payload_len=1000)) + sentinel)
        with pytest.raises(ProtocolError) as info:
            read_frame(reader)
        assert "payload_len 1000 does not match shape [2, 3] with packing 'float32' (expected 24 bytes)" in str(
            info.value)
        assert recv_exactly(reader, len(sentinel)) == bytearray(sentinel)  # nothing past the metadata was read
    finally:
        writer.close()
        reader.close()


def test_truncated_frames():
    frame = encode_frame("cam0", 1, 2.0, np.arange(6, dtype=np.float32).reshape(2, 3), "float16")
    with pytest.raises(ConnectionClosed):
        read_from_bytes(b"")
    for cut in range(1, len(frame)):
        with pytest.raises(ProtocolError) as info:
            read_from_bytes(frame[:cut])
        assert "connection closed after" in str(info.value)
    assert read_from_bytes(frame)[0].seq == 1


def test_recv_exactly_messages_and_zero_length():
    writer, reader = socket.socketpair()
    try:
        assert recv_exactly(reader, 0) == bytearray()
        writer.sendall(b"abc")
        writer.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError) as info:
            recv_exactly(reader, 10, what="payload", at_boundary=True)
        assert str(info.value) == "connection closed after 3 of 10 bytes of payload"
        with pytest.raises(ProtocolError):  # not at a boundary: even a close before any byte is a truncation
            recv_exactly(reader, 4, what="metadata")
        with pytest.raises(ConnectionClosed):
            recv_exactly(reader, 4, at_boundary=True)
    finally:
        writer.close()
        reader.close()


class TrickleSocket(object):
    """A socket stand-in that hands out at most ``step`` bytes per recv, then raises ``end``."""

    def __init__(self, data, step, end=None):
        self.data, self.step, self.end = data, step, end

    def recv(self, nbytes):
        if not self.data and self.end is not None:
            raise self.end
        chunk, self.data = self.data[:min(self.step, nbytes)], self.data[min(self.step, nbytes):]
        return chunk

    def settimeout(self, seconds):
        pass


def test_short_reads_and_connection_resets():
    frame = encode_frame("cam0", 4, 1.0, np.arange(10, dtype=np.float32), "float16")
    meta, payload = read_frame(TrickleSocket(frame, 1))
    assert decode_latents(meta, payload).tolist() == list(range(10))
    with pytest.raises(ConnectionClosed):  # a reset between frames is a close
        read_frame(TrickleSocket(b"", 3, ConnectionResetError(104, "reset")))
    with pytest.raises(ProtocolError) as info:  # a reset midway is a truncated frame
        read_frame(TrickleSocket(frame[:-3], 7, ConnectionResetError(104, "reset")))
    assert "bytes of payload" in str(info.value)
    with pytest.raises(socket.timeout):
        read_frame(TrickleSocket(frame[:20], 5, socket.timeout("timed out")))


def test_on_header_and_timeouts():
    writer, reader = socket.socketpair()
    calls = []
    try:
        reader.settimeout(0.05)
        with pytest.raises(socket.timeout):  # idle: no byte yet, the callback must not have run
            read_frame(reader, on_header=lambda: calls.append(1))
        assert calls == []
        frame = encode_frame("cam0", 0, 0.0, np.zeros(4, np.float32), "float32")
        writer.sendall(frame[:FIXED_HEADER.size + 3])
        with pytest.raises(socket.timeout):  # a stall mid-frame is the caller's to judge, unchanged
            read_frame(reader, on_header=lambda: calls.append(1))
        assert calls == [1]
    finally:
        writer.close()
        reader.close()
    meta, _ = read_from_bytes(frame, on_header=lambda: calls.append(2))
    assert calls == [1, 2] and meta.shape == (4,)


# --- limits: deadlines and numbers ----------------------------------------------------------------------------

def trickle(sock, data, every_s):
    """Send ``data`` one byte every ``every_s`` seconds from a thread (stops quietly once the reader closes)."""
    def run():
        for i in range(len(data)):
            try:
                sock.sendall(data[i:i + 1])
            except OSError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_header_bounds_the_wait_for_the_first_byte_as_a_total():
    writer, reader = socket.socketpair()
    try:
        with pytest.raises(socket.timeout):  # the deadline has passed: no recv at all
            wait_header(reader, wait_until=time.monotonic() - 1)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            wait_header(reader, wait_until=started + 0.2, frame_timeout_s=5)
        assert time.monotonic() - started < 5  # the wait, not the frame timeout
        frame = encode_frame("cam0", 0, 0.0, np.zeros(4, np.float32), "float32")
        writer.sendall(frame)
        version, flags, meta_len, deadline = wait_header(reader, wait_until=time.monotonic() + 5, frame_timeout_s=3)
        assert (version, flags) == (VERSION, 0) and deadline - time.monotonic() <= 3
    finally:
        writer.close()
        reader.close()


def test_a_header_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline():
    # One byte every 0.1 s: each recv is quick, the whole 8-byte header takes 0.8 s, the deadline is 0.3 s after the
    # first byte.
    writer, reader = socket.socketpair()
    try:
        trickle(writer, encode_frame("cam0", 0, 0.0, np.zeros(4, np.float32), "float32"), 0.1)
        with pytest.raises(ProtocolError) as info:
            wait_header(reader, wait_until=time.monotonic() + 5, frame_timeout_s=0.3)
        assert "of its frame header arrived" in str(info.value) and "within the frame timeout" in str(info.value)
    finally:
        reader.close()
        writer.close()
    writer, reader = socket.socketpair()
    try:  # read_frame: the same deadline covers header, metadata and payload
        trickle(writer, encode_frame("cam0", 0, 0.0, np.zeros(4, np.float32), "float32"), 0.02)
        with pytest.raises(ProtocolError, match="not complete in time"):
            read_frame(reader, frame_timeout_s=0.3)
    finally:
        reader.close()
        writer.close()


def test_wait_header_sees_a_close_before_the_first_byte_as_a_close():
    writer, reader = socket.socketpair()
    writer.close()
    try:
        with pytest.raises(ConnectionClosed):
            wait_header(reader, wait_until=time.monotonic() + 5, frame_timeout_s=1)
        with pytest.raises(ProtocolError, match="after 3 of 8 bytes"):  # a close midway is a truncated message
            wait_header(TrickleSocket(MAGIC[:3], 8), frame_timeout_s=1)
    finally:
        reader.close()


def test_sequence_numbers_stay_exact_in_json():
    assert MAX_SEQ == 2 ** 53  # every JSON reader holds integers below it exactly
    assert float(MAX_SEQ - 1) == MAX_SEQ - 1 and float(MAX_SEQ + 1) != MAX_SEQ + 1
    assert parse_meta(json.dumps(good_meta(seq=MAX_SEQ - 1)).encode(), 0).seq == MAX_SEQ - 1
    with pytest.raises(ProtocolError, match=r"bad seq 9007199254740992 \(expected an integer 0 <= seq < 2\*\*53\)"):
        parse_meta(json.dumps(good_meta(seq=MAX_SEQ)).encode(), 0)
    for kind, fields in [(KIND_END, {"stream": "cam0", "seq": MAX_SEQ}),
                         (KIND_END, {"stream": "cam0", "seq": 2 ** 63 - 1})]:
        with pytest.raises(ProtocolError, match="seq .* is not an integer from 0 to 9007199254740991"):
            parse_fields(kind, json.dumps(fields).encode())
    assert parse_fields(KIND_END, json.dumps({"stream": "cam0", "seq": MAX_SEQ - 1}).encode())["seq"] == MAX_SEQ - 1


def test_latency_is_recorded_only_when_plausible():
    now = 1700000000.0
    assert latency_ms(now, now - 0.0125) == 12.5
    assert latency_ms(now, now - MAX_LATENCY_S) == MAX_LATENCY_S * 1000  # a frame spooled through a day's outage
    assert latency_ms(now, now + MAX_AHEAD_S / 2) == -MAX_AHEAD_S / 2 * 1000  # within the clock offset's error
    for t_capture in [now - MAX_LATENCY_S - 1, now + MAX_AHEAD_S + 1, 0.0, 1e308, -1e308, -now]:
        assert latency_ms(now, t_capture) is None, t_capture
    assert latency_ms(-1e308, 1e308) is None  # the difference overflows to -inf


def test_a_clock_offset_beyond_any_clock_is_refused():
    ok = encode_message(KIND_CLOCK, offset_s=-1.77e9, error_s=0.001)  # a Jetson booted in 1970, 56 years behind
    assert parse_fields(KIND_CLOCK, ok[FIXED_HEADER.size:])["offset_s"] == -1.77e9
    for offset in [MAX_CLOCK_OFFSET_S * 2, -1e308]:
        with pytest.raises(ConfigError):
            encode_message(KIND_CLOCK, offset_s=offset, error_s=0.0)
        with pytest.raises(ProtocolError, match="CLOCK offset_s .* is out of range"):
            parse_fields(KIND_CLOCK, json.dumps({"offset_s": offset, "error_s": 0.0}).encode())


# --- fuzzing -------------------------------------------------------------------------------------------------

VALID_FRAMES = [
    encode_frame("cam0", 5, 1700000000.5, np.eye(3, dtype=np.float32), "bits"),
    encode_frame("c", 0, 0, np.arange(5, dtype=np.int16), "uint8"),
    encode_frame("cam.1", 9, 1.0, np.arange(6, dtype=np.float64).reshape(3, 2), "float16"),
    encode_frame("cam-2", 2 ** 40, -1.0, np.arange(4, dtype=np.uint16), "float32"),
    encode_frame("cam_3", 1, 2.0, np.arange(4, dtype=np.float32).reshape(2, 2), "pickle"),
    encode_frame("cam_4", 3, 4.0, np.tile(np.eye(4, dtype=np.float32), 4), "bits", entropy="zlib"),
    encode_frame("cam_5", 7, 4.0, np.arange(64, dtype=np.float32) // 8, "uint8", entropy="zlib"),
    encode_end_of_stream("cam0", 6),
]


def check_frame_outcome(data):
    """read_frame + decode_latents either succeed consistently or raise one of the two protocol errors."""
    try:
        meta, payload = read_from_bytes(data)
    except ConnectionClosed:
        assert data == b""
        return
    except ProtocolError:
        return
    assert isinstance(meta, FrameMeta) and len(payload) == meta.payload_len
    if meta.flags & FLAG_END_OF_STREAM:
        return
    try:
        out = decode_latents(meta, payload)
    except ProtocolError:
        # the only payloads whose length does not imply validity
        assert meta.packing == "pickle" or meta.entropy != "none"
        return
    assert out.shape == meta.shape and out.dtype == np.dtype(meta.dtype)


@settings(max_examples=100, **FAST)
@given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b"LLNK\x01" + b))
def test_fuzz_random_bytes(data):
    check_frame_outcome(data)


@settings(max_examples=100, **FAST)
@given(frame=st.sampled_from(VALID_FRAMES), edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                                          max_size=4),
       cut=st.none() | st.integers(0, 10 ** 6), tail=st.binary(max_size=20))
def test_fuzz_mutated_frames(frame, edits, cut, tail):
    data = bytearray(frame)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    check_frame_outcome(bytes(data) + tail)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=100, **FAST)
@given(key=st.sampled_from(sorted(good_meta())), value=JSON_VALUES, flags=st.sampled_from([0, 1]))
def test_fuzz_meta_values(key, value, flags):
    meta = good_meta()
    meta[key] = value
    try:
        parsed = parse_meta(json.dumps(meta).encode("utf-8"), flags)
    except ProtocolError:
        return
    # whatever got through is consistent
    assert parsed.payload_len == payload_size(parsed.packing, parsed.shape)
    assert all(isinstance(d, int) and 1 <= d <= 2 ** 20 for d in parsed.shape)
    assert isinstance(parsed.seq, int) and not isinstance(parsed.seq, bool)


# --- pickle payloads (read by edge/safe_pickle.py; its own tests are tests/test_safe_pickle.py) ----------------

class Evil(object):
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def loads(data, dtype="float32", shape=(2, 2)):
    return loads_ndarray(data, dtype, shape)


def pickle_frame(payload, dtype="float32", shape=(2, 2)):
    return raw_frame(good_meta(packing="pickle", dtype=dtype, shape=list(shape), payload_len=len(payload)),
                     payload=payload)


def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(os.system, "touch " + str(marker)), protocol=3)
    with pytest.raises(ProtocolError) as info:
        loads(evil)
    assert "system is not allowed (only the names numpy's array pickles use" in str(info.value)
    meta, payload = read_from_bytes(pickle_frame(evil))
    with pytest.raises(ProtocolError):
        decode_latents(meta, payload)
    assert not marker.exists()
    pickle.loads(evil)  # control: the payload really is malicious with a plain unpickler
    assert marker.exists()


def test_pickle_refusals():
    with pytest.raises(ProtocolError) as info:
        loads(pickle.dumps(Evil(eval, "1+1"), protocol=3))
    assert "global builtins.eval is not allowed" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        loads(pickle.dumps(np.array([1, "x", None], dtype=object), protocol=3), shape=(3,))
    assert "numpy.dtype('O8', False, True)" in str(info.value)
    for bad in [{"a": 1}, [1.0, 2.0], 3.5, np.array(["ab"]), np.zeros(2, dtype=[("x", "f4")]),
                np.zeros(2, np.complex64), np.float32(1.0)]:
        with pytest.raises(ProtocolError):
            loads(pickle.dumps(bad, protocol=3), shape=(2,))
    # numpy.ndarray called directly (a huge allocation asked for in a few bytes) and abused _reconstruct
    with pytest.raises(ProtocolError, match="calls numpy.ndarray directly"):
        loads(b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R.")
    with pytest.raises(ProtocolError, match="expected \\(numpy.ndarray, \\(0,\\), b'b'\\)"):
        loads(b"\x80\x03cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                         b"J\x00\x00\x00\x40\x85C\x01b\x87R.")
    for garbage in [b"", b"\x80\x03", b"\x80\x03K\x01.", b"not a pickle", b"\x80\x03X\xff\xff\xff\xff"]:
        with pytest.raises(ProtocolError):
            loads(garbage)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_pickle_protocols_accepted(protocol):
    if protocol > pickle.HIGHEST_PROTOCOL:
        pytest.skip("this Python has no pickle protocol %d" % protocol)
    for dtype in DTYPES:
        a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
        check_round_trip(a, loads(pickle.dumps(a, protocol=protocol), dtype, a.shape))
        meta, payload = read_from_bytes(pickle_frame(pickle.dumps(a, protocol=protocol), dtype, a.shape))
        check_round_trip(a, decode_latents(meta, payload))


# np.arange(6, dtype=np.float32).reshape(2, 3) pickled with protocol 3 by numpy 2.4 (numpy._core) and 1.19
# (numpy.core): each side must load the other's.
NUMPY2_PICKLE = bytes.fromhex(
    "8003636e756d70792e5f636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7100636e756d70790a6e646172"
    "7261790a71014b008571024301627103877104527105284b014b024b03867106636e756d70790a64747970650a710758020000006634"
    "7108898887710952710a284b0358010000003c710b4e4e4e4affffffff4affffffff4b0074710c62894318000000000000803f0000"
    "004000004040000080400000a040710d74710e622e")
NUMPY119_PICKLE = NUMPY2_PICKLE.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("data", [NUMPY2_PICKLE, NUMPY119_PICKLE], ids=["numpy2", "numpy1.19"])
def test_pickles_from_either_numpy_load(data):
    check_round_trip(np.arange(6, dtype=np.float32).reshape(2, 3), loads(data, "float32", (2, 3)))


def test_pickle_must_match_metadata():
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    data = pickle.dumps(a, protocol=3)
    for dtype, shape in [("float64", (2, 2)), ("float32", (4,)), ("float32", (2, 2, 1))]:
        meta, payload = read_from_bytes(pickle_frame(data, dtype, shape))
        with pytest.raises(ProtocolError) as info:
            decode_latents(meta, payload)
        assert "does not match the metadata's" in str(info.value)
    # a big-endian array is read into native byte order: it matches "float32"
    out = decode_latents(*read_from_bytes(pickle_frame(pickle.dumps(a.astype(">f4"), protocol=3))))
    check_round_trip(a, out)


# --- findings of the security review ------------------------------------------------------------------------
def test_a_pickle_naming_a_huge_memo_index_allocates_nothing():
    import tracemalloc

    bomb = b"\x80\x03Nr" + struct.pack("<I", 1 << 24) + b"."  # LONG_BINPUT 16M: the C unpickler sizes its memo
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            loads(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_a_pickle_cannot_set_attributes_on_the_allowed_globals():
    # GLOBAL numpy.ndarray, state (None, {"planted": 1}), BUILD: would setattr on the class itself.
    payload = b"\x80\x03cnumpy\nndarray\nN}X\x07\x00\x00\x00plantedK\x01s\x86b."
    with pytest.raises(ProtocolError, match="EMPTY_DICT at offset 18"):  # no dict is ever built
        loads(payload)
    with pytest.raises(ProtocolError, match="BUILD at offset 19: sets the state of numpy.ndarray"):
        loads(b"\x80\x03cnumpy\nndarray\nN\x85b.")
    assert not hasattr(np.ndarray, "planted")


def test_read_frame_refuses_from_the_metadata_via_check_meta():
    frame = encode_frame("cam0", 0, 0.0, np.zeros((2, 3), np.float32), "float32")
    header_and_meta = frame[:-24]  # everything but the payload

    def refuse(meta):
        raise ProtocolError("shape %r does not fit" % (meta.shape,))

    with pytest.raises(ProtocolError, match="does not fit"):
        read_frame(TrickleSocket(header_and_meta, 64, ConnectionResetError(104, "reset")), check_meta=refuse)
