import os
import shutil

import numpy as np
import pytest

from latentlink.edge.backends import open_backend, read_model_info
from latentlink.edge.errors import BackendError, ConfigError
from latentlink.edge.profile import load_profile


def test_onnxruntime_encoder_and_decoder(tiny_profile):
    profile = load_profile(tiny_profile)
    with open_backend(profile.model.encoder, "encoder") as enc, open_backend(profile.model.decoder, "decoder") as dec:
        assert enc.name == "onnxruntime" and enc.info.packing == "bits"
        x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
        latents, timings = enc.infer(x)
        assert latents.shape == (1, 8, 16, 16) and set(np.unique(latents)) <= {0.0, 1.0}
        assert timings["run_ms"] > 0 and timings["copy_ms"] >= 0
        image, _ = dec.infer(latents)
        assert image.shape == (1, 3, 64, 64)
        assert enc.copy_note  # says what gpu_to_cpu means on a CPU backend
    assert not enc.loaded


def test_wrong_shape_names_tensor_received_and_expected(tiny_profile):
    profile = load_profile(tiny_profile)
    with open_backend(profile.model.encoder, "encoder") as enc:
        with pytest.raises(BackendError, match=r"input 'image': got shape \(1, 3, 32, 32\), expected \(1, 3, 64, 64\)"):
            enc.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_infer_before_load(tiny_profile):
    backend = open_backend(load_profile(tiny_profile).model.encoder, "encoder")
    with pytest.raises(BackendError, match="not loaded"):
        backend.infer(np.zeros((1, 3, 64, 64), np.float32))


def test_missing_file_unknown_suffix_and_missing_sidecar(tmp_path, tiny_profile):
    with pytest.raises(BackendError, match="does not exist"):
        open_backend(str(tmp_path / "nope.onnx"), "encoder")
    unknown = tmp_path / "model.tflite"
    unknown.write_bytes(b"x")
    with pytest.raises(BackendError, match="no backend for .*model.tflite.*: latentlink runs .engine, .onnx"):
        open_backend(str(unknown), "encoder")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model.engine has no metadata \(model.engine.json"):
        open_backend(str(engine), "encoder")
    lonely = tmp_path / "encoder.onnx"
    shutil.copy(load_profile(tiny_profile).model.encoder, str(lonely))
    with pytest.raises(ConfigError, match="no metadata"):
        open_backend(str(lonely), "encoder")


def test_model_info_from_sidecar(tiny_profile):
    info = read_model_info(load_profile(tiny_profile).model.encoder)
    assert info.input_shape == (1, 3, 64, 64) and info.latent_shape == (1, 8, 16, 16)
    assert info.bits_per_pixel == 0.5 and os.path.basename(info.path) == "model.json"
