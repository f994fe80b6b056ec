"""Lossy compressive autoencoder with binary latents (the seed deck's best model on the Nano).

The encoder maps an RGB image in [0, 1] to ``latent_channels`` binary planes at 1/4 resolution, so with 8 channels
a frame costs 8 bits per 16 pixels = 0.5 bits per pixel on the wire, with no entropy coding. The encoder is kept
light because it runs on the Nano; the decoder, on the host, is allowed to be heavier.
"""

import numpy as np
import torch
from torch import nn

from .layers import ResidualBlock, step, subpixel_conv
from .registry import register_model


# The 4x4 Bayer matrix: 16 thresholds spread evenly over space, the classic ordered-dither pattern.
BAYER_4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]])


def dither_thresholds(channels, height, width):
    """Ordered-dither thresholds in (-1, 1): a float32 array of shape (1, channels, height, width).

    The 4x4 Bayer pattern, mapped to ``(2 b + 1) / 16 - 1`` and tiled over the latent grid; channel ``c`` uses it
    shifted by ``(c % 4, (c // 4 + 2 c) % 4)`` so that the channels' patterns do not line up. Built with numpy, so
    an exported graph holds it as one constant.
    """
    levels = (2 * BAYER_4 + 1) / 16 - 1
    reps = (-(-height // 4), -(-width // 4))
    maps = [np.tile(np.roll(levels, (c % 4, (c // 4 + 2 * c) % 4), axis=(0, 1)), reps)[:height, :width]
            for c in range(channels)]
    return np.stack(maps)[None].astype(np.float32)


class Binarizer(nn.Module):
    """Map tanh activations in (-1, 1) to bits in {0, 1}.

    Inference: the deterministic bit ``x > t``, what ``clamp(sign(x - t), min=0)`` gives, computed with
    :func:`~.layers.step` (Clip, Ceil and Abs: bit for bit the same), because TensorRT 8.0, JetPack 4.6's, has no
    ONNX Sign, and TensorRT 8.2 fails on BOOL tensors (what ``(x > 0).float()`` exports to). With ``dither`` off,
    ``t = 0``; with it on, ``t`` is a fixed ordered-dither pattern (:func:`dither_thresholds`, a constant in the
    exported graph).

    Why dither: a convolutional encoder is translation-equivariant, so with ``t = 0`` every 4x4 block of a flat
    area gets the same 8 bits, and a flat area can take only 2^8 colours: smooth skies, skin and bokeh come back
    with colour casts and banding. Spreading the thresholds over space lets neighbouring blocks differ, so the share
    of ones over a neighbourhood carries the colour, as in halftoning, and the decoder averages it back.

    Training, while ``stochastic`` is True: stochastic binarization, P(bit = 1) = (1 + x) / 2 (a uniformly random
    threshold), with a straight-through gradient. Ordered dither is its deterministic counterpart: the same
    thresholds, spread evenly instead of drawn at random. Without dither, training must end with ``stochastic =
    False``: the encoder learns to code smooth areas as random dither that ``t = 0`` then destroys (measured here,
    one photo at 22 dB stochastic fell to 15 dB deterministic).
    """

    def __init__(self, dither=False):
        super().__init__()
        self.stochastic = True
        self.dither = dither
        self._thresholds = {}  # (shape, device, dtype) -> tensor: built and uploaded once, not once per frame

    def deterministic(self, x):
        """The deployed bits: 1.0 where ``x > t``, else 0.0 (``clamp(sign(x - t), 0)``, bit for bit)."""
        if self.dither:
            # int(): the shapes are static (one engine per input size), so the pattern is a constant, not graph ops.
            shape = tuple(int(n) for n in x.shape[1:])
            key = (shape, x.device, x.dtype)
            if key not in self._thresholds:
                self._thresholds[key] = torch.from_numpy(dither_thresholds(*shape)).to(device=x.device, dtype=x.dtype)
            x = x - self._thresholds[key]
        return step(x)

    def forward(self, x):
        if not self.training:
            return self.deterministic(x)
        soft = (x + 1) / 2
        if self.stochastic:
            hard = (torch.rand_like(x) < soft).to(x.dtype)
        else:
            hard = self.deterministic(x)
        return soft + (hard - soft).detach()


@register_model("lossy-cae")
class LossyCAE(nn.Module):
    """Binary-latent autoencoder: (N, 3, H, W) in [0, 1] -> (N, C, H/4, W/4) bits -> (N, 3, H, W).

    H and W must be multiples of 4. Bits per pixel = latent_channels / 16. ``dither=1`` (the default) binarizes
    against an ordered-dither pattern, ``dither=0`` against 0 (the seed deck's binarizer); see :class:`Binarizer`.
    On 8 held-out photos at 504x504, switching it on took the same weights from 24.7 dB to 26.5 dB in 1000 steps.

    ``space_to_depth=1`` swaps the 5x5 stride-2 first conv on RGB for a pixel-unshuffle (12 channels at H/2) and a
    3x3 stride-2 conv; with ``encoder_channels=48`` the encoder costs 1026 multiply-adds per pixel instead of 3924
    (2.1 instead of 8.0 GFLOP a 1008x1008 frame): the nano-1008 path that fits the Nano's frame budget (see
    export/cost_model.py and README "Will it fit? The cost model").
    """

    packing = "bits"
    downscale = 4
    # Checkpoints written before ``dither`` existed were trained with the seed's binarizer.
    legacy_hparams = {"dither": 0}

    def __init__(self, latent_channels=8, encoder_channels=96, decoder_channels=96, decoder_blocks=1, dither=1,
                 space_to_depth=0):
        super().__init__()
        self.hparams = dict(latent_channels=latent_channels, encoder_channels=encoder_channels,
                            decoder_channels=decoder_channels, decoder_blocks=decoder_blocks, dither=dither)
        if space_to_depth:  # recorded only when set: checkpoints of the default model keep their hparams as they were
            self.hparams["space_to_depth"] = space_to_depth
        e, d = encoder_channels, decoder_channels
        if space_to_depth:
            # The cheap stem for large frames: pixel-unshuffle to 12 channels at H/2, then a 3x3 stride-2 conv to
            # H/4; the same 6x6-pixel footprint as a 6x6 stride-4 conv, never a full-size activation at H/2.
            stem = [nn.PixelUnshuffle(2), nn.Conv2d(12, e // 2, 3, stride=2, padding=1)]
        else:
            stem = [nn.Conv2d(3, e // 2, 5, stride=2, padding=2)]
        self.encoder = nn.Sequential(
            *stem,
            nn.PReLU(e // 2),
            nn.Conv2d(e // 2, e, 3, stride=1 if space_to_depth else 2, padding=1),
            nn.PReLU(e),
            nn.Conv2d(e, latent_channels, 3, padding=1),
            nn.Tanh(),
            Binarizer(dither=bool(dither)),
        )
        self.decoder = nn.Sequential(
            _Centre(),
            nn.Conv2d(latent_channels, d, 3, padding=1),
            nn.PReLU(d),
            *[ResidualBlock(d) for _ in range(decoder_blocks)],
            subpixel_conv(d, d // 2),
            nn.PReLU(d // 2),
            nn.Conv2d(d // 2, d // 2, 3, padding=1),
            nn.PReLU(d // 2),
            subpixel_conv(d // 2, 3),
        )

    def latent_shape(self, height, width):
        """(C, H/4, W/4) for an input of ``height`` x ``width`` pixels."""
        return (self.hparams["latent_channels"], height // 4, width // 4)

    @property
    def bits_per_pixel(self):
        return self.hparams["latent_channels"] / 16.0

    def forward(self, x):
        latents = self.encoder(x)
        return {"x_hat": self.decoder(latents), "latents": latents}


class _Centre(nn.Module):
    """Bits {0, 1} -> {-1, +1}: the decoder sees zero-centred inputs."""

    def forward(self, bits):
        return bits * 2 - 1
