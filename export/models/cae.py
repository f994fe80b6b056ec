"""The seed deck's plain autoencoder: the latent is a small 8-bit image (1008x1008 -> 252x252, values 0..255).

No constraint on what the encoder puts in its small image (the deck found the Laplacian constraint hurt): it is
whatever the decoder reconstructs best from. Rounding to integers is trained with a straight-through estimator and
the latents travel as ``uint8``: ``latent_channels * 8 / downscale**2`` bits per pixel (3 * 8 / 16 = 1.5 bpp at the
defaults, a quarter of the deck's 504 -> 252 at downscale 2).
"""

from torch import nn

from latentlink.edge.errors import ConfigError

from .layers import QuantizeUint8, ResidualBlock, subpixel_conv
from .registry import register_model


def strided_encoder(in_ch, width, out_ch, downscale):
    """Conv 5x5/2 then Conv 3x3/2 per further halving (PReLU after each), then Conv 3x3 to ``out_ch`` maps."""
    if downscale not in (2, 4, 8):
        raise ConfigError(f"downscale={downscale}; use 2, 4 or 8")
    layers, ch = [nn.Conv2d(in_ch, width, 5, stride=2, padding=2), nn.PReLU(width)], width
    for _ in range(downscale.bit_length() - 2):
        layers += [nn.Conv2d(ch, width, 3, stride=2, padding=1), nn.PReLU(width)]
    return layers + [nn.Conv2d(width, out_ch, 3, padding=1)]


def subpixel_decoder(in_ch, width, out_ch, downscale, blocks):
    """Conv 3x3 + PReLU, ``blocks`` residual blocks, then one sub-pixel x2 (+ PReLU) per halving the encoder did."""
    layers = [nn.Conv2d(in_ch, width, 3, padding=1), nn.PReLU(width)]
    layers += [ResidualBlock(width) for _ in range(blocks)]
    for _ in range(downscale.bit_length() - 2):
        layers += [subpixel_conv(width, width, 2), nn.PReLU(width)]
    return layers + [subpixel_conv(width, out_ch, 2)]


class _Scale(nn.Module):
    """Integers 0..255 -> [0, 1]: the decoder sees what the encoder's sigmoid made."""

    def forward(self, x):
        return x * (1.0 / 255.0)


@register_model("cae")
class CAE(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, latent_channels, H/d, W/d) integers 0..255 -> (N, 3, H, W); d = downscale."""

    packing = "uint8"
    test_hparams = {"width": 8}

    def __init__(self, latent_channels=3, width=64, decoder_blocks=2, downscale=4):
        super().__init__()
        self.hparams = dict(latent_channels=latent_channels, width=width, decoder_blocks=decoder_blocks,
                            downscale=downscale)
        self.downscale = downscale
        self.encoder = nn.Sequential(*strided_encoder(3, width, latent_channels, downscale), nn.Sigmoid(),
                                     QuantizeUint8())
        self.decoder = nn.Sequential(_Scale(), *subpixel_decoder(latent_channels, width, 3, downscale,
                                                                 decoder_blocks))

    def latent_shape(self, height, width):
        return (self.hparams["latent_channels"], height // self.downscale, width // self.downscale)

    @property
    def bits_per_pixel(self):
        return self.hparams["latent_channels"] * 8.0 / self.downscale ** 2

    def forward(self, x):
        latents = self.encoder(x)
        return {"x_hat": self.decoder(latents), "latents": latents}
