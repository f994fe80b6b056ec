"""Frame sources opened from URIs, in the style Jetson users know from jetson-inference.

``open_source(uri)`` accepts::

    csi://0                      MIPI CSI camera through nvarguscamerasrc (GStreamer; scaled in hardware)
    v4l2:///dev/video0, v4l2://0 USB / V4L2 camera
    file://clip.mp4, file:///data/clip.mp4, clip.mp4       video file (relative, absolute or bare path)
    file://photos/, file://photo.jpg                       folder of images (sorted by name) or one image
    synthetic://, synthetic://640x480                      deterministic moving test pattern (infinite)
    rtsp://..., http://..., https://...                    network camera

Every source yields ``(frame, t_capture)``: ``frame`` is a C-contiguous uint8 HxWx3 BGR array at the source's native
size (not resized here), ``t_capture`` is ``time.time()`` (seconds) right after the frame arrived. Finite sources
return ``None`` when exhausted unless opened with ``loop=True``. File sources are not paced to their frame rate.
Runs on Python 3.6 + numpy 1.19 + OpenCV 4.1.1 (JetPack) as well as current versions.
"""

import logging
import numbers
import os
import re
import time

# FFmpeg, inside OpenCV, prints its own errors (a refused rtsp:// connection: "[tcp @ 0x...] Connection to
# tcp://... failed") before OpenCV returns and our one-line message can say what to do. Only fatal ones, unless the
# user sets the variable (OPENCV_FFMPEG_LOGLEVEL=32 shows everything); OpenCV reads it when it first uses FFmpeg.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from .errors import SourceError  # noqa: E402

log = logging.getLogger("latentlink.edge.sources")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Not read from a folder (a folder source plays its images); named in a warning so they are not ignored silently.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".wmv", ".flv",
                    ".h264", ".h265", ".mjpeg", ".mjpg")
ACCEPTED_FORMS = "csi://N, v4l2:///dev/videoN, file://PATH, synthetic://, rtsp://..."

_CSI_PIPELINE = (
    "nvarguscamerasrc sensor-id={sensor_id} ! video/x-raw(memory:NVMM), width=1920, height=1080, "
    "framerate={fps}/1 ! nvvidconv flip-method=0 ! video/x-raw, width={width}, height={height}, format=BGRx ! "
    "videoconvert ! video/x-raw, format=BGR ! appsink drop=1"
)


class FrameSource(object):
    """Base class: lifecycle (read / close / context manager / iteration) shared by every source.

    Attributes: ``uri`` (as given, password redacted), ``description`` (human readable), ``nominal_fps`` (frames per
    second the source claims, float, or None when unknown or unpaced).
    """

    def __init__(self, uri, description, nominal_fps=None):
        self.uri = _redact(uri)
        self.description = description
        self.nominal_fps = float(nominal_fps) if nominal_fps else None
        self.closed = False

    def read(self):
        """Return ``(frame, t_capture)``, or None when a finite source is exhausted."""
        if self.closed:
            raise SourceError("source {!r} is closed; open it again with open_source()".format(self.uri))
        frame = self._next_frame()
        t_capture = time.time()
        if frame is None:
            return None
        return _to_bgr8(frame, self.description), t_capture

    def close(self):
        """Release the device or file; further reads raise SourceError. Safe to call twice."""
        if not self.closed:
            self.closed = True
            self._release()

    def _next_frame(self):
        raise NotImplementedError

    def _release(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __iter__(self):
        while True:
            item = self.read()
            if item is None:
                return
            yield item

    def __repr__(self):
        return "<{} {}>".format(type(self).__name__, self.description)


class ImageSource(FrameSource):
    """One image or a folder of images, decoded one per read (a single image is decoded once, at open).

    In a folder, an image that does not decode is skipped with a warning and counted in ``skipped`` (its paths);
    a folder none of whose images decode raises SourceError. ``current_path``: the image the last read returned.
    """

    def __init__(self, uri, paths, description, loop=False):
        FrameSource.__init__(self, uri, description)
        self.paths = list(paths)
        self.loop = loop
        self._index = 0
        self._single = _read_image(self.paths[0]) if len(self.paths) == 1 else None
        self.current_path = None
        self.skipped = []

    def _next_frame(self):
        failures = 0  # in a row: a whole pass of them means no image decodes
        while True:
            if self._index >= len(self.paths):
                if not self.loop:
                    return None
                self._index = 0
            path = self.paths[self._index]
            self._index += 1
            if self._single is not None:
                self.current_path = path
                return self._single.copy()
            try:
                frame = _read_image(path)
            except SourceError as exc:
                failures += 1
                if path not in self.skipped:
                    self.skipped.append(path)
                    log.warning("%s: skipping it (%d unreadable of %d images so far)", exc, len(self.skipped),
                                len(self.paths))
                if failures >= len(self.paths):
                    raise SourceError("none of the {} images of {} decodes; replace them with images OpenCV reads "
                                      "({})".format(len(self.paths), self.description, " ".join(IMAGE_EXTENSIONS)))
                continue
            self.current_path = path
            return frame


class VideoFileSource(FrameSource):
    """A video file decoded with ``cv2.VideoCapture(path)``; ``loop=True`` reopens it at the end."""

    def __init__(self, uri, path, loop=False):
        self.path = path
        self.loop = loop
        self._cap = self._open()
        width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        details = ["{}x{}".format(width, height)]
        if fps and fps > 0:
            details.append("{:.1f} fps".format(fps))
        if count > 0:
            details.append("{} frames".format(count))
        description = "video {} ({})".format(os.path.basename(path), ", ".join(details))
        FrameSource.__init__(self, uri, description, fps if fps and fps > 0 else None)
        self._delivered = 0

    def _open(self):
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            raise SourceError("could not open video {!r}: not a video, or this OpenCV has no decoder for it "
                              "(see FFMPEG/GStreamer in cv2.getBuildInformation())".format(self.path))
        return cap

    def _next_frame(self):
        ok, frame = self._cap.read()
        if ok and frame is not None:
            self._delivered += 1
            return frame
        if not self.loop:
            return None
        if self._delivered == 0:
            raise SourceError("video {!r} has no decodable frames; re-encode it (e.g. ffmpeg -i IN -c:v libx264 "
                              "OUT.mp4)".format(self.path))
        self._cap.release()
        self._cap = self._open()
        self._delivered = 0
        return self._next_frame()

    def _release(self):
        self._cap.release()


class CameraSource(FrameSource):
    """A live camera (CSI, V4L2, network); a failed read is retried, then raises SourceError."""

    read_retries = 5  # failed reads in a row before giving up
    retry_delay_s = 0.2  # pause between retries, seconds

    def __init__(self, uri, cap, description, nominal_fps=None):
        FrameSource.__init__(self, uri, description, nominal_fps)
        self._cap = cap

    def _next_frame(self):
        for attempt in range(self.read_retries + 1):
            ok, frame = self._cap.read()
            if ok and frame is not None:
                return frame
            if attempt < self.read_retries:
                time.sleep(self.retry_delay_s)
        raise SourceError("camera stopped delivering frames: {} failed {} reads in a row; check the cable / "
                          "network and that no other process uses it".format(self.description, self.read_retries + 1))

    def _release(self):
        self._cap.release()


class SyntheticSource(FrameSource):
    """Deterministic moving test pattern: colour bars over a grey ramp, shifted right by i pixels in frame i, with a
    white square moving diagonally. Infinite and unpaced."""

    def __init__(self, uri, width=640, height=480):
        FrameSource.__init__(self, uri, "synthetic test pattern ({}x{})".format(width, height))
        self.width, self.height = width, height
        bars = np.array([[255, 255, 255], [0, 255, 255], [255, 255, 0], [0, 255, 0],
                         [255, 0, 255], [0, 0, 255], [255, 0, 0]], dtype=np.uint8)  # BGR
        columns = np.arange(width) * len(bars) // width
        base = np.empty((height, width, 3), dtype=np.uint8)
        base[: height // 2] = bars[columns][None, :, :]
        ramp = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)
        base[height // 2:] = ramp[None, :, None]
        self._base = base
        self._square = max(min(width, height) // 8, 2)
        self._index = 0

    def _next_frame(self):
        i, s = self._index, self._square
        self._index += 1
        frame = np.roll(self._base, i % self.width, axis=1)
        x = (2 * i) % (self.width - s + 1)
        y = i % (self.height - s + 1)
        frame[y:y + s, x:x + s] = 255
        return frame


def csi_pipeline(sensor_id, width, height, fps):
    """GStreamer pipeline for CSI camera ``sensor_id``: 1920x1080 at ``fps`` (integer frames/s) from the sensor,
    scaled by nvvidconv to ``width`` x ``height`` BGR pixels; appsink drops stale frames."""
    if int(fps) != fps or fps <= 0:
        raise SourceError("CSI capture fps must be a positive whole number, got {!r}; use e.g. 30".format(fps))
    return _CSI_PIPELINE.format(sensor_id=int(sensor_id), width=int(width), height=int(height), fps=int(fps))


def open_source(uri, capture_width=1280, capture_height=720, capture_fps=30, loop=False):
    """Open ``uri`` (see the module docstring) and return a :class:`FrameSource`.

    ``capture_width`` / ``capture_height`` (pixels) and ``capture_fps`` (frames/s) apply to cameras only (csi, v4l2);
    ``loop=True`` restarts finite sources (files, folders, images) instead of ending.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError("source must be a non-empty string, got {!r} (expected {})".format(uri, ACCEPTED_FORMS))
    for name, value in (("capture_width", capture_width), ("capture_height", capture_height),
                        ("capture_fps", capture_fps)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
            raise SourceError("{} must be a positive number, got {!r}".format(name, value))
    uri = uri.strip()
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "csi":
        return _open_csi(uri, rest, capture_width, capture_height, capture_fps)
    if scheme == "v4l2":
        return _open_v4l2(uri, rest, capture_width, capture_height, capture_fps)
    if scheme == "file":
        return _open_path(uri, rest, loop)
    if scheme == "synthetic":
        return _open_synthetic(uri, rest)
    if scheme in ("rtsp", "rtsps", "http", "https"):
        cap = cv2.VideoCapture(uri)
        if not cap.isOpened():
            raise SourceError("could not open network stream {!r}; check the address, credentials and that the "
                              "camera is reachable (e.g. ffplay or VLC on the same URL)".format(_redact(uri)))
        return CameraSource(uri, cap, "network stream {}".format(_redact(uri)), _positive(cap.get(cv2.CAP_PROP_FPS)))
    if not sep and (os.path.exists(os.path.expanduser(uri)) or "/" in uri or os.path.splitext(uri)[1]):
        return _open_path(uri, uri, loop)  # missing but path-like: "no such file"
    raise SourceError("unknown source {!r} (expected {})".format(_redact(uri), ACCEPTED_FORMS))


def _open_csi(uri, rest, width, height, fps):
    if not _is_index(rest):
        raise SourceError("bad CSI camera {!r}: expected csi://N with N the sensor id, e.g. csi://0".format(uri))
    if not _has_gstreamer():
        raise SourceError(
            "cannot open {!r}: this OpenCV ({}) was built without GStreamer, which csi:// cameras need. On a Jetson "
            "the usual cause is a pip opencv-python shadowing JetPack's OpenCV; remove it with "
            "`pip3 uninstall opencv-python opencv-python-headless`".format(uri, cv2.__version__))
    pipeline = csi_pipeline(int(rest), width, height, fps)
    cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        raise SourceError("could not open CSI camera {!r} with pipeline {!r}; check the ribbon cable and sensor id, "
                          "and if another process held the camera run `sudo systemctl restart nvargus-daemon`"
                          .format(uri, pipeline))
    description = "CSI camera {} ({}x{} @ {} fps)".format(int(rest), int(width), int(height), int(fps))
    return CameraSource(uri, cap, description, fps)


def _open_v4l2(uri, rest, width, height, fps):
    if _is_index(rest):
        target, device = int(rest), "/dev/video" + rest
    elif rest.startswith("/"):
        target = device = rest
    else:
        raise SourceError("bad V4L2 camera {!r}: expected v4l2:///dev/videoN or v4l2://N".format(uri))
    if not _device_exists(device):
        raise SourceError("no V4L2 device {!r} (from {!r}); list the cameras with `v4l2-ctl --list-devices`"
                          .format(device, uri))
    cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
    if not cap.isOpened():
        raise SourceError("could not open V4L2 device {!r}; is it a capture device, busy in another process, or "
                          "not readable by this user (group 'video')? See `v4l2-ctl --list-devices`".format(device))
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    cap.set(cv2.CAP_PROP_FPS, fps)
    got_w, got_h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    got_fps = _positive(cap.get(cv2.CAP_PROP_FPS)) or float(fps)
    description = "V4L2 camera {} ({}x{} @ {:.1f} fps)".format(device, got_w, got_h, got_fps)
    return CameraSource(uri, cap, description, got_fps)


def _open_path(uri, path, loop):
    if not path:
        raise SourceError("empty path in {!r}; use file://PATH, e.g. file://clip.mp4 or file:///data/photos/"
                          .format(uri))
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        names = [n for n in files if _is_image_name(n)]
        videos = [n for n in files if os.path.splitext(n)[1].lower() in VIDEO_EXTENSIONS]
        if videos and not names:
            raise SourceError("no images in folder {!r}, but {} video(s): a folder source plays images; give a "
                              "video itself, e.g. --source file://{}".format(path, len(videos),
                                                                             os.path.join(path, videos[0])))
        if not names:
            raise SourceError("no images in folder {!r} (looked for {}); put images there or point at a video"
                              .format(path, " ".join(IMAGE_EXTENSIONS)))
        if videos:
            log.warning("folder %s: playing its %d images; its %d video(s) are not played (%s). A video is a source "
                        "of its own: --source file://%s", path, len(names), len(videos), ", ".join(videos[:3]) +
                        (", ..." if len(videos) > 3 else ""), os.path.join(path, videos[0]))
        description = "image folder {} ({} images)".format(path, len(names))
        return ImageSource(uri, [os.path.join(path, n) for n in names], description, loop)
    if not os.path.exists(path):
        raise SourceError("no such file {!r} (from {!r}); check the path (relative paths start from {!r})"
                          .format(path, uri, os.getcwd()))
    if _is_image_name(path):
        source = ImageSource(uri, [path], "image " + os.path.basename(path), loop)
        height, width = source._single.shape[:2]
        source.description += " ({}x{})".format(width, height)
        return source
    return VideoFileSource(uri, path, loop)


def _open_synthetic(uri, rest):
    size = rest or "640x480"
    match = re.match(r"^(\d+)x(\d+)$", size)
    if not match or not (8 <= int(match.group(1)) <= 16384 and 8 <= int(match.group(2)) <= 16384):
        raise SourceError("bad synthetic size {!r} in {!r}; use synthetic://WxH with 8..16384 pixels each, e.g. "
                          "synthetic://640x480".format(size, uri))
    return SyntheticSource(uri, int(match.group(1)), int(match.group(2)))


def _read_image(path):
    """Decode one image (keeping 16-bit depth; EXIF orientation applied); SourceError if it cannot be decoded."""
    image = cv2.imread(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image is None:
        raise SourceError("could not decode image {!r}; the file is damaged or not an image, remove or replace it"
                          .format(path))
    return _to_bgr8(image, path)


def _to_bgr8(image, name):
    """Return ``image`` as C-contiguous uint8 HxWx3 BGR: grey and BGRA are converted, 16-bit scaled by 1/257,
    float assumed in [0, 1]."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError("unsupported pixel type {} in {!r}; convert it to 8- or 16-bit".format(image.dtype, name))
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise SourceError("unsupported channel count {} in {!r}; use grey, BGR or BGRA images".format(channels, name))
    return np.ascontiguousarray(image)


def _has_gstreamer():
    """True when cv2.getBuildInformation() reports GStreamer YES (OpenCV 3.x puts it on the next 'base:' line)."""
    lines = cv2.getBuildInformation().splitlines()
    for i, line in enumerate(lines):
        name, _, value = line.strip().partition(":")
        if name.strip() == "GStreamer":
            value = value.strip()
            if not value and i + 1 < len(lines):
                value = lines[i + 1].partition(":")[2].strip()
            return value.upper().startswith("YES")
    return False


def _is_index(text):
    return re.match(r"^[0-9]+$", text) is not None


def _device_exists(path):
    return os.path.exists(path)


def _is_image_name(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _positive(value):
    return float(value) if value and value > 0 else None


def _redact(uri):
    """Hide the password of ``scheme://user:password@host`` URIs in messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*:)[^/@]*@", r"\1***@", uri)
