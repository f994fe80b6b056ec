import json

import cv2
import pytest

from edge.profile import load_profile
from export.evaluate import codec_at_budget, evaluate


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_codec_at_budget_is_the_best_quality_within_the_budget(photos_dir, codec):
    image = cv2.imread(photos_dir + "/coffee.png")
    quality, size, decoded = codec_at_budget(image, codec, 4000)
    assert size <= 4000 and decoded.shape == image.shape
    if quality < 100:  # one step up would not fit
        ext, flag = {"jpeg": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY)}[codec]
        assert len(cv2.imencode(ext, image, [flag, quality + 1])[1]) > 4000


def test_evaluate_measures_the_deployed_path(tiny_profile, photos_dir):
    profile = load_profile(tiny_profile)
    rows = evaluate(photos_dir, profile, profile.model.encoder, profile.model.decoder, codecs=("jpeg",))
    assert len(rows) == 4
    for row in rows:
        # 8 x 16 x 16 bits = 256 bytes plus the frame header, over 64 x 64 pixels.
        assert 0.5 < row["model"]["bpp"] < 0.5 + 8 * 200 / 64 ** 2
        assert row["jpeg"]["bytes"] <= row["model"]["bytes"] or row["jpeg"]["quality"] == 1
        assert row["model"]["psnr"] > 0


def test_eval_command_writes_json(tiny_profile, photos_dir, tmp_path, capsys):
    from latentlink.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--photos", photos_dir, "--profile", tiny_profile, "--json", str(out)]) == 0
    assert "mean" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["results"]) == 4
