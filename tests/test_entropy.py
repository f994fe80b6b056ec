"""The optional entropy stage (edge/entropy.py) and its frames; runs on Python 3.6 + numpy 1.19 and 3.11 + numpy 2.

lz4 and zstd cases are skipped where their package is not installed (`pip install 'latentlink[entropy]'`).
"""
import importlib
import json
import struct
import sys
import tracemalloc
import zlib

import numpy as np
import pytest

from latentlink.edge import entropy
from latentlink.edge.entropy import BYTE_CODERS, check_available, compress, decompress
from latentlink.edge.errors import ConfigError, ProtocolError
from latentlink.edge.protocol import (FIXED_HEADER, PACKINGS, decode_latents, encode_frame, pack_latents, parse_meta,
                           payload_size)

from .test_protocol import check_round_trip, good_meta, raw_frame, read_from_bytes


def _installed(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def coder_param(coder):
    module = {"lz4": "lz4.block", "zstd": "zstandard"}.get(coder)
    marks = [] if module is None or _installed(module) else [
        pytest.mark.skip(reason="%s is not installed (pip install 'latentlink[entropy]')" % module)]
    return pytest.param(coder, marks=marks, id=coder)


# The coders of packed bytes; "context" codes latents with a model's tables: tests/test_context_model.py
ALL = [coder_param(c) for c in ("none",) + BYTE_CODERS]
CODED = [coder_param(c) for c in BYTE_CODERS]


def latents(shape=(1, 8, 16, 16), seed=0):
    """Binary latents with structure (runs of equal bits), as a model's are: something a coder can shrink."""
    rng = np.random.RandomState(seed)
    return np.repeat(rng.rand(*shape[:-1] + (shape[-1] // 4,)) > 0.5, 4, axis=-1).astype(np.float32)


# --- round trips ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [p for p in PACKINGS if p != "pickle"])
@pytest.mark.parametrize("coder", ALL)
def test_round_trip_through_a_socket_for_every_coder_and_packing(coder, packing):
    a = latents() * 3 - 1  # -1 and 2: every packing carries these exactly (bits and uint8 as 0 / 1, 2)
    if packing in ("bits", "uint8"):
        a = np.clip(a, 0, 1)
    frame = encode_frame("cam0", 4, 1.5, a, packing, entropy=coder)
    meta, payload = read_from_bytes(frame)
    assert meta.entropy == coder and len(payload) == meta.payload_len
    packed = payload_size(packing, a.shape)
    if coder == "none":
        assert meta.payload_len == packed
        assert frame == encode_frame("cam0", 4, 1.5, a, packing)  # unchanged: older hosts still read it
        assert b"entropy" not in frame
    else:
        assert meta.payload_len < packed  # structured latents do shrink
    check_round_trip(a, decode_latents(meta, payload))


@pytest.mark.parametrize("coder", ALL)
def test_compress_and_decompress_are_inverse(coder):
    for data in (b"\x00", bytes(bytearray(range(256))) * 3, pack_latents(latents(seed=3), "bits")):
        assert decompress(compress(data, coder), coder, len(data)) == data


def test_an_explicit_entropy_none_key_is_the_same_as_none():
    meta = parse_meta(json.dumps(good_meta(entropy="none")).encode(), 0)
    assert meta.entropy == "none" and meta.payload_len == 24
    assert parse_meta(json.dumps(good_meta()).encode(), 0).entropy == "none"  # absent: none


# --- refusals ------------------------------------------------------------------------------------------------

def test_unknown_coders_are_refused_on_both_sides():
    with pytest.raises(ConfigError) as info:
        encode_frame("cam0", 0, 0.0, latents(), "bits", entropy="brotli")
    assert str(info.value) == "unknown entropy coder 'brotli' (available: none, zlib, lz4, zstd, context)"
    with pytest.raises(ConfigError, match="'brotli'"):
        check_available("brotli")
    with pytest.raises(ProtocolError, match="unknown entropy coder 'brotli'"):
        parse_meta(json.dumps(good_meta(entropy="brotli", payload_len=5)).encode(), 0)
    with pytest.raises(ProtocolError, match="unknown entropy coder"):
        parse_meta(json.dumps(good_meta(entropy=["zlib"], payload_len=5)).encode(), 0)


def test_pickle_is_never_entropy_coded():
    with pytest.raises(ConfigError, match="pickle.*'zlib'"):
        encode_frame("cam0", 0, 0.0, latents(), "pickle", entropy="zlib")
    meta = good_meta(packing="pickle", payload_len=10, entropy="zlib")
    with pytest.raises(ProtocolError, match="packing 'pickle' cannot be entropy-coded"):
        read_from_bytes(raw_frame(meta, payload=bytes(10)))
    with pytest.raises(ProtocolError, match="cannot be entropy-coded"):  # nor an end-of-stream frame
        parse_meta(json.dumps(good_meta(packing="none", payload_len=0, entropy="zlib")).encode(), 1)


def test_max_payload_bytes_bounds_the_unpacked_size_too():
    # 9 bytes on the wire, but the shape says 4 MiB once unpacked: refused from the metadata alone.
    meta = good_meta(shape=[1024, 1024], packing="float32", payload_len=9, entropy="zlib")
    with pytest.raises(ProtocolError) as info:
        read_from_bytes(raw_frame(meta, payload=bytes(9)), max_payload_bytes=1 << 20)
    assert "zlib payload unpacks to 4194304 bytes" in str(info.value) and "1048576" in str(info.value)
    assert parse_meta(json.dumps(meta).encode(), 0, 4 << 20).payload_len == 9  # within the limit it is fine


# --- untrusted compressed payloads ---------------------------------------------------------------------------

def bomb(coder, size=50 * 1024 * 1024):
    """``size`` zero bytes compressed by ``coder`` (a zip bomb: 50 MB in a few hundred KB at most)."""
    return compress(bytes(size), coder)


@pytest.mark.parametrize("coder", CODED)
def test_a_bomb_in_a_frame_is_refused_without_allocating_it(coder):
    data = bomb(coder)
    assert len(data) < 1 << 20
    meta = dict(good_meta(shape=[1, 8, 16, 16], packing="bits", payload_len=len(data)), entropy=coder)
    frame = raw_frame(meta, payload=data)
    meta, payload = read_from_bytes(frame)  # the metadata is fine: 256 bytes once unpacked
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as info:
            decode_latents(meta, payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert coder in str(info.value) and "256" in str(info.value)
    assert peak < 1 << 20, "decompressing the bomb allocated %d bytes" % peak


def test_zlib_decompression_asks_for_at_most_one_byte_more_than_expected(monkeypatch):
    asked = []
    real = zlib.decompressobj

    class Spy(object):
        def __init__(self):
            self.d = real()

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            return self.d.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self.d, name)

    monkeypatch.setattr(entropy.zlib, "decompressobj", Spy)
    with pytest.raises(ProtocolError, match="zlib payload of .* unpacks to more than 256 bytes"):
        decompress(bomb("zlib"), "zlib", 256)
    assert asked == [257]


def test_a_zstd_frame_that_lies_about_its_size_is_refused():
    pytest.importorskip("zstandard")
    # Declares 1000 bytes (what we expect) and a 128 MiB window, then holds 2000 RLE blocks of 128 KiB (250 MiB).
    header = struct.pack("<I", 0xFD2FB528) + b"\x80\x88" + struct.pack("<I", 1000)
    block = struct.pack("<I", (1 << 1) | ((128 * 1024) << 3))[:3] + b"\0"
    last = struct.pack("<I", 1 | (1 << 1) | ((128 * 1024) << 3))[:3] + b"\0"
    data = header + block * 1999 + last
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="zstd payload of 8010 bytes is corrupt"):
            decompress(data, "zstd", 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    import zstandard

    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc" * 100)
    with pytest.raises(ProtocolError, match="declares no size of content"):
        decompress(no_size, "zstd", 300)
    with pytest.raises(ProtocolError, match="declares 52428800 bytes of content"):
        decompress(bomb("zstd"), "zstd", 256)


@pytest.mark.parametrize("coder", CODED)
def test_bad_compressed_payloads_are_protocol_errors_naming_the_coder(coder):
    data = pack_latents(latents(seed=1), "bits")
    good = compress(data, coder)
    cases = {
        "truncated": (good[:-3], len(data)),
        "trailing garbage": (good + b"junk", len(data)),
        "another stream after it": (good + good, len(data)),
        "too short": (compress(data[:-1], coder), len(data)),
        "too long": (compress(data + b"\x01", coder), len(data)),
        "garbage": (b"\xff\xfe\xfd garbage \x00\x01" * 3, len(data)),
        "empty": (b"", len(data)),
    }
    for name, (payload, expected_len) in cases.items():
        with pytest.raises(ProtocolError) as info:
            decompress(payload, coder, expected_len)
        message = str(info.value)
        assert message.startswith(coder + " payload of %d bytes" % len(payload)), (name, message)
        assert str(expected_len) in message, (name, message)


@pytest.mark.parametrize("coder", CODED)
def test_every_single_byte_corruption_is_either_refused_or_the_right_size(coder):
    data = pack_latents(latents(seed=2), "bits")
    good = compress(data, coder)
    for pos in range(len(good)):
        for flip in (0x01, 0x80, 0xff):
            bad = bytearray(good)
            bad[pos] ^= flip
            try:
                out = decompress(bytes(bad), coder, len(data))
            except ProtocolError:
                continue
            assert len(out) == len(data)  # lz4 blocks carry no checksum: a flipped literal decodes, wrongly


# --- a coder's library missing -------------------------------------------------------------------------------

@pytest.mark.parametrize("coder, module, package", [("lz4", "lz4.block", "lz4"), ("zstd", "zstandard", "zstandard")])
def test_a_missing_library_says_what_to_install_on_both_sides(monkeypatch, coder, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    monkeypatch.setattr(entropy, "_modules", {})
    with pytest.raises(ConfigError) as info:
        check_available(coder)
    assert "pip install %s" % package in str(info.value)
    with pytest.raises(ConfigError, match="pip install %s" % package):
        encode_frame("cam0", 0, 0.0, latents(), "bits", entropy=coder)
    meta, payload = read_from_bytes(raw_frame(dict(good_meta(shape=[1, 8], packing="bits", payload_len=3),
                                                   entropy=coder), payload=b"abc"))
    with pytest.raises(ProtocolError) as info:
        decode_latents(meta, payload)
    assert "entropy coder %r needs the %s package" % (coder, package) in str(info.value)
    assert "pip install %s" % package in str(info.value)
    check_available("zlib")  # the stdlib one is always there
