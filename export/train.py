"""``latentlink train``: photos in, checkpoint (weights + architecture) out.

Example::

    latentlink train --data data/train --out runs/lossy-cae.pt --steps 20000 --loss mse
"""

import argparse
import inspect
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latentlink.edge.cli import (ArgumentParser, HelpFormatter, Number, check_input_dir, check_input_file,
                                 check_output_file, positive_float, positive_int, progress)
from latentlink.edge.errors import ConfigError
from latentlink.edge.tiles import join_tiles, split_tiles

from .data import CropSampler, centre_crop, list_images, readable_images, resize_short_side, to_batch
from .losses import LOSSES, bit_usage_penalty, get_loss
from .models import MODELS, build_model, copy_matching_weights, load_checkpoint, save_checkpoint


RATE_LR = 1e-2  # Adam learning rate of --lmbda's rate model (its logits), constant


def get_args_parser(parser=None):
    parser = parser or ArgumentParser(prog="latentlink train")
    parser.description = "Train a model of the zoo on folders of photos."
    parser.epilog = ("example: latentlink train --data data/train data/extra --out runs/lossy-cae.pt --steps 20000\n"
                     "resume:  latentlink train --data data/train --out runs/lossy-cae.pt --resume runs/lossy-cae.pt\n"
                     "rate:    latentlink train --data data/train --out runs/rd.pt --init-from runs/lossy-cae.pt --lmbda 0.05\n"
                     "grow:    latentlink train --data data/train --out runs/big.pt --init-from runs/lossy-cae.pt \\\n"
                     "             --hparam decoder_blocks=3 --freeze-encoder\n"
                     "zoo:     latentlink train --model crae --data data/train --out runs/crae.pt --crop 128\n"
                     "progressive: latentlink train --model progressive --data data/train data/extra "
                     "--out runs/progressive.pt --crop 64 --loss mix\n"
                     "patches: latentlink train --model crae --data data/train --out runs/crae-tiles.pt --crop 128 "
                     "--tiles 4x4")
    parser.formatter_class = HelpFormatter  # the examples as written, and every option's default
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR",
                        help="one or more folders of training photos (searched recursively)")
    parser.add_argument("--out", required=True,
                        help="checkpoint to write (.pt), at every validation; the best one by validation PSNR "
                             "goes beside it as NAME.best.pt")
    parser.add_argument("--model", choices=sorted(MODELS), help="architecture of a new model (default: lossy-cae)")
    parser.add_argument("--latent-channels", type=positive_int,
                        help="latent channels, for the models that have them (lossy-cae: 8 = 0.5 bpp, the default)")
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=INT",
                        help="architecture setting of a new model, repeatable, e.g. --hparam decoder_blocks=3; "
                             + "; ".join(f"{name}: {', '.join(hparam_names(name))}" for name in sorted(MODELS)))
    parser.add_argument("--loss", default="mse", choices=sorted(LOSSES), help="training loss")
    parser.add_argument("--steps", type=positive_int, default=20000, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="crops per step")
    parser.add_argument("--crop", type=positive_int, default=128, help="training crop size in pixels")
    parser.add_argument("--scales", type=scales_type, default=(504, 1008), metavar="N[,N...]",
                        help="short-side sizes (pixels) each photo is resized to before cropping, e.g. 504,1008 "
                             "(default: 504,1008)")
    parser.add_argument("--stochastic-fraction", type=Number(float, low=0, high=1), default=0.25,
                        help="share of the steps that use stochastic binarization before switching to the "
                             "deterministic binarizer deployment uses")
    parser.add_argument("--bit-usage", type=Number(float, low=0, note="0: off"), default=0.0,
                        help="weight of the bit-usage penalty on binary latents (balanced, uncorrelated bits; "
                             "see losses.bit_usage_penalty); 0: off")
    parser.add_argument("--lmbda", type=Number(float, low=0, note="0: off"), default=0.0, metavar="L",
                        help="rate-distortion training of binary latents: loss = distortion + L * estimated bits per "
                             "pixel under --entropy context's model (export/rate.py), learning its tables alongside; "
                             "0: off. Fit the deployed tables afterwards with `latentlink export entropy`")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="peak Adam learning rate, cosine-decayed")
    parser.add_argument("--clip-grad", type=Number(float, low=0, note="0: off"), default=1.0,
                        help="clip the gradient norm to this (0: off); without it a run here diverged at step 3100")
    parser.add_argument("--val-split", type=Number(float, low=0, below=1), default=0.15,
                        help="fraction of photos held out for validation (0: none)")
    parser.add_argument("--val-every", type=positive_int, default=1000, help="validate and checkpoint every N steps")
    parser.add_argument("--resume", help="checkpoint to continue from (weights; the schedule restarts, and the "
                                         "checkpoint's training history is kept in the new one's)")
    parser.add_argument("--init-from", metavar="CKPT",
                        help="start a new model (--model, --hparam) from the weights of CKPT whose names and shapes "
                             "match; the rest start fresh (to grow a trained model, e.g. a larger decoder)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="train the decoder only: the encoder's weights, and so its bits, stay as they start "
                             "(needs --stochastic-fraction 0)")
    parser.add_argument("--tiles", metavar="RxC", type=tiles_type,
                        help="patch processing: the model will see frames as R x C tiles (train with --crop at the "
                             "tile size; validation cuts its 256-pixel crops into tiles and joins them back, as "
                             "deployment does); recorded in the checkpoint for `export onnx` (default: 1x1, or the --resume checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (crops, flips, init, binarization)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=Number(int, low=0, note="0: PyTorch's default"), default=0,
                        help="CPU threads for PyTorch (0: PyTorch's default)")
    return parser


def scales_type(text):
    """argparse type: ``"504,1008"`` -> ``(504, 1008)``, sizes in pixels."""
    try:
        scales = tuple(int(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) < 1:
        raise argparse.ArgumentTypeError("got {!r}; expected sizes in pixels (whole numbers >= 1) separated by "
                                         "commas, e.g. 504,1008".format(text))
    return scales


def tiles_type(text):
    """argparse type: ``RxC`` tiles (see ``latentlink export onnx --tiles``)."""
    from .__main__ import tiles_type as parse

    return parse(text)


def check_args(args):
    """Options that exclude each other, then the paths: before the photos are read and the model built."""
    if args.resume and (args.hparam or args.init_from or args.model or args.latent_channels is not None):
        raise ConfigError("--resume continues a checkpoint as it is; --model, --latent-channels, --hparam and "
                          "--init-from build a new model (use --init-from CKPT with them to change the "
                          "architecture)")
    if args.freeze_encoder and args.lmbda:
        raise ConfigError("--freeze-encoder keeps the encoder's bits as they are: --lmbda has nothing to shape")
    if args.freeze_encoder and (args.stochastic_fraction or args.bit_usage):
        raise ConfigError("--freeze-encoder keeps the encoder's bits as they are: it needs --stochastic-fraction 0 "
                          "(random bits would train the decoder on bits it never gets) and no --bit-usage "
                          "(nothing left to shape the bits)")
    if args.loss == "ms-ssim" and args.crop < 176:
        raise ConfigError(f"--loss ms-ssim needs --crop of at least 176 pixels (5 scales of an 11-pixel window), "
                          f"got {args.crop}")
    for folder in args.data:
        check_input_dir("--data", folder, "give folders of training photos")
    for option, path in (("--resume", args.resume), ("--init-from", args.init_from)):
        if path:
            check_input_file(option, path, "a checkpoint written by `latentlink train`")
    check_output_file("--out", args.out)


def hparam_names(model_name):
    """The settings ``--hparam`` takes for a model: its constructor's keyword arguments."""
    return [p for p in inspect.signature(MODELS[model_name].__init__).parameters if p != "self"]


def psnr(mse):
    """PSNR in dB for images in [0, 1] given their mean squared error."""
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(model, images, device, tiles=(1, 1)):
    """Mean PSNR (dB) of the deterministic (deployed) model over 256x256 centre crops of ``images`` (RGB uint8).

    ``tiles=(R, C)``: each crop goes through the model as R x C tiles and is put back together, as deployed.
    """
    model.eval()
    scores = []
    for image in images:
        # Trimmed to whole tiles whose sides are multiples of the model's downscale.
        step_h, step_w = model.downscale * tiles[0], model.downscale * tiles[1]
        image = image[:image.shape[0] - image.shape[0] % step_h, :image.shape[1] - image.shape[1] % step_w]
        frame = to_batch(image[None])
        x = torch.from_numpy(frame).to(device)
        x_hat = model(torch.from_numpy(split_tiles(frame, tiles)).to(device))["x_hat"].clamp(0, 1)
        x_hat = torch.from_numpy(join_tiles(x_hat.cpu().numpy(), tiles)).to(device)
        # Quantize to 8 bits as the host does before comparing.
        x_hat = torch.round(x_hat * 255) / 255
        scores.append(psnr(torch.mean((x_hat - x) ** 2).item()))
    model.train()
    return float(np.mean(scores))


def set_stochastic(model, stochastic):
    """Switch every binarizer of ``model`` between stochastic and deterministic bits (training mode only)."""
    for module in model.modules():
        if hasattr(module, "stochastic"):
            module.stochastic = stochastic


def parse_hparams(pairs):
    """["decoder_blocks=3", ...] -> {"decoder_blocks": 3}."""
    hparams = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            hparams[name.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"--hparam {pair!r}: expected NAME=INTEGER, e.g. decoder_blocks=3") from None
    return hparams


def split_paths(paths, val_split, seed):
    paths = list(paths)
    random.Random(seed).shuffle(paths)
    n_val = max(1, int(round(len(paths) * val_split))) if len(paths) > 1 and val_split > 0 else 0
    if paths and n_val >= len(paths):
        raise ConfigError(f"--val-split {val_split} holds out all {len(paths)} photos, leaving none to train on: "
                          f"lower it (e.g. 0.15), or add photos")
    return sorted(paths[n_val:]), sorted(paths[:n_val])


def lr_scheduler(optimizer, lr, steps):
    """A one-cycle schedule: 5% of the steps warming up to ``lr``, then cosine decay to lr / 2500.

    PyTorch's OneCycleLR divides by the warm-up's last step, ``pct_start * steps - 1``, which is 0 for a warm-up of
    exactly one step (--steps 20): that case warms up over two steps instead.
    """
    pct_start = 0.05 if float(0.05 * steps) - 1 != 0 else 2.0 / steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=pct_start,
                                               final_div_factor=100)


def main(argv=None):
    from latentlink.edge.cli import run_main

    return run_main(lambda a: train(get_args_parser().parse_args(a)), argv)


def parse_device(text):
    """``torch.device`` for --device, or a ConfigError that says what is accepted."""
    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r}: expected cpu, cuda or cuda:N (N: the GPU's index)") from None


def train(args):
    check_args(args)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} asked for CUDA, but this PyTorch sees no GPU (use --device cpu)")
    scales = tuple(args.scales)

    photos = sorted({path for folder in args.data for path in list_images(folder)})
    train_paths, val_paths = split_paths(photos, args.val_split, args.seed)
    skipped = []  # unreadable files: each one warned about, and counted
    sampler = CropSampler(train_paths, crop=args.crop, scales=scales, seed=args.seed, skipped=skipped)
    val_images, val_read = [], []
    for path, image in readable_images(val_paths, skipped=skipped):
        val_read.append(path)
        val_images.extend(centre_crop(resize_short_side(image, s), 256) for s in scales)
    train_paths, val_paths = sampler.paths, val_read
    print(f"{len(train_paths)} training photos, {len(val_paths)} validation photos, scales {scales}"
          + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""))

    history = []  # the training runs this checkpoint went through, oldest first
    resumed_tiles = (1, 1)
    if args.resume:
        model, previous = load_checkpoint(args.resume, device)
        history = previous.pop("history", []) + [previous]
        resumed_tiles = tuple(previous.get("tiles", (1, 1)))
    else:
        hparams = parse_hparams(args.hparam)
        if args.latent_channels is not None:
            hparams.setdefault("latent_channels", args.latent_channels)
        model = build_model(args.model or "lossy-cae", **hparams)
        if args.init_from:
            source, source_meta = load_checkpoint(args.init_from)
            copied, fresh = copy_matching_weights(model, source)
            print(f"--init-from {args.init_from}: {len(copied)} tensors copied, {len(fresh)} start fresh")
            history = source_meta.pop("history", []) + [source_meta]  # the new model descends from it
        model = model.to(device)
    tiles = args.tiles or resumed_tiles
    if args.bit_usage and model.packing != "bits":
        raise ConfigError(f"--bit-usage shapes binary latents; model {model.name!r} sends {model.packing} latents "
                          f"(use it with lossy-cae)")
    if args.lmbda and model.packing != "bits":
        raise ConfigError(f"--lmbda estimates the rate of binary latents; model {model.name!r} sends {model.packing} "
                          f"latents (use it with lossy-cae)")
    if args.crop % model.downscale:
        raise ConfigError(f"--crop {args.crop} is not a multiple of {model.downscale}, model {model.name}'s downscale")
    model.train()
    if args.freeze_encoder:
        model.encoder.requires_grad_(False)
    loss_fn = get_loss(args.loss)
    # The encoder and decoder are what ships; a model trained against critics (cyclegan) trains them apart.
    adversarial = hasattr(model, "discriminator_loss")
    trained = [p for part in (model.encoder, model.decoder) for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    scheduler = lr_scheduler(optimizer, args.lr, args.steps)
    rate_model = rate_optimizer = None
    if args.lmbda:
        from .rate import RateModel

        # Its own optimizer at a fixed, larger rate: the logits must reach +-5 or so within a few hundred steps,
        # whatever the autoencoder's schedule does.
        rate_model = RateModel(model.hparams["latent_channels"]).to(device)
        rate_optimizer = torch.optim.Adam(rate_model.parameters(), lr=RATE_LR)
    if adversarial:  # betas as Zhu et al.'s Cycle-GAN: a short momentum keeps the two games from oscillating
        critic_optimizer = torch.optim.Adam(model.discriminators.parameters(), lr=args.lr, betas=(0.5, 0.999))
    best, started = -1.0, time.time()
    best_path = Path(args.out).with_suffix(".best.pt")
    bar = progress(range(1, args.steps + 1), desc="train", unit="step", leave=True)
    for step in bar:
        set_stochastic(model, step <= args.stochastic_fraction * args.steps)
        x = torch.from_numpy(sampler.batch(args.batch_size)).to(device)
        out = model(x)
        x_hat = out["x_hat"]
        if adversarial:
            loss = model.generator_loss(x, out, loss_fn)
        elif hasattr(model, "training_loss"):  # the progressive model: every iteration's reconstruction counts
            loss = model.training_loss(x, out, loss_fn)
        else:
            loss = loss_fn(x_hat, x)
        if args.bit_usage:
            loss = loss + args.bit_usage * bit_usage_penalty(out["latents"])
        bpp = None
        if rate_model is not None:  # estimated coded bits per pixel of each crop, averaged
            bpp = rate_model(out["latents"]).mean() / (x.shape[2] * x.shape[3])
            loss = loss + args.lmbda * bpp
            rate_optimizer.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            tqdm.write(f"step {step}: loss is {loss.item()}; skipping this batch")
            scheduler.step()
            continue
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(trained, args.clip_grad)
        optimizer.step()
        scheduler.step()
        if rate_optimizer is not None:
            rate_optimizer.step()
        if adversarial:
            critic_optimizer.zero_grad(set_to_none=True)  # also drops what the generators' loss left on the critics
            model.discriminator_loss(x, out).backward()
            critic_optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(torch.mean((x_hat - x) ** 2).item()):.2f}",
                            **({} if bpp is None else {"bpp": f"{bpp.item():.3f}"}))
        if step % args.val_every == 0 or step == args.steps:
            val_psnr = evaluate(model, val_images, device, tiles) if val_images else float("nan")
            facts = dict(history=history, step=step, loss=args.loss, val_psnr_db=round(val_psnr, 3),
                         train_photos=[p.name for p in train_paths], val_photos=[p.name for p in val_paths],
                         scales=list(scales), crop=args.crop, tiles=list(tiles), batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         stochastic_fraction=args.stochastic_fraction, bit_usage=args.bit_usage, lmbda=args.lmbda,
                         init_from=args.init_from, freeze_encoder=args.freeze_encoder, clip_grad=args.clip_grad,
                         minutes=round((time.time() - started) / 60, 1))
            # --out always holds the latest weights (the end of the schedule is what ships); the best by
            # validation is kept beside it, since a few validation crops are a noisy guide.
            save_checkpoint(args.out, model, **facts)
            wrote = [args.out]
            if val_images and val_psnr > best:
                best = val_psnr
                save_checkpoint(best_path, model, **facts)
                wrote.append(str(best_path))
            tqdm.write(f"step {step}: validation PSNR {val_psnr:.2f} dB (best {max(best, val_psnr):.2f}); wrote "
                       + " and ".join(wrote))
    bar.close()
    if val_images:
        print(f"checkpoint: {args.out} (step {args.steps}); best validation PSNR {best:.2f} dB: {best_path}")
    else:
        print(f"checkpoint: {args.out} (step {args.steps}); no validation photos, so no {best_path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
