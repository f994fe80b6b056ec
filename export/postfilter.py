"""``latentlink train-postfilter``: a DnCNN-style post-filter that removes a codec's artifacts on the host.

Seed 001 restored JPEG images with DnCNN (Zhang et al. 2017): a stack of 3x3 conv + ReLU layers learns the residual
(the artifacts), and the restored image is the compressed one minus it, trained on pairs of (compressed, original)
patches. Here the pairs are the photos decoded by one model (the shipped default, through its ONNX files, at the
rate the edge sends: the profile's entropy coder) or, for comparison, JPEG at the same bytes per photo (a separate
filter: artifacts differ per codec). The filter is written as ONNX for the host (``latentlink host --postfilter``)
with a sidecar ``<name>.json`` naming the model it was trained for, so the host refuses a filter of another model.

The network works at half resolution (pixel-unshuffle 2: 12 channels at H/2 x W/2, pixel-shuffle back), as FFDNet
does: about the cost of a full-resolution network of half the width, with twice the receptive field, which the
lossy CAE's 4x4-pixel latent grid calls for. Batch normalization (seed 001's middle layers) is left out: at
inference it would fold into the convolutions anyway, and at 4 layers the network trains without it.
"""

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from latentlink.edge.cli import (ArgumentParser, HelpFormatter, Number, check_input_dir, check_output_file,
                                 positive_int, progress, run_main)
from latentlink.edge.errors import ConfigError
from latentlink.host.postfilter import FORMAT, JPEG_ID, describe, sidecar_path

CODECS = ("model", "jpeg")  # what the filter restores: the model's decoded frames, or JPEG at the model's bytes
DEFAULTS = {"depth": 4, "width": 32, "unshuffle": 2}

EXAMPLES = """examples:
  latentlink train-postfilter --data /work/photos/train /work/photos/extra --out runs/postfilter/postfilter.onnx
  latentlink train-postfilter --codec jpeg --data data/train data/extra --out runs/postfilter-jpeg/postfilter.onnx
  latentlink host --postfilter runs/postfilter/postfilter.onnx --out frames/
  latentlink eval --photos data/holdout --postfilter runs/postfilter/postfilter.onnx \\
      --jpeg-postfilter runs/postfilter-jpeg/postfilter.onnx

regenerate the shipped default's filter (profiles/default/nano-504/postfilter.onnx; about 10 minutes on one core):
  latentlink train-postfilter --data data/train data/extra --profile nano-504 --threads 1 \\
      --out profiles/default/nano-504/postfilter.onnx"""


def build_postfilter(depth=4, width=32, unshuffle=2):
    """The DnCNN-style filter (a torch module): restored = x - residual(x), for RGB NCHW float in [0, 1].

    ``depth``: conv layers (the first and last included); ``width``: channels of the hidden layers;
    ``unshuffle``: the factor the frame is folded by first (1: full resolution, as seed 001; 2: half).
    """
    from torch import nn

    if depth < 2:
        raise ConfigError("postfilter depth {}: needs at least 2 conv layers (in and out)".format(depth))

    class PostFilter(nn.Module):
        def __init__(self):
            super().__init__()
            self.hparams = {"depth": depth, "width": width, "unshuffle": unshuffle}
            channels = 3 * unshuffle * unshuffle
            layers = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            for _ in range(depth - 2):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
            layers.append(nn.Conv2d(width, channels, 3, padding=1))
            self.body = nn.Sequential(*layers)
            nn.init.zeros_(self.body[-1].weight)  # starts as the identity: never worse than no filter at step 0
            nn.init.zeros_(self.body[-1].bias)

        def forward(self, x):
            u = self.hparams["unshuffle"]
            y = nn.functional.pixel_unshuffle(x, u) if u > 1 else x
            y = self.body(y)
            residual = nn.functional.pixel_shuffle(y, u) if u > 1 else y
            return x - residual

    return PostFilter()


# ---------------------------------------------------------------------------------------------------------------
# Training pairs


def model_pairs(photos, profile, encoder_path, decoder_path, entropy=None, threads=0, quiet=False):
    """The training pairs of ``photos``, a dict: ``model``, ``jpeg`` and ``original``, uint8 RGB arrays (N, H, W, 3)
    of the photos decoded by the model, the same photos through JPEG at the highest quality no larger than the
    model's wire frame (bytes, header included, with the ``entropy`` coder: the profile's by default, as the edge
    sends), and the originals (fitted to the profile's input as the edge fits them); ``bytes``: each photo's wire
    frame size; ``decoder``: the decoder's ModelInfo (its ``model_id`` names the model).
    """
    import cv2

    from latentlink.edge.backends import open_backend
    from latentlink.edge.preprocess import Preprocessor, fit_frame, to_image
    from latentlink.edge.protocol import code_latents, frame_payload

    from .data import read_bgr, readable_images
    from .evaluate import codec_at_budget

    entropy = entropy or profile.transport.entropy
    w, h, fit = profile.input.width, profile.input.height, profile.input.fit
    options = {"threads": threads, "input_size": (h, w)}
    decoded, jpeg, originals, sizes = [], [], [], []
    with open_backend(encoder_path, "encoder", **options) as enc, \
            open_backend(decoder_path, "decoder", **options) as dec:
        preprocess = Preprocessor(w, h, fit, enc.info.tiles)
        context = enc.info.context_model() if entropy == "context" else None
        bar = progress(photos, quiet=quiet, desc="decoding photos", unit="photo")
        for path, frame in readable_images(bar, read=read_bgr):
            reference = fit_frame(frame, w, h, fit)
            latents, _ = enc.infer(preprocess(frame))
            payload = code_latents(latents, enc.info.packing, entropy, context)
            wire = frame_payload("pf", 0, 0.0, latents, enc.info.packing, payload, entropy)
            output, _ = dec.infer(latents.astype(np.float32))
            _, _, jpeg_bgr = codec_at_budget(reference, "jpeg", len(wire))
            for out, image in ((decoded, to_image(output, dec.info.tiles)), (jpeg, jpeg_bgr),
                               (originals, reference)):
                out.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            sizes.append(len(wire))
    if not originals:
        raise ConfigError("none of the {} photos decodes (see the warnings above)".format(len(photos)))
    return {"model": np.stack(decoded), "jpeg": np.stack(jpeg), "original": np.stack(originals), "bytes": sizes,
            "decoder": dec.info}


class PairSampler:
    """Random ``crop`` x ``crop`` patches of (degraded, original) pairs, flipped and transposed alike (seed 001
    rotated its patches), as float32 NCHW batches in [0, 1]. Their corners are multiples of 8 pixels: JPEG's 8x8
    blocks and the model's 4x4 latent grid never move in a real frame, so the crops keep them in place."""

    GRID = 8  # JPEG's block and a multiple of the model's 4-pixel latent grid: crops keep both in place

    def __init__(self, degraded, originals, crop=64, seed=0):
        if crop % self.GRID:
            raise ConfigError("--crop {}: must be a multiple of {} (the codecs' block grid)".format(crop, self.GRID))
        self.degraded, self.originals, self.crop = degraded, originals, crop
        self.rng = np.random.default_rng(seed)

    def batch(self, size):
        n, h, w, _ = self.originals.shape
        pairs = np.empty((2, size, self.crop, self.crop, 3), dtype=np.uint8)
        for i in range(size):
            k = self.rng.integers(n)
            y = self.GRID * self.rng.integers(0, (h - self.crop) // self.GRID + 1)
            x = self.GRID * self.rng.integers(0, (w - self.crop) // self.GRID + 1)
            patch = np.stack([self.degraded[k, y:y + self.crop, x:x + self.crop],
                              self.originals[k, y:y + self.crop, x:x + self.crop]])
            # Flips and transposes move the block grid only by whole blocks (the crop is a multiple of it).
            if self.rng.random() < 0.5:
                patch = patch[:, :, ::-1]
            if self.rng.random() < 0.5:
                patch = patch.transpose(0, 2, 1, 3)
            pairs[:, i] = patch
        batch = np.ascontiguousarray(pairs.transpose(0, 1, 4, 2, 3), dtype=np.float32) / 255.0
        return batch[0], batch[1]


def psnr_db(a, b):
    """PSNR (dB, peak 255) of two uint8 arrays of the same shape."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def apply_torch(model, images, chunk=4):
    """``images`` (N, H, W, 3) uint8 RGB through the torch ``model``, rounded to 8 bits as the host writes them."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk].transpose(0, 3, 1, 2))).float() / 255
            y = model(x).clamp(0, 1).mul(255).round().byte().numpy().transpose(0, 2, 3, 1)
            out.append(y)
    return np.concatenate(out)


def train_filter(degraded, originals, val_degraded, val_originals, steps=6000, batch_size=16, crop=64, lr=1e-3,
                 seed=0, hparams=None, log=print):
    """Train a filter on the pairs (uint8 RGB arrays); returns ``(model, facts)`` with the validation PSNR (dB) of
    the degraded photos and of the filtered ones, and the minutes taken."""
    import torch

    torch.manual_seed(seed)
    model = build_postfilter(**dict(DEFAULTS, **(hparams or {})))
    sampler = PairSampler(degraded, originals, crop=crop, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05,
                                                    final_div_factor=100)
    started = time.time()
    bar = progress(range(1, steps + 1), desc="train", unit="step", leave=True)
    for step in bar:
        x, target = (torch.from_numpy(a) for a in sampler.batch(batch_size))
        loss = torch.mean((model(x) - target) ** 2)  # MSE: the PSNR the filter is judged by
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(psnr="{:.2f}".format(10 * math.log10(1.0 / max(loss.item(), 1e-12))))
        if len(val_originals) and (step % 1000 == 0 or step == steps):
            model.eval()
            before = np.mean([psnr_db(d, o) for d, o in zip(val_degraded, val_originals)])
            after = np.mean([psnr_db(d, o) for d, o in zip(apply_torch(model, val_degraded), val_originals)])
            model.train()
            log("step {}: validation {:.2f} dB -> {:.2f} dB with the filter ({:+.2f} dB)".format(
                step, before, after, after - before))
    bar.close()
    model.eval()
    facts = {"steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr, "seed": seed,
             "minutes": round((time.time() - started) / 60, 1)}
    if len(val_originals):
        facts["val_psnr_db"] = round(float(np.mean([psnr_db(d, o) for d, o in zip(val_degraded, val_originals)])), 3)
        facts["val_filtered_psnr_db"] = round(float(np.mean(
            [psnr_db(d, o) for d, o in zip(apply_torch(model, val_degraded), val_originals)])), 3)
    return model, facts


def export_filter(model, path, trained_for, meta):
    """Write ``model`` to ``path`` (ONNX opset 13; batch, height and width dynamic: any frame size whose sides are
    multiples of the unshuffle factor) and its sidecar ``<path without .onnx>.json``; returns the sidecar's dict."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unshuffle = model.hparams["unshuffle"]
    example = torch.zeros(1, 3, 64, 64)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, example, str(path), opset_version=13, input_names=["decoded"],
                          output_names=["restored"], dynamic_axes={"decoded": axes, "restored": axes}, dynamo=False)
    info = dict({"format": FORMAT, "version": 1, "trained_for": trained_for, "hparams": model.hparams,
                 "multiple_of": unshuffle, "parameters": sum(p.numel() for p in model.parameters()),
                 "input": "RGB float32 in [0, 1], NCHW: the decoded frame, rounded to 8 bits",
                 "output": "RGB float32, NCHW, clip to [0, 1]", "onnx": path.name, "opset": 13,
                 "torch": torch.__version__}, **meta)
    sidecar_path(path).write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------------------
# The command


def get_args_parser():
    parser = ArgumentParser(prog="latentlink train-postfilter", formatter_class=HelpFormatter, epilog=EXAMPLES,
                            description="Train a DnCNN-style post-filter (seed 001) on photos decoded by a model, or "
                                        "by JPEG at the model's bytes, and write it as ONNX for `latentlink host "
                                        "--postfilter` and `latentlink eval --postfilter`.")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR",
                        help="folders of training photos (searched recursively); each is fitted to the profile's "
                             "input as the edge fits frames")
    parser.add_argument("--out", required=True, help="the filter to write, FILE.onnx (and FILE.json beside it)")
    parser.add_argument("--codec", choices=CODECS, default="model",
                        help="what the filter restores: the model's decoded frames, or JPEG at the highest quality "
                             "no larger than the model's wire frame, photo by photo")
    parser.add_argument("--profile", default="nano-504", help="profile: input size, entropy coder and default model")
    parser.add_argument("--encoder", default="default", help="encoder .onnx or .pt (default: the profile's)")
    parser.add_argument("--decoder", default="default", help="decoder .onnx or .pt (default: the profile's)")
    parser.add_argument("--depth", type=Number(int, low=2), default=DEFAULTS["depth"], help="conv layers")
    parser.add_argument("--width", type=positive_int, default=DEFAULTS["width"], help="hidden channels")
    parser.add_argument("--unshuffle", type=positive_int, default=DEFAULTS["unshuffle"],
                        help="fold the frame by this factor first (1: full resolution; 2: a quarter of the pixels, "
                             "four times the channels)")
    parser.add_argument("--steps", type=positive_int, default=6000, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="patches per step")
    parser.add_argument("--crop", type=positive_int, default=64, help="patch size in pixels (a multiple of 8)")
    parser.add_argument("--lr", type=Number(float, low=0, below=1), default=1e-3, help="peak Adam learning rate")
    parser.add_argument("--val-split", type=Number(float, low=0, below=1), default=0.1,
                        help="fraction of photos held out to report the gain on while training")
    parser.add_argument("--seed", type=int, default=0, help="random seed (split, patches, init)")
    parser.add_argument("--threads", type=Number(int, low=0, note="0: the libraries' default"), default=0,
                        help="CPU threads for PyTorch and ONNX Runtime")
    return parser


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    for folder in args.data:
        check_input_dir("--data", folder, "give folders of training photos")
    check_output_file("--out", args.out)
    if not args.out.endswith(".onnx"):
        raise ConfigError("--out {}: the filter is written as ONNX; give a FILE.onnx".format(args.out))
    import torch

    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile

    from .data import list_images
    from .train import split_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    encoder = profile.model.encoder if args.encoder == "default" else args.encoder
    decoder = profile.model.decoder if args.decoder == "default" else args.decoder
    with open_backend(decoder, "decoder", input_size=(profile.input.height, profile.input.width)) as dec:
        info = dec.info  # the model's identity, checked before the photos are decoded and the filter trained
    trained_for = info.model_id if args.codec == "model" else JPEG_ID
    if not trained_for:
        raise ConfigError("{} does not record its checkpoint (checkpoint_sha256 in model.json), so the filter could "
                          "not name its model; export the model with `latentlink export onnx`".format(decoder))
    photos = sorted({path for folder in args.data for path in list_images(folder)})
    train_paths, val_paths = split_paths(photos, args.val_split, args.seed)
    pairs = {}
    for name, paths in (("train", train_paths), ("val", val_paths)):
        if paths:
            pairs[name] = model_pairs(paths, profile, encoder, decoder, threads=args.threads)
    degraded, originals = pairs["train"][args.codec], pairs["train"]["original"]
    val_degraded, val_originals = (pairs["val"][args.codec], pairs["val"]["original"]) if "val" in pairs else ((), ())
    print("{} training photos, {} validation photos at {}x{}; {} at {:,} bytes per photo on average".format(
        len(originals), len(val_originals), profile.input.width, profile.input.height,
        "the model" if args.codec == "model" else "JPEG", int(np.mean(pairs["train"]["bytes"]))), flush=True)
    model, facts = train_filter(degraded, originals, val_degraded, val_originals, steps=args.steps,
                                batch_size=args.batch_size, crop=args.crop, lr=args.lr, seed=args.seed,
                                hparams={"depth": args.depth, "width": args.width, "unshuffle": args.unshuffle})
    meta = dict(facts, codec=args.codec, profile=profile.name, entropy=profile.transport.entropy,
                decoder=os.path.relpath(decoder, os.path.dirname(os.path.abspath(args.out))),
                checkpoint=info.data.get("checkpoint") if args.codec == "model" else None,
                frame=[profile.input.height, profile.input.width],
                train_photos=[p.name for p in train_paths], val_photos=[p.name for p in val_paths])
    export_filter(model, args.out, trained_for, meta)
    size = os.path.getsize(args.out)
    print("wrote {} ({:,} bytes) and {}: trained for {}{}".format(
        args.out, size, sidecar_path(args.out), describe(trained_for),
        "; validation {val_psnr_db:.2f} -> {val_filtered_psnr_db:.2f} dB".format(**facts) if "val_psnr_db" in facts
        else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
