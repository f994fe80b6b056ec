"""Train the learned predictor of lossless mode (``--lossless mlp``): ``python -m latentlink.export.lossless``.

Seed 002's predictive coding with an MLP, made small and exact (edge/lossless.py says how): per channel, 12 inputs
(the causal neighbours minus MED, and the earlier channels of the pixel), 16 ReLU units, one output, the correction
to MED. Trained with torch on random crops of the training photos to minimise the mean absolute residual (the
Rice codes' size grows with it), then quantized to integers and written as ``edge/lossless_mlp.json`` (a few KB),
which the edge and the host both read with numpy alone. The last lines printed compare the quantized predictor with
MED on the training crops, in bits per pixel, through the real coder.

example:
  nice -n 10 python -m latentlink.export.lossless --photos /work/photos/train /work/photos/extra
"""

import argparse
import glob
import math
import os
import time

import cv2
import numpy as np
import torch

from latentlink.edge.lossless import CHANNELS, FEATURES, HIDDEN_CLIP, MLP, WEIGHTS_FILE, LosslessCodec, \
    frame_features


def get_args_parser():
    parser = argparse.ArgumentParser(prog="python -m latentlink.export.lossless", description=__doc__.split(
        "\n\n")[0], epilog=__doc__.rsplit("example:", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", nargs="+", required=True, help="folders of training images")
    parser.add_argument("--out", default=WEIGHTS_FILE, help="the weights file (default: %(default)s)")
    parser.add_argument("--crop", type=int, default=192, help="crop size in pixels (default: %(default)s)")
    parser.add_argument("--crops", type=int, default=3, help="random crops per photo (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=600000, help="training samples per channel "
                        "(default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units, 1 to 16 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps per channel (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_crops(folders, size, per_photo, rng):
    paths = sorted(p for folder in folders for p in glob.glob(os.path.join(folder, "*"))
                   if os.path.splitext(p)[1].lower() in (".jpg", ".jpeg", ".png"))
    crops = []
    for path in paths:
        image = cv2.imread(path)
        if image is None:
            continue
        h, w = image.shape[:2]
        for _ in range(per_photo):
            y, x = rng.randint(0, max(1, h - size + 1)), rng.randint(0, max(1, w - size + 1))
            crops.append(np.ascontiguousarray(image[y:y + size, x:x + size]))
    return crops


def samples(crops, per_channel, rng):
    """``[(features, target)]`` per channel: float32 (n, FEATURES) and the MED residual x - MED (n,)."""
    feats, targets = [[] for _ in range(CHANNELS)], [[] for _ in range(CHANNELS)]
    for crop in crops:
        m, _, f = frame_features(crop)
        x = crop.transpose(2, 0, 1).astype(np.int16)
        for c in range(CHANNELS):
            feats[c].append(f[:, c].reshape(FEATURES, -1).T)
            targets[c].append((x[c] - m[c]).ravel())
    out = []
    for c in range(CHANNELS):
        f, t = np.concatenate(feats[c]), np.concatenate(targets[c]).astype(np.float32)
        pick = rng.choice(len(t), min(per_channel, len(t)), replace=False)
        out.append((f[pick], t[pick]))
    return out


def train_channel(feats, target, hidden, steps, seed):
    torch.manual_seed(seed)
    x, y = torch.from_numpy(feats), torch.from_numpy(target)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(y), (4096,), generator=gen)
        loss = (net(x[idx]).squeeze(1) - y[idx]).abs().mean()  # L1: the residuals' codes grow with |r|
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        base = y.abs().mean().item()
        final = (net(x).squeeze(1) - y).abs().mean().item()
        hmax = float(torch.quantile(torch.relu(net[0](x[:200000])).max(1).values, 0.999))
    return net, base, final, hmax


def quantize(net, hmax):
    """Integer weights and shifts for :class:`edge.lossless.MLP` (see its bounds)."""
    w1, b1 = net[0].weight.detach().numpy().T.astype(np.float64), net[0].bias.detach().numpy().astype(np.float64)
    w2, b2 = net[2].weight.detach().numpy()[0].astype(np.float64), float(net[2].bias.detach().numpy()[0])
    a = int(math.floor(math.log2(127.0 / np.abs(w1).max())))
    hb = min(a, int(math.floor(math.log2(HIDDEN_CLIP / max(hmax, 1e-3)))))  # hidden units as h * 2**hb
    d = int(math.floor(math.log2(127.0 / np.abs(w2).max())))
    s1, s2 = a - hb, hb + d
    return {"w1": np.round(w1 * 2.0 ** a).astype(int).tolist(),
            "b1": np.clip(np.round(b1 * 2.0 ** a), -(1 << 21), 1 << 21).astype(int).tolist(),
            "w2": np.round(w2 * 2.0 ** d).astype(int).tolist(),
            # + half a unit: the floor after the last shift then rounds to nearest
            "b2": int(np.clip(round(b2 * 2.0 ** s2) + (1 << s2 >> 1), -(1 << 21), 1 << 21)), "s1": s1, "s2": s2}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.RandomState(args.seed)
    started = time.time()
    crops = load_crops(args.photos, args.crop, args.crops, rng)
    data = samples(crops, args.samples, rng)
    print("%d crops of %d px, %d samples per channel (%.0f s)" % (len(crops), args.crop, len(data[0][1]),
                                                                  time.time() - started))
    layers, info = [], {"photos": [os.path.basename(os.path.normpath(f)) for f in args.photos],
                        "crops": len(crops), "crop": args.crop, "samples": len(data[0][1]), "steps": args.steps,
                        "hidden": args.hidden, "seed": args.seed, "loss": "L1"}
    for c in range(CHANNELS):
        net, base, final, hmax = train_channel(data[c][0], data[c][1], args.hidden, args.steps, args.seed + c)
        layers.append(quantize(net, hmax))
        print("channel %d: mean |residual| %.3f (MED) -> %.3f (MLP, float) (%.0f s)" % (c, base, final,
                                                                                      time.time() - started))
    model = MLP(layers, info)
    with open(args.out, "w") as f:
        f.write(model.to_json())
    print("wrote %s (%d bytes, sha256 %s)" % (args.out, os.path.getsize(args.out), model.sha256[:12]))
    # The quantized predictor through the real coder, on (some of) the training crops.
    check = crops[::4]
    pixels = sum(c.shape[0] * c.shape[1] for c in check)
    for name in ("med", "mlp"):
        codec = LosslessCodec(name, weights=args.out)
        size = sum(len(codec.encode(c)) for c in check)
        print("%s: %.3f bpp on %d training crops" % (name, size * 8.0 / pixels, len(check)))


if __name__ == "__main__":
    main()
