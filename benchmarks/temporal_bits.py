"""How much of a fixed camera's next frame the model's bits already hold: the case for an inter-frame mode.

    python benchmarks/temporal_bits.py --video data/video/vtest.avi --frames 30

Encodes a clip's first frames (fitted to ``size`` x ``size`` as the edge does) with a checkpoint, then prints the
share of bits equal to the previous frame's at the same position, the context coder's real rate per frame coded
alone (``--entropy context``, the tables of ``--tables``), and the empirical conditional entropy of a bit given the
same bit of the previous frame (per channel; bits per pixel): an estimate of what a coder that conditions on the
previous frame could reach, not a coder. Figures for the README's comparison with low-delay H.264/H.265.
"""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.edge.context_model import ContextModel  # noqa: E402
from latentlink.export.evaluate import read_video_frames  # noqa: E402
from latentlink.export.models import load_checkpoint  # noqa: E402
from latentlink.export.rate import encoder_bits  # noqa: E402


def binary_entropy(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def conditional_bpp(bits, pixels):
    """Empirical H(bit | the same bit of the previous frame), per channel, in bits per pixel of the later frames."""
    cur, prev = np.stack(bits[1:]), np.stack(bits[:-1])
    total = 0.0
    for c in range(cur.shape[1]):
        for prior in (0, 1):
            seen = prev[:, c] == prior
            if seen.any():
                total += seen.sum() * binary_entropy(cur[:, c][seen].mean())
    return total / (cur.shape[0] * pixels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True, help="a clip, e.g. data/video/vtest.avi")
    parser.add_argument("--frames", type=int, default=30, help="its first N frames (default: %(default)s)")
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "profiles", "default", "lossy-cae.pt"))
    parser.add_argument("--tables", default=os.path.join(ROOT, "profiles", "default", "nano-504", "entropy.json"),
                        help="the context coder's tables for this checkpoint at this size")
    parser.add_argument("--size", type=int, default=504, help="frame side in pixels (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.checkpoint)
    frames = [frame for _, frame in read_video_frames(args.video, args.frames)]
    bits = [b[0] for b in encoder_bits(model, frames, args.size, args.size)]
    pixels = args.size * args.size
    tables = ContextModel.load(args.tables)
    alone = np.mean([8.0 * len(tables.encode(b[None])) / pixels for b in bits])
    same = np.mean([np.mean(bits[i] == bits[i - 1]) for i in range(1, len(bits))])
    print("{} frames of {} at {}x{}".format(len(bits), args.video, args.size, args.size))
    print("bits equal to the previous frame's: {:.1f} %".format(100 * same))
    print("context coder, each frame alone: {:.3f} bpp (payload, no header)".format(alone))
    print("H(bit | the same bit of the previous frame): {:.3f} bpp (an estimate, frames 2 on)".format(
        conditional_bpp(bits, pixels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
