"""Optional lossless entropy coding of a frame's packed payload: none, zlib, lz4 or zstd.

``compress(data, coder)`` runs on the edge (the Nano's CPU, timed as the ``entropy`` stage);
``decompress(data, coder, expected_len)`` runs on the host, on untrusted network bytes. The receiver always knows
the exact size the payload must unpack to (from the frame's packing and shape), so decompression is bounded by it:
whatever the compressed bytes claim, at most ``expected_len`` + 1 bytes of output are ever produced (a zip bomb
costs nothing), and anything but exactly ``expected_len`` bytes from exactly one stream is a
:class:`ProtocolError`.

Formats: ``zlib`` (RFC 1950, level 6; stdlib, always available), ``lz4`` (LZ4 block format without a size prefix,
the ``lz4`` package), ``zstd`` (one Zstandard frame with its content size, level 3, the ``zstandard`` package).
lz4 and zstandard are imported only when used; missing, they are a :class:`ConfigError` on the sending side and a
:class:`ProtocolError` (that connection only) on the receiving side, both saying what to ``pip install``.

``context`` is not a coder of bytes: it codes the binary latents themselves with the model's probability tables
(:mod:`latentlink.edge.context_model`, ``entropy.json`` beside the model), so :func:`latentlink.edge.protocol.
code_latents` and :func:`~latentlink.edge.protocol.decode_latents` call it, not :func:`compress`.

Python 3.6 compatible (the Jetson Nano).
"""

import importlib
import zlib

from .errors import ConfigError, ProtocolError

CODERS = ("none", "zlib", "lz4", "zstd", "context")
BYTE_CODERS = ("zlib", "lz4", "zstd")  # the coders of packed bytes (compress / decompress)
ZLIB_LEVEL = 6  # zlib's default: the default model's packed bits to 67 % in 0.69 ms (504x504, x86; README)
ZSTD_LEVEL = 3  # zstd's default: to 68 % in 0.18 ms
# coder -> (module to import, pip package that provides it)
_LIBRARIES = {"lz4": ("lz4.block", "lz4"), "zstd": ("zstandard", "zstandard")}
ZSTANDARD_MIN = (0, 19)  # the first with decompress(allow_extra_data=False): trailing bytes are refused
_modules = {}


def _check_coder(coder, error):
    if coder not in CODERS:
        raise error("unknown entropy coder %r (available: %s)" % (coder, ", ".join(CODERS)))


def _library(coder, error):
    """The module behind ``coder`` (lz4.block or zstandard), imported on first use; ``error`` if not installed."""
    name, package = _LIBRARIES[coder]
    if name not in _modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise error("entropy coder %r needs the %s package, which is not installed here (%s): pip install %s "
                        "(or pip install \".[entropy]\" in the latentlink folder)" % (coder, package, exc, package))
        if coder == "zstd" and tuple(int(v) for v in module.__version__.split(".")[:2]) < ZSTANDARD_MIN:
            raise error("entropy coder 'zstd' needs zstandard %d.%d or newer, this is %s: pip install -U zstandard"
                        % (ZSTANDARD_MIN + (module.__version__,)))
        _modules[name] = module
    return _modules[name]


def check_available(coder):
    """Raise ConfigError unless ``coder`` is known and its library importable (call before streaming starts)."""
    _check_coder(coder, ConfigError)
    if coder in _LIBRARIES:
        _library(coder, ConfigError)


def compress(data, coder):
    """``data`` (bytes) coded with ``coder``; "none" returns ``data`` itself. ConfigError for a bad coder."""
    check_available(coder)
    if coder == "none":
        return data
    if coder == "context":
        raise ConfigError("entropy 'context' codes the latents, not packed bytes: use protocol.code_latents")
    if coder == "zlib":
        return zlib.compress(data, ZLIB_LEVEL)
    if coder == "lz4":
        # No size prefix: the receiver knows the size from the frame's metadata.
        return _library(coder, ConfigError).compress(data, store_size=False)
    zstd = _library(coder, ConfigError)
    return zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(data)  # writes the content size into the frame


def decompress(data, coder, expected_len):
    """Decode untrusted ``data`` coded with ``coder``; returns exactly ``expected_len`` bytes or raises ProtocolError.

    Never produces more than ``expected_len`` + 1 bytes of output, whatever ``data`` says about its own size.
    """
    _check_coder(coder, ProtocolError)
    if coder == "context":
        raise ProtocolError("entropy 'context' payloads are decoded with the model's tables (decode_latents)")
    if coder == "none":
        out = data
    else:
        module = _library(coder, ProtocolError) if coder in _LIBRARIES else None
        try:
            out = _DECODERS[coder](data, expected_len, module)
        except ProtocolError:
            raise
        except Exception as exc:  # bytes from the network: no raw exception may escape
            raise ProtocolError("%s payload of %d bytes is corrupt (%s: %s); expected it to unpack to %d bytes"
                                % (coder, len(data), type(exc).__name__, exc, expected_len))
    if len(out) != expected_len:
        raise ProtocolError("%s payload of %d bytes unpacks to %d bytes (expected %d bytes)"
                            % (coder, len(data), len(out), expected_len))
    return out


def _zlib_decode(data, expected_len, _module):
    d = zlib.decompressobj()
    out = d.decompress(data, expected_len + 1)  # one byte more than allowed tells "too long" from "just right"
    if len(out) > expected_len:
        raise ProtocolError("zlib payload of %d bytes unpacks to more than %d bytes" % (len(data), expected_len))
    if not d.eof:
        raise ProtocolError("zlib payload of %d bytes is truncated (its stream does not end; %d of %d bytes "
                            "unpacked)" % (len(data), len(out), expected_len))
    if d.unused_data:
        raise ProtocolError("zlib payload of %d bytes has %d bytes of trailing data after its stream of %d bytes"
                            % (len(data), len(d.unused_data), expected_len))
    return out


def _lz4_decode(data, expected_len, lz4_block):
    # uncompressed_size is the size of the output buffer: the block cannot write past it (too long is an error).
    return lz4_block.decompress(data, uncompressed_size=expected_len)


def _zstd_decode(data, expected_len, zstd):
    # decompress() allocates the content size the frame header declares: check it before trusting it. Edges always
    # write it; a frame without one could make the decoder allocate the window it asks for (up to 128 MiB).
    declared = zstd.frame_content_size(data)
    if declared != expected_len:
        raise ProtocolError("zstd payload of %d bytes declares %s of content (expected %d bytes)" % (
            len(data), "no size" if declared == -1 else "%d bytes" % declared, expected_len))
    return zstd.ZstdDecompressor().decompress(data, max_output_size=expected_len, allow_extra_data=False)


_DECODERS = {"zlib": _zlib_decode, "lz4": _lz4_decode, "zstd": _zstd_decode}
