"""One rate-distortion plot from several `latentlink eval` runs: the models of their --json files as one curve,
the codecs' curves from a --compressai folder. For runs too slow to repeat together on a small machine (the codec
sweeps of a clip take most of an eval's time, and do not change with the models).

    python scripts/rd_plot.py --models runs/vtest-default.json runs/vtest-lambdas.json \\
        --curves runs/vtest-default-rd --title "nano-504: 30 frames of vtest.avi" --out docs/rd-vtest-504.png
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's latentlink

from latentlink.export.evaluate import plot_rd  # noqa: E402

KEYS = {"psnr-rgb": "psnr", "ms-ssim-rgb": "ms_ssim"}  # CompressAI's names -> eval's


def codec_curves(folder):
    """codec -> points, from the CompressAI-style files of `eval --compressai` (the models' files left out)."""
    curves = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.stem == "model" or path.stem.startswith("model-"):
            continue
        results = json.loads(path.read_text())["results"]
        curves[path.stem] = [dict(bpp=bpp, **dict((KEYS[k], results[k][i] if k in results else None) for k in KEYS))
                             for i, bpp in enumerate(results["bpp"])]
    return curves


def model_points(paths):
    """(name, point) of every model of the `eval --json` files ``paths``, in order."""
    return [(m["name"], m["point"]) for path in paths for m in json.loads(Path(path).read_text())["models"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="`latentlink eval --json` files")
    parser.add_argument("--curves", required=True, help="an `eval --compressai` folder: the codecs' curves")
    parser.add_argument("--label", default="latentlink", help="legend of the models' curve")
    parser.add_argument("--title", default="", help="the plot's title")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    points = model_points(args.models)
    for name, point in points:
        print("{:<24} {:.3f} bpp  {:.2f} dB  MS-SSIM {}".format(name, point["bpp"], point["psnr"], "-" if
                                                                point["ms_ssim"] is None else
                                                                "{:.4f}".format(point["ms_ssim"])))
    label = "{} ({})".format(args.label, ", ".join(name for name, _ in points))
    plot_rd(args.out, {label: [p for _, p in points]}, codec_curves(args.curves), args.title)
    print("wrote {}".format(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
