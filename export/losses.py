"""Training losses for images in [0, 1]: MSE, 1-SSIM, 1-MS-SSIM and a mix (pytorch-msssim for the SSIMs)."""

import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from edge.errors import ConfigError


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


LOSSES = {"mse": mse_loss, "ssim": ssim_loss, "ms-ssim": ms_ssim_loss, "mix": mix_loss}


def get_loss(name):
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r} (available: {', '.join(LOSSES)})") from None
