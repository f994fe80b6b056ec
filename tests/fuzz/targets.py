"""Fuzz targets: the parsers that read bytes from the network, each fed arbitrary bytes.

A target takes one input (bytes) and either returns, or raises one of :data:`ALLOWED` (latentlink's own
``ProtocolError`` and ``ConnectionClosed``: the parser refused the input, as it must refuse anything it cannot
read). Anything else escaping is a bug: a raw ``ValueError``/``IndexError``/``struct.error`` from a parser, or an
``AssertionError`` from the checks each target makes on what a parser accepted (a decoded array of the announced
dtype and shape, a message that encodes back to itself, numbers strict JSON can hold, decompression of exactly the
announced size).

- ``frame``: one wire message (protocol 1 frame or protocol 2 message): ``parse_header``, then ``parse_meta`` and
  ``decode_latents`` (every packing and entropy coder, pickle too) or ``parse_fields``.
- ``messages``: a byte stream through a fake socket that hands it out in small chunks (the first byte sets their
  size): ``wait_header`` and ``read_body`` for up to 16 messages; and ``parse_fields`` for every control kind on the
  same bytes, with the round trip through ``encode_message``.
- ``pickle``: ``safe_pickle.loads_ndarray``; the first byte picks the dtype, the next the number of dimensions,
  then one byte per dimension, then the pickle.
- ``context``: ``ContextModel.decode`` (--entropy context) of fixed pseudo-random tables; the first 4 bytes pick
  channels (1 to 8), tiles (1 or 2), height and width (1 to 16 latents), the rest is the payload; decoded bits must
  code back to themselves, and the payload read as bits must round-trip through the coder.
- ``lossless``: ``lossless.decode`` (--lossless); the first 2 bytes pick height and width (1 to 16 pixels, 3
  channels), the rest is the payload (its header picks med or mlp); a decoded image must code and decode back.
- ``entropy``: ``entropy.decompress`` with a bound; the first byte picks the coder (zlib, lz4, zstd), the next two
  the size it must unpack to (big-endian, at most 65535), the rest is the payload; and the coder's round trip.

Python 3.6 compatible (the replay test runs on the Nano's Python too); atheris drives these in ``fuzz.py``.
"""

import json
import struct

import numpy as np

from latentlink.edge import entropy as _entropy
from latentlink.edge import lossless as _lossless
from latentlink.edge.context_model import PROB_ONE, ContextModel, table_sizes
from latentlink.edge.errors import ConnectionClosed, ProtocolError
from latentlink.edge.protocol import (DTYPES, FIXED_HEADER, FLAG_END_OF_STREAM, KIND_ACCEPT, KIND_FRAME, KIND_NAMES,
                                      MAX_SEQ, VERSION, VERSION_2, VERSIONS, decode_latents, encode_message,
                                      parse_fields, parse_header, parse_meta, read_body, wait_header)
from latentlink.edge.safe_pickle import loads_ndarray

ALLOWED = (ProtocolError, ConnectionClosed)
MAX_PAYLOAD = 1 << 16  # bytes: the targets' --max-frame-bytes, small so that every input runs in microseconds
CONTROL_KINDS = sorted(k for k in KIND_NAMES if k != KIND_FRAME)
CODERS = ("zlib", "lz4", "zstd")


def _check_meta(meta):
    assert 0 <= meta.seq < MAX_SEQ and meta.dtype in DTYPES and meta.payload_len <= MAX_PAYLOAD, meta
    json.dumps(meta._asdict(), allow_nan=False)  # every number finite: it may reach a report


def _check_latents(meta, payload):
    if meta.flags & FLAG_END_OF_STREAM:
        return
    out = decode_latents(meta, payload)
    assert out.shape == meta.shape and out.dtype == np.dtype(meta.dtype), (out.shape, out.dtype, meta)
    assert out.flags.writeable


def _check_fields(kind, fields):
    """What the parser accepted, the encoder accepts, and it parses back the same."""
    json.dumps(fields, allow_nan=False)
    if kind == KIND_ACCEPT:  # parsed pairs are tuples; the wire has lists
        fields = dict(fields, acked=[list(pair) for pair in fields["acked"]])
    again = parse_fields(kind, encode_message(kind, **fields)[FIXED_HEADER.size:])
    if kind == KIND_ACCEPT:
        again = dict(again, acked=[list(pair) for pair in again["acked"]])
    assert again == fields, (KIND_NAMES[kind], fields, again)


def frame(data):
    """One message: header, metadata, payload (protocol 1 or 2)."""
    version, byte, meta_len = parse_header(data[:FIXED_HEADER.size])
    meta_bytes = data[FIXED_HEADER.size:FIXED_HEADER.size + meta_len]
    if len(meta_bytes) < meta_len:
        return  # truncated: the socket reader says so (see ``messages``)
    if version == VERSION_2 and byte != KIND_FRAME:
        _check_fields(byte, parse_fields(byte, meta_bytes))
        return
    meta = parse_meta(meta_bytes, byte if version == VERSION else 0, MAX_PAYLOAD)
    _check_meta(meta)
    start = FIXED_HEADER.size + meta_len
    payload = data[start:start + meta.payload_len]
    if len(payload) == meta.payload_len:
        _check_latents(meta, payload)


class FakeSocket(object):
    """Hands ``data`` out ``step`` bytes at a time at most, then end of stream (as a closed peer would)."""

    def __init__(self, data, step):
        self.data, self.step = data, step

    def recv(self, n):
        chunk, self.data = self.data[:min(n, self.step)], self.data[min(n, self.step):]
        return chunk

    def settimeout(self, seconds):
        pass


def messages(data):
    """A stream of messages read from a socket, and every control kind's fields parsed from the same bytes."""
    if not data:
        return
    step, rest = 1 + data[0] % 16, data[1:]
    for kind in CONTROL_KINDS:
        try:
            _check_fields(kind, parse_fields(kind, rest))
        except ALLOWED:
            pass
    sock = FakeSocket(rest, step)
    for _ in range(16):
        version, byte, meta_len, deadline = wait_header(sock, VERSIONS)
        body, payload = read_body(sock, version, byte, meta_len, MAX_PAYLOAD, deadline)
        if version == VERSION_2 and byte != KIND_FRAME:
            _check_fields(byte, body)
        else:
            _check_meta(body)
            assert len(payload) == body.payload_len


def pickle(data):
    """``loads_ndarray(pickle, dtype, shape)`` with dtype and shape from the input's first bytes."""
    if len(data) < 2:
        return
    dtype, ndim = DTYPES[data[0] % len(DTYPES)], 1 + data[1] % 6
    shape = tuple(bytearray(data[2:2 + ndim]))
    if len(shape) < ndim or 0 in shape:
        return  # the frame parser never passes such a shape
    out = loads_ndarray(data[2 + ndim:], dtype, shape)
    assert out.shape == shape and out.dtype == np.dtype(dtype), (out.shape, out.dtype, dtype, shape)
    assert out.flags.writeable and out.flags.c_contiguous


def entropy(data):
    """``decompress(payload, coder, size)``: exactly ``size`` bytes or a ProtocolError; and a round trip."""
    if len(data) < 3:
        return
    coder = CODERS[data[0] % len(CODERS)]
    (size,), payload = struct.unpack(">H", data[1:3]), data[3:]
    try:
        out = _entropy.decompress(payload, coder, size)
    except ALLOWED:
        pass
    else:
        assert len(out) == size, (coder, len(out), size)
    try:
        packed = _entropy.compress(payload, coder)
    except Exception:  # ConfigError: the coder's library is missing here (then decompress refused too)
        return
    assert bytes(_entropy.decompress(packed, coder, len(payload))) == bytes(payload), coder


_CONTEXT_MODELS = {}


def context_model(channels):
    """Tables for ``channels`` channels: fixed pseudo-random probabilities, from near-certain to 1/2."""
    if channels not in _CONTEXT_MODELS:
        rng = np.random.RandomState(channels)
        tables = [rng.randint(1, PROB_ONE, size=n) for n in table_sizes(channels)]
        _CONTEXT_MODELS[channels] = ContextModel(channels, tables)
    return _CONTEXT_MODELS[channels]


def context(data):
    """``ContextModel.decode(payload, shape)``: bits of exactly that shape or a ProtocolError; and round trips."""
    if len(data) < 4:
        return
    channels, tiles, height, width = 1 + data[0] % 8, 1 + data[1] % 2, 1 + data[2] % 16, 1 + data[3] % 16
    shape, payload, model = (tiles, channels, height, width), data[4:], context_model(1 + data[0] % 8)
    n = tiles * channels * height * width
    bits = np.unpackbits(np.frombuffer(payload + bytes(n // 8 + 1), dtype=np.uint8))[:n].reshape(shape)
    assert (model.decode(model.encode(bits), shape) == bits).all()
    bits = model.decode(payload, shape)  # a ProtocolError here is the refusal
    assert bits.shape == shape and bits.dtype == np.uint8 and bits.max(initial=0) <= 1, (bits.shape, shape)
    assert (model.decode(model.encode(bits), shape) == bits).all()

def lossless(data):
    """``lossless.decode(payload, shape)``: the image of exactly that shape or a ProtocolError; and round trips."""
    if len(data) < 2:
        return
    shape = (1 + data[0] % 16, 1 + data[1] % 16, 3)
    image = _lossless.decode(data[2:], shape)  # a ProtocolError here is the refusal
    assert image.shape == shape and image.dtype == np.uint8, (image.shape, image.dtype)
    # it decoded: the image codes and decodes back to itself (the payload may differ: its Rice parameters are free)
    assert (_lossless.decode(_lossless.codec(_lossless.PREDICTORS[data[3]]).encode(image), shape) == image).all()


TARGETS = {"frame": frame, "messages": messages, "pickle": pickle, "entropy": entropy, "context": context,
           "lossless": lossless}


def run_one(name, data):
    """Run target ``name`` on ``data``; returns True if it refused the input (an allowed error), False if it took
    it. Anything else propagates: a bug."""
    try:
        TARGETS[name](bytes(data))
    except ALLOWED:
        return True
    return False
