"""A training checkpoint on held-out photos, in PyTorch: PSNR per photo, and how well its bits are used.

    python benchmarks/checkpoint_quality.py profiles/default/lossy-cae.pt                # 504x504
    python benchmarks/checkpoint_quality.py runs/stage3.pt --size 1008 --photos data/holdout

For checkpoints between training stages, before any ONNX export (`latentlink eval` measures exported models
against JPEG and WebP). Each photo is fitted to ``size`` x ``size`` as the edge does it; PSNR is over RGB, 8 bits.
The symbol entropy is that of the 8-bit words the latent channels form at each position, over all photos: 8 bits
would mean every word equally likely.
"""

import argparse
import glob
import os
import sys

import cv2
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.edge.preprocess import Preprocessor, fit_frame, psnr, to_image  # noqa: E402
from latentlink.export.models import load_checkpoint  # noqa: E402


def symbol_entropy_bits(bits):
    """Entropy (bits) of the words formed by the C bit channels at each position of (C, positions) bits."""
    words = (bits.T.astype(np.int64) << np.arange(bits.shape[0])).sum(axis=1)
    p = np.bincount(words) / len(words)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--photos", default="data/holdout", help="folder of held-out photos (default: %(default)s)")
    parser.add_argument("--size", type=int, default=504, help="square input size in pixels (default: %(default)s)")
    args = parser.parse_args()

    model, meta = load_checkpoint(args.checkpoint)
    preprocess = Preprocessor(args.size, args.size)
    scores, all_bits = [], []
    for path in sorted(glob.glob(os.path.join(args.photos, "*"))):
        frame = cv2.imread(path)
        if frame is None:
            continue
        with torch.no_grad():
            out = model(torch.from_numpy(preprocess(frame).copy()))
        scores.append(psnr(fit_frame(frame, args.size, args.size), to_image(out["x_hat"].numpy())))
        latents = out["latents"][0].numpy()
        all_bits.append(latents.reshape(latents.shape[0], -1))
        print(f"{os.path.basename(path):28s} {scores[-1]:6.2f} dB")
    if not scores:
        parser.error(f"no photos under {args.photos!r} (bash scripts/get_photos.sh data)")
    bits = np.concatenate(all_bits, axis=1)
    print(f"mean {np.mean(scores):.2f} dB over {len(scores)} photos at {args.size}x{args.size} "
          f"(checkpoint step {meta.get('step')}, dither={model.hparams.get('dither')})")
    print(f"bits: P(1) per channel {[round(float(p), 2) for p in bits.mean(axis=1)]}; "
          f"symbol entropy {symbol_entropy_bits(bits):.2f} of {bits.shape[0]} bits")


if __name__ == "__main__":
    main()
