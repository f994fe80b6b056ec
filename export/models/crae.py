"""CRAE: seed 000's Convolutional Residual Autoencoder, layer for layer as its Tables IV and V give it.

Encoder (Table IV): Conv 5x5/4, 64 maps, PReLU; Conv 5x5/4, 64 maps, PReLU; Res Block (Conv 3x3 64, PReLU,
Conv 3x3 64); Conv 3x3/2, 44 maps. Downscaling 4 * 4 * 2 = 32, no activation and no quantization on the latents:
the paper sends 44 float32 maps at 1/32 resolution, 44 * 32 / 32**2 = 1.375 bits per pixel (its Table VI).

Decoder (Table V): SubPixelConv x2; Res Block (64 maps); SubPixelConv x4; Conv 3x3, 16 maps; PReLU;
SubPixelConv x4. The tables do not give the sub-pixel layers' widths; each takes the width of the layer after it
(64, then 16), and the last one outputs the image's channels.

The paper compresses grey CT slices (``channels=1``); ``channels=3`` is the same network on RGB. A grey model takes
and returns RGB frames like every model of the zoo (luma in, luma copied to the three channels out), so the
pipeline does not change. ``latent_bits=16`` sends the latents as float16 (0.6875 bpp at the defaults), which the
paper did not do; 32 (the default) is the paper's.
"""

from torch import nn

from latentlink.edge.errors import ConfigError

from .layers import GreyToRGB, ResidualBlock, RGBToGrey, RoundToHalf, subpixel_conv
from .registry import register_model


@register_model("crae")
class CRAE(nn.Module):
    """(N, 3, H, W) in [0, 1] -> (N, latent_channels, H/32, W/32) floats -> (N, 3, H, W); H, W multiples of 32."""

    downscale = 32
    test_hparams = {"features": 8, "latent_channels": 4}

    def __init__(self, channels=3, latent_channels=44, features=64, latent_bits=32):
        super().__init__()
        if channels not in (1, 3):
            raise ConfigError(f"crae: channels={channels}; use 1 (grey, as in the paper) or 3 (RGB)")
        if latent_bits not in (16, 32):
            raise ConfigError(f"crae: latent_bits={latent_bits}; use 32 (float32, the paper) or 16 (float16)")
        self.hparams = dict(channels=channels, latent_channels=latent_channels, features=features,
                            latent_bits=latent_bits)
        self.packing = "float32" if latent_bits == 32 else "float16"
        f = features
        self.encoder = nn.Sequential(
            *([RGBToGrey()] if channels == 1 else []),
            nn.Conv2d(channels, f, 5, stride=4, padding=2),
            nn.PReLU(f),
            nn.Conv2d(f, f, 5, stride=4, padding=2),
            nn.PReLU(f),
            ResidualBlock(f),
            nn.Conv2d(f, latent_channels, 3, stride=2, padding=1),
            *([RoundToHalf()] if latent_bits == 16 else []),
        )
        self.decoder = nn.Sequential(
            subpixel_conv(latent_channels, f, 2),
            ResidualBlock(f),
            subpixel_conv(f, 16, 4),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.PReLU(16),
            subpixel_conv(16, channels, 4),
            *([GreyToRGB()] if channels == 1 else []),
        )

    def latent_shape(self, height, width):
        return (self.hparams["latent_channels"], height // 32, width // 32)

    @property
    def bits_per_pixel(self):
        return self.hparams["latent_channels"] * self.hparams["latent_bits"] / 32.0 ** 2

    def forward(self, x):
        latents = self.encoder(x)
        return {"x_hat": self.decoder(latents), "latents": latents}
