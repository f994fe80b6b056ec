"""Training losses for images in [0, 1]: MSE, 1-SSIM, 1-MS-SSIM and a mix (pytorch-msssim for the SSIMs)."""

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from latentlink.edge.errors import ConfigError


def mse_loss(x_hat, x):
    return F.mse_loss(x_hat, x)


def ssim_loss(x_hat, x):
    return 1 - ssim(x_hat, x, data_range=1.0, size_average=True)


def ms_ssim_loss(x_hat, x):
    # MS-SSIM needs crops larger than 160 px (5 scales of an 11-px window).
    return 1 - ms_ssim(x_hat, x, data_range=1.0, size_average=True)


def mix_loss(x_hat, x, ssim_weight=0.01):
    """MSE + 0.01 (1-SSIM): the weight makes both terms about equal near 27 dB (MSE 0.002, 1-SSIM 0.1)."""
    return mse_loss(x_hat, x) + ssim_weight * ssim_loss(x_hat, x)


def bit_usage_penalty(bits):
    """How far binary latents (N, C, H, W) in {0, 1} are from a fully used code, in [0, 2].

    A fixed-rate code carries the most when every bit is 1 half of the time and the bits of a position are
    uncorrelated: the first shipped model's 8 bits had a symbol entropy of only 5.3 bits, with channels at
    P(1) = 0.14 to 0.83 (``benchmarks/checkpoint_quality.py`` on the held-out photos). The penalty is mean 4 (P(1) - 1/2)^2 over channels plus the mean squared
    correlation between channels, both computed on the deployed (hard) bits and differentiated through the
    binarizer's straight-through gradient.
    """
    flat = bits.transpose(0, 1).reshape(bits.shape[1], -1)
    p_one = flat.mean(dim=1)
    balance = (4 * (p_one - 0.5) ** 2).mean()
    centred = flat - p_one[:, None]
    cov = centred @ centred.T / flat.shape[1]
    std = torch.sqrt(torch.diagonal(cov) + 1e-6)
    corr = cov / (std[:, None] * std[None, :])
    off_diagonal = corr - torch.diag(torch.diagonal(corr))
    channels = bits.shape[1]
    decorrelation = (off_diagonal ** 2).sum() / max(channels * (channels - 1), 1)
    return balance + decorrelation


LOSSES = {"mse": mse_loss, "ssim": ssim_loss, "ms-ssim": ms_ssim_loss, "mix": mix_loss}


def get_loss(name):
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r} (available: {', '.join(LOSSES)})") from None
