"""Lossless predictive coding of camera frames (``latentlink edge --lossless med|mlp``): integers and numpy only.

For inspection cameras where no loss is allowed: the edge sends the frame as captured (BGR uint8, its native size,
no resize and no encoder), and the host rebuilds it bit for bit. The scheme is JPEG-LS's (LOCO-I) in outline:

**Prediction.** Each sample (channel ``c`` of pixel ``(y, x)``) is predicted from samples already coded: its causal
neighbours W, N, NW, NE (and WW, NN) in the same channel, and the earlier channels of the same pixel.

- ``med``: the median edge detector of JPEG-LS, per channel: ``min(W, N)`` if ``NW >= max(W, N)``, ``max(W, N)``
  if ``NW <= min(W, N)``, else ``W + N - NW``.
- ``mlp``: seed 002's idea, a small multilayer perceptron (12 inputs, 16 ReLU units, 1 output, one per channel)
  that corrects MED from the neighbours' differences to MED and, for channels 1 and 2, from the earlier channels
  of the same pixel (how far each is from its own MED prediction and from its W and N neighbours). Trained by
  ``python -m latentlink.export.lossless`` on the training photos; its integer weights ship beside this module
  (``lossless_mlp.json``, a few KB).

Both sides must predict the same integer. The MLP's weights are integers (at most 127 in magnitude) and its inputs
are bounded integers, so every product and partial sum is an integer below 2**24 in magnitude: float32 holds them
exactly whatever order BLAS adds them in, and numpy 1.19 on the Nano's ARM and numpy 2 on a host's x86 compute the
same sums. The rescaling between layers is a floor by a power of two (exact), and the hidden units are clipped so
that those bounds hold for any input, even a hostile payload's.

**Residuals.** ``(x - prediction) mod 256``, taken as -128..127 and folded to 0..255 (0, -1, 1, -2, ...). Each sample
belongs to a *class*: its channel, and its local activity ``|NE - N| + |N - NW| + |NW - W|`` plus twice the
previous channel's MED residual at the pixel, quantized (:data:`ACTIVITY_BINS`). Each class has a *mode*, chosen
by the encoder for the frame and sent in the header (semi-static, not adaptive per sample, so that both sides stay
whole-array numpy): *plain*, every value a Rice code with one parameter ``k`` (0 to 7, JPEG-LS's rule: the least
``k`` with ``n * 2**k >= sum``); or, for classes of mostly zeros (flat areas, where a plain code costs at least a
bit a sample), *run mode*: the run of zeros before each non-zero value as a Rice code with parameter ``kz`` (0 to
15), and the non-zero values less one with ``k``; the zeros after the last non-zero value cost nothing. The
encoder takes whichever is smaller (:func:`_choose_mode`).

**Coding order.** The samples of a class are coded in *wavefront* order: sample ``(c, y, x)`` belongs to step
``t = x + 2 y + c``, and every sample a prediction or a class reads (W, WW, N, NN, NW, NE, the earlier channels of
the pixel) belongs to an earlier step. Within a step: channel, then row. The decoder rebuilds one step at a time,
all its samples at once (``W + 2 H`` numpy steps per frame, not one Python step per sample); the encoder, which
has every sample, codes the whole frame at once.

**Payload** (all integers big-endian): version (1 byte, :data:`VERSION`), predictor id (1 byte: 0 med, 1 mlp),
the predictor's identity (8 bytes: the first bytes of the SHA-256 of the MLP's weights; zeros for med), CRC-32 of
the image's bytes (4 bytes; the decoder checks it, so any disagreement is an error, never a wrong image), the mode
of each class (one byte each: ``k``, or ``RUN_MODE | kz << 3 | k``), the number of samples of each class (LEB128
varints), the number of non-zero values of each run-mode class (varints), then the unary parts of every code
(each quotient as that many ones and a zero; class after class, each in coding order, a run-mode class's runs
before its values), then the remainders in the same order (``k`` or ``kz`` bits, most significant first), then
zero bits to a whole byte. The image's shape comes from the frame's
metadata, never from the payload; decoding checks every count and length against it and raises
:class:`ProtocolError` for anything but an exact, complete payload whose image matches its CRC.

Python 3.6 + numpy 1.19 compatible (the Jetson Nano).
"""

import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np

from .context_model import leb128, read_leb128
from .errors import ConfigError, ProtocolError

VERSION = 1
PREDICTORS = ("med", "mlp")
CHANNELS = 3  # frames are BGR (the sources' format)
MAX_K = 7  # Rice parameter of residuals (values 0..255)
MAX_KZ = 15  # of runs of zeros (run mode)
RUN_MODE = 0x80  # a class's mode byte: RUN_MODE | kz << 3 | k, or k alone (plain)
# Thresholds of the activity (see above) that separate a channel's classes: len + 1 classes per channel.
ACTIVITY_BINS = (1, 3, 5, 8, 12, 17, 24, 33, 45, 62, 85, 120, 170)
BINS = len(ACTIVITY_BINS) + 1
_CLASS_OF_ACTIVITY = np.searchsorted(np.array(ACTIVITY_BINS), np.arange(5 * 255 + 1), side="right").astype(np.uint8)
NUM_CLASSES = CHANNELS * BINS
HEADER = struct.Struct(">BB8sI")  # version, predictor id, predictor identity, CRC-32 of the image
WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lossless_mlp.json")
WEIGHTS_FORMAT = "latentlink-lossless-mlp"
WEIGHTS_VERSION = 1
FEATURES = 12  # the MLP's inputs (see _features)
HIDDEN_CLIP = 2047  # the hidden units' integer range: with |w| <= 127 and 16 units, sums stay below 2**23
WEIGHT_LIMIT = 127
BIAS_LIMIT = 1 << 21
MLP_CHUNK = 1 << 16  # samples per MLP evaluation on the edge (bounds its working memory: 4 MB of hidden units)


# --- prediction ---------------------------------------------------------------------------------------------------
def med(w, n, nw):
    """The median edge detector of JPEG-LS on int16 arrays."""
    hi, lo = np.maximum(w, n), np.minimum(w, n)
    return np.where(nw >= hi, lo, np.where(nw <= lo, hi, w + n - nw))


class MLP(object):
    """The learned predictor's integer weights: per channel ``w1`` (FEATURES, hidden), ``b1`` (hidden), ``w2``
    (hidden,), ``b2``, and the shifts ``s1`` (after layer 1) and ``s2`` (after layer 2). See the module's docstring
    for why float32 computes them exactly."""

    def __init__(self, layers, info=None):
        if len(layers) != CHANNELS:
            raise ConfigError("lossless MLP: %d channels of weights, expected %d" % (len(layers), CHANNELS))
        self.layers = []
        for c, layer in enumerate(layers):
            w1 = np.asarray(layer["w1"], dtype=np.int64)
            b1 = np.asarray(layer["b1"], dtype=np.int64)
            w2 = np.asarray(layer["w2"], dtype=np.int64)
            b2, s1, s2 = int(layer["b2"]), int(layer["s1"]), int(layer["s2"])
            hidden = w1.shape[1] if w1.ndim == 2 else 0
            if (w1.shape != (FEATURES, hidden) or not 1 <= hidden <= 16 or b1.shape != (hidden,)
                    or w2.shape != (hidden,) or not 0 <= s1 <= 30 or not 0 <= s2 <= 30):
                raise ConfigError("lossless MLP channel %d: bad shapes or shifts" % c)
            if (np.abs(w1).max() > WEIGHT_LIMIT or np.abs(w2).max() > WEIGHT_LIMIT or np.abs(b1).max() > BIAS_LIMIT
                    or abs(b2) > BIAS_LIMIT):
                raise ConfigError("lossless MLP channel %d: a weight beyond the exact-arithmetic bounds" % c)
            self.layers.append({"w1": np.ascontiguousarray(w1.T, dtype=np.float32),
                                "b1": b1.astype(np.float32)[:, None],
                                "w2": w2.astype(np.float32), "b2": np.float32(b2),
                                "s1": np.float32(2.0 ** -s1), "s2": np.float32(2.0 ** -s2),
                                "raw": {"w1": w1.tolist(), "b1": b1.tolist(), "w2": w2.tolist(), "b2": b2,
                                        "s1": s1, "s2": s2}})
        self.info = dict(info or {})
        text = json.dumps([layer["raw"] for layer in self.layers], sort_keys=True, separators=(",", ":"))
        self.sha256 = hashlib.sha256(text.encode("ascii")).hexdigest()

    def to_json(self):
        return json.dumps({"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "sha256": self.sha256,
                           "info": self.info, "layers": [layer["raw"] for layer in self.layers]}, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path=WEIGHTS_FILE):
        try:
            with io.open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") != WEIGHTS_FORMAT or obj.get("version") != WEIGHTS_VERSION:
                raise ValueError("format %r version %r" % (obj.get("format"), obj.get("version")))
            model = cls(obj["layers"], obj.get("info"))
        except (OSError, IOError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError("cannot read the lossless MLP's weights %s (%s): train them with `python -m "
                              "latentlink.export.lossless`, or use --lossless med" % (path, exc))
        if obj.get("sha256") not in (None, model.sha256):
            raise ConfigError("%s: its weights hash to %s, not the sha256 it records: the file was changed" % (
                path, model.sha256[:12]))
        return model

    def delta(self, feats, c):
        """The integer correction to MED of channel ``c`` for ``feats`` (FEATURES, n) float32 integers."""
        layer = self.layers[c]
        h = np.dot(layer["w1"], feats)  # (hidden, n)
        h += layer["b1"]
        np.maximum(h, 0, out=h)
        h *= layer["s1"]  # a power of two: exact
        np.floor(h, out=h)
        np.minimum(h, HIDDEN_CLIP, out=h)
        out = np.dot(layer["w2"], h)
        out += layer["b2"]
        out *= layer["s2"]
        np.clip(out, -1024, 1024, out=out)  # int16 below, whatever the input
        return np.floor(out).astype(np.int16)


def _features(w, n, nw, ne, ww, nn, m, p1, p2):
    """The MLP's inputs (FEATURES, ...) float32, one row per input, from int16 arrays of any one shape: the
    neighbours minus MED, and for the previous two channels ``p1``, ``p2`` (tuples x, W, N, x - MED; zeros before the
    first channel) their offsets."""
    out = np.empty((FEATURES,) + m.shape, dtype=np.float32)
    for i, a in enumerate((w, n, nw, ne, ww, nn)):
        np.subtract(a, m, out=out[i], casting="unsafe")
    for j, (x, xw, xn, d) in enumerate((p1, p2)):
        out[6 + 3 * j] = d
        np.subtract(x, xw, out=out[7 + 3 * j], casting="unsafe")
        np.subtract(x, xn, out=out[8 + 3 * j], casting="unsafe")
    return out


def activity_class(ne, n, nw, w, dprev):
    """The class within a channel (0 .. BINS - 1) from the neighbours and the previous channel's MED residual."""
    a = np.abs(ne - n) + np.abs(n - nw) + np.abs(nw - w) + 2 * np.abs(dprev)  # 0 .. 1275
    return _CLASS_OF_ACTIVITY[a]


def fold(residual):
    """(x - prediction) as int16 -> 0..255: mod 256 as -128..127, then 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    s = ((residual.astype(np.int16) + 128) & 255) - 128
    return np.where(s >= 0, 2 * s, -2 * s - 1).astype(np.uint8)


def unfold(v):
    v = v.astype(np.int16)
    return np.where(v & 1, -((v + 1) >> 1), v >> 1)


def frame_features(image, with_features=True):
    """For every sample of ``image`` (H, W, 3) uint8: ``(MED prediction, class, MLP inputs)``, int16 (3, H, W),
    uint8 (3, H, W) and float32 (FEATURES, 3, H, W) (None without ``with_features``). The encoder's (and the
    training's) whole-frame version of what the decoder computes step by step."""
    h, w = image.shape[:2]
    planes = np.zeros((CHANNELS + 2, h + _PAD_TOP, w + _PAD_LEFT + _PAD_RIGHT), dtype=np.int16)
    planes[2:, _PAD_TOP:, _PAD_LEFT:_PAD_LEFT + w] = image.transpose(2, 0, 1)

    def at(dy, dx, dc=0):
        return planes[2 + dc:2 + dc + CHANNELS, _PAD_TOP + dy:_PAD_TOP + dy + h, _PAD_LEFT + dx:_PAD_LEFT + dx + w]

    def dmed_at(dc):
        return dmed[2 + dc:2 + dc + CHANNELS, _PAD_TOP:, _PAD_LEFT:_PAD_LEFT + w]

    x, xw, xn, xnw, xne = at(0, 0), at(0, -1), at(-1, 0), at(-1, -1), at(-1, 1)
    m = med(xw, xn, xnw)
    dmed = np.zeros_like(planes)
    dmed[2:, _PAD_TOP:, _PAD_LEFT:_PAD_LEFT + w] = x - m
    cls = activity_class(xne, xn, xnw, xw, dmed_at(-1))
    cls += (np.arange(CHANNELS, dtype=np.uint8) * BINS)[:, None, None]
    if not with_features:
        return m, cls, None
    feats = _features(xw, xn, xnw, xne, at(0, -2), at(-2, 0), m,
                      (at(0, 0, -1), at(0, -1, -1), at(-1, 0, -1), dmed_at(-1)),
                      (at(0, 0, -2), at(0, -1, -2), at(-1, 0, -2), dmed_at(-2)))
    return m, cls, feats


# --- the codec ----------------------------------------------------------------------------------------------------
_PAD_TOP, _PAD_LEFT, _PAD_RIGHT = 2, 2, 1  # zeros around the image: MED then predicts W on row 0 and N in column 0
_mlp_cache = {}


def _check_shape(shape, error):
    if len(shape) != 3 or int(shape[2]) != CHANNELS or min(int(d) for d in shape) < 1:
        raise error("lossless coding takes BGR images of shape (H, W, 3), not %r" % (list(shape),))


class LosslessCodec(object):
    """Encode (edge) and decode (host) frames with one predictor: ``med``, or ``mlp`` with the weights in
    ``weights`` (default: :data:`WEIGHTS_FILE`). :attr:`identity` names it in the HELLO (``lossless-med``,
    ``lossless-mlp-<first 12 hex digits of the weights' SHA-256>``): edge and host must agree on it."""

    def __init__(self, predictor="med", weights=None):
        if predictor not in PREDICTORS:
            raise ConfigError("unknown lossless predictor %r (available: %s)" % (predictor, ", ".join(PREDICTORS)))
        self.predictor = predictor
        self.mlp = None
        self.tag = b"\0" * 8
        self.identity = "lossless-med"
        if predictor == "mlp":
            path = weights or WEIGHTS_FILE
            if path not in _mlp_cache:
                _mlp_cache[path] = MLP.load(path)
            self.mlp = _mlp_cache[path]
            self.tag = bytes(bytearray.fromhex(self.mlp.sha256[:16]))
            self.identity = "lossless-mlp-" + self.mlp.sha256[:12]

    # The encoder: every sample known, the whole frame at once.
    def predict_all(self, image):
        """``(prediction, class)`` of every sample of ``image`` (H, W, 3) uint8, each (3, H, W)."""
        h, w = image.shape[:2]
        m, cls, feats = frame_features(image, self.mlp is not None)
        if self.mlp is None:
            return m, cls
        pred = m.reshape(CHANNELS, h * w).copy()
        for c in range(CHANNELS):
            for lo in range(0, h * w, MLP_CHUNK):  # in chunks: a frame's hidden units would be 64 bytes a sample
                pred[c, lo:lo + MLP_CHUNK] += self.mlp.delta(feats[:, c].reshape(FEATURES, h * w)[:, lo:lo + MLP_CHUNK],
                                                             c)
        np.clip(pred, 0, 255, out=pred)
        return pred.reshape(CHANNELS, h, w), cls

    def encode(self, image):
        """The payload (bytes) coding ``image``: (H, W, 3) uint8, C-contiguous or not."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8:
            raise ConfigError("lossless coding takes uint8 images, not %s" % image.dtype)
        _check_shape(image.shape, ConfigError)
        pred, cls = self.predict_all(image)
        values = fold(image.transpose(2, 0, 1) - pred)
        pos = coding_positions(image.shape[0], image.shape[1]).ravel()
        coded = np.empty((2, len(pos)), dtype=np.uint8)
        coded[0, pos] = cls.ravel()
        coded[1, pos] = values.ravel()
        cls, values = coded
        counts = np.bincount(cls, minlength=NUM_CLASSES)
        values = values[np.argsort(cls, kind="stable")]
        modes, nonzeros, streams, at = [], [], [], 0
        for n in counts:
            mode, m, class_streams = _choose_mode(values[at:at + n])
            modes.append(mode)
            nonzeros += [] if m is None else [m]
            streams += class_streams
            at += n
        header = HEADER.pack(VERSION, PREDICTORS.index(self.predictor), self.tag, zlib.crc32(image.tobytes()))
        return header + bytes(bytearray(modes)) + leb128(counts) + leb128(nonzeros) + _rice(streams)

    # The decoder: one wavefront at a time.
    def decode(self, payload, shape):
        """The (H, W, 3) uint8 image ``payload`` codes; ``shape`` comes from the frame's metadata. ProtocolError for
        anything but an exact, complete payload whose image matches its CRC-32."""
        _check_shape(shape, ProtocolError)
        h, w = int(shape[0]), int(shape[1])
        total = h * w * CHANNELS
        data = bytes(payload)
        if len(data) < HEADER.size + NUM_CLASSES:
            raise ProtocolError("lossless payload of %d bytes is shorter than its header" % len(data))
        version, predictor, tag, crc = HEADER.unpack(data[:HEADER.size])
        if version != VERSION:
            raise ProtocolError("lossless payload version %d (this side reads %d)" % (version, VERSION))
        if predictor >= len(PREDICTORS) or PREDICTORS[predictor] != self.predictor or tag != self.tag:
            raise ProtocolError("lossless payload made with predictor %s (%s), and this side decodes %s: edge and "
                                "host need the same predictor and weights" % (
                                    PREDICTORS[predictor] if predictor < len(PREDICTORS) else predictor,
                                    tag.hex(), self.identity))
        modes = bytearray(data[HEADER.size:HEADER.size + NUM_CLASSES])
        values, starts, counts = _unrice(data, HEADER.size + NUM_CLASSES, modes, total)
        image = self._reconstruct(values, starts, counts, h, w)
        if zlib.crc32(image.tobytes()) != crc:
            raise ProtocolError("lossless payload decodes to an image whose CRC-32 is not the one it carries "
                                "(corrupt, or edge and host predict differently)")
        return image

    def _reconstruct(self, values, starts, counts, h, w):
        wp = w + _PAD_LEFT + _PAD_RIGHT
        plane = (h + _PAD_TOP) * wp
        xs = np.zeros((CHANNELS + 2) * plane, dtype=np.int16)  # flat planes: channels -2, -1 (zeros), 0, 1, 2
        dmed = np.zeros_like(xs)
        used = counts * 0
        ends = starts + counts
        base = (np.arange(CHANNELS, dtype=np.uint8) * BINS)
        samples, channels, bounds = _decoding_order(h, w)
        for t in range(len(bounds) - 1):
            idx, chan = samples[bounds[t]:bounds[t + 1]], channels[bounds[t]:bounds[t + 1]]
            xw, xn, xnw, xne = xs[idx - 1], xs[idx - wp], xs[idx - wp - 1], xs[idx - wp + 1]
            m = med(xw, xn, xnw)
            cls = activity_class(xne, xn, xnw, xw, dmed[idx - plane]) + base[chan]
            if self.mlp is None:
                pred = m
            else:
                feats = _features(xw, xn, xnw, xne, xs[idx - 2], xs[idx - 2 * wp], m,
                                  (xs[idx - plane], xs[idx - plane - 1], xs[idx - plane - wp], dmed[idx - plane]),
                                  (xs[idx - 2 * plane], xs[idx - 2 * plane - 1], xs[idx - 2 * plane - wp],
                                   dmed[idx - 2 * plane]))
                pred = m.copy()
                for c in range(CHANNELS):
                    sel = chan == c
                    if sel.any():
                        pred[sel] += self.mlp.delta(feats[:, sel], c)
                np.clip(pred, 0, 255, out=pred)
            at = _ranks(cls, used)
            at += starts[cls]
            if (at >= ends[cls]).any():
                raise ProtocolError("lossless payload has fewer codes of a class than the image needs")
            x = (pred + unfold(values[at])) & 255
            xs[idx] = x
            dmed[idx] = x - m
        if (used != counts).any():
            raise ProtocolError("lossless payload has more codes of a class than the image needs")
        out = xs.reshape(CHANNELS + 2, h + _PAD_TOP, wp)[2:, _PAD_TOP:, _PAD_LEFT:_PAD_LEFT + w]
        return np.ascontiguousarray(out.transpose(1, 2, 0)).astype(np.uint8)


_codecs = {}


def codec(predictor):
    """The :class:`LosslessCodec` of ``predictor`` (with the shipped weights), made once."""
    if predictor not in _codecs:
        _codecs[predictor] = LosslessCodec(predictor)
    return _codecs[predictor]


def decode(payload, shape):
    """Decode a lossless frame's payload with the predictor its header names (``med``, or ``mlp`` with this side's
    weights, which must be the edge's: the header's identity and the image's CRC-32 are checked)."""
    if len(payload) < HEADER.size:
        raise ProtocolError("lossless payload of %d bytes is shorter than its header" % len(payload))
    predictor = bytearray(payload[1:2])[0]
    if predictor >= len(PREDICTORS):
        raise ProtocolError("lossless payload names predictor %d (known: %s)" % (predictor, ", ".join(
            "%d %s" % p for p in enumerate(PREDICTORS))))
    try:
        receiver = codec(PREDICTORS[predictor])
    except ConfigError as exc:
        raise ProtocolError("a lossless frame coded with predictor %s, which this side cannot load: %s" % (
            PREDICTORS[predictor], exc))
    return receiver.decode(payload, shape)


_plans = {}  # (kind, H, W) -> a coding plan; the two most recent shapes are kept (a stream's frames share one)


def _cached(key, make):
    if key not in _plans:
        if len(_plans) >= 2:
            _plans.clear()  # a peer that varies its shapes costs time, never memory
        _plans[key] = make()
    return _plans[key]


def _wavefront_starts(h, w):
    """Where the samples of channel ``c`` in wavefront ``t`` start in coding order, less their first row:
    ``(start (3, T), bounds (T + 1,))``; sample ``(c, y, x)`` is at ``start[c, x + 2 y + c] + y``, and wavefront
    ``t`` is ``bounds[t]:bounds[t + 1]``. Small tables (T = W + 2 H + 1 wavefronts), computed, never sorted."""
    t = np.arange(w + 2 * h + CHANNELS - 2, dtype=np.int64)
    counts, first = np.zeros((CHANNELS, len(t)), np.int64), np.zeros((CHANNELS, len(t)), np.int64)
    for c in range(CHANNELS):  # rows y with 0 <= t - c - 2 y < W
        first[c] = np.maximum(0, (t - c - w + 2) // 2)
        counts[c] = np.maximum(0, np.minimum(h - 1, (t - c) // 2) - first[c] + 1)
    bounds = np.concatenate([[0], np.cumsum(counts.sum(axis=0))])
    start = bounds[:-1] + (np.cumsum(counts, axis=0) - counts) - first
    return start, bounds


def coding_positions(h, w):
    """The position in coding order (wavefront, channel, row) of each sample of a (3, H, W) array, int32 (3, H, W).
    Cached per shape."""
    def make():
        start, _ = _wavefront_starts(h, w)
        ys, xs = np.arange(h, dtype=np.int64)[:, None], np.arange(w, dtype=np.int64)[None, :]
        pos = np.empty((CHANNELS, h, w), dtype=np.int32)
        for c in range(CHANNELS):
            pos[c] = start[c][xs + 2 * ys + c] + ys
        return pos
    return _cached(("encoder", h, w), make)


def _decoding_order(h, w):
    """The decoder's plan for an (H, W, 3) frame: the flat indices into its padded planes of every sample in coding
    order (int32), their channels (uint8), and where each wavefront starts and ends in them (``bounds[t]:bounds[t +
    1]``). About 5 bytes a sample, cached per shape."""
    def make():
        start, bounds = _wavefront_starts(h, w)
        wp = w + _PAD_LEFT + _PAD_RIGHT
        plane = (h + _PAD_TOP) * wp
        ys, xs = np.arange(h, dtype=np.int64)[:, None], np.arange(w, dtype=np.int64)[None, :]
        samples = np.empty(CHANNELS * h * w, dtype=np.int32)
        channels = np.empty(CHANNELS * h * w, dtype=np.uint8)
        for c in range(CHANNELS):
            pos = start[c][xs + 2 * ys + c] + ys
            samples[pos] = (c + 2) * plane + (ys + _PAD_TOP) * wp + (xs + _PAD_LEFT)
            channels[pos] = c
        return samples, channels, bounds
    return _cached(("decoder", h, w), make)


def _ranks(classes, used):
    """Each sample's index among its class's samples so far (``used``, per class, updated)."""
    order = np.argsort(classes, kind="stable")
    counts = np.bincount(classes, minlength=NUM_CLASSES)
    shift = used - (np.cumsum(counts) - counts)
    rank = np.empty(len(classes), dtype=np.int64)
    rank[order] = np.arange(len(classes), dtype=np.int64) + shift[classes[order]]
    used += counts
    return rank


# --- Rice codes, grouped by class ---------------------------------------------------------------------------------
def _rice_k(count, total, limit):
    """JPEG-LS's Rice parameter: the least k (at most ``limit``) with ``count * 2**k >= total``."""
    k = 0
    while k < limit and count << k < total:
        k += 1
    return k


def _choose_mode(v):
    """How to code one class's values ``v`` (uint8, in coding order): ``(mode byte, nonzeros or None, streams)``.

    Plain: every value as a Rice code with parameter k (mode = k). Run mode, for classes of mostly zeros (flat
    areas, where a plain code costs at least a bit a sample): the runs of zeros before each non-zero value as Rice
    codes with parameter kz, and the non-zero values less one with parameter k (mode = RUN_MODE | kz << 3 | k);
    the zeros after the last non-zero value cost nothing. Whichever is smaller."""
    n = len(v)
    k = _rice_k(n, int(v.sum(dtype=np.int64)), MAX_K)
    plain = int((v >> k).sum(dtype=np.int64)) + n * (k + 1)
    if 2 * np.count_nonzero(v) < n:
        nz = np.flatnonzero(v)
        gaps = np.diff(np.concatenate([[-1], nz]))
        gaps -= 1
        rest = v[nz] - 1
        m = len(nz)
        kz = _rice_k(m, int(gaps.sum()), MAX_KZ)
        kv = _rice_k(m, int(rest.sum(dtype=np.int64)), MAX_K)
        runs = (int((gaps >> kz).sum()) + m * (kz + 1) + int((rest >> kv).sum(dtype=np.int64)) + m * (kv + 1))
        if runs < plain:
            return RUN_MODE | kz << 3 | kv, m, [(gaps, kz), (rest, kv)]
    return k, None, [(v, k)]


def _rice(streams):
    """Rice codes of ``streams`` (a list of ``(integers >= 0, k)``): the unary parts of all, then the remainders of
    all, padded to a whole byte."""
    q = np.concatenate([np.asarray(a, dtype=np.int64) >> k for a, k in streams] + [np.zeros(0, np.int64)])
    ends = np.cumsum(q)
    ends += np.arange(1, len(q) + 1)
    del q
    unary_len = int(ends[-1]) if len(ends) else 0
    rem_len = sum(len(a) * k for a, k in streams)
    bits = np.zeros((unary_len + rem_len + 7) // 8 * 8, dtype=np.uint8)
    bits[:unary_len] = 1
    bits[ends - 1] = 0
    at = unary_len
    for a, k in streams:  # the remainders: each code's last k bits, most significant first
        if k and len(a):
            if a.dtype == np.uint8:
                bits[at:at + len(a) * k] = np.unpackbits(a[:, None], axis=1)[:, 8 - k:].ravel()
            else:
                bits[at:at + len(a) * k] = ((a[:, None] >> np.arange(k - 1, -1, -1)) & 1).ravel()
            at += len(a) * k
    return np.packbits(bits).tobytes()


def _unrice(data, at, modes, total):
    """The decoder's side of the encoder's classes from ``data[at:]`` (after the ``modes``): ``(values, starts,
    counts)``, every class's values 0..255 in coding order, the counts adding up to ``total``; ProtocolError
    otherwise."""
    counts, at = read_leb128(data, at, NUM_CLASSES, "lossless payload", "the count of class %d")
    counts = np.array(counts, dtype=np.int64)
    if int(counts.sum()) != total:
        raise ProtocolError("lossless payload codes %d samples, the image has %d" % (int(counts.sum()), total))
    run = [int(mode) & RUN_MODE != 0 for mode in modes]
    nonzeros, at = read_leb128(data, at, sum(run), "lossless payload", "the non-zero count of run class %d")
    streams, it = [], iter(nonzeros)  # (codes, k, class, kind): kind 0 values, 1 runs of zeros, 2 values - 1
    for c in range(NUM_CLASSES):
        mode, n = int(modes[c]), int(counts[c])
        if not run[c]:
            if mode > MAX_K:
                raise ProtocolError("lossless payload: class %d has mode %d (a plain class's k is at most %d)" % (
                    c, mode, MAX_K))
            streams.append((n, mode, c, 0))
        else:
            m = next(it)
            if m > n:
                raise ProtocolError("lossless payload: class %d has %d non-zero values of %d" % (c, m, n))
            streams += [(m, (mode >> 3) & MAX_KZ, c, 1), (m, mode & MAX_K, c, 2)]
    codes = sum(s[0] for s in streams)
    # A valid code is at most 256 + 15 bits, a run's unary part at most a class's samples: refuse a longer payload
    # before unpacking it.
    if len(data) - at > (codes * (256 + MAX_KZ) + total + 7) // 8:
        raise ProtocolError("lossless payload of %d bytes is longer than %d samples can need" % (len(data), total))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=at))
    # The unary part ends at the codes-th zero: find the chunk it is in first, so that the positions of zeros (8
    # bytes each) are taken of the unary part only, not of the remainders that follow.
    chunk, seen, cut = 1 << 20, 0, len(bits)
    for lo in range(0, len(bits), chunk):
        seen += len(bits[lo:lo + chunk]) - int(np.count_nonzero(bits[lo:lo + chunk]))
        if seen >= codes:
            cut = min(len(bits), lo + chunk)
            break
    zeros = np.flatnonzero(bits[:cut] == 0)[:codes]
    if len(zeros) < codes:
        raise ProtocolError("lossless payload is truncated: %d of its %d codes are there" % (len(zeros), codes))
    unary_end = int(zeros[-1]) + 1 if codes else 0
    q = np.diff(zeros)
    q -= 1
    q = np.concatenate([zeros[:1], q])  # ones before each terminating zero
    del zeros
    end = unary_end + sum(s[0] * s[1] for s in streams)
    if (end + 7) // 8 != len(bits) // 8:
        raise ProtocolError("lossless payload has %d bytes of codes, they need %d (%s)" % (
            len(bits) // 8, (end + 7) // 8, "truncated" if end > len(bits) else "extra bytes"))
    if bits[end:].any():
        raise ProtocolError("lossless payload: the padding after its codes is not zero")
    values = np.zeros(total, dtype=np.uint8)
    first = np.cumsum(counts) - counts
    at_q, at_r, gaps = 0, unary_end, None
    for n, k, c, kind in streams:
        qs = q[at_q:at_q + n]
        if kind != 1 and (qs > (255 >> k)).any():
            raise ProtocolError("lossless payload codes a residual beyond 255 in class %d" % c)
        if kind == 1:
            codes_ = qs << k
            if k:
                weights = np.left_shift(1, np.arange(k - 1, -1, -1, dtype=np.int64))
                codes_ |= bits[at_r:at_r + n * k].reshape(n, k).astype(np.int64).dot(weights)
        else:
            codes_ = qs.astype(np.uint8) << k
            if k:
                codes_ |= np.packbits(bits[at_r:at_r + n * k].reshape(n, k), axis=1)[:, 0] >> (8 - k)
        at_q, at_r = at_q + n, at_r + n * k
        if kind == 0:
            values[first[c]:first[c] + n] = codes_
        elif kind == 1:
            gaps = codes_
        else:  # the non-zero values of a run class, after its gaps
            where = np.cumsum(gaps + 1) - 1
            if n and int(where[-1]) >= counts[c]:
                raise ProtocolError("lossless payload: class %d's runs are longer than its %d samples" % (
                    c, counts[c]))
            if (codes_ == 255).any():
                raise ProtocolError("lossless payload codes a residual beyond 255 in class %d" % c)
            values[first[c] + where] = codes_ + 1
    return values, first, counts
