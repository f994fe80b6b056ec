"""The PyTorch backend (edge and host): a checkpoint on the CPU here, on CUDA where a GPU exists."""

import os

import numpy as np
import pytest

from latentlink.edge.backends import open_backend
from latentlink.edge.errors import ConfigError
from latentlink.edge.profile import load_profile

torch = pytest.importorskip("torch")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")


def checkpoint_and_onnx(tiny_profile):
    profile = load_profile(tiny_profile)
    folder = os.path.dirname(os.path.dirname(profile.model.encoder))
    return os.path.join(folder, "tiny.pt"), profile


def test_cpu_backend_matches_onnxruntime(tiny_profile):
    ckpt, profile = checkpoint_and_onnx(tiny_profile)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with open_backend(ckpt, "encoder", input_size=(64, 64)) as enc, \
            open_backend(profile.model.encoder, "encoder") as ref:
        assert enc.name == "pytorch-cpu-fp32" and enc.info.packing == "bits"
        assert enc.info.latent_shape == (1, 8, 16, 16) and enc.input_shape == (1, 3, 64, 64)
        bits, timings = enc.infer(x)
        np.testing.assert_array_equal(bits, ref.infer(x)[0])
        assert set(timings) == {"run_ms", "copy_ms"}  # no CUDA events on the CPU
    with open_backend(ckpt, "decoder", input_size=(64, 64)) as dec, \
            open_backend(profile.model.decoder, "decoder") as ref:
        out, _ = dec.infer(bits)
        np.testing.assert_allclose(out, ref.infer(bits)[0], atol=1e-5)


def test_refusals_name_the_fix(tiny_profile):
    ckpt, _ = checkpoint_and_onnx(tiny_profile)
    with pytest.raises(ConfigError, match="fp16 needs --device cuda"):
        open_backend(ckpt, "encoder", input_size=(64, 64), precision="fp16")
    with pytest.raises(ConfigError, match="no fixed input size"):
        open_backend(ckpt, "encoder")
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        open_backend(ckpt, "encoder", input_size=(62, 64)).load()
    onnx = load_profile(tiny_profile).model.encoder
    with pytest.raises(ConfigError, match="runs in FP32 with ONNX Runtime"):
        open_backend(onnx, "encoder", precision="fp16")
    with pytest.raises(ConfigError, match="ONNX models run on the CPU here"):
        open_backend(onnx, "encoder", device="cuda")


def test_cuda_requested_without_a_gpu_is_a_clear_error(tiny_profile, monkeypatch):
    from latentlink.edge.errors import BackendError

    ckpt, _ = checkpoint_and_onnx(tiny_profile)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="sees no CUDA GPU.*--device cpu"):
        open_backend(ckpt, "encoder", input_size=(64, 64), device="cuda").load()


def test_edge_and_host_commands_take_a_checkpoint(tiny_profile, tmp_path):
    """latentlink host --decoder X.pt and latentlink edge --encoder X.pt, in one process each."""
    import threading

    from latentlink.edge.__main__ import main as edge_main
    from latentlink.host.__main__ import main as host_main

    ckpt, _ = checkpoint_and_onnx(tiny_profile)
    ready = tmp_path / "port.txt"
    result = {}
    host = threading.Thread(target=lambda: result.update(host=host_main([
        "--profile", tiny_profile, "--decoder", ckpt, "--listen", "127.0.0.1:0", "--ready-file", str(ready),
        "--max-streams", "1", "--out", str(tmp_path / "frames"), "--report", str(tmp_path / "host.json"), "--quiet"])))
    host.start()
    for _ in range(200):
        if ready.exists():
            break
        threading.Event().wait(0.05)
    assert edge_main(["--source", "synthetic://", "--profile", tiny_profile, "--encoder", ckpt, "--frames", "3",
                      "--connect", ready.read_text().strip(), "--drop", "block", "--quiet",
                      "--report", str(tmp_path / "edge.json")]) == 0
    host.join(30)
    assert result["host"] == 0 and len(list((tmp_path / "frames").rglob("*.png"))) == 3
    import json

    edge_report = json.loads((tmp_path / "edge.json").read_text())
    assert edge_report["meta"]["backend"] == "pytorch-cpu-fp32" and edge_report["frames"] == 3


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_backend_times_with_cuda_events(tiny_profile, precision):
    ckpt, profile = checkpoint_and_onnx(tiny_profile)
    x = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    with open_backend(ckpt, "encoder", input_size=(64, 64), device="cuda", precision=precision) as enc, \
            open_backend(profile.model.encoder, "encoder") as ref:
        bits, timings = enc.infer(x)
        assert set(timings) == {"run_ms", "copy_ms", "run_gpu_ms", "copy_gpu_ms"}
        assert all(v >= 0 for v in timings.values())
        flipped = np.mean(bits.astype(np.float32) != ref.infer(x)[0])
        assert flipped <= (1e-3 if precision == "fp32" else 2e-2)  # FP16 moves values that sit near a threshold
        assert bits.dtype == (np.float16 if precision == "fp16" else np.float32)
