"""The host's outputs (--out URIs: folders, MP4 videos, display), its live view (--view, checked in a real
headless Chromium) and its Prometheus metrics (--metrics), with frames sent over TCP to a real host."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from latentlink.edge.errors import ConfigError
from latentlink.edge.protocol import encode_end_of_stream, encode_frame
from latentlink.host.outputs import open_outputs, parse_output

from .conftest import ROOT, TINY, running_host

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def latents(seed):
    return (np.random.default_rng(seed).random((1, 8, TINY // 4, TINY // 4)) > 0.5).astype(np.float32)


def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def send(address, frames):
    """Send protocol-1 frames ``[(stream, seq, latents)]`` on one connection (closed afterwards)."""
    with socket.create_connection(tuple(address), timeout=10) as sock:
        for stream, seq, array in frames:
            sock.sendall(encode_frame(stream, seq, time.time(), array, "bits"))


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def count_video_frames(path):
    capture = cv2.VideoCapture(path)
    assert capture.isOpened(), path
    frames, size = 0, None
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames, size = frames + 1, image.shape
    capture.release()
    return frames, size


# URIs.
def test_uris_name_folders_videos_and_the_display(tmp_path):
    folder = str(tmp_path / "frames")
    assert parse_output(folder).kind == "folder" and parse_output(folder).path == folder
    assert parse_output("file://" + folder + "/").path == folder + "/"
    video = parse_output("file://{}/out.mp4?fps=12.5".format(tmp_path))
    assert (video.kind, video.path, video.fps) == ("video", str(tmp_path / "out.mp4"), 12.5)
    assert parse_output("display://0").kind == "display"
    opened = open_outputs([folder, "file://{}/more/".format(tmp_path), "file://{}/out.mp4".format(tmp_path)], fps=7)
    try:
        assert opened.out_dir == folder and not opened.display  # the first folder: PNGs and the journal
        assert [type(o).__name__ for o in opened.outputs] == ["FolderOutput", "VideoOutput"]
        assert opened.outputs[1].fps == 7.0  # the profile's capture fps where the URI gives none
        assert opened.outputs[1].video_path("cam0") == str(tmp_path / "out-cam0.mp4")
    finally:
        opened.close()


@pytest.mark.parametrize("uri, message", [
    ("rtp://192.168.1.2:5000", "unknown output scheme rtp://; supported: file://DIR/ (PNG frames), "
                               "file://NAME.mp4 (one video per stream), display://0 (a window)"),
    ("webrtc://localhost/view", "unknown output scheme webrtc://"),
    ("file://{file}", "--out {file}: a file of that name is in the way; give a folder"),
    ("{file}", "--out {file}: a file of that name is in the way; give a folder"),
    ("file://{file}/sub/", "is a file, so no folder can be made there"),
    ("file://{tmp}/missing/out.mp4", "the folder {tmp}/missing does not exist; create it first"),
    ("file://{tmp}/out.mp4?fps=0", "bad fps '0'"),
    ("file://{tmp}/out.mp4?speed=2", "unknown option 'speed'; a video takes ?fps=N"),
    ("file://{tmp}/out.avi", "only .mp4 videos are written"),
    ("file://{tmp}/dir.mp4", "is a folder; give a video file name"),
    ("display://1", "only display://0"),
    ("file://", "no path"),
])
def test_bad_uris_are_clear_errors(tmp_path, uri, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.mp4").mkdir()
    fill = dict(tmp=str(tmp_path), file=str(tmp_path / "file"))
    with pytest.raises(ConfigError) as err:
        open_outputs([uri.format(**fill)])
    assert message.format(**fill) in str(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in any folder")
def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for uri in ("file://{}/frames/".format(locked), "file://{}/out.mp4".format(locked)):
            with pytest.raises(ConfigError, match="this user may not write in"):
                open_outputs([uri])
    finally:
        locked.chmod(0o700)


def test_the_same_output_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="are the same output; give it once"):
        open_outputs([str(tmp_path / "f"), "file://{}/f/".format(tmp_path)])


def test_display_needs_a_screen(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ConfigError, match="needs a screen, and DISPLAY is not set.*--view HOST:PORT"):
        open_outputs(["display://0"])


def test_display_without_gui_opencv_is_the_existing_message(monkeypatch):
    def no_gui(name):
        raise cv2.error("The function is not implemented")

    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setattr(cv2, "namedWindow", no_gui)
    with pytest.raises(ConfigError, match="--display needs an OpenCV with GUI support.*opencv-python-headless"):
        open_outputs(["display://0"])


# Folders and videos, through a real host.
def test_folders_and_videos_get_every_frame_of_every_stream(tiny_profile, tmp_path):
    uris = [str(tmp_path / "frames"), "file://{}/copy/".format(tmp_path), "file://{}/run.mp4?fps=10".format(tmp_path)]
    opened = open_outputs(uris)
    with running_host(tiny_profile, tmp_path, out_dir=opened.out_dir, outputs=opened.outputs) as host:
        send(host.address, [("cam0", seq, latents(seq)) for seq in range(5)])
        send(host.address, [("cam1", seq, latents(seq)) for seq in range(3)])
        wait_until(lambda: host.snapshot()["frames"] == 8)
    opened.close()  # finishes the videos
    for folder in ("frames", "copy"):
        assert sorted(os.listdir(tmp_path / folder / "cam0")) == ["{:06d}.png".format(i) for i in range(5)]
        assert len(os.listdir(tmp_path / folder / "cam1")) == 3
        assert host.out_dir == str(tmp_path / "frames")  # the first folder is the host's: the journal lives there
    assert count_video_frames(str(tmp_path / "run-cam0.mp4")) == (5, (TINY, TINY, 3))
    assert count_video_frames(str(tmp_path / "run-cam1.mp4")) == (3, (TINY, TINY, 3))
    capture = cv2.VideoCapture(str(tmp_path / "run-cam0.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    capture.release()


# The live view.
@pytest.fixture(scope="module")
def red_square_latents():
    """Latents of the default model (nano-504) for a blue frame with a red square in its middle: decoded, the
    square stays red (checked), so a screenshot can be searched for it."""
    from latentlink.edge.backends import open_backend
    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.profile import load_profile

    profile = load_profile("nano-504")
    image = np.zeros((504, 504, 3), np.uint8)
    image[:] = (200, 60, 0)  # BGR: blue
    image[126:378, 126:378] = (0, 0, 230)  # red
    encoder = open_backend(profile.model.encoder, "encoder").load()
    try:
        return encoder.infer(Preprocessor(504, 504)(image))[0].copy()
    finally:
        encoder.close()


def red_pixels(image):
    """How many pixels of a BGR image are clearly red."""
    return int(((image[:, :, 2] > 170) & (image[:, :, 1] < 80) & (image[:, :, 0] < 80)).sum())


@pytest.fixture
def view_host(tmp_path, red_square_latents):
    """A host with the default decoder and a live view, that decoded 2 frames of stream "cam0"."""
    from latentlink.host.view import LiveView

    view = LiveView("127.0.0.1", 0, title="test")
    view.open()
    with running_host("nano-504", tmp_path, outputs=[view]) as host:
        view.snapshot = host.snapshot
        host.add_record_listener(view.add_record)
        with socket.create_connection(host.address, timeout=30) as sock:
            for seq in range(2):
                sock.sendall(encode_frame("cam0", seq, time.time(), red_square_latents, "bits"))
            wait_until(lambda: host.snapshot()["frames"] == 2, timeout=60)
        yield view
    view.close()


def test_the_view_serves_mjpeg_stills_and_status(view_host):
    base = view_host.uri
    status = json.loads(get(base + "status.json"))
    (stream,) = status["streams"]
    assert (stream["name"], stream["seq"], stream["width"], stream["height"]) == ("cam0", 1, 504, 504)
    assert stream["decoded"] == 2 and stream["failed"] == 0 and status["host"]["frames"] == 2
    assert set(stream["stages"]) == {"receive", "deserialize", "decode", "write"}
    assert stream["latency_ms"] is not None
    still = cv2.imdecode(np.frombuffer(get(base + "stream/cam0.jpg"), np.uint8), cv2.IMREAD_COLOR)
    assert still.shape == (504, 504, 3) and red_pixels(still[200:300, 200:300]) > 9000

    # The MJPEG stream: multipart/x-mixed-replace, each part a whole JPEG with its length.
    with socket.create_connection(view_host.address, timeout=10) as sock:
        sock.sendall(b"GET /stream/cam0.mjpg HTTP/1.0\r\n\r\n")
        data = b""
        while data.count(b"--latentlink-frame\r\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, "the MJPEG stream ended"
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"Content-Type: multipart/x-mixed-replace; boundary=latentlink-frame" in head
    assert body.startswith(b"--latentlink-frame\r\n")
    part = body[len(b"--latentlink-frame\r\n"):]
    headers, _, rest = part.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", headers).group(1))
    assert b"Content-Type: image/jpeg" in headers
    assert rest[length:length + 22] == b"\r\n--latentlink-frame\r\n"
    frame = cv2.imdecode(np.frombuffer(rest[:length], np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == (504, 504, 3) and red_pixels(frame[200:300, 200:300]) > 9000


@pytest.mark.parametrize("path, code", [("/stream/cam9.jpg", 404), ("/stream/..%2F..%2Fetc.jpg", 404),
                                        ("/stream/cam0.png", 404), ("/nothing", 404)])
def test_the_view_answers_404_to_unknown_paths(view_host, path, code):
    with pytest.raises(urllib.error.HTTPError) as err:
        get(view_host.uri.rstrip("/") + path)
    assert err.value.code == code


def screenshot(url, folder, *flags):
    """A headless Chromium's screenshot of ``url`` (900x900, BGR)."""
    shot = str(folder / "view.png")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--user-data-dir=" + str(folder / "chromium"), "--screenshot=" + shot, "--window-size=900,900"]
    result = subprocess.run(command + list(flags) + [url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    image = cv2.imread(shot)
    assert image is not None and image.shape[:2] == (900, 900)
    return image


def shows_the_frame(image):
    """True when the page shows the decoded frame: its red square (252 px of the 504 px frame, shown at 504 px)
    and the blue around it."""
    blue = (image[:, :, 0] > 150) & (image[:, :, 2] < 80)
    return red_pixels(image) > 200 * 200 and blue.sum() > 50000


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install -y chromium)")


def test_the_view_keeps_a_bounded_number_of_streams_and_viewers():
    from latentlink.host.outputs import DecodedFrame
    from latentlink.host.view import LiveView

    view = LiveView("127.0.0.1", 0, max_streams=2, max_viewers=1)
    view.open()
    try:
        image = np.zeros((8, 8, 3), np.uint8)
        for name in ("a", "b", "c", "b"):  # "a" is the least recently active when "c" comes
            view.write(DecodedFrame(name, 0, image))
        assert [s["name"] for s in json.loads(get(view.uri + "status.json"))["streams"]] == ["b", "c"]

        def mjpeg_status():
            with socket.create_connection(view.address, timeout=10) as sock:
                sock.sendall(b"GET /stream/b.mjpg HTTP/1.0\r\n\r\n")
                return sock.recv(12)

        first = socket.create_connection(view.address, timeout=10)
        first.sendall(b"GET /stream/b.mjpg HTTP/1.0\r\n\r\n")
        assert first.recv(12) == b"HTTP/1.0 200"
        assert mjpeg_status() == b"HTTP/1.0 503"  # one viewer at most
        first.close()  # a viewer that leaves while the stream is silent frees its slot (the resent frame fails)
        wait_until(lambda: mjpeg_status() == b"HTTP/1.0 200")
    finally:
        view.close()


@needs_chromium
def test_the_view_shows_the_frame_in_a_real_browser(view_host, tmp_path):
    # Still mode (?still=1): JPEGs the page's script refreshes, a page that finishes loading.
    image = screenshot(view_host.uri + "?still=1", tmp_path, "--virtual-time-budget=5000")
    assert shows_the_frame(image)
    assert red_pixels(image[:120]) == 0  # the title and counts first, the frame below them


@needs_chromium
def test_the_view_plays_mjpeg_in_a_real_browser(view_host, tmp_path):
    # An MJPEG response never ends: headless Chromium takes its screenshot (virtual time) only while parts keep
    # coming, as the view makes them, resending the latest frame every second while no new one comes.
    image = screenshot(view_host.uri, tmp_path, "--virtual-time-budget=4000", "--timeout=6000")
    assert shows_the_frame(image)


# Metrics.
def metric_values(text):
    """{(sample name, frozenset of labels): value} of Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_exactly_what_the_host_did(tiny_profile, tmp_path):
    pytest.importorskip("prometheus_client")
    from latentlink.host.metrics import Metrics

    with running_host(tiny_profile, tmp_path) as host:
        metrics = Metrics(host.snapshot, "127.0.0.1", 0)
        host.add_record_listener(metrics.add_record)
        metrics.open()
        try:
            # cam0: frames 0, 1, 3, 4 (2 never sent: one dropped); cam1: a frame of the wrong shape (failed, and
            # its connection closed for it), then frame 1 on a new connection.
            send(host.address, [("cam0", seq, latents(seq)) for seq in (0, 1, 3, 4)])
            send(host.address, [("cam1", 0, np.ones((1, 8, 8, 8), np.float32))])
            wait_until(lambda: host.snapshot()["failed"] == 1)
            send(host.address, [("cam1", 1, latents(1))])
            wait_until(lambda: host.snapshot()["frames"] == 5)
            text = get("http://{}:{}/metrics".format(*metrics.address)).decode("utf-8")
        finally:
            metrics.close()
    values = metric_values(text)

    def value(name, **labels):
        return values[(name, frozenset(labels.items()))]

    assert value("latentlink_frames_decoded_total", stream="cam0") == 4
    assert value("latentlink_frames_decoded_total", stream="cam1") == 1
    assert value("latentlink_frames_dropped_total", stream="cam0") == 1
    assert value("latentlink_frames_dropped_total", stream="cam1") == 0
    assert value("latentlink_frames_failed_total", stream="cam1") == 1
    assert value("latentlink_frames_failed_total", stream="cam0") == 0
    assert value("latentlink_protocol_errors_total") == 1
    assert value("latentlink_queue_depth") == host.snapshot()["queue_depth"]
    for stage in ("receive", "deserialize", "decode", "write"):
        assert value("latentlink_stage_milliseconds_count", stage=stage) == 5
        assert value("latentlink_stage_milliseconds_bucket", stage=stage, le="+Inf") == 5
    assert value("latentlink_latency_milliseconds_count") == 5
    batches = {dict(labels)["size"]: v for (name, labels), v in values.items() if name == "latentlink_batches_total"}
    assert batches == {str(size): count for size, count in host.snapshot()["batches"].items()}
    assert all(name.startswith("latentlink_") for name, _ in values)


def test_two_hosts_have_separate_metrics(tiny_profile, tmp_path):
    pytest.importorskip("prometheus_client")
    from latentlink.host.metrics import Metrics

    with running_host(tiny_profile, tmp_path / "a") as one, running_host(tiny_profile, tmp_path / "b") as two:
        first, second = Metrics(one.snapshot), Metrics(two.snapshot)  # no clash in a process-wide registry
        send(one.address, [("cam0", 0, latents(0))])
        wait_until(lambda: one.snapshot()["frames"] == 1)
        first.add_record(one.test_records[0])
        assert metric_values(first.text())[("latentlink_frames_decoded_total", frozenset({("stream", "cam0")}))] == 1
        assert not any(name == "latentlink_frames_decoded_total" for name, _ in metric_values(second.text()))


# The command line, end to end.
def test_host_command_with_uris_view_and_metrics(tiny_profile, tmp_path):
    pytest.importorskip("prometheus_client")
    ready, log = str(tmp_path / "port.txt"), open(str(tmp_path / "host.log"), "w+")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "latentlink", "host", "--profile", tiny_profile, "--listen", "127.0.0.1:0",
               "--ready-file", ready, "--max-streams", "1", "--out", str(tmp_path / "frames"),
               "--out", "file://{}/clip.mp4?fps=5".format(tmp_path), "--view", "127.0.0.1:0",
               "--metrics", "127.0.0.1:0", "--quiet"]
    host = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: os.path.exists(ready) or host.poll() is not None, timeout=60)
        assert host.poll() is None, open(log.name).read()
        address = open(ready).read().strip().rsplit(":", 1)
        text = open(log.name).read()
        view = re.search(r"live view: (http://\S+/)", text).group(1)
        metrics = re.search(r"metrics: (http://\S+/metrics)", text).group(1)
        with socket.create_connection((address[0], int(address[1])), timeout=10) as sock:
            for seq in range(3):
                sock.sendall(encode_frame("cam0", seq, time.time(), latents(seq), "bits"))
            wait_until(lambda: json.loads(get(view + "status.json"))["host"]["frames"] == 3)
            values = metric_values(get(metrics).decode("utf-8"))
            assert values[("latentlink_frames_decoded_total", frozenset({("stream", "cam0")}))] == 3
            sock.sendall(encode_end_of_stream("cam0", 3))
            assert host.wait(60) == 0, open(log.name).read()
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        log.close()
    assert len(os.listdir(tmp_path / "frames" / "cam0")) == 3
    assert count_video_frames(str(tmp_path / "clip-cam0.mp4")) == (3, (TINY, TINY, 3))


@pytest.mark.parametrize("args, message", [
    (["--out", "rtp://1.2.3.4:5000"], "unknown output scheme rtp://"),
    (["--view", "127.0.0.1:99999"], "argument --view: got '127.0.0.1:99999'"),
    (["--out", "display://0"], "--display (--out display://0) needs a screen, and DISPLAY is not set"),
    (["--out", "f", "--out", "file://f/"], "--out f and --out file://f/ are the same output; give it once"),
])
def test_host_command_rejects_bad_outputs_before_loading_the_model(args, message, monkeypatch):
    from .conftest import run_cli

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = run_cli("latentlink", "host", *args, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
