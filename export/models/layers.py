"""Building blocks the zoo's models share: residual blocks, sub-pixel upsampling, 8-bit latents, grey <-> RGB, and
the two quantizers (:func:`step`, :func:`round_half_even`) written with the operations TensorRT 8.0's ONNX importer has.
"""

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


def step(x):
    """1.0 where ``x > 0``, else +0.0: ``torch.clamp(torch.sign(x), min=0)`` bit for bit, for every non-NaN ``x``.

    Why not Sign: TensorRT 8.0 (JetPack 4.6) has no ONNX Sign or Round (they arrived in 8.2), and BOOL tensors
    (``(x > 0).float()``) fail TensorRT 8.2's FP16 builds. Exported as Clip, Ceil, Abs, all in 8.0's table:
    ``clamp(x, 0, 1)`` is in (0, 1] exactly when ``x > 0`` (so its ceiling is 1) and +0 when ``x < 0``; at ``x = -0.0``
    it may be -0.0 (max(-0, +0) is either zero, by implementation) and so may its ceiling, and ``abs`` makes that +0,
    as Sign gives. ``tests/test_trt_ops.py`` checks every case.
    """
    return torch.abs(torch.ceil(torch.clamp(x, 0.0, 1.0)))


def round_half_even(y):
    """``torch.round(y)`` (ONNX Round: halves to even) bit for bit for ``y >= 0`` not NaN, from Mul, Floor, Sub,
    Ceil, Add: operations TensorRT 8.0's ONNX importer has (Round arrived in 8.2).

    With ``h = y / 2 = g + q`` (``g = floor(h)``, ``q`` in [0, 1)), ``y = 2 g + 2 q`` and ``2 g`` is even, so
    ``round(y) = 2 g + round(2 q)``, where ``round(2 q)`` is 0 for ``q <= 1/4`` (0.5 rounds to the even 0), 1 for
    ``1/4 < q < 3/4`` and 2 for ``q >= 3/4`` (1.5 rounds to the even 2): ``[q > 1/4] + [q >= 3/4]``. Each step is exact
    in binary floating point, FP16 included: ``y * 0.5`` and ``h - floor(h)`` are exact; ``q - 0.25`` has the sign of
    the exact difference, so ``ceil`` gives ``[q > 1/4]`` (as -0.0 or +0.0 when false, and adding -0.0 to the
    non-negative ``2 g`` changes nothing); ``q + 0.25`` only rounds for ``q < 1/2``, below 1, so ``floor`` gives
    ``[q >= 3/4]``. For negative ``y`` the value is right but a result of zero is +0.0 where Round gives -0.0.
    """
    h = y * 0.5
    g = torch.floor(h)
    q = h - g
    return (g + g + torch.floor(q + 0.25)) + torch.ceil(q - 0.25)


class QuantizeUint8(nn.Module):
    """Activations in [0, 1] -> integers 0..255 (as float), what the ``uint8`` packing sends.

    Training uses a straight-through estimator: the forward pass rounds, the backward pass acts as if it did not.
    Rounds with :func:`round_half_even` (what ``torch.round`` gives, bit for bit), which exports to operations
    TensorRT 8.0 parses; ONNX Round would need 8.2.
    """

    def forward(self, x):
        y = x * 255.0
        if self.training:
            return y + (round_half_even(y) - y).detach()
        return round_half_even(y)


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
