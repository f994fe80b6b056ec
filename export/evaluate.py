"""``latentlink eval``: is the model better than JPEG at the same bits per pixel, on these photos?

The model is measured exactly as it is deployed: the profile's ONNX encoder, latents packed into a wire frame (its
bytes, header included, are the rate), the ONNX decoder, the output rounded to 8 bits. Each codec (JPEG, WebP, via
OpenCV) is then given the highest quality whose file is no larger than the model's frame, photo by photo.
PSNR is over RGB, 8 bits (peak 255).
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from edge.backends import open_backend
from edge.cli import run_main
from edge.preprocess import Preprocessor, fit_frame, psnr, to_image
from edge.profile import load_profile
from edge.protocol import encode_frame

from .data import list_images

CODECS = {"jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}

EXAMPLES = """examples:
  latentlink eval --photos data/holdout
  latentlink eval --photos data/holdout --profile nano-1008 --json runs/eval-1008.json"""


def get_args_parser():
    parser = argparse.ArgumentParser(prog="latentlink eval", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--profile", default="nano-504", help="profile: input size and default model")
    parser.add_argument("--encoder", default="default", help="encoder .onnx (default: the profile's)")
    parser.add_argument("--decoder", default="default", help="decoder .onnx (default: the profile's)")
    parser.add_argument("--codecs", default="jpeg,webp", help="codecs to compare with (default: %(default)s)")
    parser.add_argument("--json", help="write per-photo results to this JSON file")
    return parser


def codec_at_budget(image_bgr, codec, max_bytes):
    """Highest-quality encoding by ``codec`` of at most ``max_bytes``; returns (quality, bytes, decoded image).

    Falls back to quality 1 (the smallest the codec makes) when even that is over the budget.
    """
    ext, flag = CODECS[codec]
    best = None
    low, high = 1, 100
    while low <= high:  # file size grows with quality: binary search the largest quality within budget
        q = (low + high) // 2
        ok, buf = cv2.imencode(ext, image_bgr, [flag, q])
        if len(buf) <= max_bytes:
            best, low = (q, buf), q + 1
        else:
            high = q - 1
    if best is None:
        best = (1, cv2.imencode(ext, image_bgr, [flag, 1])[1])
    quality, buf = best
    return quality, len(buf), cv2.imdecode(buf, cv2.IMREAD_COLOR)


def evaluate(photos, profile, encoder_path, decoder_path, codecs=("jpeg", "webp")):
    """Per-photo results: the model's bpp, PSNR and times, and each codec's at the same size."""
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    preprocess = Preprocessor(w, h, fit)
    results = []
    with open_backend(encoder_path, "encoder") as enc, open_backend(decoder_path, "decoder") as dec:
        for path in list_images(photos):
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            reference = fit_frame(frame, w, h, fit)
            start = time.perf_counter()
            latents, _ = enc.infer(preprocess(frame))
            wire = encode_frame("eval", 0, 0.0, latents, enc.info.packing)
            encode_ms = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            output, _ = dec.infer(latents.astype(np.float32))
            decoded = to_image(output)
            decode_ms = (time.perf_counter() - start) * 1000
            row = {"photo": path.name, "model": {"bytes": len(wire), "bpp": 8 * len(wire) / (w * h),
                                                 "psnr": psnr(reference, decoded), "encode_ms": encode_ms,
                                                 "decode_ms": decode_ms}}
            for codec in codecs:
                quality, size, image = codec_at_budget(reference, codec, len(wire))
                row[codec] = {"quality": quality, "bytes": size, "bpp": 8 * size / (w * h),
                              "psnr": psnr(reference, image)}
            results.append(row)
    return results


def format_results(results, codecs):
    names = ["model"] + list(codecs)
    lines = ["{:<24}".format("photo") + "".join("{:>18}".format(n + " dB @ bpp") for n in names)]
    for row in results:
        lines.append("{:<24}".format(row["photo"][:24]) + "".join(
            "{:>18}".format("{:.2f} @ {:.3f}".format(row[n]["psnr"], row[n]["bpp"])) for n in names))
    mean = {n: (np.mean([r[n]["psnr"] for r in results]), np.mean([r[n]["bpp"] for r in results])) for n in names}
    lines.append("{:<24}".format("mean") + "".join("{:>18}".format("{:.2f} @ {:.3f}".format(*mean[n]))
                                                    for n in names))
    return "\n".join(lines)


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    profile = load_profile(args.profile)
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        from edge.errors import ConfigError

        raise ConfigError(f"unknown codec {unknown[0]!r} (available: {', '.join(CODECS)})")
    encoder = profile.model.encoder if args.encoder == "default" else args.encoder
    decoder = profile.model.decoder if args.decoder == "default" else args.decoder
    results = evaluate(args.photos, profile, encoder, decoder, codecs)
    print(f"{profile.name}: {profile.input.width}x{profile.input.height}, PSNR RGB 8-bit; codecs at the highest "
          f"quality no larger than the model's wire frame")
    print(format_results(results, codecs))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"profile": profile.name, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
