"""``latentlink train --lmbda``: a rate term (the context model's estimated bits) that makes the encoder spend less."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from latentlink.edge.context_model import ContextModel, count_contexts, tables_from_counts  # noqa: E402
from latentlink.export.data import list_images, read_bgr  # noqa: E402
from latentlink.export.models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from latentlink.export.rate import encoder_bits  # noqa: E402


def coded_bpp(checkpoint, photos_dir):
    """Bits per pixel of the photos at 64x64 under the real coder, with tables counted on those same bits."""
    model, _ = load_checkpoint(checkpoint)
    frames = [read_bgr(p) for p in list_images(photos_dir)]
    bits = list(encoder_bits(model, frames, 64, 64))
    counts = None
    for b in bits:
        counts = count_contexts(b, counts)
    tables = ContextModel(bits[0].shape[1], tables_from_counts(counts))
    return 8.0 * sum(len(tables.encode(b)) for b in bits) / (len(bits) * 64 * 64)


def test_lmbda_lowers_the_coded_rate_against_lmbda_0(tmp_path, photos_dir):
    from latentlink.cli import main

    torch.manual_seed(0)
    untrained = tmp_path / "untrained.pt"
    save_checkpoint(untrained, build_model("lossy-cae", encoder_channels=8, decoder_channels=8))
    common = ["--data", photos_dir, "--hparam", "encoder_channels=8", "--hparam", "decoder_channels=8",
              "--batch-size", "4", "--crop", "32", "--scales", "64", "--lr", "3e-3",
              "--stochastic-fraction", "0", "--val-every", "1000", "--val-split", "0.25", "--seed", "3",
              "--threads", "1"]
    # An untrained encoder's bits are mostly the dither pattern, nearly free to code: first learn some content.
    start = tmp_path / "start.pt"
    assert main(["train", "--out", str(start), "--init-from", str(untrained), "--steps", "30"] + common) == 0
    rates = {}
    for lmbda in ("0", "3"):
        out = tmp_path / "l{}.pt".format(lmbda)
        assert main(["train", "--out", str(out), "--init-from", str(start), "--lmbda", lmbda, "--steps", "60"]
                    + common) == 0
        _, meta = load_checkpoint(out)
        assert meta["lmbda"] == float(lmbda)
        rates[lmbda] = coded_bpp(out, photos_dir)
    before = coded_bpp(start, photos_dir)
    # The same start, seed and batches: only the rate term differs, and it cuts the rate by far more than noise
    # (measured here: 0.142 bpp at lmbda 0, 0.069 at lmbda 3, from 0.087 at the start; 0.110 at lmbda 1: the
    # rate model starts its tables at P = 1/2, where the rate term has no gradient, and learns them).
    assert rates["3"] < 0.7 * rates["0"], (before, rates)
    assert rates["3"] < before


def test_rate_model_gradient_pushes_bits_toward_their_probable_value():
    from latentlink.export.rate import RateModel

    rate = RateModel(4)
    with torch.no_grad():
        for logits in rate.logits:
            logits.fill_(-2.0)  # P(1) = 0.12 in every context: zero is the probable bit
    hard = (np.random.default_rng(0).random((2, 4, 8, 8)) < 0.2).astype(np.float32)
    bits = torch.from_numpy(hard).requires_grad_(True)
    total = rate(bits)
    ones = hard.reshape(2, -1).sum(axis=1)
    expected = (ones * np.log1p(np.exp(2.0)) + (4 * 8 * 8 - ones) * np.log1p(np.exp(-2.0))) / np.log(2.0)
    assert total.detach().numpy() == pytest.approx(expected, rel=1e-5)  # -log2 p summed over each image's bits
    total.sum().backward()
    # d total / d bit = the log-odds against a one = 2 / ln 2 for every bit: a step against it moves bits toward zero.
    assert bits.grad.numpy() == pytest.approx(np.full(hard.shape, 2.0 / np.log(2.0)), rel=1e-5)
