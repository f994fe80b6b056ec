"""Training images: folders of photos -> random crops at the scales the deployed model sees."""

from pathlib import Path

import cv2
import numpy as np

from latentlink.edge.cli import progress, warn
from latentlink.edge.errors import ConfigError
from latentlink.edge.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS


def list_images(folder):
    """Image files under ``folder`` (recursively), sorted by path. Videos there are not read: a warning names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if videos:
        warn(f"{len(videos)} video(s) under {str(folder)!r} are not read, only images are "
             f"({', '.join(p.name for p in videos[:3])}{', ...' if len(videos) > 3 else ''}); to use a video's frames, "
             f"save them as images first (e.g. ffmpeg -i clip.mp4 -vf fps=1 frames/%04d.png)")
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    return paths


def read_bgr(path):
    """An image file as a BGR uint8 array (H, W, 3), as OpenCV reads it; ConfigError if it does not decode."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f"cannot decode image {str(path)!r} (damaged, or not an image)")
    return image


def read_rgb(path):
    """An image file as an RGB uint8 array (H, W, 3)."""
    return cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2RGB)


def readable_images(paths, read=read_rgb, skipped=None):
    """Yield ``(path, image)`` for each of ``paths`` that decodes, one at a time. One that does not is skipped with
    a warning and appended to the list ``skipped``: a damaged file in a folder of photos must not end the run."""
    for path in paths:
        try:
            image = read(path)
        except ConfigError as exc:
            warn(f"skipping it: {exc}")
            if skipped is not None:
                skipped.append(path)
            continue
        yield path, image


def resize_short_side(image, short_side):
    """Resize so the shorter side is ``short_side`` pixels (area interpolation when shrinking)."""
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interp)


class CropSampler:
    """Random ``crop`` x ``crop`` RGB patches with horizontal flips, as float32 NCHW batches in [0, 1].

    Each photo is kept at every short-side size in ``scales`` (pixels), matching how a camera frame is shrunk to a
    profile's 504 or 1008 input, so the model trains on the detail level it will be deployed on.
    """

    def __init__(self, paths, crop=128, scales=(504, 1008), seed=0, skipped=None):
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        self.images = []
        self.paths = []  # the photos read (unreadable ones are skipped, and appended to ``skipped``)
        for path, rgb in readable_images(progress(paths, desc="reading photos", unit="photo"), skipped=skipped):
            self.paths.append(path)
            for s in scales:
                im = resize_short_side(rgb, s)
                if min(im.shape[:2]) >= crop:
                    self.images.append(im)
        if paths and not self.paths:
            raise ConfigError(f"none of the {len(paths)} training photos could be decoded (see the warnings above)")
        if not self.images:
            raise ConfigError(f"no image is at least {crop} pixels on its short side at scales {scales}")
        # Sample in proportion to area, so every region of every photo is equally likely.
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], dtype=np.float64)
        self.weights = areas / areas.sum()

    def batch(self, size):
        out = np.empty((size, self.crop, self.crop, 3), dtype=np.uint8)
        picks = self.rng.choice(len(self.images), size=size, p=self.weights)
        for i, k in enumerate(picks):
            im = self.images[k]
            y = self.rng.integers(0, im.shape[0] - self.crop + 1)
            x = self.rng.integers(0, im.shape[1] - self.crop + 1)
            patch = im[y:y + self.crop, x:x + self.crop]
            out[i] = patch[:, ::-1] if self.rng.random() < 0.5 else patch
        return to_batch(out)


def to_batch(images_hwc):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def centre_crop(image, size):
    """The central ``size`` x ``size`` square of an (H, W, 3) image (whole image if smaller)."""
    h, w = image.shape[:2]
    s = min(size, h, w) // 4 * 4
    y, x = (h - s) // 2, (w - s) // 2
    return image[y:y + s, x:x + s]
