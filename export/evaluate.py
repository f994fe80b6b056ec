"""``latentlink eval``: is the model better than JPEG, WebP and JPEG 2000 at the same bits per pixel, on these photos?

The model is measured exactly as it is deployed: its encoder (ONNX by default; any backend file), latents packed
(and with ``--entropy`` losslessly compressed) into a wire frame (its bytes, header included, are the rate), its
decoder, the output rounded to 8 bits. Each codec (OpenCV) is then given the highest quality whose file is no
larger than the model's frame, photo by photo (seed 000 matched JPEG's quality factor to its compression ratio the
same way), and is also swept over its quality range for rate-distortion curves.

Metrics: PSNR over RGB and over Y (BT.601 luma), SSIM and MS-SSIM over RGB (8 bits, peak 255), bpp, compression
ratio against raw 24-bit RGB, and encode/decode time. ``--compressai DIR`` writes one JSON per method in
CompressAI's shape, ``--plot FILE.png`` the rate-distortion plot.
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from latentlink.edge.backends import open_backend
from latentlink.edge.cli import (ArgumentParser, check_input_dir, check_model_file, check_output_dir,
                                 check_output_file, progress, run_main)
from latentlink.edge.errors import ConfigError
from latentlink.edge.preprocess import Preprocessor, fit_frame, psnr, to_image
from latentlink.edge.profile import load_profile
from latentlink.edge.entropy import CODERS, check_available, compress, decompress
from latentlink.edge.protocol import frame_payload, pack_latents

from .cost_model import estimate_file, format_estimate
from .data import list_images, read_bgr, readable_images

# codec -> (file extension, OpenCV quality flag, lowest and highest quality value)
CODECS = {
    "jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY, 1, 100),
    "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY, 1, 100),
    "jpeg2000": (".jp2", cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, 1, 1000),  # target rate x 1000
}
SWEEPS = {"jpeg": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95), "webp": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
          "jpeg2000": (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)}
METRICS = ("psnr", "psnr_y", "ssim", "ms_ssim")
COMPRESSAI_KEYS = {"psnr": "psnr-rgb", "psnr_y": "psnr-y", "ssim": "ssim-rgb", "ms_ssim": "ms-ssim-rgb"}
MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window
MS_SSIM_NOTE = ("ms-ssim-rgb left out: MS-SSIM needs frames of at least {} pixels a side (5 scales of an 11-pixel "
                "window); these are smaller".format(MS_SSIM_MIN_SIDE))

EXAMPLES = """examples:
  latentlink eval --photos data/holdout
  latentlink eval --photos data/holdout --profile nano-1008 --json runs/eval-1008.json
  latentlink eval --photos data/holdout --codecs jpeg,webp,jpeg2000 --compressai runs/rd --plot runs/rd.png
  latentlink eval --photos data/holdout --encoder runs/lossy-cae.pt --decoder runs/lossy-cae.pt   (a checkpoint)"""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink eval", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--profile", default="nano-504", help="profile: input size and default model")
    parser.add_argument("--size", metavar="WxH", type=size_type, help="frame size in pixels instead of the "
                        "profile's, for a model exported at another size (crae needs multiples of 32, e.g. 512x512)")
    parser.add_argument("--encoder", default="default", help="encoder .onnx, .pt or .engine (default: the profile's)")
    parser.add_argument("--decoder", default="default", help="decoder .onnx, .pt or .engine (default: the profile's)")
    parser.add_argument("--codecs", type=codecs_type, default="jpeg,webp",
                        help="codecs to compare with, of {} (default: %(default)s)".format(", ".join(CODECS)))
    parser.add_argument("--entropy", choices=CODERS, default="none", metavar="CODER",
                        help="compress the packed latents losslessly as the edge would (--entropy of `latentlink "
                             "edge`): one of {}; the rate counts the compressed frame, the times include coding "
                             "(default: %(default)s)".format(", ".join(CODERS)))
    parser.add_argument("--per-image", action="store_true", help="print every photo's row, not only the means")
    parser.add_argument("--json", help="write per-photo results to this JSON file")
    parser.add_argument("--compressai", metavar="DIR", help="write CompressAI-style JSON, one file per method")
    parser.add_argument("--plot", metavar="FILE.png", help="write the rate-distortion plot (PSNR and MS-SSIM)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def size_type(text):
    """argparse type: ``"512x512"`` -> ``(512, 512)``, width x height in pixels."""
    try:
        width, height = (int(n) for n in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError("got {!r}; expected WIDTHxHEIGHT in pixels, e.g. 512x512".format(text))
    return width, height


def codecs_type(text):
    """argparse type: ``"jpeg,webp"`` -> ``["jpeg", "webp"]``, each one of :data:`CODECS`."""
    codecs = [c for c in text.split(",") if c]
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs:
        raise argparse.ArgumentTypeError("got {!r}; expected codecs separated by commas, of {}".format(
            text, ", ".join(CODECS)))
    return codecs


def check_args(args):
    """The paths, before the models load and the photos are read."""
    check_input_dir("--photos", args.photos, "give a folder of photos")
    for option, path, role in (("--encoder", args.encoder, "encoder"), ("--decoder", args.decoder, "decoder")):
        if path != "default":
            check_model_file(option, path, role)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(option, path)
    if args.compressai:
        check_output_dir("--compressai", args.compressai)


def encode_with_codec(image_bgr, codec, quality):
    """``(bytes, decoded image, encode s, decode s)`` of ``image_bgr`` through ``codec`` at ``quality``."""
    ext, flag, _, _ = CODECS[codec]
    start = time.perf_counter()
    ok, buf = cv2.imencode(ext, image_bgr, [flag, int(quality)])
    encode_s = time.perf_counter() - start
    if not ok:
        raise ConfigError("OpenCV could not encode {} at quality {}".format(codec, quality))
    start = time.perf_counter()
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return len(buf), decoded, encode_s, time.perf_counter() - start


def codec_at_budget(image_bgr, codec, max_bytes):
    """Highest-quality encoding by ``codec`` of at most ``max_bytes``; returns (quality, bytes, decoded image).

    Falls back to the lowest quality when even that is over the budget.
    """
    _, _, low, high = CODECS[codec]
    best = None
    while low <= high:  # file size grows with quality: binary search the largest quality within budget
        q = (low + high) // 2
        size, decoded, _, _ = encode_with_codec(image_bgr, codec, q)
        if size <= max_bytes:
            best, low = (q, size, decoded), q + 1
        else:
            high = q - 1
    if best is None:
        lowest = CODECS[codec][2]
        best = (lowest,) + encode_with_codec(image_bgr, codec, lowest)[:2]
    return best


def image_metrics(reference, test):
    """PSNR (RGB, Y), SSIM and MS-SSIM (RGB) of two BGR uint8 images; MS-SSIM is None below 161 pixels a side."""
    import torch
    from pytorch_msssim import ms_ssim, ssim

    y_ref = cv2.cvtColor(reference, cv2.COLOR_BGR2YCrCb)[..., :1]
    y_test = cv2.cvtColor(test, cv2.COLOR_BGR2YCrCb)[..., :1]
    a, b = (torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))[None].double()
            for im in (reference, test))
    small = min(reference.shape[:2]) < MS_SSIM_MIN_SIDE
    return {"psnr": psnr(reference, test), "psnr_y": psnr(y_ref, y_test),
            "ssim": float(ssim(a, b, data_range=255.0)),
            "ms_ssim": None if small else float(ms_ssim(a, b, data_range=255.0))}


def evaluate(photos, profile, encoder_path, decoder_path, codecs=("jpeg", "webp"), backend_options=None,
             entropy="none", skipped=None, quiet=False):
    """Per-photo results: the model's bytes, bpp, ratio, metrics and times (s), and each codec's at the same size.

    ``photos``: a folder, or a list of image paths.

    ``entropy``: the coder applied to the packed latents; the model's bytes are the compressed wire frame, its
    encoding time includes the compression (also given alone as ``entropy_encoding_time``) and its decoding time
    the decompression (``entropy_decoding_time``). Files that do not decode are skipped with a warning and
    appended to the list ``skipped``. A progress bar on stderr where it is a terminal, unless ``quiet``.
    """
    check_available(entropy)
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    options = dict(backend_options or {}, input_size=(h, w))
    results = []
    with open_backend(encoder_path, "encoder", **options) as enc, \
            open_backend(decoder_path, "decoder", **options) as dec:
        preprocess = Preprocessor(w, h, fit, enc.info.tiles)  # a tiled model: the frame as a batch of tiles
        paths = list_images(photos) if isinstance(photos, (str, Path)) else photos
        bar = progress(paths, quiet=quiet, desc="photos", unit="photo")
        for path, frame in readable_images(bar, read=read_bgr, skipped=skipped):
            reference = fit_frame(frame, w, h, fit)
            start = time.perf_counter()
            latents, _ = enc.infer(preprocess(frame))
            packed = pack_latents(latents, enc.info.packing)
            coding_start = time.perf_counter()
            payload = compress(packed, entropy)
            entropy_encode_s = time.perf_counter() - coding_start
            wire = frame_payload("eval", 0, 0.0, latents, enc.info.packing, payload, entropy)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decompress(payload, entropy, len(packed))  # lossless: it gives back exactly `packed` (tests check that)
            entropy_decode_s = time.perf_counter() - start
            output, _ = dec.infer(latents.astype(np.float32))
            decoded = to_image(output, dec.info.tiles)
            decode_s = time.perf_counter() - start
            row = {"photo": path.name, "model": dict(
                _rate(len(wire), w, h), encoding_time=encode_s, decoding_time=decode_s,
                entropy_encoding_time=entropy_encode_s, entropy_decoding_time=entropy_decode_s,
                **image_metrics(reference, decoded))}
            for codec in codecs:
                quality, size, image = codec_at_budget(reference, codec, len(wire))
                row[codec] = dict(_rate(size, w, h), quality=quality, **image_metrics(reference, image))
            results.append(row)
    if not results:
        raise ConfigError("none of the {} photos decodes (see the warnings above)".format(len(paths)))
    return results


def codec_sweep(photos, profile, codec, qualities=None, quiet=False):
    """The codec's rate-distortion curve: for each quality, the mean bpp, metrics and times over the photos.

    ``photos``: a folder, or a list of image paths. A progress bar on stderr where it is a terminal, unless ``quiet``.
    """
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    paths = list_images(photos) if isinstance(photos, (str, Path)) else photos
    images = [fit_frame(image, w, h, fit) for _, image in readable_images(paths, read=read_bgr)]
    qualities = qualities or SWEEPS[codec]
    curve = []
    bar = progress(quiet=quiet, total=len(qualities) * len(images), desc=codec + " sweep", unit="image")
    for quality in qualities:
        rows = []
        for image in images:
            bar.update()
            size, decoded, encode_s, decode_s = encode_with_codec(image, codec, quality)
            rows.append(dict(_rate(size, w, h), encoding_time=encode_s, decoding_time=decode_s,
                             **image_metrics(image, decoded)))
        point = _mean_rows(rows)
        point["quality"] = quality
        curve.append(point)
    bar.close()
    return curve


def _rate(size, w, h):
    return {"bytes": size, "bpp": 8.0 * size / (w * h), "ratio": 3.0 * w * h / size}


def _mean_rows(rows):
    keys = [k for k in rows[0] if k not in ("quality",)]
    return dict((k, None if any(r[k] is None for r in rows) else float(np.mean([r[k] for r in rows]))) for k in keys)


def compressai_json(name, description, points):
    """CompressAI's results shape: ``{"name", "description", "results": {"psnr-rgb": [...], "bpp": [...]...}}``."""
    results = {"bpp": [p["bpp"] for p in points]}
    document = {"name": name, "description": description, "results": results}
    for key, out in COMPRESSAI_KEYS.items():
        if any(p[key] is None for p in points):  # a null breaks compressai.utils.plot: the key is left out
            document["note"] = MS_SSIM_NOTE if key == "ms_ssim" else "{} left out: not measured".format(out)
            continue
        results[out] = [p[key] for p in points]
    for key in ("encoding_time", "decoding_time"):
        if all(key in p for p in points):
            results[key] = [p[key] for p in points]
    return document


def plot_rd(path, model_name, model_point, curves, title):
    """PSNR-RGB and MS-SSIM against bpp: codecs as curves, the model as a point (matplotlib, written as PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "psnr", "PSNR RGB (dB)"), (axes[1], "ms_ssim", "MS-SSIM (RGB)")):
        for codec, curve in curves.items():
            points = [(p["bpp"], p[key]) for p in curve if p[key] is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=codec)
        if model_point.get(key) is not None:
            ax.plot([model_point["bpp"]], [model_point[key]], marker="*", markersize=14, linestyle="none",
                    color="black", label=model_name)
        ax.set_xlabel("bits per pixel (bpp)")
        ax.set_ylabel(label)
        ax.set_xlim(0, max([model_point["bpp"] * 2.5] + [0.1]))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def format_results(results, codecs, per_image=False, entropy="none"):
    """The table: PSNR @ bpp per method (every photo with ``per_image``, and the mean), then the other metrics.

    ``entropy``: the coder the model's rate was measured with (its coding times get their own line).
    """
    names = ["model"] + list(codecs)
    lines = ["{:<24}".format("photo") + "".join("{:>18}".format(n + " dB @ bpp") for n in names)]
    for row in results if per_image else []:
        lines.append("{:<24}".format(row["photo"][:24]) + "".join(
            "{:>18}".format("{:.2f} @ {:.3f}".format(row[n]["psnr"], row[n]["bpp"])) for n in names))
    means = dict((n, _mean_rows([r[n] for r in results])) for n in names)
    lines.append("{:<24}".format("mean") + "".join("{:>18}".format("{:.2f} @ {:.3f}".format(
        means[n]["psnr"], means[n]["bpp"])) for n in names))
    for key, label in (("psnr_y", "mean PSNR-Y dB"), ("ssim", "mean SSIM"), ("ms_ssim", "mean MS-SSIM"),
                       ("ratio", "mean ratio")):
        lines.append("{:<24}".format(label) + "".join(
            "{:>18}".format("-" if means[n][key] is None else "{:.4f}".format(means[n][key])) for n in names))
    model = means["model"]
    lines.append("model times: encode {:.1f} ms, decode {:.1f} ms (mean, this machine)".format(
        1000 * model["encoding_time"], 1000 * model["decoding_time"]))
    if entropy != "none":
        lines.append("entropy coding ({}), included above: compress {:.2f} ms, decompress {:.2f} ms".format(
            entropy, 1000 * model["entropy_encoding_time"], 1000 * model["entropy_decoding_time"]))
    return "\n".join(lines)


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    profile = load_profile(args.profile)
    if args.size:
        width, height = args.size
        profile.input.width, profile.input.height = width, height
        profile.name = f"{profile.name}@{width}x{height}"
    codecs = args.codecs
    encoder = profile.model.encoder if args.encoder == "default" else args.encoder
    decoder = profile.model.decoder if args.decoder == "default" else args.decoder
    paths, skipped = list_images(args.photos), []
    print(f"{profile.name}: {len(paths)} photos from {args.photos} at {profile.input.width}x{profile.input.height}, "
          f"against {', '.join(codecs)} ...", flush=True)
    results = evaluate(paths, profile, encoder, decoder, codecs, entropy=args.entropy, skipped=skipped,
                       quiet=args.quiet)
    coded = "" if args.entropy == "none" else f" ({args.entropy}-compressed)"
    print(f"{profile.name}: {profile.input.width}x{profile.input.height}, {len(results)} photos"
          f"{f' ({len(skipped)} unreadable skipped)' if skipped else ''}; codecs at the highest quality no larger "
          f"than the model's wire frame{coded}")
    print(format_results(results, codecs, per_image=args.per_image, entropy=args.entropy))
    # Beside the quality, what the encoder would cost on the Nano (export/cost_model.py: a model, not a measurement).
    estimate, reason = estimate_file(encoder)
    print("Nano encoder " + (format_estimate(estimate, profile.budget_ms) if estimate else "estimate: none ("
                             + reason + ")"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"profile": profile.name, "entropy": args.entropy,
                                               "estimate": estimate, "results": results}, indent=1))
        print(f"wrote {args.json}")
    if args.compressai or args.plot:
        model_point = _mean_rows([r["model"] for r in results])
        model_name = "latentlink {} ({}{})".format(profile.name, Path(encoder).name,
                                                  "" if args.entropy == "none" else ", " + args.entropy)
        readable = [p for p in paths if p not in skipped]
        print(f"rate-distortion curves: {', '.join(codecs)} at {', '.join(str(len(SWEEPS[c])) for c in codecs)} "
              f"qualities over {len(readable)} photos ...", flush=True)
        curves = dict((codec, codec_sweep(readable, profile, codec, quiet=args.quiet)) for codec in codecs)
        if args.compressai:
            out = Path(args.compressai)
            out.mkdir(parents=True, exist_ok=True)
            documents = {"model": compressai_json(model_name, "wire frame bytes (header included) as the rate; "
                                                  f"{profile.input.width}x{profile.input.height}; entropy coder "
                                                  f"{args.entropy}", [model_point])}
            for codec, curve in curves.items():
                documents[codec] = compressai_json(codec, f"OpenCV {cv2.__version__}, quality sweep "
                                                   f"{[p['quality'] for p in curve]}", curve)
            for name, document in documents.items():
                (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
            notes = sorted(set(d["note"] for d in documents.values() if "note" in d))
            print(f"wrote {', '.join(str(out / (n + '.json')) for n in documents)} (CompressAI-style results"
                  f"{''.join('; ' + note for note in notes)})")
        if args.plot:
            plot_rd(args.plot, model_name, model_point, curves,
                    f"{profile.name}: {len(results)} photos from {args.photos}")
            print(f"wrote {args.plot} (rate-distortion plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
