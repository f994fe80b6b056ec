"""Progressive coder: one network, many rates (seeds 002 and 003, after Toderici et al.'s recurrent coders).

Each iteration codes what the previous ones missed: the encoder sees the residual ``x - x_hat`` and its own
recurrent state, and sends ``code_channels`` binary planes at 1/8 resolution (8 channels: 8 bits per 64 pixels =
0.125 bpp per iteration); the decoder turns those bits and its own state into an increment that is added to the
reconstruction. After k iterations the receiver has spent k x 0.125 bpp; stopping early is a lower rate, with no
retraining and no second model.

The recurrent cells are convolutional GRUs built from plain convolutions, sigmoids and tanhs (:class:`ConvGRU`),
so the ONNX graphs hold no LSTM/GRU op: every operation is in TensorRT 8.0's table, and the state is an explicit
input and output of each step (one iteration per engine call, see export/onnx_export.py: export_progressive).
"""

import torch
from torch import nn

from .layers import subpixel_conv
from .lossy_cae import Binarizer
from .registry import register_model


class ConvGRU(nn.Module):
    """A convolutional GRU cell: ``h' = (1 - z) h + z n``, with the gates ``z, r = sigmoid(conv1x1([x, h]))`` and
    the candidate ``n = tanh(conv3x3([x, r h]))``."""

    def __init__(self, in_ch, hidden):
        super().__init__()
        self.hidden = hidden
        # two gate convolutions, not one split in two: a split exports as Shape/Slice ops of unknown output shape.
        # The gates are 1x1 (the candidate's 3x3 spreads the state over space): a third of the cost of 3x3 gates,
        # which matters for training on CPUs and for the Nano, which runs both steps every iteration.
        self.update = nn.Conv2d(in_ch + hidden, hidden, 1)
        self.reset = nn.Conv2d(in_ch + hidden, hidden, 1)
        self.candidate = nn.Conv2d(in_ch + hidden, hidden, 3, padding=1)

    def forward(self, x, h):
        xh = torch.cat([x, h], dim=1)
        z, r = torch.sigmoid(self.update(xh)), torch.sigmoid(self.reset(xh))
        n = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return h + z * (n - h)


class EncoderStep(nn.Module):
    """One encoder iteration: ``(residual (N, 3, H, W), state (N, S, H/8, W/8)) -> (bits (N, C, H/8, W/8), state)``.

    The residual of the first iteration is ``x - 0.5`` (the reconstruction starts mid-grey)."""

    def __init__(self, code_channels, channels, state_channels, dither):
        super().__init__()
        c = channels
        # pixel-unshuffle (12 channels at H/2) then two stride-2 convs: the lossy-cae's cheap stem, to H/8
        self.features = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, c // 2, 3, stride=2, padding=1), nn.PReLU(c // 2),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.PReLU(c))
        self.cell = ConvGRU(c, state_channels)
        self.code = nn.Sequential(nn.Conv2d(state_channels, code_channels, 1), nn.Tanh())
        self.binarizer = Binarizer(dither=bool(dither))

    def forward(self, residual, state):
        state = self.cell(self.features(residual), state)
        return self.binarizer(self.code(state)), state


class DecoderStep(nn.Module):
    """One decoder iteration: ``(bits (N, C, H/8, W/8), state (N, S, H/8, W/8)) -> (increment (N, 3, H, W), state)``.

    The reconstruction after k iterations is ``0.5 + increment_1 + ... + increment_k`` (clip it to [0, 1])."""

    def __init__(self, code_channels, channels, state_channels):
        super().__init__()
        c = channels
        self.embed = nn.Sequential(nn.Conv2d(code_channels, c, 3, padding=1), nn.PReLU(c))
        self.cell = ConvGRU(c, state_channels)
        self.upsample = nn.Sequential(
            subpixel_conv(state_channels, c // 2), nn.PReLU(c // 2),   # H/4
            subpixel_conv(c // 2, c // 4), nn.PReLU(c // 4),            # H/2
            subpixel_conv(c // 4, 3))                                   # H

    def forward(self, bits, state):
        state = self.cell(self.embed(bits * 2 - 1), state)
        return self.upsample(state), state


@register_model("progressive")
class Progressive(nn.Module):
    """Residual binary codes with recurrent state: (N, 3, H, W) -> K x (N, C, H/8, W/8) bits -> (N, 3, H, W).

    H and W must be multiples of 8. ``iterations`` K, ``code_channels`` C bits per 8x8 block per iteration
    (C / 64 bpp each), ``channels`` of the convolutions, ``state_channels`` of each GRU's state.

    ``forward`` runs all K iterations and returns ``x_hat`` (after K), ``x_hats`` (after each; the training loss is
    averaged over all of them, so every prefix of the code is a good image) and ``latents`` (N, K*C, H/8, W/8).
    """

    packing = "bits"
    downscale = 8
    test_hparams = {"iterations": 2, "channels": 16, "state_channels": 8}

    def __init__(self, iterations=8, code_channels=8, channels=32, state_channels=32, dither=1):
        super().__init__()
        self.hparams = dict(iterations=iterations, code_channels=code_channels, channels=channels,
                            state_channels=state_channels, dither=dither)
        self.encoder = EncoderStep(code_channels, channels, state_channels, dither)
        self.decoder = DecoderStep(code_channels, channels, state_channels)

    @property
    def iterations(self):
        return self.hparams["iterations"]

    def code_shape(self, height, width):
        """(C, H/8, W/8): the bits of one iteration."""
        return (self.hparams["code_channels"], height // 8, width // 8)

    def latent_shape(self, height, width):
        """(K*C, H/8, W/8): all K iterations' bits."""
        c, h, w = self.code_shape(height, width)
        return (c * self.iterations, h, w)

    def state_shape(self, height, width):
        """(S, H/8, W/8): each GRU's state (encoder and decoder alike)."""
        return (self.hparams["state_channels"], height // 8, width // 8)

    @property
    def bits_per_pixel(self):
        """At all K iterations; k iterations cost k * code_channels / 64."""
        return self.iterations * self.hparams["code_channels"] / 64.0

    def initial_state(self, x):
        return x.new_zeros((x.shape[0],) + self.state_shape(x.shape[2], x.shape[3]))

    def forward(self, x, iterations=None):
        enc_state, dec_state = self.initial_state(x), self.initial_state(x)
        x_hat = torch.full_like(x, 0.5)
        x_hats, codes = [], []
        for _ in range(iterations or self.iterations):
            bits, enc_state = self.encoder(x - x_hat, enc_state)
            increment, dec_state = self.decoder(bits, dec_state)
            x_hat = x_hat + increment
            x_hats.append(x_hat)
            codes.append(bits)
        return {"x_hat": x_hat, "x_hats": x_hats, "latents": torch.cat(codes, dim=1)}

    def training_loss(self, x, out, loss_fn):
        """The loss averaged over every iteration's reconstruction (each prefix of the code must decode well)."""
        return sum(loss_fn(x_hat, x) for x_hat in out["x_hats"]) / len(out["x_hats"])


# The step graphs' inputs and outputs, in order (ONNX names; the edge's backends feed and read them by name).
ENCODER_INPUTS, ENCODER_OUTPUTS = ("residual", "state"), ("codes", "new_state")
DECODER_INPUTS, DECODER_OUTPUTS = ("codes", "state"), ("increment", "new_state")


def progressive_info(model, height, width):
    """model.json's ``progressive`` section for ``height`` x ``width`` frames: iterations, shapes, step I/O."""
    image = [1, 3, height, width]
    code = [1] + list(model.code_shape(height, width))
    state = [1] + list(model.state_shape(height, width))
    return {
        "iterations": model.iterations,
        "code_shape": code[1:],
        "state_shape": state[1:],
        "bits_per_pixel_per_iteration": model.hparams["code_channels"] / 64.0,
        "initial_reconstruction": 0.5,
        # [name, shape] pairs in the graph's order
        "encoder_step": {"file": "encoder_step.onnx",
                         "inputs": [list(p) for p in zip(ENCODER_INPUTS, (image, state))],
                         "outputs": [list(p) for p in zip(ENCODER_OUTPUTS, (code, state))]},
        "decoder_step": {"file": "decoder_step.onnx",
                         "inputs": [list(p) for p in zip(DECODER_INPUTS, (code, state))],
                         "outputs": [list(p) for p in zip(DECODER_OUTPUTS, (image, state))]},
    }
