"""Lossy compressive autoencoder with binary latents (the seed deck's best model on the Nano).

The encoder maps an RGB image in [0, 1] to ``latent_channels`` binary planes at 1/4 resolution, so with 8 channels
a frame costs 8 bits per 16 pixels = 0.5 bits per pixel on the wire, with no entropy coding. The encoder is kept
light because it runs on the Nano; the decoder, on the host, is allowed to be heavier.
"""

import torch
from torch import nn

from .registry import register_model


class Binarizer(nn.Module):
    """Map tanh activations in (-1, 1) to bits in {0, 1}.

    Inference: the deterministic ``clamp(sign(x), min=0)``, built from float ops only, because TensorRT 8.2 fails
    on BOOL tensors (what ``(x > 0).float()`` exports to).

    Training, while ``stochastic`` is True: stochastic binarization, P(bit = 1) = (1 + x) / 2, with a
    straight-through gradient. It explores well early on, but it lets the encoder code smooth areas as dither (the
    share of ones carries the intensity) that the deterministic binarizer then destroys: measured here, one photo
    at 22 dB stochastic fell to 15 dB deterministic. So training ends with ``stochastic = False``: the same
    deterministic bits as deployment, with a straight-through gradient.
    """

    def __init__(self):
        super().__init__()
        self.stochastic = True

    def forward(self, x):
        if not self.training:
            return torch.clamp(torch.sign(x), min=0)
        soft = (x + 1) / 2
        if self.stochastic:
            hard = (torch.rand_like(x) < soft).to(x.dtype)
        else:
            hard = torch.clamp(torch.sign(x), min=0)
        return soft + (hard - soft).detach()


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


def _upsample(in_ch, out_ch):
    """Sub-pixel convolution: x2 resolution (exports to Conv + DepthToSpace)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * 4, 3, padding=1), nn.PixelShuffle(2))


@register_model("lossy-cae")
class LossyCAE(nn.Module):
    """Binary-latent autoencoder: (N, 3, H, W) in [0, 1] -> (N, C, H/4, W/4) bits -> (N, 3, H, W).

    H and W must be multiples of 4. Bits per pixel = latent_channels / 16.
    """

    packing = "bits"
    downscale = 4

    def __init__(self, latent_channels=8, encoder_channels=96, decoder_channels=96, decoder_blocks=1):
        super().__init__()
        self.hparams = dict(latent_channels=latent_channels, encoder_channels=encoder_channels,
                            decoder_channels=decoder_channels, decoder_blocks=decoder_blocks)
        e, d = encoder_channels, decoder_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, e // 2, 5, stride=2, padding=2),
            nn.PReLU(e // 2),
            nn.Conv2d(e // 2, e, 3, stride=2, padding=1),
            nn.PReLU(e),
            nn.Conv2d(e, latent_channels, 3, padding=1),
            nn.Tanh(),
            Binarizer(),
        )
        self.decoder = nn.Sequential(
            _Centre(),
            nn.Conv2d(latent_channels, d, 3, padding=1),
            nn.PReLU(d),
            *[ResidualBlock(d) for _ in range(decoder_blocks)],
            _upsample(d, d // 2),
            nn.PReLU(d // 2),
            nn.Conv2d(d // 2, d // 2, 3, padding=1),
            nn.PReLU(d // 2),
            _upsample(d // 2, 3),
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
