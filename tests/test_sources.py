"""Tests of edge.sources with real media written to tmp_path (small frames, few frames) and fake cameras."""

import os

import cv2
import numpy as np
import pytest

from latentlink.edge import sources
from latentlink.edge.errors import LatentlinkError, SourceError
from latentlink.edge.sources import csi_pipeline, open_source

RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)
VIDEO_FRAMES = 6
VIDEO_SIZE = (64, 48)  # width, height


def check_frame(item):
    """Assert the read() contract and return the frame."""
    assert item is not None
    frame, t_capture = item
    assert isinstance(frame, np.ndarray)
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.flags["C_CONTIGUOUS"]
    assert isinstance(t_capture, float) and t_capture > 1e9
    return frame


def read_all(source, limit=50):
    frames = []
    for _ in range(limit):
        item = source.read()
        if item is None:
            return frames
        frames.append(check_frame(item))
    raise AssertionError("source did not end after {} frames".format(limit))


def mean_colour(frame):
    return tuple(int(round(c)) for c in frame.reshape(-1, 3).mean(axis=0))


def close_to(frame, bgr, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(mean_colour(frame), bgr))


def flat(width, height, bgr):
    image = np.empty((height, width, 3), np.uint8)
    image[:] = bgr
    return image


@pytest.fixture
def photos(tmp_path):
    """A folder: 4 images of different sizes/kinds (names chosen so name order is a, b, c, d) + ignored files."""
    folder = tmp_path / "photos"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a_red.png"), flat(40, 30, RED))
    assert cv2.imwrite(str(folder / "b_green.JPG"), flat(48, 24, GREEN))
    assert cv2.imwrite(str(folder / "c_grey.png"), np.full((20, 36), 100, np.uint8))
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[:] = (255, 0, 0, 128)
    assert cv2.imwrite(str(folder / "d_rgba.png"), rgba)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"resource fork junk")
    (folder / "sub.png").mkdir()
    return folder


@pytest.fixture
def video(tmp_path):
    """A short video: frame i is flat grey 30*i + 20."""
    width, height = VIDEO_SIZE
    for fourcc, name in (("mp4v", "clip.mp4"), ("MJPG", "clip.avi")):
        path = tmp_path / name
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (width, height))
        if writer.isOpened():
            break
    assert writer.isOpened(), "no VideoWriter codec available (tried mp4v and MJPG)"
    for i in range(VIDEO_FRAMES):
        writer.write(flat(width, height, (30 * i + 20,) * 3))
    writer.release()
    return path


def test_folder_in_name_order_with_conversions(photos):
    with open_source("file://" + str(photos)) as source:
        assert source.nominal_fps is None
        assert "4 images" in source.description
        frames = read_all(source)
    assert [f.shape[:2] for f in frames] == [(30, 40), (24, 48), (20, 36), (16, 32)]
    assert close_to(frames[0], RED) and close_to(frames[1], GREEN)
    assert mean_colour(frames[2]) == (100, 100, 100)  # grey -> 3 equal channels
    assert mean_colour(frames[3]) == BLUE  # alpha dropped


def test_folder_loop_wraps_around(photos):
    source = open_source(str(photos), loop=True)
    frames = [check_frame(source.read()) for _ in range(6)]
    assert [f.shape[:2] for f in frames[4:]] == [(30, 40), (24, 48)]
    source.close()


def test_single_image_once_or_looped(photos):
    path = str(photos / "a_red.png")
    with open_source(path) as source:
        assert source.description == "image a_red.png (40x30)"
        assert close_to(check_frame(source.read()), RED)
        assert source.read() is None
        assert source.read() is None
    with open_source(path, loop=True) as source:
        first, second = check_frame(source.read()), check_frame(source.read())
        first[:] = 0  # frames are independent copies
        assert close_to(second, RED) and close_to(check_frame(source.read()), RED)


def test_sixteen_bit_image_scaled_to_eight_bit(tmp_path):
    image = np.zeros((8, 8, 3), np.uint16)
    image[:4] = 65535
    image[4:] = 100 * 257
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), image)
    frame = check_frame(open_source(str(path)).read())
    assert frame[0, 0].tolist() == [255] * 3 and frame[7, 7].tolist() == [100] * 3


def test_video_frame_count_shape_and_order(video):
    with open_source(str(video)) as source:
        assert source.description.startswith("video " + video.name + " (64x48")
        assert source.nominal_fps == pytest.approx(10.0)
        frames = read_all(source)
        assert source.read() is None
    assert len(frames) == VIDEO_FRAMES
    assert all(f.shape == (48, 64, 3) for f in frames)
    greys = [mean_colour(f)[1] for f in frames]
    assert all(abs(g - (30 * i + 20)) <= 8 for i, g in enumerate(greys)), greys


def test_video_loop_wraps_around(video):
    with open_source(str(video), loop=True) as source:
        frames = [check_frame(source.read()) for _ in range(VIDEO_FRAMES + 2)]
    assert abs(mean_colour(frames[VIDEO_FRAMES])[1] - 20) <= 8  # back at frame 0


def test_relative_absolute_and_bare_uris(photos, video, monkeypatch):
    monkeypatch.chdir(str(video.parent))
    for uri in ("file://" + video.name, "file://" + str(video), video.name, str(video)):
        with open_source(uri) as source:
            assert isinstance(source, sources.VideoFileSource), uri
            assert source.uri == uri
            check_frame(source.read())
    assert str(video).startswith("/") and ("file://" + str(video)).startswith("file:///")
    for uri in ("file://photos/", "file://photos", "photos/", "file://" + str(photos) + "/"):
        with open_source(uri) as source:
            assert len(read_all(source)) == 4, uri
    with open_source("file://photos/a_red.png") as source:
        assert close_to(check_frame(source.read()), RED)


def test_synthetic_is_deterministic_and_moving():
    a, b = open_source("synthetic://"), open_source("synthetic://")
    frames_a = [check_frame(a.read()) for _ in range(3)]
    frames_b = [check_frame(b.read()) for _ in range(3)]
    assert frames_a[0].shape == (480, 640, 3)
    assert not np.array_equal(frames_a[0], frames_a[1])
    assert not np.array_equal(frames_a[1], frames_a[2])
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
    small = open_source("synthetic://32x24")
    assert check_frame(small.read()).shape == (24, 32, 3)
    assert "32x24" in small.description


@pytest.mark.parametrize("uri", ["synthetic://abc", "synthetic://0x0", "synthetic://640x"])
def test_synthetic_bad_size(uri):
    with pytest.raises(SourceError, match=uri.split("://")[1]):
        open_source(uri)


def test_csi_pipeline_string():
    assert csi_pipeline(1, 640, 360, 21) == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM), width=1920, height=1080, framerate=21/1 ! "
        "nvvidconv flip-method=0 ! video/x-raw, width=640, height=360, format=BGRx ! videoconvert ! "
        "video/x-raw, format=BGR ! appsink drop=1")
    with pytest.raises(SourceError, match="29.97"):
        csi_pipeline(0, 640, 360, 29.97)


def test_csi_without_gstreamer_explains_pip_opencv(monkeypatch):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  Video I/O:\n    FFMPEG:  YES\n    GStreamer:  NO\n")
    with pytest.raises(SourceError) as info:
        open_source("csi://0")
    message = str(info.value)
    assert "csi://0" in message and "GStreamer" in message and "opencv-python" in message


class FakeCapture(object):
    """Stands in for cv2.VideoCapture: records its arguments, delivers `good` frames then fails."""

    instances = []

    def __init__(self, *args):
        self.args, self.props, self.released, self.reads = args, {}, False, 0
        self.good = 2
        FakeCapture.instances.append(self)

    def isOpened(self):
        return True

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def get(self, prop):
        return self.props.get(prop, 0.0)

    def read(self):
        self.reads += 1
        if self.reads > self.good:
            return False, None
        return True, np.zeros((4, 6, 3), np.uint8)

    def release(self):
        self.released = True


@pytest.fixture
def fake_capture(monkeypatch):
    FakeCapture.instances = []
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    monkeypatch.setattr(sources.CameraSource, "retry_delay_s", 0.0)
    return FakeCapture


def test_csi_opens_the_pipeline_and_gives_up_after_retries(monkeypatch, fake_capture):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "    GStreamer:                   YES (1.14.5)\n")
    with open_source("csi://0", capture_width=640, capture_height=360, capture_fps=30) as source:
        assert fake_capture.instances[0].args == (csi_pipeline(0, 640, 360, 30), cv2.CAP_GSTREAMER)
        assert source.nominal_fps == 30.0
        check_frame(source.read())
        check_frame(source.read())
        with pytest.raises(SourceError, match="stopped delivering frames"):
            source.read()
        assert fake_capture.instances[0].reads == 2 + 1 + sources.CameraSource.read_retries
    assert fake_capture.instances[0].released


def test_opencv3_style_gstreamer_section(monkeypatch):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "    GStreamer:\n      base:   YES (ver 1.0)\n")
    assert sources._has_gstreamer()


def test_v4l2_sets_capture_size(monkeypatch, fake_capture):
    monkeypatch.setattr(sources, "_device_exists", lambda path: path == "/dev/video0")
    source = open_source("v4l2://0", capture_width=320, capture_height=240, capture_fps=15)
    cap = fake_capture.instances[0]
    assert cap.args == (0, cv2.CAP_V4L2)
    assert cap.props == {cv2.CAP_PROP_FRAME_WIDTH: 320, cv2.CAP_PROP_FRAME_HEIGHT: 240, cv2.CAP_PROP_FPS: 15}
    assert source.description == "V4L2 camera /dev/video0 (320x240 @ 15.0 fps)"
    open_source("v4l2:///dev/video0")
    assert fake_capture.instances[1].args == ("/dev/video0", cv2.CAP_V4L2)


@pytest.mark.parametrize("uri", ["v4l2:///dev/video987", "v4l2://987"])
def test_v4l2_missing_device(uri):
    with pytest.raises(SourceError, match="v4l2-ctl --list-devices") as info:
        open_source(uri)
    assert "/dev/video987" in str(info.value)


def test_network_stream_not_opened_hides_password(monkeypatch):
    class Closed(FakeCapture):
        def isOpened(self):
            return False

    monkeypatch.setattr(cv2, "VideoCapture", Closed)
    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:secret@10.0.0.9:554/stream1")
    assert "rtsp://admin:***@10.0.0.9:554/stream1" in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize("uri", ["cam0", "foo://bar", "csi://x", "v4l2://cam"])
def test_unknown_or_malformed_uri(uri):
    with pytest.raises(SourceError) as info:
        open_source(uri)
    assert repr(uri) in str(info.value)


def test_unknown_source_lists_accepted_forms():
    with pytest.raises(SourceError, match=r"unknown source 'cam0' \(expected csi://N, v4l2:///dev/videoN"):
        open_source("cam0")


@pytest.mark.parametrize("uri", ["file://nope.mp4", "nope/clip.mp4", "file:///no/such/dir/"])
def test_missing_file(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))
    with pytest.raises(SourceError, match="no such file") as info:
        open_source(uri)
    assert uri.replace("file://", "") in str(info.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(SourceError, match="no images in folder") as info:
        open_source("file://" + str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)


def test_undecodable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(SourceError, match="bad.png"):
        open_source(str(bad))



def test_an_undecodable_image_in_a_folder_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), flat(8, 8, RED))
    (folder / "b.png").write_bytes(b"garbage")
    assert cv2.imwrite(str(folder / "c.png"), flat(8, 8, BLUE))
    with caplog.at_level("WARNING", logger="latentlink.edge.sources"):
        with open_source(str(folder)) as source:
            frames = [(frame[0, 0].tolist(), source.current_path) for frame, _ in source]
    assert frames == [(list(RED), str(folder / "a.png")), (list(BLUE), str(folder / "c.png"))]
    assert source.skipped == [str(folder / "b.png")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "b.png" in warnings[0] and "skipping it (1 unreadable of 3 images" in warnings[0]


def test_a_looping_folder_warns_once_per_bad_image_and_fails_when_none_decodes(tmp_path, caplog):
    folder = tmp_path / "loop"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), flat(8, 8, RED))
    (folder / "b.png").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="latentlink.edge.sources"):
        with open_source(str(folder), loop=True) as source:
            for _ in range(5):
                check_frame(source.read())
    assert len([r for r in caplog.records if "b.png" in r.getMessage()]) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"garbage")
    with open_source(str(broken), loop=True) as source:
        with pytest.raises(SourceError, match="none of the 2 images"):
            source.read()


def test_videos_in_an_image_folder_are_named_not_ignored(tmp_path, caplog, video_file):
    import shutil

    folder = tmp_path / "media"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a.png"), flat(8, 8, RED))
    shutil.copy(video_file, str(folder / "clip.avi"))
    with caplog.at_level("WARNING", logger="latentlink.edge.sources"):
        open_source("file://" + str(folder)).close()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "1 video(s) are not played (clip.avi)" in message and "--source file://" in message
    os.remove(str(folder / "a.png"))
    with pytest.raises(SourceError, match="no images in folder .*, but 1 video.*give a video itself"):
        open_source("file://" + str(folder))


def test_unopenable_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(SourceError, match="junk.mp4"):
        open_source(str(junk))


def test_bad_capture_settings_and_closed_source():
    with pytest.raises(SourceError, match="capture_width.*-1"):
        open_source("synthetic://", capture_width=-1)
    source = open_source("synthetic://16x16")
    source.close()
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.read()
    assert issubclass(SourceError, LatentlinkError)


def test_iteration_yields_until_exhausted(photos):
    with open_source(str(photos)) as source:
        assert len([check_frame(item) for item in source]) == 4


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        sources.FrameSource("x://", "x").read()
