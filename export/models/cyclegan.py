"""The seed deck's Cycle-GAN pair: photo -> small 8-bit image (G, the encoder) and back (F, the decoder).

Domain X is photos; domain Y is small images (the photos downscaled by area averaging). G is trained so that G(x)
reconstructs through F, and also looks like a real small image to D_Y; F so that F(y) looks like a photo to D_X
and maps back through G. The losses (:meth:`CycleGAN.generator_loss`): the training loss of ``--loss`` on F(G(x))
(the deck's SSIM loss), the L1 cycle terms of Zhu et al. 2017 (weight 10, as theirs) and least-squares adversarial
terms (weight 0.1: here compression fidelity comes first, and the deck found Cycle-GAN training unstable).

Only the generators are exported; the discriminators (``discriminators``) exist for training and stay in the
checkpoint so that training can resume. The latent is an RGB image at 1/``downscale`` of the input, integers
0..255 sent as ``uint8``: 24 / downscale**2 bits per pixel (the deck: 504 -> 252, downscale 2, 6 bpp).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .cae import _Scale, strided_encoder, subpixel_decoder
from .layers import QuantizeUint8, ResidualBlock
from .registry import register_model

CYCLE_WEIGHT = 10.0
ADVERSARIAL_WEIGHT = 0.1


def patch_discriminator(width):
    """A PatchGAN critic: a map of real (1) / fake (0) scores, one per overlapping patch."""
    return nn.Sequential(
        nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 1, 3, padding=1),
    )


def _least_squares(scores, target):
    return torch.mean((scores - target) ** 2)


@register_model("cyclegan")
class CycleGAN(nn.Module):
    """G: (N, 3, H, W) in [0, 1] -> (N, 3, H/d, W/d) integers 0..255; F: back to (N, 3, H, W); d = downscale."""

    packing = "uint8"
    test_hparams = {"width": 8, "blocks": 1, "critic_width": 8}

    def __init__(self, width=32, blocks=2, downscale=2, critic_width=32):
        super().__init__()
        self.hparams = dict(width=width, blocks=blocks, downscale=downscale, critic_width=critic_width)
        self.downscale = downscale
        g = strided_encoder(3, width, 3, downscale)
        g[-1:-1] = [ResidualBlock(width) for _ in range(blocks)]  # residual blocks before the last convolution
        self.encoder = nn.Sequential(*g, nn.Sigmoid(), QuantizeUint8())
        self.decoder = nn.Sequential(_Scale(), *subpixel_decoder(3, width, 3, downscale, blocks))
        self.discriminators = nn.ModuleDict({"x": patch_discriminator(critic_width),
                                             "y": patch_discriminator(critic_width)})

    def latent_shape(self, height, width):
        return (3, height // self.downscale, width // self.downscale)

    @property
    def bits_per_pixel(self):
        return 24.0 / self.downscale ** 2

    def forward(self, x):
        latents = self.encoder(x)
        return {"x_hat": self.decoder(latents), "latents": latents}

    def generator_loss(self, x, out, reconstruction_loss):
        """The generators' loss for photos ``x`` and ``out = self(x)``; keeps the fakes in ``out`` for the critics."""
        y_real = F.avg_pool2d(x, self.downscale)
        x_fake = self.decoder(torch.round(y_real * 255))  # F(y)
        y_cycle = self.encoder(x_fake) / 255  # G(F(y))
        out["y_fake"], out["x_fake"] = out["latents"] / 255, x_fake
        cycle = F.l1_loss(out["x_hat"], x) + F.l1_loss(y_cycle, y_real)
        adversarial = (_least_squares(self.discriminators["y"](out["y_fake"]), 1.0)
                       + _least_squares(self.discriminators["x"](x_fake), 1.0))
        return reconstruction_loss(out["x_hat"], x) + CYCLE_WEIGHT * cycle + ADVERSARIAL_WEIGHT * adversarial

    def discriminator_loss(self, x, out):
        """The critics' loss: real photos and small images score 1, the generators' fakes (detached) 0."""
        y_real = F.avg_pool2d(x, self.downscale)
        d_x, d_y = self.discriminators["x"], self.discriminators["y"]
        return 0.5 * (_least_squares(d_y(y_real), 1.0) + _least_squares(d_y(out["y_fake"].detach()), 0.0)
                      + _least_squares(d_x(x), 1.0) + _least_squares(d_x(out["x_fake"].detach()), 0.0))
