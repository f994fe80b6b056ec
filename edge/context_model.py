"""Context-model entropy coding of binary latents (``--entropy context``): integers and numpy only.

The default model sends 8 bits per 4x4 block whatever the block shows. This module codes those bits with a
probability for each one, taken from bits already coded, so a flat sky costs less than foliage.

**The model.** The latents (N, C, H, W) are coded in ``4 * C`` *passes*: channel by channel, and within a channel
the 2x2 sub-grids in the order (0, 0), (1, 1), (0, 1), (1, 0) (row parity, column parity). A pass codes all its
symbols at once: each gets a *context* index from bits of earlier passes only:

- the symbol's ordered-dither phase ``((y >> 1) & 1, (x >> 1) & 1)`` (4 values; with the pass's parities it
  fixes the Bayer threshold the binarizer compared against, see export/models/lossy_cae.py);
- counts of ones among already coded neighbours of the same channel: none in sub-grid (0, 0); the 4 diagonal
  ones in (1, 1); north+south and west+east in (0, 1); those two and the diagonals in (1, 0);
- the bits of the 4 previous channels at the same position (fewer for the first channels), and the count of ones
  among the previous channel's 4 nearest neighbours (north, south, west, east) of the position.

Each pass has a table of P(bit = 1) for its contexts as 16-bit integers (units of 1/65536, 1 to 65535): the
:class:`ContextModel`, stored as ``entropy.json`` beside the model's ONNX files, identified by the SHA-256 of
its tables (:attr:`ContextModel.sha256`), which the edge's HELLO carries so that edge and host agree bit for bit.

**The coder.** Every probability maps (integer comparisons only, :func:`rice_class`) to a class: which bit is the
less probable one (LPS) and a Rice parameter k (0 to 15). Each class is coded as a whole: the gaps between its
LPS (the runs of the probable bit, in coding order) as Rice codes, whose unary parts all go in one bit string and
whose k-bit remainders in another, so that both coding and decoding are a handful of whole-array numpy operations
per pass, never a Python step per symbol. Rice codes of runs are within 0 to 3 % of the ideal size (-log2 p)
for such a class (at most 3.0 %, at P(LPS) = 0.4; the README has the measured total).

Payload: ``NUM_CLASSES`` LEB128 varints (the number of LPS of each class), then the unary bits (each gap's
quotient as that many ones and a zero), then the remainders (k bits each, most significant first), then zero
bits to a whole byte. The symbol count always comes from the shape, never from the payload; decoding checks every
count and length against it and raises :class:`ProtocolError` for anything but an exact, complete payload.

Python 3.6 + numpy 1.19 compatible (the Jetson Nano); no floating point anywhere in coding or decoding.
"""

import base64
import hashlib
import io
import json
import zlib

import numpy as np

from .errors import ConfigError, ProtocolError

FORMAT = "latentlink-entropy"
VERSION = 1
SCHEME = "dither-subgrid-v1"  # the pass order and contexts above; a new layout gets a new name
PROB_BITS = 16
PROB_ONE = 1 << PROB_BITS
FILENAME = "entropy.json"  # beside model.json (or a TensorRT engine's sidecar)
MAX_K = 15
NUM_CLASSES = 2 * (MAX_K + 1)  # class = 2 * k + lps
# Rice parameter k for a class whose LPS has probability pl (units of 1/65536): k = how many of these pl is below.
# They are the crossovers of the expected Rice code lengths of k and k + 1 for geometric runs, p (k + 1 + Q/(1-Q))
# bits per symbol with Q = (1 - p) ** (2 ** k), rounded up (tests/test_context_model.py derives them again).
RICE_THRESHOLDS = (25033, 14015, 7429, 3826, 1942, 979, 491, 246, 124, 62, 31, 16, 8, 4, 2)
SUBGRIDS = ((0, 0), (1, 1), (0, 1), (1, 0))  # coding order of the 2x2 sub-grids within a channel
CROSS_CHANNELS = 4  # previous channels whose bit at the same position is part of the context (zeros before the first)
_N, _S, _W, _E = (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)
_DIAGONALS = ((0, -1, -1), (0, -1, 1), (0, 1, -1), (0, 1, 1))
# Same-channel neighbours per sub-grid: each entry a group of taps (dc, dy, dx) whose ones are counted.
_SPATIAL = {(0, 0): (), (1, 1): (_DIAGONALS,), (0, 1): ((_N, _S), (_W, _E)), (1, 0): ((_N, _S), (_W, _E), _DIAGONALS)}


def passes(channels):
    """The coding order: a list of ``(channel, (row parity, column parity), features)``; each feature is a tuple of
    taps ``(dc, dy, dx)`` whose bits are summed (all of them in earlier passes, or in the zero channels before the
    first: every channel has the same features, so that the edge computes a sub-grid's contexts for all channels at
    once)."""
    cross = tuple(((-k, 0, 0),) for k in range(1, CROSS_CHANNELS + 1))
    # the previous channel around the position: -4 % bits at 504 and -5 % at 1008 on held-out photos
    cross += (tuple((-1,) + tap[1:] for tap in (_N, _S, _W, _E)),)
    return [(c, grid, _SPATIAL[grid] + cross) for c in range(channels) for grid in SUBGRIDS]


def table_sizes(channels):
    """Number of contexts of each pass: 4 dither phases times the product of (taps + 1) over its features."""
    sizes = []
    for _, _, features in passes(channels):
        n = 4
        for taps in features:
            n *= len(taps) + 1
        sizes.append(n)
    return sizes


def rice_class(p16):
    """Class (``2 * k + lps``) of each probability of a one ``p16`` (int array, units of 1/65536, 1 to 65535)."""
    p16 = np.asarray(p16, dtype=np.int64)
    lps = (p16 < PROB_ONE // 2).astype(np.int64)  # the less probable bit: 1 if P(1) < 1/2
    pl = np.where(lps == 1, p16, PROB_ONE - p16)
    k = np.zeros(pl.shape, dtype=np.int64)
    for t in RICE_THRESHOLDS:
        k += pl < t
    return (2 * k + lps).astype(np.uint8)


def _class_k(cls):
    return np.asarray(cls, dtype=np.int64) >> 1


# --- contexts -----------------------------------------------------------------------------------------------------
def _grid_shape(height, width, grid):
    return (height - grid[0] + 1) // 2, (width - grid[1] + 1) // 2


def _subphase(height, width, grid):
    """The dither phase index (0 to 3) of each position of a sub-grid."""
    h, w = _grid_shape(height, width, grid)
    ys = (np.arange(h) * 2 + grid[0]) >> 1 & 1
    xs = (np.arange(w) * 2 + grid[1]) >> 1 & 1
    return (ys[:, None] * 2 + xs[None, :]).astype(np.int32)


def _padded(bits):
    """(N, C, H, W) bits -> uint8 (N, CROSS_CHANNELS + C, H + 2, W + 2): a zero border, and zero channels before the
    first (neighbours beyond the edges, and channels before the first, read as 0)."""
    n, c, h, w = bits.shape
    out = np.zeros((n, CROSS_CHANNELS + c, h + 2, w + 2), dtype=np.uint8)
    out[:, CROSS_CHANNELS:, 1:h + 1, 1:w + 1] = bits
    return out


def _tap(padded, c, grid, tap, h, w, channels=1):
    """The bits at offset ``tap`` from the positions of sub-grid ``grid`` of ``channels`` channels from ``c``."""
    dc, dy, dx = tap
    y0, x0, c0 = 1 + grid[0] + dy, 1 + grid[1] + dx, CROSS_CHANNELS + c + dc
    return padded[:, c0:c0 + channels, y0:y0 + 2 * h - 1:2, x0:x0 + 2 * w - 1:2]


def pass_contexts(padded, index, plan, phases, channels=1):
    """Context indices (uint16, (N, channels, h, w)) of pass ``index`` of ``plan`` (:func:`passes`) and of the
    ``channels - 1`` passes of the same sub-grid in the next channels (the edge's encoder, which has every bit, takes
    a sub-grid of all channels at once), from ``padded`` (:func:`_padded` bits; only earlier passes are read).
    ``phases``: :func:`_subphase` per sub-grid."""
    c, grid, features = plan[index]
    height, width = padded.shape[2] - 2, padded.shape[3] - 2
    h, w = _grid_shape(height, width, grid)
    # uint8 counts and uint16 indices (every table has fewer than 2**16 contexts): a quarter of int32's traffic
    ctx = np.empty((padded.shape[0], channels, h, w), dtype=np.uint16)
    ctx[...] = phases[grid]
    for taps in features:
        views = [_tap(padded, c, grid, tap, h, w, channels) for tap in taps]
        if len(views) == 1:
            count = views[0]
        else:
            count = np.add(views[0], views[1])
            for view in views[2:]:
                count += view
        ctx *= len(taps) + 1
        ctx += count
    return ctx


def all_contexts(bits):
    """For fitting and training: ``[(context indices, bits)]`` per pass of ``bits`` (N, C, H, W) in {0, 1}, each
    a flat uint16 and a flat uint8 array in coding order."""
    bits = np.asarray(bits, dtype=np.uint8)
    n, channels, height, width = bits.shape
    plan = passes(channels)
    padded = _padded(bits)
    phases = dict((g, _subphase(height, width, g)) for g in SUBGRIDS)
    out = []
    for i, (c, grid, _) in enumerate(plan):
        ctx = pass_contexts(padded, i, plan, phases)
        out.append((ctx.ravel(), bits[:, c, grid[0]::2, grid[1]::2].ravel()))
    return out


# --- the model: tables, identity, JSON ------------------------------------------------------------------------------
class ContextModel(object):
    """The probability tables of one encoder: ``tables[i]`` holds P(bit = 1) of pass ``i``'s contexts as integers
    in units of 1/65536 (1 to 65535). ``info``: how they were fitted (not part of the identity)."""

    def __init__(self, channels, tables, info=None):
        self.channels = int(channels)
        sizes = table_sizes(self.channels)
        if max(sizes) > 1 << 16:  # contexts are uint16 (pass_contexts)
            raise ConfigError("entropy tables of %d contexts: more than 2**16" % max(sizes))
        if len(tables) != len(sizes):
            raise ConfigError("entropy tables: %d tables for %d channels (expected %d)" % (
                len(tables), self.channels, len(sizes)))
        self.tables = []
        for i, (table, size) in enumerate(zip(tables, sizes)):
            table = np.asarray(table)
            if table.shape != (size,) or table.dtype.kind not in "iu":
                raise ConfigError("entropy table %d has shape %s and dtype %s (expected %d integers)" % (
                    i, table.shape, table.dtype, size))
            if size and (table.min() < 1 or table.max() >= PROB_ONE):
                raise ConfigError("entropy table %d holds probabilities outside 1..65535" % i)
            self.tables.append(table.astype(np.uint16))
        self.classes = [rice_class(t) for t in self.tables]
        # Per sub-grid, the classes of all channels end to end, and each channel's offset there (the encoder's).
        self._grid_classes, self._offsets = {}, {}
        for i, grid in enumerate(SUBGRIDS):
            self._grid_classes[grid] = np.concatenate(self.classes[i::len(SUBGRIDS)])
            self._offsets[grid] = (np.arange(self.channels, dtype=np.uint32) * sizes[i])[None, :, None, None]
        self.info = dict(info or {})
        self.sha256 = hashlib.sha256(json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))
                                     .encode("ascii")).hexdigest()

    def _identity(self):
        return {"format": FORMAT, "version": VERSION, "scheme": SCHEME, "prob_bits": PROB_BITS,
                "channels": self.channels,
                # zlib-compressed: most of the contexts never occur and keep P = 1/2, so the file stays small
                "tables": [base64.b64encode(zlib.compress(t.astype("<u2").tobytes(), 9)).decode("ascii")
                           for t in self.tables]}

    def to_json(self):
        """The ``entropy.json`` text: the identity fields, ``sha256`` and ``info``."""
        obj = self._identity()
        obj["sha256"] = self.sha256
        obj["info"] = self.info
        return json.dumps(obj, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text, where="entropy.json"):
        """Parse :meth:`to_json` text; ConfigError naming ``where`` if it is not a valid, intact table file."""
        try:
            obj = json.loads(text)
            if obj.get("format") != FORMAT or obj.get("version") != VERSION or obj.get("scheme") != SCHEME \
                    or obj.get("prob_bits") != PROB_BITS:
                raise ValueError("format %r version %r scheme %r prob_bits %r (expected %s %d %s %d)" % (
                    obj.get("format"), obj.get("version"), obj.get("scheme"), obj.get("prob_bits"), FORMAT,
                    VERSION, SCHEME, PROB_BITS))
            sizes = table_sizes(int(obj["channels"]))
            if not isinstance(obj["tables"], list) or len(obj["tables"]) != len(sizes):
                raise ValueError("%d tables for %r channels" % (len(obj["tables"]), obj["channels"]))
            tables = []
            for text, size in zip(obj["tables"], sizes):
                d = zlib.decompressobj()  # bounded: a table is never more than its size
                raw = d.decompress(base64.b64decode(text.encode("ascii"), validate=True), 2 * size + 1)
                if len(raw) != 2 * size or not d.eof:
                    raise ValueError("a table of %d bytes, expected %d" % (len(raw), 2 * size))
                tables.append(np.frombuffer(raw, dtype="<u2"))
            model = cls(obj["channels"], tables, obj.get("info"))
        except ConfigError as exc:
            raise ConfigError("%s: %s" % (where, exc))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError("%s is not a latentlink entropy table file (%s): write it with `latentlink export "
                              "entropy`" % (where, exc))
        if obj.get("sha256") not in (None, model.sha256):
            raise ConfigError("%s: its tables hash to %s, not the sha256 it records (%s): the file was changed; "
                              "fit it again with `latentlink export entropy`" % (where, model.sha256[:12],
                                                                                  str(obj["sha256"])[:12]))
        return model

    @classmethod
    def load(cls, path):
        try:
            with io.open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, IOError, ValueError) as exc:
            raise ConfigError("cannot read entropy tables %s (%s): write them with `latentlink export entropy`"
                              % (path, exc))
        return cls.from_json(text, path)

    def save(self, path):
        with io.open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    # --- coding ---------------------------------------------------------------------------------------------------
    def _check_shape(self, shape, error):
        if len(shape) != 4 or int(shape[1]) != self.channels or min(int(d) for d in shape) < 1:
            raise error("context coding takes latents of shape (N, %d, H, W), not %r" % (self.channels,
                                                                                           list(shape)))

    def ideal_bits(self, bits):
        """The model's ideal size of ``bits`` in bits, sum of -log2 p (float; for reports, not for coding)."""
        total = 0.0
        for i, (ctx, b) in enumerate(all_contexts(bits)):
            p1 = self.tables[i][ctx].astype(np.float64) / PROB_ONE
            total -= np.log2(np.where(b == 1, p1, 1.0 - p1)).sum()
        return total

    def encode(self, latents):
        """Code binary latents (N, C, H, W), values > 0.5 read as one (as pack_latents does): returns bytes."""
        a = np.asarray(latents)
        self._check_shape(a.shape, ConfigError)
        bits = (a > 0.5).astype(np.uint8) if a.dtype != np.uint8 else np.minimum(a, 1)
        plan = passes(self.channels)
        padded = _padded(bits)
        phases = dict((g, _subphase(bits.shape[2], bits.shape[3], g)) for g in SUBGRIDS)
        # Contexts and classes of each sub-grid for all channels at once (4 passes of numpy calls, not 4 C): every
        # channel has the same features, and this side has every bit.
        classes = {}
        for i, grid in enumerate(SUBGRIDS):
            ctx = pass_contexts(padded, i, plan, phases, self.channels)
            ctx = ctx.astype(np.uint32)
            ctx += self._offsets[grid]
            classes[grid] = self._grid_classes[grid][ctx]
        used = np.zeros(NUM_CLASSES, dtype=np.int64)
        every_class = np.arange(NUM_CLASSES, dtype=np.uint8)
        lps_cls, lps_pos = [], []
        # Pass by pass, in coding order (numpy is several times faster per element on arrays of one pass, a few
        # thousand, than on the whole frame's, which leave the CPU's caches): sort the pass's bits by class (a
        # stable radix sort), find the LPS, and each one's index in its class is its index in the sorted pass minus
        # where its class starts there, plus the class's symbols in earlier passes.
        for c, grid, _ in plan:
            cls = classes[grid][:, c].ravel()
            order = np.argsort(cls, kind="stable")
            counts = np.bincount(cls, minlength=NUM_CLASSES)
            cls_sorted = np.repeat(every_class, counts)
            hit = np.flatnonzero(bits[:, c, grid[0]::2, grid[1]::2].ravel()[order] == (cls_sorted & 1))
            hit_cls = cls_sorted[hit]
            lps_cls.append(hit_cls)
            lps_pos.append(hit + (used - (np.cumsum(counts) - counts))[hit_cls])
            used += counts
        return encode_runs(np.concatenate(lps_cls), np.concatenate(lps_pos))

    def decode(self, payload, shape):
        """The uint8 bits (``shape``: N, C, H, W) that ``payload`` codes; ProtocolError for anything but an exact,
        complete payload. ``shape`` comes from the frame's metadata, already checked against the model."""
        self._check_shape(shape, ProtocolError)
        n, channels, height, width = (int(d) for d in shape)
        total = n * channels * height * width
        stream = _ClassStream(payload, total)
        plan = passes(channels)
        padded = np.zeros((n, CROSS_CHANNELS + channels, height + 2, width + 2), dtype=np.uint8)
        phases = dict((g, _subphase(height, width, g)) for g in SUBGRIDS)
        for i, (c, grid, _) in enumerate(plan):
            ctx = pass_contexts(padded, i, plan, phases)
            values = stream.take(self.classes[i][ctx.ravel()])
            h, w = ctx.shape[2:]
            padded[:, CROSS_CHANNELS + c, 1 + grid[0]:1 + grid[0] + 2 * h - 1:2,
                   1 + grid[1]:1 + grid[1] + 2 * w - 1:2] = values.reshape(ctx.shape[0], h, w)
        stream.finish()
        return np.ascontiguousarray(padded[:, CROSS_CHANNELS:, 1:height + 1, 1:width + 1])


# --- the class coder ------------------------------------------------------------------------------------------------
def leb128(values):
    """Non-negative integers as LEB128 varints (7 bits a byte, low first): the counts ahead of a payload's codes
    (this coder's and edge/lossless.py's)."""
    out = bytearray()
    for v in values:
        v = int(v)
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def read_leb128(data, at, count, payload, what):
    """``count`` LEB128 varints from ``data[at:]`` (bytes or uint8): ``(list of ints, next offset)``. ProtocolError,
    naming ``payload`` (e.g. "lossless payload") and ``what`` (each value's name, "%d": its index), when the data ends
    inside them or one is longer than 5 bytes (35 bits: no count here needs more)."""
    out = []
    for i in range(count):
        value, shift = 0, 0
        while True:
            if at >= len(data):
                raise ProtocolError("%s of %d bytes ends inside its header" % (payload, len(data)))
            byte = int(data[at])
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 35:
                raise ProtocolError(("%s: " + what + " is not a valid varint") % (payload, i))
        out.append(value)
    return out, at


def _ranks(classes, used):
    """Each symbol's index among the symbols of its class so far: ``used`` (per class, updated) plus its rank among
    this pass's symbols of the class (a stable sort by class, numpy's radix sort for uint8)."""
    order = np.argsort(classes, kind="stable")
    counts = np.bincount(classes, minlength=NUM_CLASSES)
    shift = (used - (np.cumsum(counts) - counts)).astype(np.int32)  # index in class = index in sorted order + shift
    rank = np.empty(len(classes), dtype=np.int32)
    rank[order] = np.arange(len(classes), dtype=np.int32) + shift[classes[order]]
    used += counts
    return rank


def encode_runs(lps_cls, lps_pos):
    """The payload for the LPS (less probable symbols) of each class: their classes ``lps_cls`` (uint8) and
    positions ``lps_pos`` within their class (increasing within a class), in any order of classes: bytes."""
    # int32 throughout (positions are below MAX_ELEMENTS = 2**27): half the memory traffic of int64.
    order = np.argsort(lps_cls, kind="stable")
    hit_cls = lps_cls[order]
    pos = lps_pos[order].astype(np.int32)
    m = np.bincount(hit_cls, minlength=NUM_CLASSES)
    # Gap before each LPS: its position in its class minus the previous one's, minus 1 (its position, first in class).
    gaps = np.empty_like(pos)
    if len(pos):
        gaps[0] = pos[0]
        np.subtract(pos[1:], pos[:-1], out=gaps[1:])
        gaps[1:] -= 1
        firsts = (np.cumsum(m) - m)[m > 0]
        gaps[firsts] = pos[firsts]
    k = (hit_cls >> 1).astype(np.int32)
    q = gaps >> k
    ends = np.cumsum(q + 1)  # each quotient's terminating zero is at end - 1
    unary_len = int(ends[-1]) if len(ends) else 0
    rem_len = int(k.sum())
    bits = np.zeros(unary_len + rem_len + 7 >> 3 << 3, dtype=np.uint8)
    bits[:unary_len] = 1
    bits[ends - 1] = 0
    if rem_len:
        # The remainders, k bits each, most significant first. Classes 2k and 2k + 1 share k and are adjacent in
        # class order, so the gaps of each k are one slice: one (gaps, k) bit matrix per k.
        at, first_gap = unary_len, np.cumsum(m) - m
        for kk in range(1, MAX_K + 1):
            lo, hi = first_gap[2 * kk], first_gap[2 * kk] + m[2 * kk] + m[2 * kk + 1]
            if hi > lo:
                shifts = np.arange(kk - 1, -1, -1)
                bits[at:at + (hi - lo) * kk] = ((gaps[lo:hi, None] >> shifts) & 1).ravel()
                at += (hi - lo) * kk
    return leb128(m) + np.packbits(bits).tobytes()


class _ClassStream(object):
    """The decoder's side of :func:`encode_runs`: parses and checks the whole payload up front (bounded by
    ``total``, the symbol count from the shape), then hands out each pass's symbols by class with :meth:`take`."""

    def __init__(self, payload, total):
        data = np.frombuffer(bytes(payload), dtype=np.uint8)
        # A valid payload is at most 16 bits a symbol (k + 1 bits for an LPS of a class with parameter k) plus the
        # header; refuse anything longer before unpacking it.
        limit = 2 * total + 3 * NUM_CLASSES * 4 + 8
        if len(data) > limit:
            raise ProtocolError("context-coded payload of %d bytes is longer than %d symbols can need (%d bytes)"
                                % (len(data), total, limit))
        m, at = read_leb128(data, 0, NUM_CLASSES, "context-coded payload", "class %d's count")
        for c, value in enumerate(m):
            if value > total:
                raise ProtocolError("context-coded payload says class %d has %d rare symbols, more than the %d "
                                    "symbols of the shape" % (c, value, total))
        m = np.array(m, dtype=np.int64)
        count = int(m.sum())
        if count > total:
            raise ProtocolError("context-coded payload says %d rare symbols, more than the %d symbols of the shape"
                                % (count, total))
        bits = np.unpackbits(data[at:])
        zeros = np.flatnonzero(bits == 0)[:count]  # the unary codes' terminators
        if len(zeros) < count:
            raise ProtocolError("context-coded payload is truncated: %d of its %d run lengths are there"
                                % (len(zeros), count))
        unary_end = int(zeros[-1]) + 1 if count else 0
        k = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64) >> 1, m)
        end = unary_end + int(k.sum())
        if (end + 7) // 8 != len(bits) // 8:
            raise ProtocolError("context-coded payload has %d bytes after its header, its codes need %d (%s)" % (
                len(bits) // 8, (end + 7) // 8, "truncated" if end > len(bits) else "extra bytes"))
        if bits[end:].any():
            raise ProtocolError("context-coded payload: the padding after its codes is not zero")
        q = np.diff(np.concatenate([[-1], zeros])) - 1
        gaps = q << k
        at, first_gap = unary_end, np.cumsum(m) - m
        for kk in range(1, MAX_K + 1):  # the remainders: one (gaps, k) bit matrix per k, as encode_runs wrote
            lo, hi = first_gap[2 * kk], first_gap[2 * kk] + m[2 * kk] + m[2 * kk + 1]
            if hi > lo:
                weights = np.left_shift(1, np.arange(kk - 1, -1, -1, dtype=np.int64))
                gaps[lo:hi] |= bits[at:at + (hi - lo) * kk].reshape(hi - lo, kk).astype(np.int64).dot(weights)
                at += (hi - lo) * kk
        # Position of each LPS within its class: a running sum of gap + 1 that restarts at each class.
        run = np.cumsum(gaps + 1)
        class_ends = np.cumsum(m)
        base = np.concatenate([[0], run])[class_ends - m]
        pos = run - 1 - np.repeat(base, m)
        # Each class's symbols up to its last LPS; later ones are its probable bit.
        self.length = np.zeros(NUM_CLASSES, dtype=np.int64)
        last = class_ends[m > 0] - 1
        self.length[m > 0] = pos[last] + 1
        if int(self.length.sum()) > total:
            raise ProtocolError("context-coded payload's runs are longer than the %d symbols of the shape" % total)
        self.offset = np.cumsum(self.length + 1) - (self.length + 1)  # one zero after each class: "not an LPS"
        self.flags = np.zeros(int((self.length + 1).sum()), dtype=np.uint8)
        self.flags[np.repeat(self.offset, m) + pos] = 1
        self.used = np.zeros(NUM_CLASSES, dtype=np.int64)

    def take(self, classes):
        """The next symbols of these ``classes`` (uint8, one each, in order): uint8 0/1."""
        cls = classes.astype(np.int64)
        flag = self.flags[self.offset[cls] + np.minimum(_ranks(classes, self.used), self.length[cls])]
        lps = classes & 1
        return lps ^ (flag ^ 1)  # an LPS where flagged, else the probable bit, 1 - lps

    def finish(self):
        """Every LPS the payload codes must have been used."""
        if (self.length > self.used).any():
            c = int(np.flatnonzero(self.length > self.used)[0])
            raise ProtocolError("context-coded payload codes class %d up to symbol %d, but the frame has only %d "
                                "of them" % (c, int(self.length[c]), int(self.used[c])))


# --- fitting ------------------------------------------------------------------------------------------------------
def count_contexts(bits, counts=None):
    """Add the context statistics of ``bits`` (N, C, H, W) to ``counts`` (a list per pass of int64 arrays
    ``[contexts, 2]``: zeros and ones seen; None starts new ones); returns it."""
    bits = np.asarray(bits, dtype=np.uint8)
    sizes = table_sizes(bits.shape[1])
    if counts is None:
        counts = [np.zeros((size, 2), dtype=np.int64) for size in sizes]
    for i, (ctx, b) in enumerate(all_contexts(bits)):
        counts[i][:, 1] += np.bincount(ctx[b == 1], minlength=sizes[i])
        counts[i][:, 0] += np.bincount(ctx[b == 0], minlength=sizes[i])
    return counts


def tables_from_counts(counts):
    """P(1) per context from counts, as 16-bit integers: (ones + 1/2) / (all + 1) (the Krichevsky-Trofimov
    estimate: an unseen context gets 1/2), in integer arithmetic, so every machine fits the same tables."""
    tables = []
    for c in counts:
        ones, total = c[:, 1], c[:, 0] + c[:, 1]
        p16 = ((2 * ones + 1) * PROB_ONE + total + 1) // (2 * total + 2)  # rounded to nearest
        tables.append(np.clip(p16, 1, PROB_ONE - 1).astype(np.uint16))
    return tables
