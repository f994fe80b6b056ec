"""Shared fixtures: a tiny exported model with its profile, real photos, and a real video made from them.

The tiny model is a randomly initialised Lossy CAE at 64x64: every pipeline mechanism (packing, wire, decode,
PNG) is exercised without depending on the shipped weights, in well under a second per run.
"""

import contextlib
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
try:
    from hypothesis import settings
except ImportError:  # a Jetson running only tests/test_tensorrt_device.py need not install hypothesis
    settings = None
else:
    # Behaviour, not speed: no per-example deadline (CI machines are noisy and have 2 cores).
    settings.register_profile("latentlink", deadline=None)
    settings.load_profile("latentlink")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 64


@pytest.fixture(scope="session")
def tiny_profile(tmp_path_factory):
    """Path of a profile YAML whose encoder/decoder are a tiny Lossy CAE exported to ONNX at 64x64."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    save_checkpoint(folder / "tiny.pt", model)
    export_onnx(model, TINY, TINY, folder / "onnx", profile="tiny", checkpoint=folder / "tiny.pt")
    profile = folder / "tiny.yaml"
    profile.write_text(
        "name: tiny\nmodel:\n  encoder: onnx/encoder.onnx\n  decoder: onnx/decoder.onnx\n"
        "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n"
        "transport:\n  queue_size: 2\n  max_backoff_s: 0.5\n".format(TINY))
    return str(profile)


@pytest.fixture(scope="session")
def tiny_context_profile(tmp_path_factory, tiny_profile, photos_dir):
    """The tiny profile, copied, with entropy tables (``--entropy context``) fitted on the test photos."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-context") / "model"
    shutil.copytree(os.path.dirname(tiny_profile), str(folder))
    run = run_cli("latentlink.export", "entropy", "--checkpoint", str(folder / "tiny.pt"), "--photos", photos_dir,
                  "--out", str(folder / "onnx"))
    assert run.returncode == 0, run.stderr
    return str(folder / os.path.basename(tiny_profile))


@contextlib.contextmanager
def running_host(profile, tmp_path, **options):
    """A :class:`~latentlink.host.server.Host` with ``profile``'s decoder, serving a free loopback port from a thread,
    writing under ``tmp_path/frames``, with short timeouts (5 s idle, 2 s per frame) unless ``options`` say
    otherwise. Its ``test_records`` list gets each decoded frame's record (what a report writer would get)."""
    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile
    from latentlink.host.server import Host

    records = []
    options = dict(dict(out_dir=str(tmp_path / "frames"), idle_timeout_s=5, frame_timeout_s=2,
                        on_record=records.append), **options)
    decoder = open_backend(load_profile(profile).model.decoder, "decoder").load()
    server = Host(decoder, **options)
    server.test_records = records
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        decoder.close()


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory):
    """A folder of 4 real photos (scikit-image's samples), shrunk to about 160 px to keep tests fast."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        rgb = getattr(data, name)()
        small = cv2.resize(rgb, (rgb.shape[1] // 3, rgb.shape[0] // 3), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / (name + ".png")), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    return str(folder)


@pytest.fixture(scope="session")
def video_file(tmp_path_factory, photos_dir):
    """A real 24-frame video (MJPG in AVI) panning across a photo; returns its path."""
    frame = cv2.imread(os.path.join(photos_dir, "coffee.png"))
    path = str(tmp_path_factory.mktemp("video") / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 80))
    assert writer.isOpened()
    for i in range(24):
        writer.write(np.ascontiguousarray(frame[10 + i:90 + i, 20 + 2 * i:116 + 2 * i]))
    writer.release()
    return path


def run_cli(*args, timeout=120, **kwargs):
    """Run ``python -m <args>`` from the repository root; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m"] + list(args), cwd=kwargs.pop("cwd", ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
