"""The latentlink wire format: protocol 1 (frames one way) and protocol 2 (a closed loop: handshake, acks).

Every message starts with the same fixed header (8 bytes, big-endian ``>4sBBH``): magic ``b"LLNK"``, version, one
byte, metadata length in bytes. Then a UTF-8 JSON object (sorted keys, no spaces, at most :data:`MAX_META_BYTES`
bytes), then a payload for frames. Unknown extra keys are ignored (forward compatibility).

**Protocol 1** (``version`` 1; the byte is ``flags``): the edge only sends frames. Metadata keys
``stream seq t_capture dtype shape packing payload_len`` and the optional ``entropy`` and ``iterations`` (a
progressive model's frame: k of its K residual codes, shape (k, C, h, w); see :data:`MAX_ITERATIONS`).
Payload: ``payload_len`` bytes holding the latent array packed as ``packing`` says (see :func:`pack_latents`), then,
if ``entropy`` names a coder (``zlib``, ``lz4``, ``zstd``; see :mod:`latentlink.edge.entropy`), compressed with it.
``entropy`` ``context`` (packing ``bits`` only) codes the latents themselves with the model's probability
tables (:mod:`latentlink.edge.context_model`); the payload is then that coder's output.
Without the key (or with ``"none"``, which senders leave out) ``payload_len`` is exactly the packed size implied by
packing and shape; with it, ``payload_len`` is the compressed size and the packed size is what decompression must
give exactly. ``max_payload_bytes`` bounds both. The ``pickle`` packing is never entropy-coded: it exists for the
seed pipeline's receivers, which know no entropy coding, and its size is not implied by the shape. Packing
``lossless`` carries no latents but the captured frame itself (dtype uint8, shape [H, W, 3], BGR), coded by
:mod:`latentlink.edge.lossless` (``--lossless``; never entropy-coded, its size not implied by the shape). Flag
``END_OF_STREAM`` (packing ``none``, no payload) ends a stream.

**Protocol 2** (``version`` 2; the byte is the message ``kind``): see the "protocol 2" section below and the README.
The edge opens with HELLO; the host answers ACCEPT or REFUSE (a host with a token first sends CHALLENGE, and the edge
proves it has the token with AUTH: :mod:`latentlink.edge.security`); then the edge sends FRAME messages (protocol 1's
metadata and payload exactly), CLOCK now and then, and END; the host answers each FRAME and the END with an ACK once
the frame is decoded (and written). A host that speaks 2 also serves protocol-1 edges, without acknowledgements.

Everything here runs on Python 3.6 + numpy 1.19 (the Jetson Nano) as well as on current Python and numpy 2.
The pure functions (encode/parse/pack/unpack) are separate from those that touch a socket
(:func:`recv_exactly`, :func:`read_frame`, :func:`read_header`, :func:`wait_header`, :func:`read_body`). Bytes from the network only ever
raise :class:`ProtocolError` or :class:`ConnectionClosed`; the sending side raises :class:`ConfigError` for bad
arguments.
"""
import collections
import json
import math
import numbers
import pickle
import re
import socket
import struct
import time

import numpy as np

from .entropy import CODERS, compress, decompress
from .errors import ConfigError, ConnectionClosed, ProtocolError
from .lossless import decode as decode_lossless
from .safe_pickle import loads_ndarray

MAGIC = b"LLNK"
VERSION = 1  # protocol 1: frames only (the header's byte is flags)
VERSION_2 = 2  # protocol 2: messages (the header's byte is the message kind)
VERSIONS = (VERSION, VERSION_2)
FIXED_HEADER = struct.Struct(">4sBBH")  # magic, version (uint8), flags or kind (uint8), metadata bytes (uint16)
FLAG_END_OF_STREAM = 0x01
_KNOWN_FLAGS = FLAG_END_OF_STREAM
PACKINGS = ("bits", "uint8", "float16", "float32", "pickle")
# What a frame may carry: latents packed as PACKINGS says, or (lossless) no latents but the captured frame itself,
# (H, W, 3) uint8 BGR, predictively coded (edge/lossless.py); the decoded image is at most LOSSLESS_EXPANSION times
# the frame's payload limit: decoding takes about 30 bytes of memory per byte of image (README, "Lossless mode"), so
# this bounds what one frame can make a host allocate to about 60 times its --max-frame-bytes.
FRAME_PACKINGS = PACKINGS + ("lossless",)
LOSSLESS_EXPANSION = 2
# framed: the model's packing; pickle: the seed pipeline's pickled arrays in latentlink frames; pickle-raw: no
# latentlink framing at all, what the seed pipeline's plain sockets carry (see raw_pickle_message)
SERIALIZERS = ("framed", "pickle", "pickle-raw")
RAW_LENGTH = struct.Struct(">Q")  # pickle-raw: the length of each pickle, 8 bytes big-endian
DTYPES = ("float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "int64")
MAX_META_BYTES = 4096
MAX_DIMS = 6
MAX_DIM = 2 ** 20
MAX_ELEMENTS = 2 ** 27
# Sequence numbers are below 2**53: every JSON reader (JavaScript, jq, Python's float) holds such an integer exactly,
# and reports quote them. At 30 fps 2**53 frames take 9.5 million years, so no edge ever needs more.
MAX_SEQ = 2 ** 53
# The latencies that count (capture to decoded, seconds, on one clock): at most a day (a frame a reliable edge spooled
# through a host outage may be hours old), and at most a second "in the future" (the clock offset's error is
# milliseconds). Outside the window (an edge without network time, a wrong offset, a lie) the frame is decoded all
# the same; only its latency is not recorded, so that no absurd figure reaches a report.
MAX_LATENCY_S = 86400.0
MAX_AHEAD_S = 1.0
# The largest clock offset (host clock minus edge clock, seconds) CLOCK may carry: 317 years. A Jetson without a
# battery or network time starts in 1970, 56 years off; anything beyond this is not a clock.
MAX_CLOCK_OFFSET_S = 1e10
DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
_RECV_CHUNK = 1 << 20  # bytes per recv: memory follows the bytes that arrive, not the size a peer announces
_META_KEYS = ("stream", "seq", "t_capture", "dtype", "shape", "packing", "payload_len")
# The stream name becomes a directory on the host: a closed character set, and no "." / ".." (path traversal).
_STREAM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")

FrameMeta = collections.namedtuple("FrameMeta", "stream seq t_capture dtype shape packing payload_len flags "
                                                "meta_len entropy iterations")
# meta_len: bytes of the metadata block, known once a frame is parsed; entropy: the coder, "none" if absent;
# iterations: a progressive model's frame (see MAX_ITERATIONS), None for every other frame
FrameMeta.__new__.__defaults__ = (0, "none", None)
# A progressive model's frame (edge/rate.py) carries ``iterations`` k in its metadata: its latents are the first k of
# the model's K residual binary codes, shape (k, C, h, w), packing "bits". K is at most this; the HELLO says K and
# (C, h, w) ("progressive"), and the host checks every frame against its decoder's.
MAX_ITERATIONS = 64


def _is_int(value):
    # bool is an int subclass in Python, but True as a sequence number or dimension is a bug on the other side.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_stream(stream, error):
    if not isinstance(stream, str) or not _STREAM_RE.match(stream) or stream.strip(".") == "":
        raise error("bad stream name %r (use 1 to 64 characters from A-Z a-z 0-9 . _ -, not only dots)" % (stream,))


def latency_ms(t_done, t_capture):
    """Milliseconds from ``t_capture`` to ``t_done`` (UNIX seconds, both on the same clock), rounded to the
    microsecond; None unless it is a plausible latency: finite, at most MAX_LATENCY_S (a day) and at least
    -MAX_AHEAD_S (a second) - see those constants."""
    latency_s = t_done - t_capture  # inf when the two are huge and of opposite signs: refused below
    if not math.isfinite(latency_s) or not -MAX_AHEAD_S <= latency_s <= MAX_LATENCY_S:
        return None
    return round(latency_s * 1000.0, 3)
def check_stream_name(stream, error=ConfigError):
    """Raise ``error`` unless ``stream`` is a valid stream name (the host makes it a folder; a TLS certificate of
    ``latentlink keys`` carries it)."""
    _check_stream(stream, error)


def payload_size(packing, shape):
    """Exact payload size in bytes implied by ``packing`` and ``shape``; None for "pickle" (variable)."""
    n = 1
    for dim in shape:
        n *= int(dim)
    sizes = {"bits": (n + 7) // 8, "uint8": n, "float16": 2 * n, "float32": 4 * n, "none": 0}
    if packing in ("pickle", "lossless"):
        return None
    if packing not in sizes:
        raise ConfigError("unknown packing %r (available: %s)" % (packing, ", ".join(PACKINGS)))
    return sizes[packing]


def _check_shape(shape, error):
    """A latent shape from the network: a list of 1 to MAX_DIMS positive integers, at most MAX_ELEMENTS in all."""
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
        raise error("bad shape %r (expected a list of 1 to %d integers)" % (shape, MAX_DIMS))
    n = 1
    for dim in shape:
        if not _is_int(dim):
            raise error("shape %r has a non-integer dimension %r" % (shape, dim))
        if dim < 1:
            raise error("shape %r has a dimension of %d" % (shape, dim))
        if dim > MAX_DIM:
            raise error("shape %r has a dimension of %d (at most 2**20 allowed)" % (shape, dim))
        n *= dim
    if n > MAX_ELEMENTS:
        raise error("shape %r has %d elements (at most %d allowed)" % (shape, n, MAX_ELEMENTS))
    return shape


def _validate_meta(obj, flags, max_payload_bytes, error):
    """Check a decoded metadata dict and build a FrameMeta; ``error`` is the exception class to raise."""
    if not isinstance(obj, dict):
        raise error("frame metadata is a JSON %s, not an object" % type(obj).__name__)
    for key in _META_KEYS:
        if key not in obj:
            raise error("frame metadata lacks required key %r (has: %s)" % (key, ", ".join(sorted(obj))))
    _check_stream(obj["stream"], error)
    seq = obj["seq"]
    if not _is_int(seq) or not 0 <= seq < MAX_SEQ:
        raise error("bad seq %r (expected an integer 0 <= seq < 2**53)" % (seq,))
    t_capture = obj["t_capture"]
    if not isinstance(t_capture, numbers.Real) or isinstance(t_capture, bool):
        raise error("bad t_capture %r (expected UNIX seconds as a number)" % (t_capture,))
    try:
        t_capture = float(t_capture)
    except OverflowError:
        raise error("bad t_capture %r (too large)" % (t_capture,))
    if not math.isfinite(t_capture):
        raise error("bad t_capture %r (must be finite)" % (t_capture,))
    dtype = obj["dtype"]
    if dtype not in DTYPES:  # a non-str (even an unhashable list) simply is not in the tuple
        raise error("unknown dtype %r (supported: %s)" % (dtype, ", ".join(DTYPES)))
    shape = _check_shape(obj["shape"], error)
    packing = obj["packing"]
    end_of_stream = bool(flags & FLAG_END_OF_STREAM)
    if end_of_stream:
        if packing != "none":
            raise error("end-of-stream frame has packing %r (expected 'none')" % (packing,))
    elif packing not in FRAME_PACKINGS:
        raise error("unknown packing %r (available: %s)" % (packing, ", ".join(FRAME_PACKINGS)))
    entropy = obj.get("entropy", "none")  # optional: frames from edges older than the key have none
    if entropy not in CODERS:
        raise error("unknown entropy coder %r (available: %s)" % (entropy, ", ".join(CODERS)))
    if entropy != "none" and (end_of_stream or packing == "pickle"):
        raise error("packing %r cannot be entropy-coded (entropy %r): only bits, uint8, float16 and float32 "
                    "payloads can" % (packing, entropy))
    if entropy == "context" and packing != "bits":
        raise error("entropy 'context' codes binary latents: packing %r is not 'bits'" % (packing,))
    if packing == "lossless":
        _check_lossless(shape, dtype, entropy, max_payload_bytes, error)
    payload_len = obj["payload_len"]
    if not _is_int(payload_len) or payload_len < 0:
        raise error("bad payload_len %r (expected an integer >= 0)" % (payload_len,))
    if max_payload_bytes is not None and payload_len > max_payload_bytes:
        raise error("payload of %d bytes exceeds the limit of %d bytes (raise --max-frame-bytes if this is "
                    "legitimate)" % (payload_len, max_payload_bytes))
    expected = payload_size(packing, shape)
    if entropy == "none":
        if expected is not None and payload_len != expected:
            raise error("payload_len %d does not match shape %r with packing %r (expected %d bytes)"
                        % (payload_len, shape, packing, expected))
    elif max_payload_bytes is not None and expected > max_payload_bytes:
        # The size after decompression is bounded too: a few compressed bytes may not unpack to gigabytes.
        raise error("%s payload unpacks to %d bytes (shape %r, packing %r), over the limit of %d bytes (raise "
                    "--max-frame-bytes if this is legitimate)" % (entropy, expected, shape, packing,
                                                                  max_payload_bytes))
    iterations = _check_iterations(obj, shape, packing, end_of_stream, error)
    return FrameMeta(obj["stream"], int(seq), t_capture, dtype, tuple(int(d) for d in shape), packing,
                     int(payload_len), flags, 0, entropy, iterations)


def _check_iterations(obj, shape, packing, end_of_stream, error):
    """A progressive frame's ``iterations`` k (optional; None when absent): 1 to MAX_ITERATIONS, packing "bits",
    and latents of shape (k, C, h, w)."""
    if "iterations" not in obj:
        return None
    k = obj["iterations"]
    if not _is_int(k) or not 1 <= k <= MAX_ITERATIONS:
        raise error("bad iterations %r (expected an integer from 1 to %d)" % (k, MAX_ITERATIONS))
    if end_of_stream or packing != "bits":
        raise error("iterations %d on a frame packed %r: a progressive model's codes travel as packing 'bits'"
                    % (k, packing))
    if len(shape) != 4 or shape[0] != k:
        raise error("iterations %d with latents of shape %r: expected (%d, C, h, w), one code per iteration"
                    % (k, list(shape), k))
    return int(k)


def _check_lossless(shape, dtype, entropy, max_payload_bytes, error):
    """A lossless frame is a (H, W, 3) uint8 image, coded by edge/lossless.py alone, no bigger than
    LOSSLESS_EXPANSION times the payload limit once decoded."""
    if len(shape) != 3 or shape[2] != 3 or dtype != "uint8":
        raise error("a lossless frame is a (H, W, 3) uint8 image, not %s %r" % (dtype, shape))
    if entropy != "none":
        raise error("a lossless frame is coded by its predictor, not by entropy %r" % (entropy,))
    pixels = shape[0] * shape[1] * shape[2]
    if max_payload_bytes is not None and pixels > LOSSLESS_EXPANSION * max_payload_bytes:
        raise error("a lossless frame of %dx%d pixels (%d bytes) is more than %d times the payload limit of %d bytes "
                    "(raise --max-frame-bytes if this is legitimate)" % (shape[1], shape[0], pixels,
                                                                        LOSSLESS_EXPANSION, max_payload_bytes))


def _sender_numbers(seq, t_capture):
    # numpy scalars are fine on the sending side, but JSON needs plain int / float
    try:
        if _is_int(seq) and isinstance(t_capture, numbers.Real) and not isinstance(t_capture, bool):
            return int(seq), float(t_capture)
    except OverflowError:
        pass
    raise ConfigError("bad seq %r or t_capture %r (expected an int and UNIX seconds)" % (seq, t_capture))


def _encode(meta_dict, flags, payload, version=VERSION):
    """Header + JSON + payload; ``flags`` is protocol 1's flags byte or protocol 2's message kind."""
    meta_bytes = json.dumps(meta_dict, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(meta_bytes) > MAX_META_BYTES:  # cannot happen with validated fields; guards the uint16 all the same
        raise ConfigError("frame metadata of %d bytes exceeds %d bytes" % (len(meta_bytes), MAX_META_BYTES))
    return FIXED_HEADER.pack(MAGIC, version, flags, len(meta_bytes)) + meta_bytes + payload


def pack_latents(array, packing):
    """Encode a latent array as payload bytes (layout in C order, multi-byte values little-endian)."""
    a = np.asarray(array)
    if packing == "bits":  # binary latents: one bit each, numpy's default big bit order
        return np.packbits((a > 0.5).ravel()).tobytes()
    if packing == "uint8":
        if a.dtype.kind == "f":
            a = np.nan_to_num(np.clip(np.rint(a), 0, 255))
        else:
            a = np.clip(a.astype(np.int64), 0, 255)  # int64 first: clipping an int8 to 255 overflows on numpy 2
        return a.astype(np.uint8).tobytes()
    if packing == "float16":
        return a.astype("<f2").tobytes()
    if packing == "float32":
        return a.astype("<f4").tobytes()
    if packing == "pickle":
        # What the old pipeline sent (numpy's unpickling turns any byte order into the receiver's native one).
        return pickle.dumps(a, protocol=3)
    if packing == "lossless":
        raise ConfigError("packing 'lossless' codes images with a predictor: use edge.lossless.LosslessCodec.encode")
    raise ConfigError("unknown packing %r (available: %s)" % (packing, ", ".join(PACKINGS)))


def encode_frame(stream, seq, t_capture, array, packing, entropy="none", context_model=None):
    """The whole frame (header + metadata + payload) as one bytes object, ready for ``sock.sendall``.

    ``entropy``: compress the packed payload with this coder (see :mod:`edge.entropy`); "none" sends it as packed;
    "context" codes the latents with ``context_model`` (:class:`edge.context_model.ContextModel`).
    """
    a = np.asarray(array)
    _check_sender_args(a, packing, entropy)
    return frame_payload(stream, seq, t_capture, a, packing, code_latents(a, packing, entropy, context_model),
                         entropy)


def code_latents(array, packing, entropy="none", context_model=None):
    """The payload of a frame: ``array`` packed (:func:`pack_latents`), then coded with ``entropy``; for
    ``context``, coded by ``context_model`` straight from the latents (its ``encode``)."""
    if entropy == "context":
        if context_model is None:
            raise ConfigError("entropy 'context' needs the model's probability tables (entropy.json beside the "
                              "model: `latentlink export entropy`)")
        return context_model.encode(array)
    return compress(pack_latents(array, packing), entropy)


def _check_sender_args(a, packing, entropy, packings=PACKINGS):
    if packing not in packings:
        raise ConfigError("unknown packing %r (available: %s)" % (packing, ", ".join(packings)))
    if a.dtype.name not in DTYPES:
        raise ConfigError("array dtype %r is not supported (supported: %s)" % (a.dtype.name, ", ".join(DTYPES)))
    check_coding(packing, entropy)


def check_coding(packing, entropy):
    """Raise ConfigError unless ``entropy`` is a known coder that ``packing`` can take (the sender's side)."""
    if entropy not in CODERS:
        raise ConfigError("unknown entropy coder %r (available: %s)" % (entropy, ", ".join(CODERS)))
    if entropy == "context" and packing != "bits":
        raise ConfigError("entropy 'context' codes binary latents (packing 'bits'), not %r latents: use another "
                          "--entropy (zlib, zstd)" % (packing,))
    if packing == "lossless" and entropy != "none":
        raise ConfigError("--lossless frames are coded by their predictor, not by --entropy %s: leave --entropy out"
                          % (entropy,))
    if packing == "pickle" and entropy != "none":
        raise ConfigError("--serializer pickle cannot be entropy-coded (entropy %r): it is for the seed "
                          "pipeline's receivers, which know no entropy coding; use --serializer framed or "
                          "--entropy none" % (entropy,))


def frame_payload(stream, seq, t_capture, array, packing, payload, entropy="none", version=VERSION,
                  iterations=None):
    """The frame carrying ``payload``: ``array`` packed with :func:`pack_latents` and coded with ``entropy``.

    :func:`encode_frame` in steps, for a caller that times packing, entropy coding and framing apart.
    ``version``: 1 for a protocol-1 frame, 2 for protocol 2's FRAME message (the same metadata and payload).
    ``iterations``: a progressive model's frame, ``array`` its first k codes (k, C, h, w) (see MAX_ITERATIONS).
    """
    a = np.asarray(array)
    _check_sender_args(a, packing, entropy, FRAME_PACKINGS)  # lossless too: its payload comes ready
    seq, t_capture = _sender_numbers(seq, t_capture)
    meta = _frame_fields(stream, seq, t_capture, a.dtype.name, a.shape, packing, len(payload), entropy, iterations)
    _validate_meta(meta, 0, None, ConfigError)  # refuse here what the host would refuse
    if version == VERSION_2:
        return _encode(meta, KIND_FRAME, payload, VERSION_2)
    return _encode(meta, 0, payload)


def _frame_fields(stream, seq, t_capture, dtype, shape, packing, payload_len, entropy, iterations):
    """A frame's metadata dict: the one place its layout is written (edges, and a gateway forwarding frames)."""
    meta = {"stream": stream, "seq": seq, "t_capture": t_capture, "dtype": dtype,
            "shape": [int(d) for d in shape], "packing": packing, "payload_len": payload_len}
    if entropy != "none":  # absent means none: frames without a coder stay byte-identical for older hosts
        meta["entropy"] = entropy
    if iterations is not None:  # absent for every other model: those frames stay byte-identical too
        meta["iterations"] = iterations
    return meta


def reframe(meta, payload):
    """The protocol-2 FRAME message of a received frame (``meta``: its validated :class:`FrameMeta`) and its
    ``payload``, byte for byte as :func:`frame_payload` encodes it; extra keys a peer added are not kept (a gateway
    forwards frames so, host/jetstream.py)."""
    fields = _frame_fields(meta.stream, meta.seq, meta.t_capture, meta.dtype, meta.shape, meta.packing, len(payload),
                           meta.entropy, meta.iterations)
    return _encode(fields, KIND_FRAME, bytes(payload), VERSION_2)


def raw_pickle_message(payload):
    """``--serializer pickle-raw``: an 8-byte big-endian length, then ``payload`` (``pack_latents(a, "pickle")``).

    Exactly what the seed pipeline's plain-socket clients send and expect: no magic, no metadata, no handshake, no
    acknowledgements, no end-of-stream message (closing the connection ends the stream).
    """
    return RAW_LENGTH.pack(len(payload)) + payload


def encode_end_of_stream(stream, seq, t_capture=0.0):
    """A frame saying the sender is done (flag END_OF_STREAM, packing "none", empty payload).

    ``seq`` is the next sequence number, i.e. the number of frames sent; dtype and shape are placeholders.
    """
    seq, t_capture = _sender_numbers(seq, t_capture)
    meta = {"stream": stream, "seq": seq, "t_capture": t_capture, "dtype": "uint8", "shape": [1],
            "packing": "none", "payload_len": 0}
    _validate_meta(meta, FLAG_END_OF_STREAM, None, ConfigError)
    return _encode(meta, FLAG_END_OF_STREAM, b"")


def parse_header(data8, versions=VERSIONS):
    """Check the 8 fixed-header bytes of a protocol 1 or 2 message; returns ``(version, flags_or_kind, meta_len)``.

    Protocol 1's byte is flags (only END_OF_STREAM is defined), protocol 2's the message kind (``KIND_*``).
    """
    if len(data8) != FIXED_HEADER.size:
        raise ProtocolError("fixed header is %d bytes (expected %d)" % (len(data8), FIXED_HEADER.size))
    magic, version, byte, meta_len = FIXED_HEADER.unpack(bytes(data8))
    if magic != MAGIC:
        raise ProtocolError("bad magic %r (expected %r: is this a latentlink edge?)" % (magic, MAGIC))
    if version not in versions:
        raise ProtocolError("unsupported protocol version %d (this host speaks %s)"
                            % (version, " and ".join(str(v) for v in versions)))
    if version == VERSION and byte & ~_KNOWN_FLAGS:
        raise ProtocolError("reserved flag bits 0x%02x are set (flags 0x%02x)" % (byte & ~_KNOWN_FLAGS, byte))
    if version == VERSION_2 and byte not in KIND_NAMES:
        raise ProtocolError("unknown protocol-2 message kind %d (known: %s)" % (
            byte, ", ".join("%d %s" % (k, KIND_NAMES[k]) for k in sorted(KIND_NAMES))))
    if meta_len > MAX_META_BYTES:
        raise ProtocolError("metadata of %d bytes exceeds the limit of %d bytes" % (meta_len, MAX_META_BYTES))
    return version, byte, meta_len


def parse_fixed_header(data8):
    """Check the 8 fixed-header bytes of a protocol-1 frame; returns ``(flags, meta_len)`` with meta_len in bytes."""
    return parse_header(data8, versions=(VERSION,))[1:]


def _refuse_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _json_object(meta_bytes):
    if len(meta_bytes) > MAX_META_BYTES:
        raise ProtocolError("metadata of %d bytes exceeds the limit of %d bytes" % (len(meta_bytes), MAX_META_BYTES))
    try:
        return json.loads(bytes(meta_bytes).decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError("frame metadata is not UTF-8 JSON (%s): %r" % (exc, bytes(meta_bytes[:80])))


def parse_meta(meta_bytes, flags, max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES):
    """Decode and validate a frame's metadata block; ``max_payload_bytes`` bounds payload_len (bytes)."""
    obj = _json_object(meta_bytes)
    return _validate_meta(obj, flags, max_payload_bytes, ProtocolError)._replace(meta_len=len(meta_bytes))


# --- protocol 2: handshake, acknowledgements, clock --------------------------------------------------------------
# Message kinds (the header's byte in protocol 2). Edge -> host: HELLO, AUTH, FRAME, CLOCK, END. Host -> edge:
# CHALLENGE, ACCEPT, REFUSE, ACK. A connection is: HELLO, then (a host with a token) CHALLENGE and the edge's AUTH,
# then ACCEPT or REFUSE (then close), then any number of FRAME and CLOCK, then END; the host ACKs each FRAME once it
# is decoded (and written) and the END once every frame before it was. CHALLENGE and AUTH: edge/security.py.
KIND_HELLO, KIND_ACCEPT, KIND_REFUSE, KIND_FRAME, KIND_END, KIND_ACK, KIND_CLOCK = 1, 2, 3, 4, 5, 6, 7
KIND_CHALLENGE, KIND_AUTH = 8, 9
KIND_NAMES = {KIND_HELLO: "HELLO", KIND_ACCEPT: "ACCEPT", KIND_REFUSE: "REFUSE", KIND_FRAME: "FRAME",
              KIND_END: "END", KIND_ACK: "ACK", KIND_CLOCK: "CLOCK", KIND_CHALLENGE: "CHALLENGE", KIND_AUTH: "AUTH"}
DELIVERIES = ("live", "reliable")  # live: frames lost with a connection stay lost; reliable: resent until acked
# What the host says of a frame in an ACK. "decoded" includes a frame it had already decoded (a resent duplicate:
# the ACK then says "duplicate": true and nothing is decoded or written again); "end" acknowledges END.
# "stored": a gateway (latentlink host --jetstream) stored the frame durably in its broker, for decode workers: it is
# not decoded yet, and the edge's report says so.
ACK_OUTCOMES = ("decoded", "failed", "end", "stored")
# Reasons a host refuses a HELLO. Permanent ones stop the edge at once (nothing it can retry would change them);
# the others ("busy", "shutting_down") are retried with backoff.
# "unauthorized": the edge lacks the credentials the host requires (a token, a certificate for the stream's name), or
# has credentials the host does not use (a token).
PERMANENT_REFUSALS = ("version", "bad_hello", "model_mismatch", "shape_mismatch", "packing_mismatch",
                      "pickle_refused", "entropy_unavailable", "name_in_use", "unauthorized")
TRANSIENT_REFUSALS = ("busy", "shutting_down")
MAX_WINDOW = 1024  # frames in flight; also bounds the lists a HELLO or ACCEPT may carry
_SESSION_RE = re.compile(r"[0-9a-f]{8,64}\Z")
_NONCE_RE = re.compile(r"[0-9a-f]{32,64}\Z")  # 16 to 32 random bytes, as hex
_PROOF_RE = re.compile(r"[0-9a-f]{64}\Z")  # an HMAC-SHA256, as hex


def _number(obj, key, error, minimum=None):
    value = obj.get(key)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise error("%s %r is not a number" % (key, value))
    try:
        value = float(value)
    except OverflowError:
        raise error("%s %r is too large" % (key, value))
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise error("%s %r is out of range (finite%s)" % (key, value, "" if minimum is None else ", >= %r" % minimum))
    return value


def _integer(obj, key, error, lo, hi):
    value = obj.get(key)
    if not _is_int(value) or not lo <= value <= hi:
        raise error("%s %r is not an integer from %d to %d" % (key, value, lo, hi))
    return int(value)


def _text(obj, key, error, choices=None, limit=1024):
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise error("%s %r is not a string of at most %d characters" % (key, value, limit))
    if choices is not None and value not in choices:
        raise error("%s %r is not one of %s" % (key, value, ", ".join(choices)))
    return value


def _hex(obj, key, error, pattern, what):
    value = obj.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise error("%s %r is not %s" % (key, value, what))
    return value


def _nonce(obj, key, error):
    return _hex(obj, key, error, _NONCE_RE, "32 to 64 lowercase hex digits")


def _proof(obj, key, error):
    return _hex(obj, key, error, _PROOF_RE, "64 lowercase hex digits (an HMAC-SHA256)")


def _seq_list(obj, key, error):
    value = obj.get(key, [])
    if not isinstance(value, list) or len(value) > 4 * MAX_WINDOW:
        raise error("%s is not a list of at most %d sequence numbers" % (key, 4 * MAX_WINDOW))
    for seq in value:
        if not _is_int(seq) or not 0 <= seq < MAX_SEQ:
            raise error("%s holds %r, not a sequence number" % (key, seq))
    return [int(seq) for seq in value]


def _progressive(obj, shape, error):
    """A HELLO's optional ``progressive``: ``{"iterations": K, "code_shape": [C, h, w]}`` (the edge's model sends
    up to K codes of that shape per frame), consistent with the HELLO's ``shape`` [K, C, h, w]; None if absent."""
    value = obj.get("progressive")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise error("HELLO progressive %r is not an object {iterations, code_shape}" % (value,))
    k, code_shape = value.get("iterations"), value.get("code_shape")
    if not _is_int(k) or not 1 <= k <= MAX_ITERATIONS:
        raise error("HELLO progressive iterations %r is not an integer from 1 to %d" % (k, MAX_ITERATIONS))
    if not isinstance(code_shape, list) or len(code_shape) != 3:
        raise error("HELLO progressive code_shape %r is not [C, h, w]" % (code_shape,))
    _check_shape(code_shape, error)
    if list(shape) != [k] + list(code_shape):
        raise error("HELLO shape %r does not match progressive iterations %d of codes %r (expected %r)"
                    % (shape, k, code_shape, [k] + list(code_shape)))
    return {"iterations": int(k), "code_shape": [int(d) for d in code_shape]}


def _validate_fields(kind, obj, error):
    """Check a protocol-2 control message's fields (everything but FRAME); returns a clean dict."""
    if not isinstance(obj, dict):
        raise error("%s fields are a JSON %s, not an object" % (KIND_NAMES[kind], type(obj).__name__))
    if kind == KIND_HELLO:
        versions = obj.get("versions")
        if not isinstance(versions, list) or not 1 <= len(versions) <= 16 or not all(_is_int(v) for v in versions):
            raise error("HELLO versions %r is not a list of protocol numbers" % (versions,))
        stream = obj.get("stream")
        _check_stream(stream, error)
        session = obj.get("session")
        if not isinstance(session, str) or not _SESSION_RE.match(session):
            raise error("HELLO session %r is not 8 to 64 lowercase hex digits" % (session,))
        model_id = obj.get("model_id")
        if model_id is not None and (not isinstance(model_id, str) or not 1 <= len(model_id) <= 128):
            raise error("HELLO model_id %r is not a string of 1 to 128 characters or null" % (model_id,))
        shape = _check_shape(obj.get("shape"), error)
        tiles = obj.get("tiles", [1, 1])
        if not isinstance(tiles, list) or len(tiles) != 2 or not all(_is_int(t) and 1 <= t <= 64 for t in tiles):
            raise error("HELLO tiles %r is not [rows, columns] of 1 to 64" % (tiles,))
        return {"versions": [int(v) for v in versions], "stream": stream, "session": session, "model_id": model_id,
                "shape": [int(d) for d in shape], "dtype": _text(obj, "dtype", error, DTYPES),
                "packing": _text(obj, "packing", error, FRAME_PACKINGS),
                "entropy": _text(obj, "entropy", error, CODERS) if "entropy" in obj else "none",
                "tiles": [int(t) for t in tiles], "delivery": _text(obj, "delivery", error, DELIVERIES),
                "window": _integer(obj, "window", error, 1, MAX_WINDOW), "unacked": _seq_list(obj, "unacked", error),
                "t_send": _number(obj, "t_send", error), "software": _text(obj, "software", error, limit=64)
                if "software" in obj else "",
                # An edge with a token sends its nonce (the host then answers CHALLENGE); others none.
                "nonce": _nonce(obj, "nonce", error) if obj.get("nonce") is not None else None,
                "progressive": _progressive(obj, shape, error)}
    if kind == KIND_ACCEPT:
        acked = obj.get("acked", [])
        if not isinstance(acked, list) or len(acked) > 4 * MAX_WINDOW:
            raise error("ACCEPT acked is not a list of at most %d [seq, outcome] pairs" % (4 * MAX_WINDOW))
        pairs = []
        for pair in acked:
            if (not isinstance(pair, list) or len(pair) != 2 or not _is_int(pair[0]) or not 0 <= pair[0] < MAX_SEQ
                    or pair[1] not in ("decoded", "failed", "stored")):
                raise error("ACCEPT acked holds %r, not [seq, 'decoded', 'failed' or 'stored']" % (pair,))
            pairs.append((int(pair[0]), pair[1]))
        return {"version": _integer(obj, "version", error, 2, 255), "window": _integer(obj, "window", error, 1,
                                                                                       MAX_WINDOW),
                "max_frame_bytes": _integer(obj, "max_frame_bytes", error, 1, 1 << 40), "acked": pairs,
                "t_recv": _number(obj, "t_recv", error), "t_send": _number(obj, "t_send", error)}
    if kind == KIND_REFUSE:
        permanent = obj.get("permanent")
        if not isinstance(permanent, bool):
            raise error("REFUSE permanent %r is not true or false" % (permanent,))
        return {"reason": _text(obj, "reason", error, limit=64), "message": _text(obj, "message", error),
                "permanent": permanent}
    if kind == KIND_ACK:
        fields = {"seq": _integer(obj, "seq", error, 0, MAX_SEQ - 1),
                  "outcome": _text(obj, "outcome", error, ACK_OUTCOMES),
                  "reason": _text(obj, "reason", error) if "reason" in obj else "",
                  "duplicate": obj.get("duplicate") is True,
                  "t_recv": _number(obj, "t_recv", error), "t_ack": _number(obj, "t_ack", error)}
        fields["t_done"] = _number(obj, "t_done", error) if "t_done" in obj else fields["t_ack"]
        return fields
    if kind == KIND_CHALLENGE:  # the host's nonce, and its proof that it knows the token (edge/security.py)
        return {"nonce": _nonce(obj, "nonce", error), "proof": _proof(obj, "proof", error)}
    if kind == KIND_AUTH:  # the edge's proof that it knows the token
        return {"proof": _proof(obj, "proof", error)}
    if kind == KIND_CLOCK:
        offset_s = _number(obj, "offset_s", error)
        if abs(offset_s) > MAX_CLOCK_OFFSET_S:
            raise error("CLOCK offset_s %r is out of range (at most %g seconds either way)" % (offset_s,
                                                                                              MAX_CLOCK_OFFSET_S))
        return {"offset_s": offset_s, "error_s": _number(obj, "error_s", error, 0.0)}
    if kind == KIND_END:
        _check_stream(obj.get("stream"), error)
        return {"stream": obj["stream"], "seq": _integer(obj, "seq", error, 0, MAX_SEQ - 1)}
    raise error("message kind %r has no fields to check" % (kind,))


def encode_message(kind, **fields):
    """A protocol-2 control message (not FRAME: see :func:`frame_payload` with ``version=2``), checked as the peer
    will check it."""
    _validate_fields(kind, fields, ConfigError)
    return _encode(fields, kind, b"", VERSION_2)


def parse_fields(kind, meta_bytes):
    """Decode and check a protocol-2 control message's JSON; returns its fields as a dict."""
    return _validate_fields(kind, _json_object(meta_bytes), ProtocolError)


def unpack_latents(payload, meta):
    """Decode a payload according to ``meta``; returns a writable array of meta.dtype and meta.shape."""
    if meta.packing not in FRAME_PACKINGS or meta.dtype not in DTYPES:
        raise ProtocolError("cannot unpack latents with packing %r and dtype %r" % (meta.packing, meta.dtype))
    if meta.packing == "lossless":
        return decode_lossless(payload, meta.shape)
    dtype = np.dtype(meta.dtype)
    expected = payload_size(meta.packing, meta.shape)
    if expected is not None and len(payload) != expected:
        raise ProtocolError("payload of %d bytes does not match shape %r with packing %r (expected %d bytes)"
                            % (len(payload), list(meta.shape), meta.packing, expected))
    n = int(np.prod(meta.shape))
    if meta.packing == "bits":
        flat = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=n)
    elif meta.packing == "pickle":  # read, never unpickled: edge/safe_pickle.py
        return loads_ndarray(payload, meta.dtype, meta.shape)
    else:  # explicit little-endian wire types, whatever the host's byte order
        flat = np.frombuffer(payload, dtype={"uint8": "u1", "float16": "<f2", "float32": "<f4"}[meta.packing])
    return flat.reshape(meta.shape).astype(dtype)  # astype copies: writable and independent of the buffer


def decode_latents(meta, payload, context_model=None):
    """The latent array a frame carries: decompressed (bounded by the packed size), then unpacked.

    Pickle payloads are read by :func:`edge.safe_pickle.loads_ndarray`, which never unpickles them. ``context``
    payloads are decoded by ``context_model`` (the receiver's tables; None: refused), bounded by the shape.
    """
    if meta.flags & FLAG_END_OF_STREAM:
        raise ProtocolError("an end-of-stream frame carries no latents")
    if meta.packing == "lossless":  # the captured image itself, rebuilt bit for bit (checked by its CRC-32)
        return decode_lossless(payload, meta.shape)
    if meta.entropy == "context":
        if meta.packing != "bits":
            raise ProtocolError("entropy 'context' with packing %r (only 'bits')" % (meta.packing,))
        if context_model is None:
            raise ProtocolError("a context-coded frame, and this receiver has no entropy tables (entropy.json "
                                "beside its model)")
        return context_model.decode(payload, meta.shape).astype(np.dtype(meta.dtype))
    if meta.entropy != "none":
        payload = decompress(payload, meta.entropy, payload_size(meta.packing, meta.shape))
    return unpack_latents(payload, meta)


# --- socket I/O ----------------------------------------------------------------------------------------------
def recv_exactly(sock, n, what="frame", at_boundary=False, deadline=None, got=b""):
    """Read exactly ``n`` bytes (bounded by the caller); the buffer grows only as bytes actually arrive.

    A close before any byte arrived is :class:`ConnectionClosed` when ``at_boundary`` (between frames), a close
    midway is :class:`ProtocolError`. ``deadline`` (a ``time.monotonic()`` value) bounds the whole read, so a peer
    that trickles bytes cannot hold the connection: missing it is a :class:`ProtocolError`. Without a deadline,
    socket.timeout propagates unchanged. ``got``: the first bytes of the ``n``, already received.
    """
    buf = bytearray(got)
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("message not complete in time: %d of %d bytes of its %s arrived (a message must "
                                    "arrive whole within the frame timeout of its first byte)" % (len(buf), n, what))
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - len(buf), _RECV_CHUNK))
        except ConnectionResetError:  # an abrupt close is still a close; the caller handles both alike
            chunk = b""
        except socket.timeout:
            if deadline is None:
                raise
            continue  # the deadline check above reports it
        if not chunk:
            if not buf and at_boundary:
                raise ConnectionClosed("peer closed the connection")
            raise ProtocolError("connection closed after %d of %d bytes of %s" % (len(buf), n, what))
        buf += chunk
    return buf


def read_frame(sock, max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES, on_header=None, frame_timeout_s=None,
               check_meta=None):
    """Read one protocol-1 frame; returns ``(FrameMeta, payload bytearray)``. Each part is validated before the
    next is read.

    ``on_header`` (no arguments) is called as soon as the 8 fixed-header bytes arrived, so that a receive
    timer started there does not count the idle wait for the frame. ``frame_timeout_s``: once a frame has
    started (its first byte arrived), all of it must arrive within this many seconds. ``check_meta(meta)`` may
    refuse a frame (by raising) after its metadata and before its payload is read: the receiver's own limits, such
    as its model's shape.
    """
    _, flags, meta_len, deadline = wait_header(sock, (VERSION,), frame_timeout_s=frame_timeout_s)
    if on_header is not None:
        on_header()
    return read_body(sock, VERSION, flags, meta_len, max_payload_bytes, deadline, check_meta)


def read_header(sock, versions=VERSIONS):
    """Wait for the next message and check its 8 header bytes; returns ``(version, flags_or_kind, meta_len)``.

    A close before the first byte is :class:`ConnectionClosed`; the socket's own timeout bounds each wait (for a
    peer that may trickle bytes, use :func:`wait_header`).
    """
    return parse_header(recv_exactly(sock, FIXED_HEADER.size, "frame header", at_boundary=True), versions)


def wait_header(sock, versions=VERSIONS, wait_until=None, frame_timeout_s=None):
    """Wait for the next message and check its 8 header bytes; returns ``(version, flags_or_kind, meta_len,
    deadline)``.

    ``wait_until`` (a ``time.monotonic()`` value; None: the socket's own timeout) bounds the wait for the first
    byte as a total: nothing by then is ``socket.timeout``, and since the wait is one ``recv``, no byte can extend
    it. ``frame_timeout_s`` (seconds; None: no limit): from that first byte, the whole message must arrive within
    it, header included, so a peer cannot trickle one byte at a time; ``deadline`` is that instant (or None), for
    :func:`read_body`. A close before the first byte is :class:`ConnectionClosed`.
    """
    header, deadline = wait_header_bytes(sock, wait_until, frame_timeout_s)
    version, byte, meta_len = parse_header(header, versions)
    return version, byte, meta_len, deadline


def wait_header_bytes(sock, wait_until=None, frame_timeout_s=None):
    """:func:`wait_header` without the check: ``(the 8 header bytes, deadline)``, for a receiver that also takes
    connections that are not latentlink (a plain client's length-prefixed pickles)."""
    if wait_until is not None:
        remaining = wait_until - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no message arrived in time")
        sock.settimeout(remaining)
    try:
        first = sock.recv(FIXED_HEADER.size)
    except ConnectionResetError:
        first = b""
    if not first:
        raise ConnectionClosed("peer closed the connection")
    deadline = None if frame_timeout_s is None else time.monotonic() + frame_timeout_s
    return recv_exactly(sock, FIXED_HEADER.size, "frame header", deadline=deadline, got=first), deadline


def read_body(sock, version, byte, meta_len, max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES, deadline=None,
              check_meta=None):
    """The rest of a message whose header :func:`read_header` checked.

    A frame (protocol 1, or protocol 2's FRAME) gives ``(FrameMeta, payload)``, ``check_meta`` as in
    :func:`read_frame`; any other protocol-2 message ``(fields dict, b"")``. ``deadline`` (``time.monotonic()``)
    bounds the whole read.
    """
    meta_bytes = recv_exactly(sock, meta_len, "metadata", deadline=deadline)
    if version == VERSION_2 and byte != KIND_FRAME:
        return parse_fields(byte, meta_bytes), b""
    meta = parse_meta(meta_bytes, byte if version == VERSION else 0, max_payload_bytes)
    if check_meta is not None:
        check_meta(meta)
    payload = recv_exactly(sock, meta.payload_len, "payload", deadline=deadline)
    return meta, payload
