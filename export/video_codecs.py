"""H.264 and H.265 (x264, x265 through ffmpeg) on a clip's frames, for ``latentlink eval --video``.

A video codec is the fair comparison for the product's own use (a fixed camera sending a stream): it codes a frame
from the frames before it. Two configurations per codec:

- ``intra`` (all-intra): every frame a key frame (``keyint=1``), so no frame depends on another, like the model.
- ``lowdelay`` (low-delay): one key frame, then P-frames only (no B-frames, ``-tune zerolatency``: no look-ahead),
  so a frame can be sent as soon as it is coded, as the edge does.

The frames are the ones the model sees (fitted to the profile's input as the edge does), piped to ffmpeg as raw
BGR, coded as YUV 4:2:0 into a raw elementary stream (Annex B: no container around it), and decoded back to BGR by
ffmpeg. The rate is that stream's size in bytes, headers (SPS, PPS, the encoder's SEI) included, over all the
frames; the quality is measured by our own code on the decoded frames (``evaluate.image_metrics``), not taken from
ffmpeg's log. Single-threaded encoders: the same frames and settings give the same bytes.

The Jetson Nano's own encoder (NVENC, a hardware engine beside the GPU) is not run here: see the README.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from latentlink.edge.errors import ConfigError

VIDEO_CODECS = {"x264": ("libx264", "h264"), "x265": ("libx265", "hevc")}  # name -> (ffmpeg encoder, raw format)
CONFIGS = ("intra", "lowdelay")
CRF_RANGE = (0, 51)  # the quality scale of both encoders: lower is better
SWEEP_CRFS = (22, 27, 32, 37, 42, 47)
FPS = 25  # the frame rate written into the stream (vtest.avi's); CRF rate control does not depend on it
TIMEOUT_S = 900  # one ffmpeg run; a 30-frame 504x504 clip takes seconds


def ffmpeg_path():
    """The ffmpeg executable, or a ConfigError that says how to install it."""
    path = shutil.which("ffmpeg")
    if path is None:
        raise ConfigError("the video codecs x264 and x265 need ffmpeg (with libx264 and libx265), which is not on "
                          "PATH: apt-get install ffmpeg (Debian/Ubuntu), or leave x264,x265 out of --codecs")
    return path


def encoder_args(codec, config, crf, preset="medium"):
    """ffmpeg's output options for ``codec`` (x264, x265) in ``config`` (intra, lowdelay) at constant ``crf``."""
    if codec not in VIDEO_CODECS or config not in CONFIGS:
        raise ConfigError("unknown video codec {!r} / configuration {!r}: expected one of {} and one of {}".format(
            codec, config, ", ".join(VIDEO_CODECS), ", ".join(CONFIGS)))
    encoder, raw_format = VIDEO_CODECS[codec]
    args = ["-c:v", encoder, "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
    if codec == "x264":
        args += ["-threads", "1", "-bf", "0"]
        args += ["-g", "1"] if config == "intra" else ["-tune", "zerolatency", "-g", "100000"]
    else:
        params = ["log-level=error", "info=0", "pools=1", "frame-threads=1", "bframes=0"]  # info=0: no version SEI
        params += ["keyint=1", "min-keyint=1"] if config == "intra" else ["keyint=100000", "scenecut=0"]
        if config == "lowdelay":
            args += ["-tune", "zerolatency"]
        args += ["-x265-params", ":".join(params)]
    return args + ["-f", raw_format]


def encode_frames(frames, codec, config, crf, preset="medium", keep=None):
    """Code ``frames`` (BGR uint8, all one size, even sides) as one stream; decode it back.

    Returns ``(stream bytes, decoded frames)``: the size of the elementary stream ffmpeg wrote, and its frames as
    BGR uint8. ``keep``: a path to keep the stream at (``.h264`` / ``.hevc``), e.g. to check it with ffprobe.
    """
    frames = [np.ascontiguousarray(f) for f in frames]
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ConfigError("{}x{} frames: 4:2:0 video needs even sides; use a profile or --size with even sides".format(
            w, h))
    ffmpeg = ffmpeg_path()
    with tempfile.TemporaryDirectory(prefix="latentlink-video-") as tmp:
        stream = Path(keep) if keep else Path(tmp) / ("stream." + VIDEO_CODECS[codec][1])
        stream.parent.mkdir(parents=True, exist_ok=True)
        command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt",
                   "bgr24", "-s", "{}x{}".format(w, h), "-r", str(FPS), "-i", "-"]
        _run(command + encoder_args(codec, config, crf, preset) + [str(stream)], b"".join(f.tobytes() for f in frames))
        size = stream.stat().st_size
        raw = _run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(stream), "-f", "rawvideo",
                    "-pix_fmt", "bgr24", "-"], b"")
    decoded = np.frombuffer(raw, dtype=np.uint8)
    if decoded.size != len(frames) * h * w * 3:
        raise ConfigError("ffmpeg decoded {} bytes from the {} {} stream, expected {} frames of {}x{}".format(
            decoded.size, codec, config, len(frames), w, h))
    return size, list(decoded.reshape(len(frames), h, w, 3))


def _run(command, stdin):
    try:
        done = subprocess.run(command, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError("ffmpeg ran over {} s: {}".format(TIMEOUT_S, " ".join(command))) from None
    if done.returncode != 0:
        raise ConfigError("ffmpeg failed (exit {}): {}\n{}".format(done.returncode, " ".join(command),
                                                                   done.stderr.decode(errors="replace").strip()))
    return done.stdout


def measure(frames, codec, config, crf, metrics, preset="medium", keep=None):
    """One coded clip: bytes, bpp (over all frames), crf, and the mean of ``metrics(reference, decoded)`` per frame."""
    size, decoded = encode_frames(frames, codec, config, crf, preset, keep)
    h, w = frames[0].shape[:2]
    rows = [metrics(ref, out) for ref, out in zip(frames, decoded)]
    point = {"bytes": size, "bpp": 8.0 * size / (len(frames) * w * h), "ratio": 3.0 * len(frames) * w * h / size,
             "crf": crf, "frames": len(frames)}
    for key in rows[0]:
        point[key] = None if any(r[key] is None for r in rows) else float(np.mean([r[key] for r in rows]))
    point["per_frame_psnr"] = [r["psnr"] for r in rows]
    return point


def sweep(frames, codec, config, metrics, crfs=SWEEP_CRFS, preset="medium"):
    """The rate-distortion curve: :func:`measure` at each CRF, from the highest CRF (lowest rate) up."""
    return [measure(frames, codec, config, crf, metrics, preset) for crf in sorted(crfs, reverse=True)]


def at_budget(frames, codec, config, max_bytes, metrics, preset="medium"):
    """The best quality (lowest CRF) whose stream is at most ``max_bytes`` bytes, by binary search over CRF.

    Like the image codecs at the model's frame size, photo by photo, but over the whole clip: a video codec's
    rate control spends more on a key frame and less on the frames after it. Falls back to the highest CRF when
    even that is over the budget.
    """
    low, high = CRF_RANGE
    best = None
    while low <= high:  # the stream shrinks as CRF grows
        crf = (low + high) // 2
        size = encode_frames(frames, codec, config, crf, preset)[0]
        if size <= max_bytes:
            best, high = crf, crf - 1
        else:
            low = crf + 1
    return measure(frames, codec, config, CRF_RANGE[1] if best is None else best, metrics, preset)
