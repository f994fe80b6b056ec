"""Building blocks the zoo's models share: residual blocks, sub-pixel upsampling, 8-bit latents, grey <-> RGB."""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """``x + Conv3x3(PReLU(Conv3x3(x)))`` at constant width (seed 000's "Res Block [Conv2D PReLU Conv2D]")."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


def subpixel_conv(in_ch, out_ch, scale=2):
    """Sub-pixel convolution: Conv3x3 to ``out_ch * scale**2`` maps, then PixelShuffle (Conv + DepthToSpace in ONNX)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * scale * scale, 3, padding=1), nn.PixelShuffle(scale))


class QuantizeUint8(nn.Module):
    """Activations in [0, 1] -> integers 0..255 (as float), what the ``uint8`` packing sends.

    Training uses a straight-through estimator: the forward pass rounds, the backward pass acts as if it did not.
    Exported as Mul + Round (Round is in TensorRT 8.2's ONNX operator table).
    """

    def forward(self, x):
        y = x * 255.0
        if self.training:
            return y + (torch.round(y) - y).detach()
        return torch.round(y)


class RoundToHalf(nn.Module):
    """Training sees the float16 rounding the ``float16`` packing applies on the wire (straight-through)."""

    def forward(self, x):
        if self.training:
            return x + (x.half().float() - x).detach()
        return x


class RGBToGrey(nn.Module):
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma (BT.601 weights): grey models take the pipeline's RGB frames.

    A grey camera's frames reach the pipeline as R = G = B, and then this is exactly the grey value.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight)  # a 1x1 convolution: one Conv node with constant weights in ONNX


class GreyToRGB(nn.Module):
    """(N, 1, H, W) -> (N, 3, H, W), the grey value in every channel (the host writes RGB images)."""

    def forward(self, x):
        return torch.cat([x, x, x], dim=1)
