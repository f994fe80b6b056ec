"""How long a post-filter takes per frame on this CPU, in ONNX Runtime, for a few depths and widths.

    python benchmarks/postfilter_speed.py                          # 504x504, threads 1 and 2, batch 1 and 4
    python benchmarks/postfilter_speed.py --size 1008 --threads 4
    python benchmarks/postfilter_speed.py --filter profiles/default/nano-504/postfilter.onnx

The speed of a convolutional network does not depend on its weights, so the candidates are untrained (built by
``latentlink.export.postfilter.build_postfilter`` and exported as ``latentlink train-postfilter`` exports them);
``--filter`` times a trained file instead. Prints the median of ``--runs`` runs, in ms per frame (a batch's time
divided by its frames), with the filter's parameters and multiply-accumulates per frame: figures for the README's
choice of the default (depth 4, width 32, folded by 2), never asserted.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.host.postfilter import PostFilter, read_filter_info  # noqa: E402

CANDIDATES = [  # (depth, width, unshuffle)
    (5, 16, 1),   # seed 001's layout (full resolution), made narrow and shallow
    (6, 24, 1),
    (3, 32, 2),
    (4, 32, 2),   # the default: folded by 2 (FFDNet), a quarter of the pixels
    (6, 32, 2),
    (8, 32, 2),
    (8, 48, 2),
]


def macs_per_frame(depth, width, unshuffle, size):
    """Multiply-accumulates of the filter's convolutions on one ``size`` x ``size`` frame."""
    channels = 3 * unshuffle * unshuffle
    pixels = (size // unshuffle) ** 2
    per_pixel = 9 * (channels * width + (depth - 2) * width * width + width * channels)
    return per_pixel * pixels


def time_filter(path, size, threads, batch, runs):
    runner = PostFilter(path, read_filter_info(path), threads)
    frames = [np.random.default_rng(i).random((1, 3, size, size), dtype=np.float32) for i in range(batch)]
    runner.run(frames)  # warm-up: ONNX Runtime plans its kernels on the first run
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(frames)
        times.append((time.perf_counter() - start) * 1000.0 / batch)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=504, help="square frame side in pixels (default: %(default)s)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="frames per run (the host's batch)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per setting (default: %(default)s)")
    parser.add_argument("--filter", help="time this trained filter (FILE.onnx with FILE.json) instead")
    args = parser.parse_args()

    print("post-filter at {0}x{0}, ONNX Runtime on this CPU ({1} cores); ms per frame, median of {2} runs".format(
        args.size, os.cpu_count(), args.runs))
    print("{:<28}{:>10}{:>10}".format("filter", "params", "GMAC") + "".join(
        "{:>12}".format("{}t b{}".format(t, b)) for t in args.threads for b in args.batch))
    with tempfile.TemporaryDirectory() as folder:
        if args.filter:
            info = read_filter_info(args.filter)
            h = info["hparams"]
            settings = [(os.path.basename(args.filter), args.filter, info["parameters"], h["depth"], h["width"],
                         h["unshuffle"])]
        else:
            from latentlink.export.postfilter import build_postfilter, export_filter

            settings = []
            for depth, width, unshuffle in CANDIDATES:
                model = build_postfilter(depth, width, unshuffle).eval()
                path = os.path.join(folder, "d{}w{}u{}.onnx".format(depth, width, unshuffle))
                export_filter(model, path, "benchmark", {})
                params = sum(p.numel() for p in model.parameters())
                settings.append(("depth {} width {} fold {}".format(depth, width, unshuffle), path, params, depth,
                                 width, unshuffle))
        for name, path, params, depth, width, unshuffle in settings:
            cells = ["{:>12.1f}".format(time_filter(path, args.size, t, b, args.runs))
                     for t in args.threads for b in args.batch]
            print("{:<28}{:>10,}{:>10.2f}".format(name, params, macs_per_frame(depth, width, unshuffle, args.size) / 1e9)
                  + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
