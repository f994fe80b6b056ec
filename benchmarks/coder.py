"""``--entropy context`` against zlib on the same latents: size, the model's ideal size, coding and decoding time.

    python benchmarks/coder.py --photos data/holdout                       # nano-504 and nano-1008, x86 here
    python benchmarks/coder.py --photos data/holdout --save-latents /tmp/holdout-latents
    python3 benchmarks/coder.py --latents /tmp/holdout-latents             # on the Nano: numpy only, no model

For each profile: the shipped encoder's bits of each photo (``--photos``, ONNX Runtime or whatever backend the
profile's encoder file needs), or bits saved earlier (``--latents``, ``.npz`` per profile, so that the coder can be
timed on a Jetson Nano's Python 3.6 without the encoder), coded with the profile's ``entropy.json`` and with zlib
(level 6, the packed bits, as ``--entropy zlib`` sends them). Sizes are payload bits per pixel (the frame header,
about 150 bytes, is left out: it is the same for both); "ideal" is the sum of -log2 p under the tables. Times are
the fastest of ``--repeat`` runs, per frame, on one thread (numpy's work here is single-threaded anyway).

The Nano column is an ESTIMATE, not a measurement: the x86 time times ``--nano-factor`` (default 6; see the README,
"Entropy coding of the latents", for where that factor comes from and how to measure on a Nano instead).
"""

import argparse
import os
import sys
import time
import zlib

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the edge's coding runs in its one pipeline thread
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.edge.context_model import FILENAME, ContextModel  # noqa: E402

PROFILES = ("nano-504", "nano-1008")


def best_ms(fn, repeat):
    """The fastest of ``repeat`` calls of ``fn``, in ms (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000.0


def encoder_latents(profile_name, photos):
    """The deployed bits of each photo through the profile's encoder: a list of uint8 (tiles, C, h, w) arrays."""
    from latentlink.edge.backends import open_backend
    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.profile import load_profile
    import cv2

    profile = load_profile(profile_name)
    names = sorted(n for n in os.listdir(photos) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    out = []
    with open_backend(profile.model.encoder, "encoder") as enc:
        pre = Preprocessor(profile.input.width, profile.input.height, profile.input.fit, enc.info.tiles)
        for name in names:
            latents, _ = enc.infer(pre(cv2.imread(os.path.join(photos, name))))
            out.append((latents > 0.5).astype(np.uint8))
    return out, os.path.join(os.path.dirname(os.path.abspath(profile.model.encoder)), FILENAME)


def measure(frames, model, repeat):
    """Per-frame figures of the context coder and zlib on ``frames``; returns a dict of means."""
    rows = []
    for bits in frames:
        payload = model.encode(bits)
        if not np.array_equal(model.decode(payload, bits.shape), bits):
            raise SystemExit("round trip failed: this is a bug")
        packed = np.packbits(bits).tobytes()
        zipped = zlib.compress(packed, 6)
        rows.append({
            "packed": len(packed), "zlib": len(zipped), "context": len(payload),
            "ideal": model.ideal_bits(bits) / 8.0,
            "enc_ms": best_ms(lambda: model.encode(bits), repeat),
            "dec_ms": best_ms(lambda: model.decode(payload, bits.shape), repeat),
            "zlib_enc_ms": best_ms(lambda: zlib.compress(packed, 6), repeat),
            "zlib_dec_ms": best_ms(lambda: zlib.decompress(zipped), repeat)})
    return dict((k, float(np.mean([r[k] for r in rows]))) for k in rows[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos", help="folder of photos (e.g. data/holdout) for the profiles' encoders")
    source.add_argument("--latents", help="folder of latents saved with --save-latents (no encoder needed)")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), help="default: %(default)s")
    parser.add_argument("--save-latents", metavar="DIR", help="also save the bits to DIR/<profile>.npz")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per frame; the fastest counts")
    parser.add_argument("--nano-factor", type=float, default=6.0,
                        help="estimated Cortex-A57 / this CPU time ratio for the Nano column (default: %(default)s)")
    args = parser.parse_args()
    print("per frame, one thread, fastest of {} runs; bpp = payload bits / pixels; {}".format(
        args.repeat, "Nano = x86 time x {:g} (an estimate, not measured)".format(args.nano_factor)))
    header = ("| profile | photos | packed bpp | zlib bpp | context bpp | ideal bpp | context over ideal | "
              "context enc / dec ms | zlib enc / dec ms | Nano est. context enc / dec ms |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in args.profiles:
        if args.latents:
            data = np.load(os.path.join(args.latents, name + ".npz"))
            frames = [data[k] for k in sorted(data.files) if k.startswith("frame")]
            model = ContextModel.from_json(str(data["tables"]), name + ".npz")
        else:
            frames, tables = encoder_latents(name, args.photos)
            model = ContextModel.load(tables)
            if args.save_latents:
                if not os.path.isdir(args.save_latents):
                    os.makedirs(args.save_latents)
                np.savez_compressed(os.path.join(args.save_latents, name + ".npz"), tables=model.to_json(),
                                    **dict(("frame%03d" % i, f) for i, f in enumerate(frames)))
        pixels = float(frames[0][0, 0].size * 16 * frames[0].shape[0])
        m = measure(frames, model, args.repeat)
        bpp = dict((k, m[k] * 8 / pixels) for k in ("packed", "zlib", "context", "ideal"))
        lines.append("| {} | {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | +{:.1f} % | {:.2f} / {:.2f} | {:.2f} / {:.2f} | "
                     "{:.0f} / {:.0f} |".format(
                         name, len(frames), bpp["packed"], bpp["zlib"], bpp["context"], bpp["ideal"],
                         100.0 * (m["context"] / m["ideal"] - 1), m["enc_ms"], m["dec_ms"], m["zlib_enc_ms"],
                         m["zlib_dec_ms"], m["enc_ms"] * args.nano_factor, m["dec_ms"] * args.nano_factor))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
