"""Write the seed corpus of the fuzz targets: tests/fuzz/corpus/<target>/<name>, a few KB per target.

    python -m tests.fuzz.make_corpus

Valid inputs of every kind (frames of each packing and coder, each protocol-2 message, numpy's pickles of each
protocol, compressed payloads) and a few known-bad ones from the security reviews; the fuzzer mutates from there.
Rerun it when the wire format changes; the files are committed (the replay test reads them).
"""

import os
import pickle
import shutil
import struct
import zlib

import numpy as np

from latentlink.edge.entropy import compress
from latentlink.edge.protocol import (FIXED_HEADER, KIND_ACCEPT, KIND_ACK, KIND_CLOCK, KIND_END, KIND_FRAME,
                                      KIND_HELLO, KIND_REFUSE, MAGIC, VERSION, VERSION_2, encode_end_of_stream,
                                      encode_frame, encode_message, frame_payload, pack_latents)
from latentlink.edge.safe_pickle import DTYPE_NAMES

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DTYPE_ORDER = ("float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "int64")  # protocol.DTYPES


def raw(version, byte, meta, payload=b""):
    return FIXED_HEADER.pack(MAGIC, version, byte, len(meta)) + meta + payload


def frames():
    a = (np.arange(2 * 4 * 4).reshape(1, 2, 4, 4) % 3 == 0).astype(np.float32)
    out = {}
    for packing in ("bits", "uint8", "float16", "float32", "pickle"):
        out["p1-" + packing] = encode_frame("cam0", 3, 1700000000.25, a, packing)
    for coder in ("zlib", "lz4", "zstd"):
        out["p1-bits-" + coder] = encode_frame("cam0", 4, 1700000000.5, a, "bits", entropy=coder)
    out["p1-end"] = encode_end_of_stream("cam0", 5)
    out["p2-frame"] = frame_payload("cam0", 6, 1700000000.75, a, "bits", pack_latents(a, "bits"), version=VERSION_2)
    codes = (np.arange(3 * 2 * 4 * 4).reshape(3, 2, 4, 4) % 5 == 1).astype(np.uint8)  # a progressive frame, k = 3
    out["p2-frame-progressive"] = frame_payload("cam0", 7, 1700000000.8, codes, "bits", pack_latents(codes, "bits"),
                                                version=VERSION_2, iterations=3)
    out["p2-frame-progressive-zlib"] = frame_payload("cam0", 8, 1700000000.9, codes, "bits",
                                                     compress(pack_latents(codes, "bits"), "zlib"), "zlib",
                                                     version=VERSION_2, iterations=3)
    progressive = b'{"dtype":"uint8","packing":"bits","payload_len":12,"seq":0,"stream":"c","t_capture":0.0,'
    out["bad-iterations-0"] = raw(VERSION_2, KIND_FRAME, progressive + b'"iterations":0,"shape":[3,2,4,4]}', bytes(12))
    out["bad-iterations-65"] = raw(VERSION_2, KIND_FRAME, progressive + b'"iterations":65,"shape":[65,2,4,4]}',
                                   bytes(130))
    out["bad-iterations-shape"] = raw(VERSION_2, KIND_FRAME, progressive + b'"iterations":2,"shape":[3,2,4,4]}',
                                      bytes(12))
    out.update(("p2-" + name, data) for name, data in control_messages().items())
    meta = b'{"dtype":"float32","packing":"bits","payload_len":4,"seq":0,"shape":[1,2,4,4],"stream":"c","t_capture":'
    out["bad-t-nan"] = raw(VERSION, 0, meta + b"NaN}", bytes(4))
    out["bad-t-1e400"] = raw(VERSION, 0, meta + b"1e400}", bytes(4))
    out["bad-seq-2-63"] = raw(VERSION, 1, b'{"dtype":"uint8","packing":"none","payload_len":0,"seq":9223372036854775807,'
                                         b'"shape":[1],"stream":"c","t_capture":0.0}')
    out["bad-shape-huge"] = raw(VERSION, 0, b'{"dtype":"float32","packing":"float32","payload_len":1073741824,"seq":0,'
                                           b'"shape":[1,64,1024,4096],"stream":"c","t_capture":0.0}')
    return out


def control_messages():
    return {
        "hello": encode_message(KIND_HELLO, versions=[2], stream="cam0", session="0123456789abcdef",
                                model_id="ab" * 32, shape=[1, 2, 4, 4], dtype="float32", packing="bits",
                                entropy="zstd", tiles=[1, 1], delivery="reliable", window=8, unacked=[1, 2],
                                t_send=1700000000.0, software="latentlink 0.1.0"),
        "hello-progressive": encode_message(KIND_HELLO, versions=[2], stream="cam0", session="0123456789abcdef",
                                            model_id="ab" * 32, shape=[6, 2, 4, 4], dtype="uint8", packing="bits",
                                            tiles=[1, 1], delivery="live", window=4, unacked=[], t_send=1700000000.0,
                                            progressive={"iterations": 6, "code_shape": [2, 4, 4]}),
        "bad-hello-progressive-shape": raw(VERSION_2, KIND_HELLO, b'{"delivery":"live","dtype":"uint8","packing":'
                                           b'"bits","progressive":{"code_shape":[2,4,4],"iterations":6},"session":'
                                           b'"0123456789abcdef","shape":[5,2,4,4],"stream":"c","t_send":0.0,"tiles":'
                                           b'[1,1],"versions":[2],"window":4}'),
        "accept": encode_message(KIND_ACCEPT, version=2, window=8, max_frame_bytes=4 << 20,
                                 acked=[[1, "decoded"], [2, "failed"]], t_recv=1700000000.1, t_send=1700000000.2),
        "refuse": encode_message(KIND_REFUSE, reason="busy", message="the host serves 32 connections",
                                 permanent=False),
        "ack": encode_message(KIND_ACK, seq=6, outcome="decoded", duplicate=False, t_recv=1.0, t_done=2.0,
                              t_ack=3.0),
        "clock": encode_message(KIND_CLOCK, offset_s=-0.25, error_s=0.001),
        "end": encode_message(KIND_END, stream="cam0", seq=7),
        "bad-clock-1e308": raw(VERSION_2, KIND_CLOCK, b'{"error_s":0.0,"offset_s":1e308}'),
        "bad-end-2-63": raw(VERSION_2, KIND_END, b'{"seq":9223372036854775807,"stream":"cam0"}'),
    }


def message_streams():
    f = frames()
    out = {}
    for name, data in control_messages().items():
        out[name] = b"\x03" + data[FIXED_HEADER.size:]  # the fields alone (parse_fields of every kind)
    out["p2-session"] = b"\x05" + f["p2-hello"] + f["p2-frame"] + f["p2-clock"] + f["p2-end"]
    out["p1-session"] = b"\x00" + f["p1-bits"] + f["p1-float16"] + f["p1-end"]
    out["p2-trickled"] = b"\x00" + f["p2-accept"] + f["p2-ack"] + f["p2-refuse"]
    out["truncated"] = b"\x07" + f["p1-bits"][:-3]
    return out


def pickles():
    out = {}
    shapes = [(1, 2, 4, 4), (3,), (2, 3)]
    for i, dtype in enumerate(DTYPE_ORDER):
        shape = shapes[i % len(shapes)]
        a = (np.arange(int(np.prod(shape))) * 7 + 1).astype(dtype).reshape(shape)
        for protocol in (2, 3, 4, 5):
            if (i + protocol) % 3 and protocol != 5:
                continue  # a sample of the pairs: every dtype and every protocol, a few KB in all
            prefix = bytes([DTYPE_ORDER.index(dtype), len(shape) - 1]) + bytes(shape)
            out["%s-p%d" % (dtype, protocol)] = prefix + pickle.dumps(a, protocol=protocol)
    a = np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3))
    out["int16-fortran-big-endian-p3"] = bytes([DTYPE_ORDER.index("int16"), 1, 2, 3]) + pickle.dumps(a, protocol=3)
    # numpy 1.19 on Python 3.6 (the Nano): numpy.core instead of numpy._core
    nano = ("8003636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7100636e756d70790a6e646172"
            "7261790a71014b008571024301627103877104527105284b014b01857106636e756d70790a64747970650a7107580200000075"
            "317108898887710952710a284b0358010000007c710b4e4e4e4affffffff4affffffff4b0074710c6289680374710d622e")
    out["uint8-numpy119-p3"] = bytes([DTYPE_ORDER.index("uint8"), 0, 1]) + bytes.fromhex(nano)
    f4 = bytes([0, 0, 1])
    out["bad-binbytes8-2gib"] = f4 + b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 31) + b"."
    out["bad-reduce-system"] = f4 + b"\x80\x03cos\nsystem\nX\x04\x00\x00\x00true\x85R."
    out["bad-memo-2-31"] = f4 + b"\x80\x03Nr" + struct.pack("<I", 2 ** 31) + b"."
    assert set(DTYPE_ORDER) == set(DTYPE_NAMES)
    return out


def payloads():
    packed = pack_latents((np.arange(512) % 5 == 0).reshape(1, 2, 16, 16), "bits")
    out = {}
    for i, coder in enumerate(("zlib", "lz4", "zstd")):
        out[coder] = bytes([i]) + struct.pack(">H", len(packed)) + compress(packed, coder)
        out[coder + "-empty"] = bytes([i]) + struct.pack(">H", 0) + compress(b"", coder)
    bomb = zlib.compress(bytes(1 << 20), 9)  # 1 MiB of zeros in 1 KB
    out["bad-zlib-bomb"] = b"\x00" + struct.pack(">H", 64) + bomb
    out["bad-zlib-trailing"] = b"\x00" + struct.pack(">H", len(packed)) + compress(packed, "zlib") + b"x"
    return out


def contexts():
    from .targets import context_model

    out = {}
    for channels, tiles, h, w in ((8, 1, 16, 16), (3, 2, 5, 7), (1, 1, 1, 1), (8, 2, 3, 16)):
        bits = (np.arange(tiles * channels * h * w).reshape(tiles, channels, h, w) % 7 < 3).astype(np.uint8)
        payload = context_model(channels).encode(bits)
        head = bytes([channels - 1, tiles - 1, h - 1, w - 1])
        out["c%d-t%d-%dx%d" % (channels, tiles, h, w)] = head + payload
        if channels == 8:
            out["bad-truncated"] = head + payload[:-3]
            out["bad-trailing-byte"] = head + payload + b"\x00"
            out["bad-huge-count"] = head + b"\xff\xff\xff\xff\x0f" + payload[1:]
            out["bad-long-payload"] = head + bytes(2048)
            out["bad-zero-padding-is-not"] = head + payload[:-1] + bytes([payload[-1] | 1])
            out["bad-empty"] = head
    return out


def lossless_seeds():
    from latentlink.edge.lossless import HEADER, NUM_CLASSES, codec

    counts = HEADER.size + NUM_CLASSES  # where the counts of the classes start (after the k of each)

    out = {}
    for h, w in ((16, 16), (5, 7), (1, 1), (3, 16)):
        y, x, c = np.indices((h, w, 3))
        image = (y * 8 + x * 5 + c * 40 + (y * 7 + x * 3) % 5).astype(np.uint8)  # a gradient, a little texture
        head = bytes([h - 1, w - 1])
        for predictor in ("med", "mlp"):
            payload = codec(predictor).encode(image)
            out["%s-%dx%d" % (predictor, h, w)] = head + payload
            if (h, w) == (16, 16):
                out["bad-%s-crc" % predictor] = head + payload[:10] + bytes([payload[10] ^ 1]) + payload[11:]
                if predictor == "med":
                    out["bad-truncated"] = head + payload[:-3]
                    out["bad-trailing-byte"] = head + payload + b"\x00"
                    out["bad-huge-count"] = head + payload[:counts] + b"\xff\xff\xff\xff\x0f" + payload[counts + 1:]
                    out["bad-long-payload"] = head + payload[:counts] + bytes(1024)
                    out["bad-empty"] = head
    flat = np.full((16, 16, 3), 128, np.uint8)  # flat with a square: run mode
    flat[4:9, 5:11] = (40, 90, 200)
    for predictor in ("med", "mlp"):
        out["%s-flat-16x16" % predictor] = bytes([15, 15]) + codec(predictor).encode(flat)
    return out


def main():
    if os.path.isdir(HERE):
        shutil.rmtree(HERE)
    for target, inputs in [("frame", frames()), ("messages", message_streams()), ("pickle", pickles()),
                           ("entropy", payloads()), ("context", contexts()), ("lossless", lossless_seeds())]:
        os.makedirs(os.path.join(HERE, target))
        for name, data in sorted(inputs.items()):
            with open(os.path.join(HERE, target, name), "wb") as f:
                f.write(data)
        print("%s: %d inputs, %d bytes" % (target, len(inputs), sum(len(d) for d in inputs.values())))


if __name__ == "__main__":
    main()
