"""Where decoded frames go: the host's outputs (``latentlink host --out URI``, several allowed).

Every decoded frame becomes one :class:`DecodedFrame`; the host's write stage hands it to each of its outputs in
turn (``Output.write``). An output that cannot take a frame raises :class:`OutputError` (a ``LatentlinkError``): the
frame then counts as failed, its acknowledgement says "write error", and the host's log and summary say which output
and why. Outputs are opened once at start-up (``Output.open``: a bad URI, a file where a folder is needed or an
unwritable folder is a ``ConfigError`` with the fix, before any edge connects) and closed once at shutdown
(``Output.close``: finish videos, stop servers).

This module owns the interface and the URI schemes, parsed in one place (:func:`open_outputs`, which also opens
them; ``latentlink host`` closes them once the host has stopped):

- ``file://DIR/`` or a plain ``DIR``: PNGs, ``DIR/<stream>/<seq:06d>.png`` (:class:`FolderOutput`); the first
  folder is the host's ``out_dir``, which also holds the delivery journal;
- ``file://NAME.mp4``: one video per stream, ``NAME-<stream>.mp4`` beside it (:class:`VideoOutput`); ``?fps=N``
  sets its frame rate (default: the profile's capture fps);
- ``display://0``: a window per stream (needs a screen and an OpenCV with GUI support; ``--display`` is an alias).

The live view over HTTP (``--view``, :mod:`latentlink.host.view`) is an output too.
"""

import dataclasses
import logging
import os
import shutil
import stat
import threading
import urllib.parse
from typing import Optional

import cv2
import numpy as np

from latentlink.edge.cli import check_output_dir
from latentlink.edge.errors import ConfigError, LatentlinkError
from latentlink.edge.preprocess import to_image
from latentlink.edge.protocol import FIXED_HEADER

log = logging.getLogger("latentlink.host")
INDEX_RESERVE_BYTES = 1 << 20  # free disk kept for the videos' indexes (VideoOutput): 1 MiB + 32 bytes a frame


class OutputError(LatentlinkError):
    """An output could not take one frame (a disk full, a video writer that failed): that frame counts as failed."""


@dataclasses.dataclass
class DecodedFrame:
    """One decoded frame, as outputs and the Python API's ``Receiver`` see it.

    ``image``: HxWx3 uint8, **BGR** (OpenCV's order: ``cv2.imwrite`` takes it as is). ``latents``: the decoder's
    input as received (unpacked, float32, the decoder's shape). ``t_capture``: UNIX seconds on the edge's clock when
    the frame was captured (None for raw pickles). ``latency_ms``: capture to decoded, on the host's clock corrected
    by the edge's clock offset (None where unknown). ``timings``: this frame's host stages in ms (``receive``,
    ``deserialize``, ``decode``, ``write``, as far as measured when the output sees it), ``bytes``: its size on the
    wire, header included.
    """

    stream: str
    seq: int
    image: np.ndarray
    latents: Optional[np.ndarray] = None
    t_capture: Optional[float] = None
    latency_ms: Optional[float] = None
    timings: dict = dataclasses.field(default_factory=dict)
    bytes: int = 0


def decoded_frame(meta, output, latents, tiles, latency, timings):
    """The :class:`DecodedFrame` of a received frame (``meta``: its ``FrameMeta``) whose decoder gave ``output``
    (the host's and the fleet workers' write stage): a tiled model's tiles joined into one image, a lossless frame's
    ``output`` the image itself (and no latents). ``latency``: ms or None; ``timings``: its stages so far (ms)."""
    lossless = meta.packing == "lossless"
    image = output if lossless else to_image(output, tiles)
    return DecodedFrame(stream=meta.stream, seq=meta.seq, image=image, latents=None if lossless else latents,
                        t_capture=meta.t_capture, latency_ms=latency, timings=dict(timings),
                        bytes=FIXED_HEADER.size + meta.meta_len + meta.payload_len)


class Output:
    """The interface every output implements. ``write`` may be called from several threads at once for frames of
    different streams, never for two frames of one stream at once (the host keeps a stream's frames in order)."""

    uri = ""  # what the user wrote on the command line, for log lines

    def open(self):
        """Check and acquire what the output needs; raise ``ConfigError`` (naming the URI and the fix) if it cannot."""

    def write(self, frame: DecodedFrame):
        """Take one frame; raise :class:`OutputError` if it cannot."""
        raise NotImplementedError

    def close(self):
        """Flush and release; called once, after the last ``write``."""


class FolderOutput(Output):
    """``file://DIR/`` (or a plain ``DIR``): each frame as ``DIR/<stream>/<seq:06d>.png``, written through
    :class:`~latentlink.host.out_dir.OutDir` (no symlink inside ``DIR`` is ever followed; files appear whole)."""

    def __init__(self, out_dir):
        self.out = out_dir  # an OutDir, shared with the host's delivery journal
        self.uri = out_dir.path

    def write(self, frame):
        name = "{:06d}.png".format(frame.seq)
        try:
            encoded, png = cv2.imencode(".png", frame.image)
            if not encoded:
                raise OSError("cv2.imencode could not make a PNG of a {} image".format(frame.image.shape))
            self.out.write(frame.stream, name, png.tobytes())
        except (OSError, cv2.error) as exc:
            raise OutputError("cannot write {}: {}".format(self.out.where(frame.stream, name), exc))


class VideoOutput(Output):
    """``file://NAME.mp4``: one MPEG-4 video per stream, ``NAME-<stream>.mp4`` in NAME's folder (``out.mp4`` and
    stream ``cam0`` make ``out-cam0.mp4``), at ``fps`` frames per second, written by OpenCV's VideoWriter (fourcc
    ``mp4v``, which the headless OpenCV wheel writes without system codecs). A video's size is that of its stream's
    first frame. Each video is finished (playable) when the host stops; an existing file of that name is replaced.

    At most ``max_videos`` streams get a video (each open writer holds encoder buffers); frames of further streams
    fail with a log line that says so.

    OpenCV's writer says nothing when the disk is full: it drops the frame, and the video, whose index is written at
    the end, is left unplayable. So a frame is refused (:class:`OutputError`) while the videos' file system has less
    free than the frame raw plus :data:`INDEX_RESERVE_BYTES` plus 32 bytes per frame written (the indexes), which
    keeps room to finish every video.
    """

    def __init__(self, path, fps, uri=None, max_videos=64):
        self.path, self.fps, self.max_videos = path, float(fps), max_videos
        self.uri = uri or path
        self._writers = {}  # stream -> (cv2.VideoWriter, (width, height), path, lock held while it is in use)
        self._lock = threading.Lock()  # guards the dict; one stream's frames never come two at once (Output)
        self._closed = False
        self._written = 0  # frames in all videos: their indexes need room at close

    def video_path(self, stream):
        """The video of ``stream``: ``NAME-<stream>.mp4`` (stream names are single path components)."""
        root, ext = os.path.splitext(self.path)
        return "{}-{}{}".format(root, stream, ext)

    def open(self):
        check_video_path(self.uri, self.path)

    def write(self, frame):
        height, width = frame.image.shape[:2]
        self._check_room(frame)  # before a video starts too: no empty, unplayable file
        with self._lock:
            if self._closed:
                raise OutputError("{}: the video output is closed (the host is stopping)".format(self.uri))
            entry = self._writers.get(frame.stream)
            if entry is None:
                if len(self._writers) >= self.max_videos:
                    raise OutputError("{}: already {} videos, one per stream: stream {!r} gets none (give it a folder "
                                      "output, or fewer streams)".format(self.uri, self.max_videos, frame.stream))
                entry = self._writers[frame.stream] = self._start(frame.stream, (width, height))
        writer, size, path, busy = entry
        if (width, height) != size:
            raise OutputError("{}: frame {} of stream {!r} is {}x{}, and its video is {}x{}: a video keeps one "
                              "size".format(path, frame.seq, frame.stream, width, height, *size))
        with busy:  # close() releases the writer under this lock: never in the middle of a write (native code)
            if self._closed:
                raise OutputError("{}: the video output is closed (the host is stopping)".format(self.uri))
            try:
                writer.write(frame.image)
            except cv2.error as exc:
                raise OutputError("cannot write frame {} to {}: {}".format(frame.seq, path, exc))
        with self._lock:
            self._written += 1

    def _check_room(self, frame):
        path = self.video_path(frame.stream)
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError as exc:
            raise OutputError("cannot write frame {} to {}: {}".format(frame.seq, path, exc))
        needed = frame.image.nbytes + INDEX_RESERVE_BYTES + 32 * self._written
        if free < needed:
            raise OutputError("cannot write frame {} to {}: its disk has {} bytes free, under the {} this frame and "
                              "finishing the videos need; free some space".format(frame.seq, path, free, needed))

    def _start(self, stream, size):
        path = self.video_path(stream)
        try:  # never through a symlink someone else planted beside the videos
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise OutputError("cannot start the video {}: {}".format(path, exc))
        if mode is not None and not stat.S_ISREG(mode):
            raise OutputError("cannot start the video {}: it exists and is not a regular file (a symlink or a "
                              "folder); refusing to replace it".format(path))
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, size)
        if not writer.isOpened():
            raise OutputError("OpenCV could not start the video {} ({}x{}, mp4v, {} fps): is its folder writable, "
                              "and does this OpenCV have its video writer?".format(path, size[0], size[1], self.fps))
        log.info("stream %r: writing %s (%dx%d, %g fps)", stream, path, size[0], size[1], self.fps)
        return writer, size, path, threading.Lock()

    def close(self):
        with self._lock:
            self._closed = True
            writers, self._writers = list(self._writers.values()), {}
        for writer, _, _, busy in writers:  # a write still running (a host thread past its join) ends first
            with busy:
                writer.release()  # writes the MP4's index: the video is playable from here on


# URIs.
SCHEMES = "file://DIR/ (PNG frames), file://NAME.mp4 (one video per stream), display://0 (a window)"
VIDEO_EXTENSIONS = (".avi", ".mkv", ".mov", ".webm", ".h264", ".h265", ".m4v")  # refused: only .mp4 is written


@dataclasses.dataclass
class OutputSpec:
    """One parsed ``--out`` URI: ``kind`` "folder", "video" or "display"; ``path`` (folder or NAME.mp4);
    ``fps`` (videos; None: the caller's default)."""

    uri: str
    kind: str
    path: Optional[str] = None
    fps: Optional[float] = None


def parse_output(uri, option="--out"):
    """Parse one output URI (see the module's table); ConfigError naming the URI, the supported schemes and the
    fix. Checks the paths too: a file where a folder is needed, an unwritable folder, a video whose folder is
    missing."""
    text = uri.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:  # a plain path: a folder, or NAME.mp4 (with ?fps=N as file:// takes it)
        scheme, rest, query = "file", text, ""
        before, mark, after = text.partition("?")
        if mark and os.path.splitext(before)[1].lower() in (".mp4",) + VIDEO_EXTENSIONS:
            rest, query = before, after  # not a folder named "cam.mp4?fps=15"
    else:
        scheme = scheme.lower()
        rest, _, query = rest.partition("?")
    if scheme == "display":
        if rest.strip("/") not in ("", "0") or query:
            raise ConfigError("{} {}: only display://0 (this machine's screen, $DISPLAY) is supported; on a machine "
                              "without a screen, watch with --view HOST:PORT instead".format(option, uri))
        return OutputSpec(uri, "display")
    if scheme != "file":
        raise ConfigError("{} {}: unknown output scheme {}://; supported: {} (and a plain folder path); for a live "
                          "view in a browser, --view HOST:PORT".format(option, uri, scheme, SCHEMES))
    if not rest:
        raise ConfigError("{} {}: no path; e.g. file://frames/ or file://out.mp4".format(option, uri))
    path = os.path.expanduser(urllib.parse.unquote(rest) if sep else rest)
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if ext == ".mp4" and not path.endswith("/"):
        fps = None
        for key, values in params.items():
            if key != "fps":
                raise ConfigError("{} {}: unknown option {!r}; a video takes ?fps=N".format(option, uri, key))
            fps = _fps(option, uri, values[-1])
        check_video_path("{} {}".format(option, uri), path)
        return OutputSpec(uri, "video", path, fps)
    if ext in VIDEO_EXTENSIONS and not path.endswith("/"):
        raise ConfigError("{} {}: only .mp4 videos are written; use file://NAME.mp4, or file://DIR/ for "
                          "PNGs".format(option, uri))
    if params:
        raise ConfigError("{} {}: a folder takes no options (?{})".format(option, uri, query))
    check_output_dir(option, path)  # the messages name the option and the path, as before URIs
    return OutputSpec(uri, "folder", path)


def parse_outputs(uris, option="--out"):
    """:func:`parse_output` of each URI, and ConfigError if two name the same output."""
    specs = [parse_output(uri, option) for uri in uris]
    seen = {}
    for spec in specs:
        key = spec.kind if spec.kind == "display" else os.path.realpath(spec.path)
        if key in seen:
            raise ConfigError("{} {} and {} {} are the same output; give it once".format(
                option, seen[key], option, spec.uri))
        seen[key] = spec.uri
    return specs


def check_video_path(what, path):
    """ConfigError unless videos can be made beside ``path`` (NAME.mp4): its folder exists, is a folder and is
    writable, and ``path`` itself is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError("{}: {} is a folder; give a video file name, e.g. {}".format(
            what, path, os.path.join(path, "out.mp4")))
    if not os.path.isdir(folder):
        raise ConfigError("{}: the folder {} does not exist; create it first (mkdir -p {})".format(
            what, folder, folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("{}: this user may not write in {}; give a folder you can write".format(what, folder))


def _fps(option, uri, text):
    try:
        fps = float(text)
    except ValueError:
        fps = 0.0
    if not 0 < fps <= 240:
        raise ConfigError("{} {}: bad fps {!r}; a number of frames per second from 0 to 240, e.g. "
                          "?fps=15".format(option, uri, text))
    return fps


@dataclasses.dataclass
class OpenedOutputs:
    """What :func:`open_outputs` made of the URIs, for ``Host(out_dir=..., display=..., outputs=...)``:
    ``out_dir`` the first folder (PNGs and the delivery journal; None without a folder), ``display`` whether a
    window was asked for, ``outputs`` the other outputs, opened. :meth:`close` closes those (once)."""

    out_dir: Optional[str] = None
    display: bool = False
    outputs: list = dataclasses.field(default_factory=list)

    def close(self):
        outputs, self.outputs = self.outputs, []
        for output in outputs:
            try:
                output.close()
            except Exception as exc:  # one output failing to close must not keep the others open
                log.error("closing %s failed: %s", output.uri, exc)


def open_outputs(uris, fps=30.0, option="--out"):
    """Parse and open the outputs of ``uris`` (``--out`` values, in order); ``fps``: the videos' frame rate where
    their URI gives none (the profile's capture fps). Raises ConfigError (naming the URI and the fix) before
    anything is written: an unknown scheme, a file where a folder is needed, an unwritable folder, a video's missing
    folder, a URI given twice, a display that cannot open."""
    from .out_dir import OutDir

    specs = parse_outputs(uris, option)
    opened = OpenedOutputs()
    try:
        for spec in specs:
            if spec.kind == "display":
                check_display_available()
                opened.display = True
            elif spec.kind == "folder" and opened.out_dir is None:
                opened.out_dir = spec.path  # the host's own folder output: PNGs and the delivery journal
            else:
                output = (FolderOutput(OutDir(spec.path)) if spec.kind == "folder" else
                          VideoOutput(spec.path, spec.fps or fps, uri=spec.uri))
                output.open()
                opened.outputs.append(output)
    except BaseException:
        opened.close()
        raise
    return opened


def check_display_available():
    """ConfigError unless a window can open: a screen ($DISPLAY or $WAYLAND_DISPLAY on Linux) and an OpenCV with
    GUI support (the [host] extra's headless one has none)."""
    import sys

    from .server import check_display  # here: server imports this module

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ConfigError("--display (--out display://0) needs a screen, and DISPLAY is not set; save frames with "
                          "--out DIR, or watch them in a browser with --view HOST:PORT")
    check_display()
