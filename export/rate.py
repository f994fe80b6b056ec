"""The rate of binary latents under the context model (edge/context_model.py): fitted tables and a torch mirror.

- :func:`fit_context_model`: the tables of a trained encoder, by counting contexts over the latents of photos
  (``latentlink export entropy``).
- :class:`RateModel`: the same model with learnable logits, for training with a rate term (``train --lmbda``): its
  ``forward(bits)`` estimates each image's coded size in bits, differentiable with respect to the binarizer's
  straight-through bits; :meth:`RateModel.to_tables` gives the integer tables the coder uses.

Contexts are always computed by the numpy code the edge runs (:func:`latentlink.edge.context_model.all_contexts`)
from the hard bits, detached, so the indices here are exactly the coder's.
"""

import numpy as np
import torch
from torch import nn

from latentlink.edge.context_model import (PROB_ONE, ContextModel, all_contexts, count_contexts, passes,
                                           table_sizes, tables_from_counts)
from latentlink.edge.errors import ConfigError
from latentlink.edge.preprocess import Preprocessor

from .data import read_bgr, readable_images


def encoder_bits(model, frames_bgr, height, width, tiles=(1, 1), fit="center-crop"):
    """Yield the deployed bits (uint8, (tiles, C, H/4, W/4)) of each BGR frame, preprocessed as the edge does."""
    preprocess = Preprocessor(width, height, fit, tiles)
    model.eval()
    with torch.no_grad():
        for frame in frames_bgr:
            x = torch.from_numpy(np.array(preprocess(frame)))
            # the progressive model: all K iterations' bits as one latent of K*C channels (edge/progressive.py)
            latents = model(x)["latents"] if getattr(model, "name", None) == "progressive" else model.encoder(x)
            yield (latents.numpy() > 0.5).astype(np.uint8)


def fit_context_model(model, photo_paths, height, width, tiles=(1, 1), info=None, skipped=None):
    """A :class:`ContextModel` fitted to the bits ``model`` (lossy-cae, binary latents) gives ``photo_paths`` at
    ``height`` x ``width``: per context, P(1) = (ones + 1/2) / (count + 1), as 16-bit integers."""
    if getattr(model, "packing", None) != "bits":
        raise ConfigError("entropy tables model binary latents; model {!r} sends {} latents".format(
            getattr(model, "name", type(model).__name__), getattr(model, "packing", "?")))
    counts, photos = None, 0
    frames = (frame for _, frame in readable_images(photo_paths, read=read_bgr, skipped=skipped))
    for bits in encoder_bits(model, frames, height, width, tiles):
        counts = count_contexts(bits, counts)
        photos += 1
    if not photos:
        raise ConfigError("none of the {} photos could be read".format(len(photo_paths)))
    info = dict(info or {}, photos=photos, size=[height, width], tiles=list(tiles),
                symbols=int(sum(int(c.sum()) for c in counts)))
    return ContextModel(bits.shape[1], tables_from_counts(counts), info)


class RateModel(nn.Module):
    """Learnable P(bit = 1) per context of the context model, for ``channels`` latent channels.

    ``forward(bits)``: ``bits`` (N, C, H, W) in {0, 1}, the binarizer's straight-through output -> estimated coded
    size of each image in bits, shape (N,): the sum of -log2 p(bit) over its bits. The contexts come from the hard
    bits (detached; numpy, exactly as the coder computes them); the gradient reaches the bits through the
    cross-entropy, and the logits learn the tables. ``to_tables()`` -> the coder's :class:`ContextModel`.
    ``init`` (a ContextModel) starts from fitted tables instead of P = 1/2.
    """

    def __init__(self, channels=8, init=None):
        super().__init__()
        self.channels = int(channels)
        sizes = table_sizes(self.channels)
        if init is not None:
            if init.channels != self.channels:
                raise ConfigError("RateModel for {} channels initialised with tables for {}".format(
                    self.channels, init.channels))
            p = [t.astype(np.float64) / PROB_ONE for t in init.tables]
            start = [torch.from_numpy(np.log(q / (1 - q))).float() for q in p]
        else:
            start = [torch.zeros(n) for n in sizes]
        self.logits = nn.ParameterList([nn.Parameter(s) for s in start])

    def forward(self, bits):
        hard = (bits.detach() > 0.5).to(torch.uint8).cpu().numpy()
        n = bits.shape[0]
        total = bits.new_zeros(n)
        if hard.ndim != 4 or hard.shape[1] != self.channels:
            raise ConfigError("RateModel for {} channels got bits of shape {}".format(self.channels, list(hard.shape)))
        for i, ((ctx, _), (c, grid, _)) in enumerate(zip(all_contexts(hard), passes(self.channels))):
            b = bits[:, c, grid[0]::2, grid[1]::2].reshape(n, -1)
            logit = self.logits[i][torch.from_numpy(ctx.astype(np.int64)).to(bits.device)].reshape(n, -1)
            # -log2 p(b) = softplus(-logit) for a one, softplus(logit) for a zero; linear in b, so the
            # straight-through gradient of b is the log-odds: a bit is pushed toward its more probable value.
            nats = b * nn.functional.softplus(-logit) + (1 - b) * nn.functional.softplus(logit)
            total = total + nats.sum(dim=1) / np.log(2.0)
        return total

    def to_tables(self, info=None):
        """The integer tables the coder uses: round(sigmoid(logit) * 65536), clamped to 1..65535."""
        tables = []
        with torch.no_grad():
            for logit in self.logits:
                p = torch.sigmoid(logit.double()).cpu().numpy()
                tables.append(np.clip(np.rint(p * PROB_ONE), 1, PROB_ONE - 1).astype(np.uint16))
        return ContextModel(self.channels, tables, info)

