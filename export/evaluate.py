"""``latentlink eval``: is the model better than JPEG, WebP and JPEG 2000 at the same bits per pixel, on these photos?

The model is measured exactly as it is deployed: its encoder (ONNX by default; any backend file), latents packed
(and with ``--entropy`` losslessly compressed) into a wire frame (its bytes, header included, are the rate), its
decoder, the output rounded to 8 bits. Each codec (OpenCV) is then given the highest quality whose file is no
larger than the model's frame, photo by photo (seed 000 matched JPEG's quality factor to its compression ratio the
same way), and is also swept over its quality range for rate-distortion curves.

``--video CLIP`` takes a clip's first frames instead of photos, and adds the video codecs H.264 and H.265 (x264,
x265 through ffmpeg; see video_codecs.py), each in all-intra and low-delay configurations, at the highest quality
whose stream is no larger than the model's frames together, and swept over CRF. ``--checkpoints A B C`` measures
several models (e.g. one per rate-distortion trade-off) in one run, as a curve.

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
from latentlink.edge.cli import (ArgumentParser, Number, check_input_dir, check_input_file, check_model_file,
                                 check_output_dir, check_output_file, positive_int, progress, run_main)
from latentlink.edge.errors import ConfigError
from latentlink.edge.preprocess import Preprocessor, fit_frame, psnr, to_image
from latentlink.edge.profile import load_profile
from latentlink.edge.entropy import CODERS, check_available, decompress
from latentlink.edge.protocol import code_latents, frame_payload, pack_latents

from . import video_codecs
from .data import list_images, read_bgr, readable_images

# codec -> (file extension, OpenCV quality flag, lowest and highest quality value)
CODECS = {
    "jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY, 1, 100),
    "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY, 1, 100),
    "jpeg2000": (".jp2", cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, 1, 1000),  # target rate x 1000
}
SWEEPS = {"jpeg": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95), "webp": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
          "jpeg2000": (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)}
# Video codecs (--video only): name -> (codec, configuration) of video_codecs.
VIDEO = dict(("{}-{}".format(codec, config), (codec, config)) for codec in video_codecs.VIDEO_CODECS
             for config in video_codecs.CONFIGS)
METRICS = ("psnr", "psnr_y", "ssim", "ms_ssim")
COMPRESSAI_KEYS = {"psnr": "psnr-rgb", "psnr_y": "psnr-y", "ssim": "ssim-rgb", "ms_ssim": "ms-ssim-rgb"}
MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window
MS_SSIM_NOTE = ("ms-ssim-rgb left out: MS-SSIM needs frames of at least {} pixels a side (5 scales of an 11-pixel "
                "window); these are smaller".format(MS_SSIM_MIN_SIDE))

EXAMPLES = """examples:
  latentlink eval --photos data/holdout
  latentlink eval --photos data/holdout --profile nano-1008 --json runs/eval-1008.json
  latentlink eval --photos data/holdout --codecs jpeg,webp,jpeg2000 --compressai runs/rd --plot runs/rd.png
  latentlink eval --photos data/holdout --encoder runs/lossy-cae.pt --decoder runs/lossy-cae.pt   (a checkpoint)
  latentlink eval --photos data/holdout --checkpoints runs/l0.pt runs/l1.pt runs/l2.pt --plot runs/rd.png
  latentlink eval --photos data/holdout --progressive profiles/default/progressive-504 --plot runs/rd-progressive.png
  latentlink eval --video data/video/vtest.avi --frames 30 --codecs jpeg,webp,x264,x265 --plot runs/rd-video.png
  latentlink eval --photos data/holdout --codecs jpeg --postfilter profiles/default/nano-504/postfilter.onnx \
      --jpeg-postfilter runs/postfilter-jpeg/postfilter.onnx     (dB gained and ms spent by each post-filter)"""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink eval", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos", help="folder of photos (searched recursively)")
    source.add_argument("--video", metavar="CLIP", help="a video file: its first --frames frames, fitted to the "
                        "profile's input as the edge does; allows the video codecs x264 and x265 in --codecs")
    parser.add_argument("--frames", type=positive_int, default=30,
                        help="with --video: how many frames, from the first (default: %(default)s)")
    parser.add_argument("--profile", default="nano-504", help="profile: input size and default model")
    parser.add_argument("--size", metavar="WxH", type=size_type, help="frame size in pixels instead of the "
                        "profile's, for a model exported at another size (crae needs multiples of 32, e.g. 512x512)")
    parser.add_argument("--encoder", default="default", help="encoder .onnx, .pt or .engine (default: the profile's)")
    parser.add_argument("--decoder", default="default", help="decoder .onnx, .pt or .engine (default: the profile's)")
    parser.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                        help="several models, each a checkpoint (.pt, encoder and decoder in one) or an export "
                             "folder (`latentlink export onnx --out`: its ONNX files, and its entropy.json for "
                             "--entropy context), e.g. one per --lmbda of `latentlink train`: each is measured, "
                             "and they are plotted as one curve")
    parser.add_argument("--progressive", metavar="MODEL",
                        help="also measure a progressive model (`latentlink train --model progressive`): its export "
                             "folder, model.json or .pt checkpoint; every iteration count 1..K is a point of one "
                             "rate-distortion curve, from the one model (edge/progressive.py)")
    parser.add_argument("--codecs", type=codecs_type, default="jpeg,webp",
                        help="codecs to compare with, of {}; with --video also x264 and x265 (each all-intra and "
                             "low-delay, through ffmpeg) (default: %(default)s)".format(", ".join(CODECS)))
    parser.add_argument("--preset", default="medium", choices=("ultrafast", "veryfast", "fast", "medium", "slow"),
                        help="x264/x265 preset: slower presets give more quality per byte (default: %(default)s)")
    parser.add_argument("--streams", metavar="DIR", help="with --video: keep the x264/x265 streams coded at the "
                        "model's rate in DIR (raw .h264/.hevc, e.g. to check them with ffprobe)")
    parser.add_argument("--threads", type=Number(int, low=0, note="0: the libraries' default"), default=0,
                        help="CPU threads for the model and the metrics (PyTorch, ONNX Runtime); 1 is much faster "
                             "on a machine whose cores are busy (0: the libraries' default)")
    parser.add_argument("--entropy", choices=CODERS, default="none", metavar="CODER",
                        help="compress the packed latents losslessly as the edge would (--entropy of `latentlink "
                             "edge`): one of {}; the rate counts the compressed frame, the times include coding "
                             "(default: %(default)s)".format(", ".join(CODERS)))
    parser.add_argument("--postfilter", metavar="FILE.onnx",
                        help="also measure the model's frames through this post-filter (`latentlink train-postfilter`; "
                             "refused unless trained for the decoder's model): PSNR and MS-SSIM with and without it, "
                             "and its time per frame")
    parser.add_argument("--jpeg-postfilter", metavar="FILE.onnx",
                        help="likewise for JPEG at the model's bytes, with a filter trained for JPEG (`latentlink "
                             "train-postfilter --codec jpeg`); needs jpeg in --codecs")
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
    """argparse type: ``"jpeg,webp"`` -> ``["jpeg", "webp"]``, each one of :data:`CODECS` or x264, x265."""
    codecs = [c for c in text.split(",") if c]
    unknown = [c for c in codecs if c not in CODECS and c not in video_codecs.VIDEO_CODECS]
    if unknown or not codecs:
        raise argparse.ArgumentTypeError("got {!r}; expected codecs separated by commas, of {}".format(
            text, ", ".join(list(CODECS) + list(video_codecs.VIDEO_CODECS))))
    return codecs


def check_args(args):
    """The paths, before the models load and the photos are read."""
    if args.photos is not None:
        check_input_dir("--photos", args.photos, "give a folder of photos")
        video = [c for c in args.codecs if c in video_codecs.VIDEO_CODECS]
        if video:
            raise ConfigError("--codecs {}: video codecs need a clip: give --video CLIP instead of --photos".format(
                ",".join(video)))
        if args.streams:
            raise ConfigError("--streams keeps the video codecs' streams: it needs --video CLIP")
    else:
        check_input_file("--video", args.video, "give a video file, e.g. data/video/vtest.avi from "
                         "scripts/get_photos.sh")
    if args.checkpoints and (args.postfilter or args.jpeg_postfilter):
        raise ConfigError("--postfilter and --jpeg-postfilter measure one model's filter: leave out --checkpoints "
                          "(give --encoder and --decoder, or the profile's default)")
    if args.jpeg_postfilter and "jpeg" not in args.codecs:
        raise ConfigError("--jpeg-postfilter filters JPEG at the model's bytes: add jpeg to --codecs (e.g. --codecs "
                          "jpeg,webp)")
    for option, path in (("--postfilter", args.postfilter), ("--jpeg-postfilter", args.jpeg_postfilter)):
        if path:
            check_input_file(option, path, "train one with `latentlink train-postfilter`")
    if args.checkpoints and (args.encoder != "default" or args.decoder != "default"):
        raise ConfigError("--checkpoints gives each model's encoder and decoder (one checkpoint holds both): "
                          "leave out --encoder and --decoder")
    for path in args.checkpoints or []:
        if Path(path).is_dir():
            for role in ("encoder", "decoder"):
                check_model_file("--checkpoints", str(Path(path) / (role + ".onnx")), role)
        else:
            check_model_file("--checkpoints", path, "encoder")
    for option, path, role in (("--encoder", args.encoder, "encoder"), ("--decoder", args.decoder, "decoder")):
        if path != "default":
            check_model_file(option, path, role)
    if args.progressive and not Path(args.progressive).exists():
        raise ConfigError("--progressive {}: no such file or folder; give the export folder of a progressive model "
                          "(`latentlink export onnx --checkpoint PROGRESSIVE.pt --out DIR`)".format(args.progressive))
    if args.progressive and args.video:
        raise ConfigError("--progressive measures photos: give --photos, not --video")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(option, path)
    for option, path in (("--compressai", args.compressai), ("--streams", args.streams)):
        if path:
            check_output_dir(option, path)


def model_files(path):
    """``(name, encoder, decoder)`` of a --checkpoints entry: a checkpoint (.pt, both halves in one file; named by
    its file) or an export folder (encoder.onnx and decoder.onnx, and entropy.json for --entropy context; named
    by the folder, or by the folder above for a profile's folder such as runs/l1/nano-504)."""
    path = Path(path)
    if not path.is_dir():
        return path.stem, str(path), str(path)
    name = path.parent.name if path.name.startswith("nano-") and path.parent.name else path.name
    return name, str(path / "encoder.onnx"), str(path / "decoder.onnx")


def read_video_frames(path, count):
    """The first ``count`` frames of the video at ``path``: ``[(name, BGR uint8 frame)]``, names ``CLIP#0000``...

    ConfigError if it does not open or gives no frame; a shorter clip gives the frames it has.
    """
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while capture.isOpened() and len(frames) < count:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(("{}#{:04d}".format(Path(path).name, len(frames)), frame))
    finally:
        capture.release()
    if not frames:
        raise ConfigError("--video {}: OpenCV read no frame from it (not a video, or a codec OpenCV lacks; "
                          "convert it with ffmpeg -i CLIP -c:v libx264 clip.mp4)".format(path))
    return frames


def named_images(photos, skipped=None):
    """``(name, BGR image)`` pairs of ``photos``: a folder, a list of image paths, or ``(name, image)`` pairs
    (a clip's frames). Paths that do not decode are skipped with a warning and appended to ``skipped``."""
    items = list_images(photos) if isinstance(photos, (str, Path)) else list(photos)
    if items and isinstance(items[0], tuple):
        return items
    return [(path.name, image) for path, image in readable_images(items, read=read_bgr, skipped=skipped)]


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


def psnr_at_bytes(image_bgr, codec, quality, size, decoded, target):
    """PSNR (RGB, dB) of ``codec`` interpolated to exactly ``target`` bytes, between its encoding at ``quality``
    (``size`` bytes, at most ``target``: :func:`codec_at_budget`) and the next quality up (over ``target``).

    A codec at the budget gets fewer bytes than the model, by up to one quality step (a few percent); this says
    what those bytes were worth. No interpolation at the codec's highest quality, or below its lowest.
    """
    value = psnr(image_bgr, decoded)
    if quality >= CODECS[codec][3] or size > target:
        return value
    size_up, decoded_up, _, _ = encode_with_codec(image_bgr, codec, quality + 1)
    if size_up <= size:
        return value
    return value + (psnr(image_bgr, decoded_up) - value) * (target - size) / float(size_up - size)


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
             entropy="none", skipped=None, quiet=False, postfilter=None, jpeg_postfilter=None):
    """Per-photo results: the model's bytes, bpp, ratio, metrics and times (s), and each codec's at the same size.

    ``photos``: a folder, a list of image paths, or a list of ``(name, BGR image)`` pairs (a clip's frames, from
    :func:`read_video_frames`). ``codecs``: image codecs of :data:`CODECS` (video codecs are measured over the
    whole clip by :func:`video_at_budget`).

    ``entropy``: the coder applied to the packed latents; the model's bytes are the compressed wire frame, its
    encoding time includes the compression (also given alone as ``entropy_encoding_time``) and its decoding time
    the decompression (``entropy_decoding_time``). Files that do not decode are skipped with a warning and
    appended to the list ``skipped``. A progress bar on stderr where it is a terminal, unless ``quiet``.

    ``postfilter``: a post-filter (ONNX, ``latentlink train-postfilter``) for the decoder's model, refused if trained
    for another: each row also gets ``model+postfilter``, the metrics of the filtered frame and the filter's time
    (``postfilter_time``, s). ``jpeg_postfilter``: one trained for JPEG, applied to JPEG at the model's bytes
    (``jpeg+postfilter``).
    """
    from latentlink.host.postfilter import JPEG_ID, PostFilter, check_filter_for, open_postfilter

    check_available(entropy)
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    options = dict(backend_options or {}, input_size=(h, w))
    results = []
    with open_backend(encoder_path, "encoder", **options) as enc, \
            open_backend(decoder_path, "decoder", **options) as dec:
        preprocess = Preprocessor(w, h, fit, enc.info.tiles)  # a tiled model: the frame as a batch of tiles
        threads = options.get("threads", 0)
        filters = {}  # method -> PostFilter; refused here, before any photo, if trained for another codec
        if postfilter:
            filters["model"] = open_postfilter(postfilter, dec.info, threads)
        if jpeg_postfilter:
            filters["jpeg"] = PostFilter(jpeg_postfilter, check_filter_for(jpeg_postfilter, JPEG_ID, "JPEG"), threads)
        # --entropy context: the tables beside the encoder (entropy.json), as the edge reads them
        context = enc.info.context_model() if entropy == "context" else None
        if isinstance(photos, (str, Path)):
            photos = list_images(photos)
        framed = bool(photos) and isinstance(photos[0], tuple)
        bar = progress(photos, quiet=quiet, desc="frames" if framed else "photos", unit="frame" if framed else "photo")
        named = iter(bar) if framed else ((path.name, image) for path, image in
                                          readable_images(bar, read=read_bgr, skipped=skipped))
        for name, frame in named:
            reference = fit_frame(frame, w, h, fit)
            start = time.perf_counter()
            latents, _ = enc.infer(preprocess(frame))
            coding_start = time.perf_counter()
            payload = code_latents(latents, enc.info.packing, entropy, context)  # packed, then coded
            entropy_encode_s = time.perf_counter() - coding_start
            wire = frame_payload("eval", 0, 0.0, latents, enc.info.packing, payload, entropy)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            if context is not None:
                if not np.array_equal(context.decode(payload, latents.shape), latents):  # lossless, or a bug
                    raise ConfigError("the context coder did not give back the latents of {}".format(name))
            else:  # lossless: it gives back exactly the packed bytes (tests check that)
                decompress(payload, entropy, len(pack_latents(latents, enc.info.packing)))
            entropy_decode_s = time.perf_counter() - start
            output, _ = dec.infer(latents.astype(np.float32))
            decoded = to_image(output, dec.info.tiles)
            decode_s = time.perf_counter() - start
            row = {"photo": name, "model": dict(
                _rate(len(wire), w, h), encoding_time=encode_s, decoding_time=decode_s,
                entropy_encoding_time=entropy_encode_s, entropy_decoding_time=entropy_decode_s,
                **image_metrics(reference, decoded))}
            for codec in codecs:
                quality, size, image = codec_at_budget(reference, codec, len(wire))
                row[codec] = dict(_rate(size, w, h), quality=quality, **image_metrics(reference, image),
                                  psnr_at_model_bytes=psnr_at_bytes(reference, codec, quality, size, image,
                                                                    len(wire)))
                if codec in filters:
                    row[codec + "+postfilter"] = filtered_metrics(filters[codec], reference, image)
            if "model" in filters:
                row["model+postfilter"] = filtered_metrics(filters["model"], reference, decoded)
            results.append(row)
    if not results:
        raise ConfigError("none of the {} photos decodes (see the warnings above)".format(len(photos)))
    return results


def filtered_metrics(postfilter, reference, image):
    """The metrics of ``image`` (BGR uint8) through ``postfilter`` against ``reference``, and the filter's time
    (``postfilter_time``, s, the 8-bit conversions included, as the host spends it)."""
    start = time.perf_counter()
    rgb = postfilter.run_images(image[None, :, :, ::-1])[0]
    elapsed = time.perf_counter() - start
    return dict(image_metrics(reference, np.ascontiguousarray(rgb[:, :, ::-1])), postfilter_time=elapsed)


def format_postfilter(results):
    """The post-filters' table: each method's mean PSNR and MS-SSIM without and with its filter, the gain, and the
    filter's mean time per frame (ms); empty when no row has a filtered method."""
    methods = [m for m in ("model", "jpeg") if results and m + "+postfilter" in results[0]]
    if not methods:
        return ""
    lines = ["{:<24}{:>12}{:>12}{:>10}{:>24}{:>12}".format("post-filter", "PSNR dB", "filtered", "gain",
                                                           "MS-SSIM -> filtered", "ms/frame")]
    for method in methods:
        plain = _mean_rows([r[method] for r in results])
        filtered = _mean_rows([r[method + "+postfilter"] for r in results])
        ms_ssim = "-" if plain["ms_ssim"] is None else "{:.4f} -> {:.4f}".format(plain["ms_ssim"], filtered["ms_ssim"])
        lines.append("{:<24}{:>12.2f}{:>12.2f}{:>+10.2f}{:>24}{:>12.1f}".format(
            method if method == "model" else method + " (model's bytes)", plain["psnr"], filtered["psnr"],
            filtered["psnr"] - plain["psnr"], ms_ssim, 1000 * filtered["postfilter_time"]))
    return "\n".join(lines)


def evaluate_progressive(photos, profile, model_path, codecs=("jpeg", "webp"), backend_options=None,
                         entropy="none", skipped=None, quiet=False):
    """The progressive model's rate-distortion curve from one model: ``{k: per-photo rows}`` for k = 1..K
    iterations, each row as :func:`evaluate`'s (the wire frame of the first k iterations' codes, coded with
    ``entropy``; the decoder's image after k iterations; each codec at that frame's bytes).

    Each photo is encoded once, for K iterations: the first k iterations' codes do not depend on how many follow,
    so they are exactly what an edge stopping at k would send; ``encoding_time`` is that of all K (s).
    """
    from latentlink.edge.progressive import open_progressive

    check_available(entropy)
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    options = dict(backend_options or {}, input_size=(h, w))
    curve = {}
    with open_progressive(model_path, "encoder", **options) as codec:
        if codec.input_shape != (1, 3, h, w):
            raise ConfigError("--progressive {} takes {}x{} frames; give --size {}x{} or --profile of that size"
                              .format(model_path, codec.input_shape[3], codec.input_shape[2], codec.input_shape[3],
                                      codec.input_shape[2]))
        preprocess = Preprocessor(w, h, fit)
        if isinstance(photos, (str, Path)):
            photos = list_images(photos)
        bar = progress(photos, quiet=quiet, desc="progressive", unit="photo")
        for name, frame in ((path.name, image) for path, image in readable_images(bar, read=read_bgr,
                                                                                  skipped=skipped)):
            reference = fit_frame(frame, w, h, fit)
            start = time.perf_counter()
            codes, _ = codec.encode(preprocess(frame), codec.max_iterations)
            encode_s = time.perf_counter() - start
            decode_s = 0.0  # the decoder steps alone (the codecs' searches below run between them)
            for k, image, timings in codec.decode_steps(codes):
                decode_s += (timings["decode"] + timings["gpu_to_cpu"]) / 1000.0
                context = codec.context_model(k) if entropy == "context" else None
                payload = code_latents(codes[:k], "bits", entropy, context)
                wire = frame_payload("eval", 0, 0.0, codes[:k], "bits", payload, entropy)
                decoded = to_image(image)
                row = {"photo": name, "model": dict(_rate(len(wire), w, h), encoding_time=encode_s,
                                                    decoding_time=decode_s, iterations=k,
                                                    **image_metrics(reference, decoded))}
                for other in codecs:
                    quality, size, coded = codec_at_budget(reference, other, len(wire))
                    row[other] = dict(_rate(size, w, h), quality=quality, **image_metrics(reference, coded),
                                      psnr_at_model_bytes=psnr_at_bytes(reference, other, quality, size, coded,
                                                                        len(wire)))
                curve.setdefault(k, []).append(row)
    if not curve:
        raise ConfigError("none of the {} photos decodes (see the warnings above)".format(len(photos)))
    return curve


def fitted_frames(photos, profile):
    """The photos or frames as the model sees them: BGR uint8, fitted to the profile's input as the edge does."""
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    return [fit_frame(image, w, h, fit) for _, image in named_images(photos)]


def video_at_budget(references, name, max_bytes, preset="medium", streams=None):
    """The video codec ``name`` (of :data:`VIDEO`, e.g. ``x265-lowdelay``) on the fitted frames ``references`` at
    its best quality within ``max_bytes`` for the whole clip (the model's wire frames together); see
    :func:`video_codecs.at_budget`. ``streams``: a folder to keep that stream in, as ``NAME.h264``/``NAME.hevc``."""
    codec, config = VIDEO[name]
    point = video_codecs.at_budget(references, codec, config, max_bytes, image_metrics, preset)
    if streams:  # coded once more at the CRF found, to keep it (the same settings give the same bytes)
        keep = Path(streams) / "{}.{}".format(name, video_codecs.VIDEO_CODECS[codec][1])
        kept = video_codecs.measure(references, codec, config, point["crf"], image_metrics, preset, keep=keep)
        point = dict(kept, stream=str(keep))
    return point


def codec_sweep(photos, profile, codec, qualities=None, quiet=False, preset="medium"):
    """The codec's rate-distortion curve: for each quality, the mean bpp, metrics and times over the photos.

    ``photos``: a folder, a list of image paths, or ``(name, image)`` pairs. A video codec (of :data:`VIDEO`) is
    swept over CRF on the frames as one clip. A progress bar on stderr where it is a terminal, unless ``quiet``.
    """
    w, h = profile.input.width, profile.input.height
    images = fitted_frames(photos, profile)
    if codec in VIDEO:
        return video_codecs.sweep(images, *VIDEO[codec], metrics=image_metrics, preset=preset)
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


def plot_rd(path, models, curves, title):
    """PSNR-RGB and MS-SSIM against bpp (matplotlib, written as PNG).

    ``models``: name -> list of points (one per checkpoint: drawn as stars, joined when several); ``curves``:
    codec -> its sweep. Points are dicts with ``bpp``, ``psnr`` and ``ms_ssim``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    top = max([p["bpp"] for points in models.values() for p in points] + [0.04])
    for ax, key, label in ((axes[0], "psnr", "PSNR RGB (dB)"), (axes[1], "ms_ssim", "MS-SSIM (RGB)")):
        for codec, curve in curves.items():
            points = sorted((p["bpp"], p[key]) for p in curve if p[key] is not None)
            if points:
                ax.plot(*zip(*points), marker=".", label=codec, linestyle="--" if codec in VIDEO else "-")
        for index, (name, model_points) in enumerate(models.items()):
            points = sorted((p["bpp"], p[key]) for p in model_points if p.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="*", markersize=13, linestyle="-" if len(points) > 1 else "none",
                        color="black" if index == 0 else None, label=name)
        ax.set_xlabel("bits per pixel (bpp)")
        ax.set_ylabel(label)
        ax.set_xlim(0, top * 2.5)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=90)
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
    if codecs:
        lines.append("{:<24}{:>18}".format("codec PSNR at the", "model's bytes:") + "".join(
            "{:>18}".format("{:.2f}".format(means[n]["psnr_at_model_bytes"])) for n in codecs)
            + "  (interpolated to the model's exact frame size)")
    model = means["model"]
    lines.append("model times: encode {:.1f} ms, decode {:.1f} ms (mean, this machine)".format(
        1000 * model["encoding_time"], 1000 * model["decoding_time"]))
    if entropy != "none":
        lines.append("entropy coding ({}), included above: compress {:.2f} ms, decompress {:.2f} ms".format(
            entropy, 1000 * model["entropy_encoding_time"], 1000 * model["entropy_decoding_time"]))
    return "\n".join(lines)


def format_video(points, model_bytes):
    """The video codecs' lines: each at its best quality within the model's bytes for the whole clip."""
    lines = ["video codecs, the whole clip within the model's {:,} bytes (CRF by binary search):".format(model_bytes)]
    for name, p in points.items():
        lines.append("  {:<15} {:>6.2f} dB @ {:.3f} bpp  (CRF {:>2}, {:,} bytes)  PSNR-Y {:.2f}  SSIM {:.4f}  "
                     "MS-SSIM {}".format(name, p["psnr"], p["bpp"], p["crf"], p["bytes"], p["psnr_y"], p["ssim"],
                                         "-" if p["ms_ssim"] is None else "{:.4f}".format(p["ms_ssim"])))
    return "\n".join(lines)


def format_summary(models, codecs):
    """One line per model: its mean bpp and PSNR / MS-SSIM, and each codec's PSNR at the same bytes."""
    lines = ["{:<28}{:>8}{:>9}{:>9}".format("model", "bpp", "dB", "MS-SSIM") +
             "".join("{:>16}".format(c + " dB") for c in codecs)]
    for m in models:
        point = m["point"]
        cells = []
        for codec in codecs:
            other = m["video"][codec] if codec in m["video"] else _mean_rows([r[codec] for r in m["results"]])
            cells.append("{:>16}".format("{:.2f} @ {:.3f}".format(other["psnr"], other["bpp"])))
        lines.append("{:<28}{:>8.3f}{:>9.2f}{:>9}".format(m["name"][:27], point["bpp"], point["psnr"], "-" if
                     point["ms_ssim"] is None else "{:.4f}".format(point["ms_ssim"])) + "".join(cells))
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
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the metrics (pytorch_msssim) and a .pt model
    image_codecs = [c for c in args.codecs if c in CODECS]
    video_names = [name for name, (codec, _) in VIDEO.items() if codec in args.codecs]
    if video_names:
        video_codecs.ffmpeg_path()  # before the models run: say now if ffmpeg is missing
    if args.checkpoints:
        models = [model_files(c) for c in args.checkpoints]
    else:
        encoder = profile.model.encoder if args.encoder == "default" else args.encoder
        decoder = profile.model.decoder if args.decoder == "default" else args.decoder
        models = [("model", encoder, decoder)]
    skipped = []
    if args.video:
        photos = read_video_frames(args.video, args.frames)
        what, source = "frames", args.video
    else:
        photos = list_images(args.photos)
        what, source = "photos", args.photos
    print(f"{profile.name}: {len(photos)} {what} from {source} at {profile.input.width}x{profile.input.height}, "
          f"against {', '.join(args.codecs)} ...", flush=True)
    coded = "" if args.entropy == "none" else f" ({args.entropy}-compressed)"
    references = fitted_frames(photos, profile) if video_names else None
    measured = []
    for name, encoder, decoder in models:
        results = evaluate(photos, profile, encoder, decoder, image_codecs, entropy=args.entropy,
                           skipped=skipped if not measured else None, quiet=args.quiet,
                           backend_options={"threads": args.threads}, postfilter=args.postfilter,
                           jpeg_postfilter=args.jpeg_postfilter)
        point = _mean_rows([r["model"] for r in results])
        model_bytes = sum(r["model"]["bytes"] for r in results)
        video = dict((v, video_at_budget(references, v, model_bytes, args.preset,
                                         args.streams and str(Path(args.streams) / name)))
                     for v in video_names)
        label = "latentlink {} ({}{})".format(profile.name, Path(encoder).name,
                                              "" if args.entropy == "none" else ", " + args.entropy)
        measured.append({"name": name, "label": label, "encoder": str(encoder), "decoder": str(decoder),
                         "results": results, "point": point, "bytes": model_bytes, "video": video})
        heading = "" if len(models) == 1 else f"{name} ({encoder}): "
        print(f"{heading}{profile.name}: {profile.input.width}x{profile.input.height}, {len(results)} {what}"
              f"{f' ({len(skipped)} unreadable skipped)' if skipped else ''}; codecs at the highest quality no "
              f"larger than the model's wire frame{coded}")
        print(format_results(results, image_codecs, per_image=args.per_image, entropy=args.entropy))
        if args.postfilter or args.jpeg_postfilter:
            print(format_postfilter(results))
        if video:
            print(format_video(video, model_bytes))
        # Beside the quality, what the encoder would cost on the Nano (export/cost_model.py: a model, not measured;
        # imported here, after PyTorch, which is what a machine without the [export] extra lacks first).
        from .cost_model import estimate_file, format_estimate

        estimate, reason = estimate_file(encoder)
        measured[-1]["estimate"] = estimate
        print("Nano encoder " + (format_estimate(estimate, profile.budget_ms) if estimate else "estimate: none ("
                                 + reason + ")"))
    progressive = []  # the progressive model's points, one per iteration count
    if args.progressive:
        curve = evaluate_progressive(photos, profile, args.progressive, image_codecs, entropy=args.entropy,
                                     quiet=args.quiet, backend_options={"threads": args.threads})
        for k, results in sorted(curve.items()):
            point = _mean_rows([r["model"] for r in results])
            progressive.append({"name": f"progressive k={k}", "label": f"progressive, {k} iterations",
                                "encoder": str(args.progressive), "decoder": str(args.progressive),
                                "results": results, "point": point, "video": {}, "estimate": None,
                                "bytes": sum(r["model"]["bytes"] for r in results)})
        print(f"progressive model {args.progressive}: every iteration count, one model{coded}")
        print(format_summary(progressive, image_codecs))
    if len(measured) > 1:
        print(format_summary(measured, image_codecs + video_names))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        document = {"profile": profile.name, "entropy": args.entropy, "source": source,
                    "estimate": measured[0]["estimate"],
                    "results": measured[0]["results"],  # the first model's, as before --checkpoints
                    "models": [dict((k, m[k]) for k in ("name", "encoder", "decoder", "bytes", "point", "video",
                                                       "estimate", "results")) for m in measured + progressive]}
        Path(args.json).write_text(json.dumps(document, indent=1))
        print(f"wrote {args.json}")
    if args.compressai or args.plot:
        readable = [p for p in photos if p not in skipped]
        codecs = image_codecs + video_names
        counts = [len(SWEEPS[c]) if c in SWEEPS else len(video_codecs.SWEEP_CRFS) for c in codecs]
        print(f"rate-distortion curves: {', '.join(f'{c} at {n} qualities' for c, n in zip(codecs, counts))} "
              f"over {len(readable)} {what} ...", flush=True)
        curves = dict((codec, codec_sweep(readable, profile, codec, quiet=args.quiet, preset=args.preset))
                      for codec in codecs)
        if len(measured) > 1:  # one curve through the models' points
            coder = "" if args.entropy == "none" else ", " + args.entropy
            family = {f"latentlink {profile.name} ({len(measured)} models{coder})": [m["point"] for m in measured]}
        else:
            family = {measured[0]["label"]: [measured[0]["point"]]}
        if progressive:
            coder = "" if args.entropy == "none" else ", " + args.entropy
            family[f"progressive, 1..{len(progressive)} iterations (one model{coder})"] = [
                m["point"] for m in progressive]
        if args.compressai:
            out = Path(args.compressai)
            out.mkdir(parents=True, exist_ok=True)
            documents = {}
            if progressive:
                documents["progressive"] = compressai_json(
                    f"latentlink progressive {profile.name}", f"one model, 1..{len(progressive)} iterations; wire "
                    f"frame bytes (header included) as the rate; entropy coder {args.entropy}",
                    [m["point"] for m in progressive])
            for m in measured:
                documents["model" if len(measured) == 1 else "model-" + m["name"]] = compressai_json(
                    m["label"], f"wire frame bytes (header included) as the rate; {profile.input.width}x"
                    f"{profile.input.height}; entropy coder {args.entropy}", [m["point"]])
            for codec, curve in curves.items():
                sweep = (f"OpenCV {cv2.__version__}, quality sweep {[p['quality'] for p in curve]}" if codec in CODECS
                         else f"ffmpeg {codec} (preset {args.preset}), CRF sweep {[p['crf'] for p in curve]}; rate: "
                         f"the elementary stream's bytes over the clip")
                documents[codec] = compressai_json(codec, sweep, curve)
            for name, document in documents.items():
                (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
            notes = sorted(set(d["note"] for d in documents.values() if "note" in d))
            print(f"wrote {', '.join(str(out / (n + '.json')) for n in documents)} (CompressAI-style results"
                  f"{''.join('; ' + note for note in notes)})")
        if args.plot:
            plot_rd(args.plot, family, curves, f"{profile.name}: {len(readable)} {what} from {source}")
            print(f"wrote {args.plot} (rate-distortion plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
