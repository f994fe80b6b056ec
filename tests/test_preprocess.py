import numpy as np
import pytest

from latentlink.edge.errors import ConfigError
from latentlink.edge.preprocess import FIT_MODES, Preprocessor, fit_frame, psnr, to_image


def gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x % 256, y % 256, (x + y) % 256]).astype(np.uint8)


@pytest.mark.parametrize("fit", FIT_MODES)
@pytest.mark.parametrize("size", [(480, 640), (640, 480), (100, 100), (37, 53)])
def test_fit_gives_the_input_size_deterministically(fit, size):
    frame = gradient(*size)
    out = fit_frame(frame, 64, 48, fit)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, fit_frame(frame.copy(), 64, 48, fit))


def test_center_crop_keeps_the_centre():
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, 100:200] = 255  # the central square is white, the sides black
    assert fit_frame(frame, 50, 50, "center-crop").min() == 255


def test_pad_adds_black_bars_and_keeps_everything():
    frame = np.full((100, 200, 3), 200, np.uint8)
    out = fit_frame(frame, 100, 100, "pad")
    assert out[:25].max() == 0 and out[75:].max() == 0 and out[30:70].min() == 200


def test_same_size_is_untouched():
    frame = gradient(48, 64)
    assert np.array_equal(fit_frame(frame, 64, 48, "center-crop"), frame)


def test_unknown_fit_names_the_choices():
    with pytest.raises(ConfigError, match="'stretch'.*center-crop"):
        fit_frame(gradient(10, 10), 8, 8, "stretch")


def test_preprocessor_layout_range_and_inverse():
    frame = gradient(48, 64)
    tensor = Preprocessor(64, 48)(frame)
    assert tensor.shape == (1, 3, 48, 64) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    # Channel 0 is red: the frame is BGR, so red is frame[..., 2].
    assert np.allclose(tensor[0, 0] * 255, frame[..., 2])
    assert np.array_equal(to_image(tensor), frame)  # exact 8-bit round trip


def test_to_image_clips_out_of_range_outputs():
    out = np.full((1, 3, 2, 2), 1.7, np.float32)
    out[0, 1] = -0.3
    image = to_image(out)
    assert image[..., 2].min() == 255 and image[..., 1].max() == 0


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf")
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / (255 ** 2 / 48)))
