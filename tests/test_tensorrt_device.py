"""The real TensorRT + pycuda path, on a machine that has them (a Jetson Nano with JetPack 4.6, or a GPU PC).

Skipped where TensorRT, pycuda or a CUDA device is missing (CI, most PCs). On a Nano:
    pip3 install pytest && python3 -m pytest -q tests/test_tensorrt_device.py
builds the shipped nano-504 encoder into an FP16 engine (minutes), checks it against ONNX Runtime (if installed),
runs it with and without mapped memory, and checks that CUDA events timed each frame.
"""

import os
import shutil

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt")
cuda = pytest.importorskip("pycuda.driver")

from latentlink.edge.backends import open_backend  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402


def _has_gpu():
    try:
        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _has_gpu(), reason="no CUDA device for pycuda")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from latentlink.export.engine import build_engine

    folder = tmp_path_factory.mktemp("engine")
    source = os.path.dirname(load_profile("nano-504").model.encoder)
    for name in ("encoder.onnx", "model.json"):
        shutil.copy(os.path.join(source, name), str(folder / name))
    return build_engine(str(folder / "encoder.onnx"), precision="fp16")


@pytest.mark.parametrize("mapped", [False, True], ids=["copies", "mapped"])
def test_fp16_engine_encodes_and_times_with_cuda_events(engine, mapped):
    x = np.random.RandomState(0).rand(1, 3, 504, 504).astype(np.float32)
    with open_backend(engine["engine"], "encoder", mapped=mapped) as encoder:
        for _ in range(3):
            bits, timings = encoder.infer(x)
        bits = bits.copy()  # the backend's page-locked buffer is freed with its context on close
        assert bits.shape == (1, 8, 126, 126) and set(np.unique(bits)) <= {0.0, 1.0}
        assert timings["run_gpu_ms"] > 0 and timings["copy_gpu_ms"] >= 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    with open_backend(os.path.join(os.path.dirname(engine["engine"]), "encoder.onnx"), "encoder") as reference:
        flipped = np.mean(bits != reference.infer(x)[0])
    assert flipped < 0.01, "FP16 should flip only bits whose activation sits near the threshold"
