"""Lossless mode (``--lossless``): bits per pixel on photos against PNG, JPEG-LS and JPEG XL, and coding speed.

    python benchmarks/lossless.py --photos /work/photos/holdout          # here (x86): the README's tables
    python3 benchmarks/lossless.py --photos data/holdout --speed-only --no-decode --nano-factor 1   # on the Nano

For each photo (at its own size, as ``--source folder`` sends it): the payload of ``--lossless med`` and
``--lossless mlp`` (checked to decode bit for bit unless ``--no-decode``), PNG from OpenCV at maximum compression
(level 9), and JPEG-LS (CharLS) and JPEG XL lossless (libjxl, effort 7) through the ``imagecodecs`` package when it
is installed (``pip install imagecodecs``; columns left blank otherwise). bpp = bits per pixel of the BGR image
(24 for raw). Then the time to code and decode centre crops of a large photo at common camera sizes, the best of
``--repeat`` runs (decoding: one run), and the Nano column: this machine's encode time times ``--nano-factor``
(default 6, the README's assumed Cortex-A57 / x86 ratio, "Entropy coding of the latents"): an ESTIMATE, not a
measurement. ``--synthetic``: the bpp table of two synthetic inspection frames (a part on a flat background, and on
a noisy one) instead.

Python 3.6 compatible (numpy and OpenCV only, imagecodecs optional), so it runs on the Nano too.
"""

import argparse
import glob
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlink.edge.lossless import LosslessCodec, decode  # noqa: E402

SIZES = ((320, 240), (504, 504), (640, 480), (1280, 720), (1920, 1080))
BUDGET_MS = 33.0


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError:
        return None
    return imagecodecs


def best_ms(fn, repeat):
    """The fastest of ``repeat`` runs, in ms: what the code costs, less what other processes took (a shared
    machine's load only ever adds)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return min(times)


def inspection_images():
    """Synthetic inspection frames, 640x480: a part (a filled circle) on an exactly flat background, and on one with
    sensor-like noise (Gaussian, sigma 1 grey level)."""
    flat = np.full((480, 640, 3), 128, np.uint8)
    noisy = np.clip(128 + np.random.RandomState(0).normal(0, 1.0, flat.shape), 0, 255).astype(np.uint8)
    out = []
    for name, image in (("flat background + part", flat), ("noisy background (sigma 1) + part", noisy)):
        image = image.copy()
        cv2.circle(image, (320, 240), 100, (40, 90, 200), -1)
        out.append((name, image))
    return out


def bpp_table(paths, check, synthetic=False):
    codecs = dict((name, LosslessCodec(name)) for name in ("med", "mlp"))
    ic = _imagecodecs()
    print("| photo | size | MED | MLP | PNG (OpenCV, level 9) | JPEG-LS (CharLS) | JPEG XL lossless (effort 7) |")
    print("|---|---|---|---|---|---|---|")
    totals, pixels = {}, 0
    items = inspection_images() if synthetic else [(os.path.basename(p), cv2.imread(p)) for p in paths]
    for name, image in items:
        h, w = image.shape[:2]
        sizes = {}
        for predictor, coder in codecs.items():
            payload = coder.encode(image)
            if check and not (decode(payload, image.shape) == image).all():
                raise SystemExit("%s: %s did not decode to the image" % (name, predictor))
            sizes[predictor] = len(payload)
        sizes["png"] = len(cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1])
        if ic is not None:
            rgb = np.ascontiguousarray(image[:, :, ::-1])
            sizes["jpegls"] = len(ic.jpegls_encode(rgb))
            sizes["jpegxl"] = len(ic.jpegxl_encode(rgb, lossless=True, effort=7))
            # the coders are lossless: check it, so that no lossy setting slips into the table
            assert (ic.jpegls_decode(ic.jpegls_encode(rgb)) == rgb).all()
        pixels += h * w
        for k, v in sizes.items():
            totals[k] = totals.get(k, 0) + v
        print("| {} | {}x{} | {} |".format(name, w, h, " | ".join(
            "{:.2f}".format(sizes[k] * 8.0 / (h * w)) if k in sizes else "" for k in
            ("med", "mlp", "png", "jpegls", "jpegxl"))))
    if synthetic:
        return
    print("| **all {} photos** (total bits / total pixels) | | {} |".format(len(paths), " | ".join(
        "**{:.2f}**".format(totals[k] * 8.0 / pixels) if k in totals else "" for k in
        ("med", "mlp", "png", "jpegls", "jpegxl"))))


def speed_table(paths, sizes, repeat, nano_factor, check):
    big = max((cv2.imread(p) for p in paths), key=lambda a: a.shape[0] * a.shape[1])
    print("\n| size | MED encode / decode ms | MLP encode / decode ms | PNG level 9 encode ms | "
          "Nano est. encode MED / MLP ms (x{:g}) |".format(nano_factor))
    print("|---|---|---|---|---|")
    for w, h in sizes:
        if big.shape[0] < h or big.shape[1] < w:
            continue
        y, x = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
        crop = np.ascontiguousarray(big[y:y + h, x:x + w])
        row = {}
        for name in ("med", "mlp"):
            coder = LosslessCodec(name)
            payload = coder.encode(crop)  # also warms the caches (the coding order is computed once per size)
            row[name] = (best_ms(lambda: coder.encode(crop), repeat),
                         best_ms(lambda: decode(payload, crop.shape), 1) if check else None)
        png = best_ms(lambda: cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 9]), repeat)
        dec = dict((name, "{:.0f}".format(row[name][1]) if check else "-") for name in row)
        print("| {}x{} | {:.0f} / {} | {:.0f} / {} | {:.0f} | {:.0f} / {:.0f} |".format(
            w, h, row["med"][0], dec["med"], row["mlp"][0], dec["mlp"], png,
            row["med"][0] * nano_factor, row["mlp"][0] * nano_factor))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="a folder of photos (.png, .jpg)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per size (default: %(default)s)")
    parser.add_argument("--nano-factor", type=float, default=6.0,
                        help="estimated Cortex-A57 / this CPU time ratio (default: %(default)s; 1 on the Nano)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding checks and times")
    parser.add_argument("--speed-only", action="store_true", help="skip the bpp table (the slow part)")
    parser.add_argument("--synthetic", action="store_true",
                        help="the bpp table of two synthetic inspection frames instead of --photos, and no speed table")
    parser.add_argument("--sizes", nargs="+", default=["%dx%d" % s for s in SIZES], metavar="WxH",
                        help="crop sizes for the speed table (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = sorted(p for p in glob.glob(os.path.join(args.photos, "*"))
                   if os.path.splitext(p)[1].lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit("no .png or .jpg photos in {}".format(args.photos))
    print("python {}.{}, numpy {}; bits per pixel (24 = raw BGR), lower is better\n".format(
        sys.version_info[0], sys.version_info[1], np.__version__))
    if args.synthetic:
        bpp_table(paths, not args.no_decode, synthetic=True)
        return
    if not args.speed_only:
        bpp_table(paths, not args.no_decode)
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    speed_table(paths, sizes, args.repeat, args.nano_factor, not args.no_decode)
    print("\nNano column: this machine's time x {:g}, an ESTIMATE (not measured on a Nano); the budget is {:g} ms "
          "a frame".format(args.nano_factor, BUDGET_MS))


if __name__ == "__main__":
    main()
